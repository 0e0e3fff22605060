"""`mmsearch kb import`: bring an existing collection into a KB dir (the format DESIGN.md fixes), streaming.

Formats:
- `flashrag`: the retrieval corpus of Search-R1 (`wiki-18.jsonl`) and FlashRAG (`wiki18_100w.jsonl`), a JSON
  object a line: `{"id": "0", "contents": "\\"Aaron\\"\\nAaron is a prophet ..."}`. As FlashRAG reads it, the
  first line of `contents` is the title (we also strip the double quotes wiki-18 wraps it in) and the rest is the
  text. A record whose contents have no second line therefore has an empty text and is skipped. Writes
  `passages.jsonl`.
- `images`: a folder of images and a captions file, either JSONL (`file`, `caption`, optional `title`, `id`) or
  CSV with a header row naming the same columns. `file` is relative to the folder; the id defaults to it.
  Writes `images.jsonl` and the image files under `images/`, hard-linked where the KB dir is on the same
  filesystem (no extra disk for a large collection) and copied otherwise; the KB dir is self-contained either way.

Records are read and written one at a time, so a 21M-passage corpus is never held in memory. A bad record is
skipped with a reason and counted, never silently dropped; the counts are printed and kept in the KB dir's
`import_report.json` (one entry per file written). Output goes to `<file>.partial` and is renamed into place when
complete, so an interrupted import never leaves a file that looks whole.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from tools.kb import IMAGES_FILE, PASSAGES_FILE

REPORT_FILE = "import_report.json"
IMAGE_DIR = "images"


@dataclass
class ImportStats:
    """Records read, written, and skipped per reason (with the first few places each reason was seen)."""

    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples.setdefault(reason, [])) < 3:
            self.examples[reason].append(where)

    def as_dict(self) -> dict:
        return {"read": self.read, "written": self.written, "skipped_total": sum(self.skipped.values()),
                "skipped": {r: {"count": n, "examples": self.examples[r]} for r, n in self.skipped.most_common()}}


class SeenIds:
    """Which ids were already written, exactly, in little memory for the common case.

    Ids that continue a run of consecutive integers ("0", "1", "2", ... as in wiki-18) are stored as the run's two
    ends, so wiki-18's 21M ids cost nothing. Any other id is kept in a set: a corpus of 21M arbitrary string ids
    holds them all (about 2 GB); that is the price of an exact duplicate check in one pass.
    """

    def __init__(self) -> None:
        self._start: int | None = None
        self._end = 0  # one past the run's last id
        self._others: set[str] = set()

    def add(self, key: str) -> bool:
        """Record `key`; False if it was seen before."""
        if key in self._others:
            return False
        number = int(key) if key.isdigit() and (key == "0" or key[0] != "0") else None  # "007" is not 7
        if number is not None:
            if self._start is None:
                self._start, self._end = number, number + 1
                return True
            if self._start <= number < self._end:
                return False
            if number == self._end:
                self._end += 1
                return True
        self._others.add(key)
        return True


# -- flashrag ---------------------------------------------------------------------------------------


def split_contents(contents: str) -> tuple[str, str]:
    """FlashRAG's reading of `contents`: the first line is the title, the rest the text."""
    title, _, text = contents.partition("\n")
    title = title.strip()
    if len(title) >= 2 and title[0] == title[-1] == '"':
        title = title[1:-1]
    return title, text.strip()


def flashrag_passages(lines: Iterable[bytes | str], stats: ImportStats) -> Iterator[dict]:
    """KB passages from FlashRAG corpus lines, lazily: one line in, at most one passage out."""
    seen = SeenIds()
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue  # not a record (the KB reader ignores blank lines too)
        stats.read += 1
        where = f"line {line_no}"
        try:
            rec = json.loads(line)
        except ValueError as exc:  # bad JSON, or bytes that are not UTF-8
            stats.skip("not JSON", f"{where} ({exc})")
            continue
        if not isinstance(rec, dict):
            stats.skip("not a JSON object", where)
            continue
        raw_id = rec.get("id")
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
            stats.skip("no id", where)
            continue
        key = str(raw_id)
        contents = rec.get("contents")
        if not isinstance(contents, str) or not contents.strip():
            stats.skip("no contents", f"{where} (id {key})")
            continue
        title, text = split_contents(contents)
        if not text:
            stats.skip("empty text", f"{where} (id {key})")
            continue
        if not seen.add(key):
            stats.skip("duplicate id", f"{where} (id {key})")
            continue
        stats.written += 1
        yield {"id": key, "title": title, "text": text}


def import_flashrag(corpus: str | Path, out: str | Path, progress: bool = True) -> dict:
    corpus, out = Path(corpus), Path(out)
    stats, start = ImportStats(), time.perf_counter()
    # The bar counts bytes: the file's size is known, its line count is not (short of a pass over a multi-GB file).
    with corpus.open("rb") as src, tqdm(total=corpus.stat().st_size, unit="B", unit_scale=True,
                                         desc=f"import {corpus.name}", disable=not progress) as bar:
        lines = _with_progress(src, bar, stats, step=len)
        _write_jsonl(out / PASSAGES_FILE, flashrag_passages(lines, stats), stats, str(corpus))
    return _finish(out, PASSAGES_FILE, "flashrag", {"corpus": str(corpus)}, stats, start)


