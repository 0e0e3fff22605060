"""Evaluation sets from the formats people have, as `Example`s (DESIGN.md invariant 5).

`load_examples` reads, by what the path is:
- a dataset dir (`datasets.DatasetDict` or a single `Dataset` saved with `save_to_disk`, the
  data pipeline's output; DESIGN.md "Dataset dir");
- a `.jsonl` file whose records are, each recognised on its own:
  - generic: `question`, `answers` (list) or `answer` (str or list), `image` (path) or `images`
    (paths), optional `id`, `kind`, `hops`, `requires_search`; other keys go to `Example.meta`;
  - InfoSeek: `data_id`, `image_id`, `question`, `answer`, optional `answer_eval`, `data_split`;
    the image is `{image_root}/{image_id}` with one of `INFOSEEK_EXTS`;
  - MMSearch-R1 / FVQA (lmms-lab/FVQA, verl RL format): `prompt` (chat messages), `images`
    (`{"bytes", "path"}` structs), `reward_model` (`ground_truth`, `candidate_answers` as a JSON
    string), `data_source`, `data_id`, `category` (`search_required` / `search_free`);
  - FlashRAG QA (what Search-R1 trains and evaluates on): `id`, `question`, `golden_answers`
    (list), optional `metadata`; Search-R1's processed parquet keeps these columns and adds
    `data_source`, `prompt`, `reward_model`, ... (its prompt template is ignored: the protocol
    writes its own). Text-only unless the record has `image` / `images`. The dataset name goes to
    `Example.meta["dataset"]`: `data_source` where the record has one, else the file name's stem
    less a trailing split name (`nq-test.jsonl`, `nq_test.jsonl` -> "nq"), else, where the stem
    is only a split name, the file's folder (`nq/test.jsonl` -> "nq"). The example id is
    "{dataset}/{id}", because FlashRAG numbers every dataset's records alike ("test_0", ...) and a
    merged file or a directory of datasets would otherwise collide;
- a `.parquet` file of the same record shapes (image bytes decoded with PIL), or a directory of
  parquet files, of which those whose name contains `split` are read;
- a directory in FlashRAG's layout, one folder per dataset with `train/dev/test.jsonl`: the
  `{split}.jsonl` of every folder that has one, in folder-name order (a folder without it is
  named in a warning; FlashRAG ships some datasets with dev but no test split, which Search-R1
  evaluates on instead).

Text-only questions: an example may have no image. A FlashRAG record without an image field is
one; in the other formats the record must say so with an empty list (`"images": []`). A record
with no image field at all in those formats is still skipped as `missing_image` (except in a load
for a text-only policy, `text_only=True`): there the likeliest cause is an image key the loader
does not know, and evaluating a VQA set without its images would quietly measure something else.

A record that cannot become an example (bad JSON, no question, no answer, a missing or corrupt
image, a duplicate id) is skipped and counted by reason in the `LoadReport`; it never stops the
load. A path that does not exist or a format that is not recognised is an error.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmsearch.example import Example

log = logging.getLogger(__name__)

MAX_SKIPPED_EXAMPLES = 10
INFOSEEK_EXTS = (".jpg", ".JPEG", ".jpeg", ".JPG", ".png", ".PNG")
_GENERIC_KEYS = {"id", "question", "answers", "answer", "image", "images", "kind", "hops", "requires_search"}
_IMAGE_TAG = re.compile(r"<image>")
# a FlashRAG record's own fields, and Search-R1's copies of them (its prompt wraps the question in
# its template, its reward_model repeats golden_answers): none of these go to Example.meta
_FLASHRAG_KEYS = {"id", "question", "golden_answers", "image", "images", "prompt", "reward_model"}
_SPLIT_NAMES = ("train", "dev", "test", "val", "validation")
_SPLIT_SUFFIX = re.compile(r"[-_.](?:train|dev|test|val|validation)$", re.IGNORECASE)


@dataclass
class LoadReport:
    """What a load kept and what it skipped, by reason (never a silent drop)."""

    loaded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples_of_skipped: list[str] = field(default_factory=list)  # the first few, "where: reason: detail"
    format: str = ""  # dataset_dir | jsonl | parquet | flashrag_dir

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, where: str, reason: str, detail: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples_of_skipped) < MAX_SKIPPED_EXAMPLES:
            self.examples_of_skipped.append(f"{where}: {reason}: {detail}")

    def __str__(self) -> str:
        if not self.skipped:
            return f"loaded {self.loaded} examples ({self.format})"
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items()))
        return f"loaded {self.loaded} examples ({self.format}), skipped {self.n_skipped} ({reasons})"


class SkipRecord(Exception):
    """A record that cannot become an example; `reason` is the key it is counted under in a `LoadReport`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def load_examples(path: str, split: str = "test", limit: int | None = None,
                  image_root: str | None = None, text_only: bool = False) -> tuple[list[Example], LoadReport]:
    """The first `limit` examples that load (all if None) from `path`, in file order, and the report.

    `split` picks the split of a DatasetDict (or the parquet files of a directory); single files
    have no splits and ignore it. `image_root` resolves relative image paths (default: the file's
    directory) and is required for InfoSeek records, whose images are named by `image_id`.
    `text_only`: for a text-only policy. A record with no image field is a text question, and one with
    images is skipped as `has_image` (counted, like every skip).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no dataset at {path}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    fmt, rows, base = _open(root, split)
    report = LoadReport(format=fmt)
    ctx = _Context(base=Path(image_root) if image_root else base, image_root=image_root, stem=root.stem,
                   text_only=text_only)
    examples: list[Example] = []
    seen: set[str] = set()
    for index, (where, row, source) in enumerate(rows):
        if limit is not None and len(examples) >= limit:
            break
        try:
            if isinstance(row, SkipRecord):
                raise row
            example = _to_example(row, index, ctx, source)
            if text_only and example.images:
                raise SkipRecord("has_image", f"{len(example.images)} image(s), and the policy is text-only")
            if example.id in seen:
                raise SkipRecord("duplicate_id", f"id {example.id!r} already loaded")
        except SkipRecord as skip:
            report.skip(where, skip.reason, skip.detail)
            continue
        seen.add(example.id)
        examples.append(example)
    report.loaded = len(examples)
    if report.skipped:
        log.warning("%s: %s; first: %s", path, report, report.examples_of_skipped[:3])
    return examples, report


# --- sources: each yields (where, raw record dict | SkipRecord) in a fixed order ----------------------
# `_open` tags every record with the file it came from (FlashRAG records take their dataset name from it).

def _open(root: Path, split: str) -> tuple[str, Iterator[tuple[str, Any, Path]], Path]:
    if root.is_dir():
        if (root / "dataset_dict.json").exists() or (root / "state.json").exists():
            return "dataset_dir", _from(root, _dataset_rows(root, split)), root
        parquets = sorted(root.glob("*.parquet"))
        if parquets:
            chosen = [p for p in parquets if split in p.stem]
            if not chosen:
                raise ValueError(f"split {split!r} not found in {root}: no parquet file name contains it "
                                 f"(files: {', '.join(p.name for p in parquets)})")
            return "parquet", (r for p in chosen for r in _from(p, _parquet_rows(p))), root
        folders = sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob("*.jsonl")))
        if folders:
            return "flashrag_dir", _flashrag_dir_rows(root, folders, split), root
        raise ValueError(f"{root} is a directory but neither a saved datasets Dataset/DatasetDict "
                         "(dataset_dict.json / state.json), a directory of .parquet files, nor FlashRAG's "
                         "layout (one folder of .jsonl files per dataset)")
    suffix = root.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl", _from(root, jsonl_records(root)), root.parent
    if suffix == ".parquet":
        return "parquet", _from(root, _parquet_rows(root)), root.parent
    raise ValueError(f"unrecognised dataset format {root.name!r}: expected a dataset dir, .jsonl or .parquet")


def _from(source: Path, rows: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any, Path]]:
    for where, row in rows:
        yield where, row, source


def _flashrag_dir_rows(root: Path, folders: list[Path], split: str) -> Iterator[tuple[str, Any, Path]]:
    """`{folder}/{split}.jsonl` of each dataset folder; raises before the first row if none has the split."""
    files = [d / f"{split}.jsonl" for d in folders if (d / f"{split}.jsonl").is_file()]
    if not files:
        raise ValueError(f"split {split!r} not found in {root}: no dataset folder has {split}.jsonl "
                         f"(folders: {', '.join(d.name for d in folders)})")
    missing = [d.name for d in folders if not (d / f"{split}.jsonl").is_file()]
    if missing:
        log.warning("%s: no %s.jsonl in %s; those datasets are not loaded", root, split, ", ".join(missing))

    def rows() -> Iterator[tuple[str, Any, Path]]:
        for file in files:
            for where, row in jsonl_records(file):
                yield f"{file.parent.name}/{file.name} {where}", row, file

    return rows()


def _dataset_rows(root: Path, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"split {split!r} not in {root}; available splits: {', '.join(sorted(loaded))}")
        ds = loaded[split]
    else:
        ds = loaded
    # Rows come as raw Arrow structs ({"bytes", "path"} for images) so a corrupt image is our skip
    # with a reason, not an exception inside datasets' decoder.
    index = 0
    for batch in ds.with_format("arrow").iter(batch_size=256):
        for row in batch.to_pylist():
            yield f"row {index}", row
            index += 1


def jsonl_records(file: Path) -> Iterator[tuple[str, Any]]:
    """("line N", the record dict or a `SkipRecord` saying why the line is not one) for each non-blank line."""
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, SkipRecord("malformed_json", str(e))
                continue
            yield where, row if isinstance(row, dict) else SkipRecord("malformed_record",
                                                                      f"not a JSON object: {type(row).__name__}")


def _parquet_rows(file: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise ValueError(f"{file} is not a readable parquet file: {e}") from e
    index = 0
    for batch in parquet.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield f"{file.name} row {index}", row
            index += 1


# --- records -> examples -------------------------------------------------------------------------------

@dataclass
class _Context:
    base: Path  # relative image paths resolve against this
    image_root: str | None
    stem: str  # default ids: "{stem}-{index}"
    text_only: bool = False  # a text-only policy's load: no image field means no image


def _to_example(row: dict, index: int, ctx: _Context, source: Path) -> Example:
    # FlashRAG first: Search-R1's parquet also has `prompt` and `reward_model`, which would read as MMSearch-R1.
    if "golden_answers" in row:
        return _flashrag(row, index, ctx, source)
    if "image_id" in row and "data_id" in row and "image" not in row and "images" not in row:
        return _infoseek(row, ctx)
    if "reward_model" in row or ("prompt" in row and "question" not in row):
        return _mmsearch_r1(row, index, ctx)
    return _generic(row, index, ctx)


def _generic(row: dict, index: int, ctx: _Context) -> Example:
    question = _question(row.get("question"))
    answers = _answers(row["answers"] if row.get("answers") is not None else row.get("answer"))
    images = _images(row.get("images") if row.get("images") is not None else row.get("image"), ctx)
    meta = {k: v for k, v in row.items() if k not in _GENERIC_KEYS}
    return Example(id=_id(row.get("id"), index, ctx), question=question, images=images, answers=answers,
                   kind=_kind(row.get("kind")), hops=_hops(row.get("hops")),
                   requires_search=_requires_search(row.get("requires_search")), meta=meta)


def _infoseek(row: dict, ctx: _Context) -> Example:
    if ctx.image_root is None:
        raise ValueError("InfoSeek records name images by image_id: pass image_root (the directory of the images)")
    question = _question(row.get("question"))
    answers = answer_strings(row.get("answer"))
    evals = row.get("answer_eval")
    evals = [evals] if isinstance(evals, dict) else (evals or [])
    numeric = [e for e in evals if isinstance(e, dict)]
    answers += answer_strings([e for e in evals if not isinstance(e, dict)])
    # Numeric InfoSeek answers carry a tolerance range; the range goes to meta for range-aware scoring,
    # and the Wikidata value becomes a string answer so exact-match scoring still has a target.
    answers += [_number(e["wikidata"]) for e in numeric if isinstance(e.get("wikidata"), (int, float))]
    answers = _dedupe(answers)
    if not answers:
        raise SkipRecord("missing_answers", "no answer or answer_eval strings")
    image_id = str(row["image_id"])
    for ext in INFOSEEK_EXTS:
        file = Path(ctx.image_root) / f"{image_id}{ext}"
        if file.exists():
            break
    else:
        raise SkipRecord("missing_image", f"no {image_id}.jpg/.JPEG/.png under {ctx.image_root}")
    meta = {k: v for k, v in row.items() if k not in {"data_id", "question", "answer", "answer_eval"}}
    if numeric:
        meta["numeric_answers"] = numeric
    return Example(id=str(row["data_id"]), question=question, images=[_open_image(file)], answers=answers, meta=meta)


def _mmsearch_r1(row: dict, index: int, ctx: _Context) -> Example:
    question = _question(row["question"] if row.get("question") is not None else _prompt_question(row.get("prompt")))
    reward = row.get("reward_model") or {}
    if not isinstance(reward, dict):
        raise SkipRecord("malformed_record", "reward_model is not an object")
    answers = answer_strings(reward.get("ground_truth"))
    candidates = reward.get("candidate_answers")
    if isinstance(candidates, str):  # FVQA stores the list as a JSON string
        try:
            candidates = json.loads(candidates)
        except json.JSONDecodeError:
            candidates = [candidates]
    answers += answer_strings(candidates)
    answers += answer_strings(row.get("answers") if row.get("answers") is not None else row.get("answer"))
    answers = _dedupe(answers)
    if not answers:
        raise SkipRecord("missing_answers", "no reward_model.ground_truth, candidate_answers or answer")
    images = _images(row.get("images") if row.get("images") is not None else row.get("image"), ctx)
    category = row.get("category") or (row.get("extra_info") or {}).get("category")
    requires_search = {"search_required": True, "search_free": False}.get(category)
    meta = {k: v for k, v in row.items() if k not in {"prompt", "images", "image", "reward_model", "question",
                                                      "answer", "answers", "data_id", "id"}}
    return Example(id=_id(row.get("data_id", row.get("id")), index, ctx), question=question, images=images,
                   answers=answers, kind=_kind(row.get("kind")), hops=_hops(row.get("hops")),
                   requires_search=requires_search, meta=meta)


def _flashrag(row: dict, index: int, ctx: _Context, source: Path) -> Example:
    question = _question(row.get("question"))
    answers = _answers(row.get("golden_answers"))
    image = row.get("images") if row.get("images") is not None else row.get("image")
    images = [] if image is None else _images(image, ctx)  # FlashRAG's QA sets are text-only
    dataset = dataset_name(row.get("data_source"), source)
    meta = {k: v for k, v in row.items() if k not in _FLASHRAG_KEYS} | {"dataset": dataset}
    return Example(id=f"{dataset}/{_id(row.get('id'), index, ctx)}", question=question, images=images,
                   answers=answers, meta=meta)


def dataset_name(data_source: Any, source: Path) -> str:
    """A FlashRAG record's dataset: its `data_source`, else named by its file (see the module docstring)."""
    if isinstance(data_source, str) and data_source.strip():
        return data_source.strip()
    stem = source.stem
    if stem.lower() in _SPLIT_NAMES:  # FlashRAG's own layout: {dataset}/{split}.jsonl
        return source.resolve().parent.name
    return _SPLIT_SUFFIX.sub("", stem) or stem


