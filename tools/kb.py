"""Reading a knowledge-base (KB) directory in the format DESIGN.md fixes.

A KB dir holds `passages.jsonl` (id, title, text, optional entity_id), `images.jsonl` (id, path
relative to the dir, title, text, optional entity_id), the image files, and optionally
`entities.jsonl` and `scenes.jsonl` for the data pipeline. Records are streamed, never loaded whole.
A malformed record is reported and skipped, with a count, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

PASSAGES_FILE = "passages.jsonl"
IMAGES_FILE = "images.jsonl"
ENTITIES_FILE = "entities.jsonl"
SCENES_FILE = "scenes.jsonl"


class KBError(ValueError):
    """The KB dir is missing or unusable as a whole."""


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    entity_id: str | None = None


@dataclass(frozen=True)
class ImageRecord:
    id: str
    path: str
    title: str
    text: str
    entity_id: str | None = None


@dataclass
class SkipReport:
    """What a pass over a KB file skipped and why: a count per reason, the first few lines of each
    (`mmsearch kb check` prints them), and the first few overall for the log message."""

    file: str
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, line_no: int, reason: str, detail: str = "") -> None:
        """`reason` is the category counted; `detail` (a path, a parser message) only goes into the examples."""
        self.skipped += 1
        self.counts[reason] += 1
        if len(self.reasons) < 5:
            self.reasons.append(f"line {line_no}: {reason}{detail}")
        if len(self.examples.setdefault(reason, [])) < 3:
            self.examples[reason].append(f"line {line_no}{detail}")

    def as_dict(self) -> dict:
        return {reason: {"count": n, "examples": self.examples[reason]} for reason, n in sorted(self.counts.items())}

    def log(self) -> None:
        if self.skipped:
            logger.warning("%s: skipped %d bad record(s): %s", self.file, self.skipped, "; ".join(self.reasons))


class KB:
    """A KB directory. Iteration streams records; `skips` counts what was rejected."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / PASSAGES_FILE).is_file() and not (self.root / IMAGES_FILE).is_file():
            raise KBError(f"{self.root} is not a KB dir: it has neither {PASSAGES_FILE} nor {IMAGES_FILE}")
        self.skips: dict[str, SkipReport] = {}

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def passages(self) -> Iterator[Passage]:
        for line_no, rec, report in self._records(PASSAGES_FILE):
            text, title = rec.get("text"), rec.get("title", "")
            if not isinstance(rec.get("id"), str) or not isinstance(text, str) or not text.strip():
                report.add(line_no, "needs a string 'id' and a non-empty string 'text'")
                continue
            yield Passage(rec["id"], str(title), text, _opt_str(rec.get("entity_id")))

    def images(self, check_files: bool = True) -> Iterator[ImageRecord]:
        for line_no, rec, report in self._records(IMAGES_FILE):
            if not isinstance(rec.get("id"), str) or not isinstance(rec.get("path"), str):
                report.add(line_no, "needs a string 'id' and a string 'path'")
                continue
            if check_files and not (self.root / rec["path"]).is_file():
                report.add(line_no, "image file not found", f": {rec['path']}")
                continue
            yield ImageRecord(
                rec["id"], rec["path"], str(rec.get("title", "")), str(rec.get("text", "")),
                _opt_str(rec.get("entity_id")),
            )

    def entities(self) -> Iterator[dict]:
        for _, rec, _ in self._records(ENTITIES_FILE):
            yield rec

    def scenes(self) -> Iterator[dict]:
        for _, rec, _ in self._records(SCENES_FILE):
            yield rec

    def image_path(self, record: ImageRecord) -> Path:
        return self.root / record.path

    def fingerprint(self) -> str:
        """A content hash of the KB's record files (not the image bytes: paths stand for them)."""
        digest = hashlib.sha256()
        for name in (PASSAGES_FILE, IMAGES_FILE):
            path = self.root / name
            if path.is_file():
                digest.update(name.encode())
                with path.open("rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
        return digest.hexdigest()[:16]

    def _records(self, name: str) -> Iterator[tuple[int, dict, SkipReport]]:
        path = self.root / name
        if not path.is_file():
            return
        report = self.skips.setdefault(name, SkipReport(name))
        report.skipped, report.reasons, report.counts, report.examples = 0, [], Counter(), {}
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    report.add(line_no, "not JSON", f" ({exc.msg})")
                    continue
                if not isinstance(rec, dict):
                    report.add(line_no, "not a JSON object")
                    continue
                yield line_no, rec, report
        report.log()


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