# -- images -----------------------------------------------------------------------------------------


def caption_rows(captions: Path) -> Iterator[tuple[str, dict | None]]:
    """(where, row) per record of a captions file; row is None for a line that is not a JSON object."""
    with captions.open(encoding="utf-8", newline="") as f:
        if captions.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            if "file" not in (reader.fieldnames or []):
                raise ValueError(f"{captions}: a captions CSV needs a header row naming its columns: file, "
                                 f"caption, and optionally title, id (got {reader.fieldnames})")
            for row in reader:
                yield f"row {reader.line_num}", row
            return
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            yield f"line {line_no}", row if isinstance(row, dict) else None


def image_decodes(path: Path) -> bool:
    """Whether the file is an image PIL reads to the last pixel (verify checks structure; load decodes)."""
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
    except Exception:  # noqa: BLE001 - any decoder failure (truncated, wrong format, bomb) means unusable
        return False
    return True


def image_records(images_dir: Path, rows: Iterable[tuple[str, dict | None]], out: Path,
                  stats: ImportStats) -> Iterator[dict]:
    """KB image records from caption rows, lazily; each image is checked and placed under `out/images/`."""
    root = images_dir.resolve()
    seen = SeenIds()
    for where, row in rows:
        stats.read += 1
        if row is None:
            stats.skip("not a JSON object", where)
            continue
        file, caption, title, given_id = (row.get(k) for k in ("file", "caption", "title", "id"))
        if not isinstance(file, str) or not file.strip():
            stats.skip("no file", where)
            continue
        if any(v is not None and not isinstance(v, (str, int)) for v in (caption, title, given_id)):
            stats.skip("caption, title or id is not text", f"{where} ({file})")
            continue
        src = (root / file).resolve()
        if not src.is_relative_to(root):
            stats.skip("file outside the images dir", f"{where} ({file})")
            continue
        if not src.is_file():
            stats.skip("image file not found", f"{where} ({file})")
            continue
        if not image_decodes(src):
            stats.skip("corrupt image", f"{where} ({file})")
            continue
        rel = src.relative_to(root).as_posix()
        key = str(given_id).strip() if given_id is not None and str(given_id).strip() else rel
        if not seen.add(key):
            stats.skip("duplicate id", f"{where} (id {key})")
            continue
        _place(src, out / IMAGE_DIR / rel)
        stats.written += 1
        yield {"id": key, "path": f"{IMAGE_DIR}/{rel}", "title": str(title or "").strip(),
               "text": str(caption or "").strip()}


def import_images(images_dir: str | Path, captions: str | Path, out: str | Path, progress: bool = True) -> dict:
    images_dir, captions, out = Path(images_dir), Path(captions), Path(out)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images dir not found: {images_dir}")
    stats, start = ImportStats(), time.perf_counter()
    with tqdm(desc=f"import {captions.name}", unit=" rows", disable=not progress) as bar:
        rows = _with_progress(caption_rows(captions), bar, stats, step=lambda _: 1)
        _write_jsonl(out / IMAGES_FILE, image_records(images_dir, rows, out, stats), stats, str(captions))
    return _finish(out, IMAGES_FILE, "images", {"images": str(images_dir), "captions": str(captions)}, stats, start)


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        if os.path.samefile(src, dst):
            return  # the images already live in the KB dir
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


# -- shared -----------------------------------------------------------------------------------------


def _with_progress(items: Iterable, bar: tqdm, stats: ImportStats, step: Callable[[object], int]) -> Iterator:
    """`items` unchanged, advancing the bar by `step(item)` and showing the counts so far."""
    for n, item in enumerate(items, 1):
        bar.update(step(item))
        if n % 1024 == 0:
            bar.set_postfix_str(f"written {stats.written:,}, skipped {sum(stats.skipped.values()):,}", refresh=False)
        yield item
    bar.set_postfix_str(f"written {stats.written:,}, skipped {sum(stats.skipped.values()):,}")


def _write_jsonl(path: Path, records: Iterable[dict], stats: ImportStats, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if stats.written == 0:
        partial.unlink()
        reasons = ", ".join(f"{r} {n}" for r, n in stats.skipped.most_common()) or "it has no records"
        raise ValueError(f"nothing to import from {source} ({stats.read} records read; skipped: {reasons})")
    partial.replace(path)


def _finish(out: Path, written_file: str, fmt: str, sources: dict, stats: ImportStats, start: float) -> dict:
    """Add this import's entry to the KB dir's import_report.json (a passages and an images import can share a dir)."""
    entry = {"format": fmt, **sources, "file": written_file, **stats.as_dict(),
             "seconds": round(time.perf_counter() - start, 3)}
    report_path = out / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report[written_file] = entry
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return entry