def _prompt_question(prompt: Any) -> str | None:
    """The first user message's text of a chat-format prompt, its <image> placeholders removed."""
    if not isinstance(prompt, list):
        return prompt if isinstance(prompt, str) else None
    for message in prompt:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
            return _IMAGE_TAG.sub("", content).strip() if isinstance(content, str) else None
    return None


# --- fields ------------------------------------------------------------------------------------------

def _question(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SkipRecord("missing_question", f"question is {value!r}")
    return value.strip()


def _answers(value: Any) -> list[str]:
    answers = _dedupe(answer_strings(value))
    if not answers:
        raise SkipRecord("missing_answers", f"answers is {value!r}")
    return answers


def answer_strings(value: Any) -> list[str]:
    """The non-empty answers in a string, a number or a list of them; `SkipRecord` for any other value."""
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise SkipRecord("malformed_record", f"answer {v!r} is not a string or number")
        text = v.strip() if isinstance(v, str) else _number(v)
        if text:
            out.append(text)
    return out


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _id(value: Any, index: int, ctx: _Context) -> str:
    return str(value) if value is not None and str(value) != "" else f"{ctx.stem}-{index}"


def _kind(value: Any) -> str:
    return "" if value is None else str(value)


def _hops(value: Any) -> int:
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int):
        raise SkipRecord("malformed_record", f"hops {value!r} is not an integer")
    return value


