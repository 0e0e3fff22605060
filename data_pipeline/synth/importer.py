"""`mmsearch synth import`: InfoSeek-style records to a dataset dir (DESIGN.md "Dataset dir").

A record is one JSON line: `data_id` (or `id`), `question`, answers under `answer` (a string or a
list) and/or `answer_eng`, the image as `image_id` (`<image_root>/<image_id>.jpg`, `.jpeg`, `.png`
and their upper-case forms) or `image_path` (relative to `image_root`), and optionally `entity_id`
(InfoSeek's Wikidata id) and `entity_text`. Every imported question is a one-hop, search-required
question about the pictured entity, without a gold trajectory.

A record that cannot be used (bad JSON, no id, question or answer, a missing or corrupt image, a
duplicate id) is skipped and counted by reason (DESIGN.md invariant 5); the counts go in the card.
Splits are disjoint by entity (invariant 7): each entity's split is a seeded hash of its key.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from PIL import Image

from data_pipeline.synth.config import ImportConfig, SplitConfig
from data_pipeline.synth.export import export_dataset
from mmsearch.eval.loaders import INFOSEEK_EXTS, LoadReport, SkipRecord, answer_strings, jsonl_records

log = logging.getLogger(__name__)


def run_import(cfg: ImportConfig) -> dict:
    """Import `cfg.records` into the dataset dir `cfg.out`; return {"counts", "skipped", "fingerprint"}."""
    files = _record_files(cfg.records)
    image_root = Path(cfg.image_root)
    if not cfg.image_root or not image_root.is_dir():
        raise FileNotFoundError(f"image_root {cfg.image_root!r} is not a directory (the images named by image_id)")
    _check_shares(cfg.splits)
    report = LoadReport(format="jsonl")
    rows = _read_rows(files, image_root, cfg, report)
    if report.skipped:
        log.warning("import: %s; first: %s", report, report.examples_of_skipped[:3])
    info = {
        "source": "InfoSeek-style records",
        "records": [str(f) for f in files],
        "image_root": str(image_root.resolve()),
        "seed": cfg.seed,
        "splits": {"validation": cfg.splits.validation, "test": cfg.splits.test},
        "records_read": report.loaded + report.n_skipped,
        "dropped": dict(sorted(report.skipped.items())),
    }
    result = export_dataset(Path(cfg.out), rows, info)
    return {"counts": result["counts"], "skipped": info["dropped"], "fingerprint": result["fingerprint"]}


def _record_files(records: str) -> list[Path]:
    files = [Path(p.strip()) for p in records.split(",") if p.strip()]
    if not files:
        raise ValueError("records: give one or more JSONL files, comma-separated")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"records file(s) not found: {', '.join(missing)}")
    return files


def _check_shares(splits: SplitConfig) -> None:
    shares = {"validation": splits.validation, "test": splits.test}
    if any(not 0 <= share <= 1 for share in shares.values()) or sum(shares.values()) > 1:
        raise ValueError(f"split shares must be in [0, 1] and sum to at most 1, got {shares}")


def _read_rows(files: list[Path], image_root: Path, cfg: ImportConfig, report: LoadReport) -> list[dict]:
    rows: list[dict] = []
    seen: set[str] = set()
    checked: dict[Path, str | None] = {}  # image file -> why it is unusable; InfoSeek reuses images across questions
    for file in files:
        for where, record in jsonl_records(file):
            try:
                if isinstance(record, SkipRecord):
                    raise record
                row = _row(record, file, image_root, checked, cfg)
                if row["id"] in seen:
                    raise SkipRecord("duplicate_id", f"id {row['id']!r} already imported")
            except SkipRecord as skip:
                report.skip(f"{file.name} {where}", skip.reason, skip.detail)
                continue
            seen.add(row["id"])
            rows.append(row)
    report.loaded = len(rows)
    return rows


def _row(record: dict, source: Path, image_root: Path, checked: dict[Path, str | None], cfg: ImportConfig) -> dict:
    record_id = record.get("data_id", record.get("id"))
    if record_id is None or str(record_id) == "":
        raise SkipRecord("missing_id", "no data_id or id")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise SkipRecord("missing_question", f"question is {question!r}")
    answers = list(dict.fromkeys(answer_strings(record.get("answer")) + answer_strings(record.get("answer_eng"))))
    if not answers:
        raise SkipRecord("missing_answers", "no answer or answer_eng strings")
    image = _image_file(record, image_root, checked)
    key = _entity_key(record)
    return {
        "id": str(record_id),
        "split": _split_of(key, cfg.seed, cfg.splits),
        "images": [str(image)],
        "question": question.strip(),
        "answers": answers,
        "kind": "infoseek",
        "hops": 1,
        "requires_search": True,
        "split_key": key,
        "messages": None,
        "meta": {"source": source.name, "entity_id": record.get("entity_id"),
                 "entity_text": record.get("entity_text"), "image_id": record.get("image_id")},
    }


def _image_file(record: dict, image_root: Path, checked: dict[Path, str | None]) -> Path:
    if record.get("image_path"):
        candidates = [image_root / str(record["image_path"])]
    elif record.get("image_id") not in (None, ""):
        candidates = [image_root / f"{record['image_id']}{ext}" for ext in INFOSEEK_EXTS]
    else:
        raise SkipRecord("missing_image", "no image_id or image_path")
    file = next((c.resolve() for c in candidates if c.is_file()), None)
    if file is None:
        raise SkipRecord("missing_image", f"{candidates[0].with_suffix('')}.* not found")
    if file not in checked:
        checked[file] = _image_problem(file)
    if checked[file] is not None:
        raise SkipRecord("corrupt_image", f"{file}: {checked[file]}")
    return file


def _image_problem(file: Path) -> str | None:
    """Why PIL cannot read the image, or None when it can."""
    # verify() checks the container (PNG checksums, say) without decoding; load() decodes the pixels,
    # which catches truncated JPEGs that verify() lets through. Training would hit either later.
    try:
        with Image.open(file) as image:
            image.verify()
        with Image.open(file) as image:
            image.load()
    except Exception as e:  # noqa: BLE001 - PIL raises UnidentifiedImageError, OSError, SyntaxError, ...; all mean unusable
        return f"{type(e).__name__}: {e}"
    return None


def _entity_key(record: dict) -> str:
    """The entity the record is about: its Wikidata id, else its name, else its image (one image, one split)."""
    for field in ("entity_id", "entity_text", "image_id"):
        value = record.get(field)
        if value is not None and str(value).strip():
            return str(value).strip()
    return str(record["image_path"]).strip()  # _image_file found the image by image_id or image_path


def _split_of(key: str, seed: int, splits: SplitConfig) -> str:
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64
    if draw < splits.test:
        return "test"
    if draw < splits.test + splits.validation:
        return "validation"
    return "train"