def _requires_search(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise SkipRecord("malformed_record", f"requires_search {value!r} is not a boolean")


def _images(value: Any, ctx: _Context) -> list[Image.Image]:
    if value is None and ctx.text_only:
        return []
    if value is None:
        raise SkipRecord("missing_image", "no image or images")
    if isinstance(value, list) and not value:  # the record says it has no image: a text-only question
        return []
    values = value if isinstance(value, list) else [value]
    return [_image(v, ctx) for v in values]


def _image(value: Any, ctx: _Context) -> Image.Image:
    """An image from a path, raw bytes, a base64 data URI, or a datasets/parquet {"bytes", "path"} struct."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return _image(value["bytes"], ctx)
        if value.get("path"):
            return _image(str(value["path"]), ctx)
        raise SkipRecord("missing_image", "image struct has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        return _decode(bytes(value), "image bytes")
    if isinstance(value, str) and value:
        if value.startswith("data:image/"):
            try:
                return _decode(base64.b64decode(value.split(",", 1)[1], validate=True), "data URI")
            except (binascii.Error, IndexError) as e:
                raise SkipRecord("corrupt_image", f"bad base64 data URI: {e}") from e
        file = Path(value)
        file = file if file.is_absolute() else ctx.base / file
        if not file.is_file():
            raise SkipRecord("missing_image", f"{file} does not exist")
        return _open_image(file)
    raise SkipRecord("malformed_record", f"image value of type {type(value).__name__}")


def _open_image(file: Path) -> Image.Image:
    try:
        data = file.read_bytes()
    except OSError as e:
        raise SkipRecord("missing_image", f"{file}: {e}") from e
    return _decode(data, str(file))


def _decode(data: bytes, what: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad data
        raise SkipRecord("corrupt_image", f"{what}: {type(e).__name__}: {e}") from e

