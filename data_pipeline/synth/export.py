"""Work rows (records.py) to the dataset dir (DESIGN.md "Dataset dir").

`export_dataset` writes, into `out` (next to the run's own `work/`, which it never touches):
- the `datasets.DatasetDict` (train/validation/test, every split present even when empty) with
  image bytes embedded, so the dir is portable;
- `parquet/{split}.parquet` with the same columns, for tools that read parquet;
- `card.md`, a human-readable card: how the set was made, counts, histograms, filter and drop reports;
- `synth_info.json`: the run's `info` plus the fingerprint and the counts;
- with `sharegpt`, `sharegpt/`: LLaMA-Factory's multimodal ShareGPT format (`dataset_info.json`,
  `{split}.json`, `images/`).

The fingerprint is a content hash (image bytes, not paths), so the same rows exported anywhere have
the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from data_pipeline.synth.records import ROW_FIELDS, SPLITS, FileHashes

log = logging.getLogger(__name__)

FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "images": datasets.Sequence(datasets.Image()),
    "question": datasets.Value("string"),
    "answers": datasets.Sequence(datasets.Value("string")),
    "kind": datasets.Value("string"),
    "hops": datasets.Value("int32"),
    "requires_search": datasets.Value("bool"),
    "split_key": datasets.Value("string"),
    "messages": datasets.Value("string"),  # JSON of the message list; "" when there is no trajectory
    "meta": datasets.Value("string"),  # JSON
})
# What a previous export wrote; cleared first so a re-export leaves no stale shard or image behind.
_OUTPUTS = (*SPLITS, "dataset_dict.json", "parquet", "sharegpt", "card.md", "synth_info.json")
_SHAREGPT_ROLES = {"user": "user", "assistant": "assistant", "tool": "observation"}
_SHAREGPT_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                  "observation_tag": "observation", "system_tag": "system"}
_BAR_WIDTH = 30


def export_dataset(out: Path, rows: list[dict], info: dict, sharegpt: bool = False,
                   hashes: FileHashes | None = None) -> dict:
    """Write the dataset dir for `rows` into `out`; return {"counts", "fingerprint"[, "sharegpt_skipped"]}.

    Rows keep their order within each split. `info` is how the set was made; the card renders
    `seed`, `kb`, `n_requested`, `trajectories`, `config` (YAML text or a dict) and any other scalar
    or list as settings, and every dict under it (`vision`, `mix`, `filters`, `dropped`, `kb_report`, ...)
    as a table of its own. `hashes`: a cache the caller already filled (synthesis hashes images for dedup).
    """
    out = Path(out)
    by_split = _group_by_split(rows)
    hashes = hashes or FileHashes()
    digest = _fingerprint(rows, hashes)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out)
    _write_datasets(out, by_split)
    result: dict[str, Any] = {"counts": {split: len(by_split[split]) for split in SPLITS}, "fingerprint": digest}
    if sharegpt:
        result["sharegpt_skipped"] = _write_sharegpt(out / "sharegpt", by_split, hashes)
    full_info = {**info, **result}
    (out / "synth_info.json").write_text(json.dumps(full_info, indent=2, ensure_ascii=False, default=str) + "\n",
                                         encoding="utf-8")
    (out / "card.md").write_text(_render_card(out.name, by_split, full_info), encoding="utf-8")
    return result


def fingerprint(rows: list[dict]) -> str:
    """sha256 over every row (split included) in order, with images as the sha256 of their bytes."""
    return _fingerprint(rows, FileHashes())


# --- rows ----------------------------------------------------------------------------------------------

def _group_by_split(rows: list[dict]) -> dict[str, list[dict]]:
    by_split: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for index, row in enumerate(rows):
        missing = [name for name in ("split", *ROW_FIELDS) if name not in row]
        if missing:
            raise ValueError(f"row {index} ({row.get('id', 'no id')}): missing fields {', '.join(missing)}")
        if row["split"] not in by_split:
            raise ValueError(f"row {row['id']}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
        for path in row["images"]:
            if not Path(path).is_file():
                raise FileNotFoundError(f"row {row['id']}: image {path} does not exist")
        by_split[row["split"]].append(row)
    return by_split


def _fingerprint(rows: list[dict], hashes: FileHashes) -> str:
    digest = hashlib.sha256()
    for row in rows:
        fields = [row["split"], *(_canonical(name, row[name], hashes) for name in ROW_FIELDS)]
        digest.update(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _canonical(name: str, value: Any, hashes: FileHashes) -> Any:
    """The field as hashed: image paths become content hashes so the out dir's location does not count."""
    if name == "images":
        return [hashes.of(path) for path in value]
    if name == "meta" and value.get("tool_images"):
        return {**value, "tool_images": [hashes.of(p) if Path(p).is_file() else p for p in value["tool_images"]]}
    return value


# --- the DatasetDict and parquet -----------------------------------------------------------------------

def _clear_previous(out: Path) -> None:
    for name in _OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _write_datasets(out: Path, by_split: dict[str, list[dict]]) -> None:
    # The generator builder spills rows to Arrow files as it goes, so image bytes never all sit in
    # memory; its cache lives inside `out` (same disk as the result) and goes when the export is done.
    cache = Path(tempfile.mkdtemp(prefix=".export-cache-", dir=out))
    try:
        splits = datasets.DatasetDict({split: _split_dataset(by_split[split], cache) for split in SPLITS})
        # An empty split must be saved as one empty shard: by default datasets writes zero shards
        # for it, which load_from_disk then cannot read (datasets 5.2).
        splits.save_to_disk(str(out), num_shards={split: 1 for split in SPLITS if not by_split[split]})
        (out / "parquet").mkdir()
        for split, dataset in splits.items():
            dataset.to_parquet(str(out / "parquet" / f"{split}.parquet"))
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _split_dataset(rows: list[dict], cache: Path) -> datasets.Dataset:
    if not rows:  # the generator builder refuses a split with no examples
        return datasets.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)
    # The cache dir is fresh per export, so naming the split is enough to keep splits apart; without a
    # fingerprint, datasets hashes every row through dill first (a third of export time).
    return datasets.Dataset.from_generator(_dataset_rows, features=FEATURES, gen_kwargs={"rows": rows},
                                           cache_dir=str(cache), fingerprint=f"mmsearch-export-{rows[0]['split']}")


def _dataset_rows(rows: list[dict]) -> Iterator[dict]:
    for row in rows:
        yield {
            "id": row["id"],
            "images": [{"bytes": Path(p).read_bytes(), "path": Path(p).name} for p in row["images"]],
            "question": row["question"],
            "answers": list(row["answers"]),
            "kind": row["kind"],
            "hops": row["hops"],
            "requires_search": row["requires_search"],
            "split_key": row["split_key"],
            "messages": "" if row["messages"] is None else json.dumps(row["messages"], ensure_ascii=False),
            "meta": json.dumps(row["meta"], ensure_ascii=False),
        }


# --- LLaMA-Factory ShareGPT ----------------------------------------------------------------------------

def _write_sharegpt(root: Path, by_split: dict[str, list[dict]], hashes: FileHashes) -> int:
    """Write `root`/{split}.json, images/ and dataset_info.json; return how many rows were skipped."""
    (root / "images").mkdir(parents=True)
    skipped: list[str] = []
    for split in SPLITS:
        examples = []
        for row in by_split[split]:
            example = _sharegpt_example(row, root, hashes)
            if example is None:
                skipped.append(row["id"])
            else:
                examples.append(example)
        (root / f"{split}.json").write_text(json.dumps(examples, ensure_ascii=False, indent=1), encoding="utf-8")
    if skipped:
        log.warning("ShareGPT export skipped %d rows whose tool images are not in meta.tool_images (first: %s)",
                    len(skipped), ", ".join(skipped[:5]))
    dataset_info = {
        f"mmsearch_{split}": {
            "file_name": f"{split}.json",
            "formatting": "sharegpt",
            # "system" too: LLaMA-Factory reads an example's system prompt only from a named column.
            "columns": {"messages": "messages", "images": "images", "system": "system"},
            "tags": _SHAREGPT_TAGS,
        }
        for split in SPLITS
    }
    (root / "dataset_info.json").write_text(json.dumps(dataset_info, indent=2) + "\n", encoding="utf-8")
    return len(skipped)


def _sharegpt_example(row: dict, root: Path, hashes: FileHashes) -> dict | None:
    """One conversation with an `<image>` token where each image is, or None when a tool image is missing."""
    order: list[int] = []  # image numbers, in the order of their <image> tokens
    system = ""
    if row["messages"] is None:
        order = list(range(len(row["images"])))
        messages = [{"role": "user", "content": "<image>" * len(order) + row["question"]},
                    {"role": "assistant", "content": f"<answer>{row['answers'][0]}</answer>"}]
    else:
        turns = row["messages"]
        if turns and turns[0]["role"] == "system":
            system, turns = _flatten(turns[0]["content"], []), turns[1:]
        messages = [{"role": _sharegpt_role(row, m["role"]), "content": _flatten(m["content"], order)} for m in turns]
    files = [_image_file(row, number) for number in order]
    if None in files:
        return None
    return {"messages": messages, "images": [_copy_image(file, root, hashes) for file in files], "system": system}


def _sharegpt_role(row: dict, role: str) -> str:
    if role not in _SHAREGPT_ROLES:
        raise ValueError(f"row {row['id']}: a {role!r} message cannot go into ShareGPT "
                         "(a system prompt must be the first message)")
    return _SHAREGPT_ROLES[role]


def _flatten(content: str | list[dict], order: list[int]) -> str:
    """The content as text, each image part an `<image>` token in its place; its number goes to `order`."""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        if part["type"] == "image":
            pieces.append("<image>")
            order.append(part["image"])
        else:
            pieces.append(part["text"])
    return "".join(pieces)


def _image_file(row: dict, number: int) -> str | None:
    """The file of image `number`: a question image, else one the synth run saved for a tool's output."""
    if number < len(row["images"]):
        return row["images"][number]
    tool_images = row["meta"].get("tool_images") or []
    index = number - len(row["images"])
    if index >= len(tool_images) or not Path(tool_images[index]).is_file():
        return None
    return tool_images[index]


def _copy_image(file: str, root: Path, hashes: FileHashes) -> str:
    """Copy under its content hash (an image in many rows is stored once); return its path relative to `root`."""
    name = hashes.of(file) + (Path(file).suffix.lower() or ".png")
    target = root / "images" / name
    if not target.exists():
        shutil.copyfile(file, target)
    return f"images/{name}"


# --- the card ------------------------------------------------------------------------------------------

_CARD_INTRO = ("Multimodal search VQA examples (DESIGN.md \"Dataset dir\"): question images, question, answers "
               "with aliases, hop count, whether search is needed and, where made, a gold tool-use trajectory.")
_TEXT_INTRO = ("Modality: **text**. Questions have no images: the first entity is named, or described by one of "
               "its facts or relations that is unique in the knowledge base, and gold trajectories call text_search "
               "only.")
_SETTING_LABELS = {"hop_count": "hops", "kb": "knowledge base", "kb_fingerprint": "knowledge base fingerprint",
                   "n": "examples requested",
                   "n_requested": "examples requested", "records_read": "records read"}
_SECTION_TITLES = {"vision": "Vision geometry", "mix": "Mix", "filters": "Filter report", "dropped": "Dropped",
                   "kb_report": "Knowledge base report", "rewrites": "Rewrites", "entities_per_split": "Entities per split",
                   "splits": "Split shares"}


def _render_card(name: str, by_split: dict[str, list[dict]], info: dict) -> str:
    """The markdown card for the rows of each split and the run's `info` (with fingerprint and counts)."""
    lines = [f"# mmsearch dataset: {name}", "", _CARD_INTRO, ""]
    if info.get("modality") == "text":
        lines += [_TEXT_INTRO, ""]
    lines += [f"Fingerprint: `{info.get('fingerprint', '')}`", ""]
    lines += _counts_section(by_split)
    lines += _settings_section(info)
    lines += _histograms_section(by_split)
    for key, value in info.items():
        if isinstance(value, dict) and key != "counts":
            lines += [f"## {_SECTION_TITLES.get(key, key)}", "", *_dict_table(value), ""]
    if "sharegpt_skipped" in info:
        lines += ["## ShareGPT export", "",
                  f"`sharegpt/` (LLaMA-Factory); rows skipped for missing tool images: {info['sharegpt_skipped']}", ""]
    return "\n".join(lines)


def _counts_section(by_split: dict[str, list[dict]]) -> list[str]:
    lines = ["## Splits", "", "| split | examples |", "|---|---:|"]
    lines += [f"| {split} | {len(rows)} |" for split, rows in by_split.items()]
    lines += [f"| total | {sum(len(rows) for rows in by_split.values())} |", ""]
    return lines


def _settings_section(info: dict) -> list[str]:
    skip = {"config", "fingerprint", "counts", "sharegpt_skipped"}
    settings = [(key, value) for key, value in info.items() if key not in skip and not isinstance(value, dict)]
    lines = ["## How it was made", ""]
    if settings:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {_SETTING_LABELS.get(key, key)} | {_cell(value)} |" for key, value in settings]
        lines.append("")
    config = info.get("config")
    if config:
        text = config if isinstance(config, str) else _yaml(config)
        lines += ["<details><summary>Config</summary>", "", "```yaml", text.rstrip("\n"), "```", "", "</details>", ""]
    return lines


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True)


def _histograms_section(by_split: dict[str, list[dict]]) -> list[str]:
    per_row = {
        "Hops": (lambda row: [row["hops"]], True),
        "Kind": (lambda row: [row["kind"] or "(none)"], False),
        "Requires search": (lambda row: [str(row["requires_search"]).lower()], False),
        "View": (lambda row: [row["meta"].get("view", "(none)")], False),
        "Tool calls by tool": (lambda row: _tool_names(row["messages"]), False),
        "Tool calls per example": (lambda row: [len(_tool_names(row["messages"]))], True),
        "Answer length (words)": (lambda row: [len(row["answers"][0].split()) if row["answers"] else 0], True),
    }
    lines = ["## Histograms", ""]
    for title, (values, ordinal) in per_row.items():
        counts = {split: Counter(v for row in rows for v in values(row)) for split, rows in by_split.items()}
        lines += [f"### {title}", "", *_histogram(counts, ordinal), ""]
    return lines


def _tool_names(messages: list[dict] | None) -> list[str]:
    return [call.get("function", {}).get("name", "?")
            for message in messages or [] if message.get("role") == "assistant"
            for call in message.get("tool_calls") or []]


def _histogram(counts: dict[str, Counter], ordinal: bool) -> list[str]:
    """A table with a count per split, the total and a bar scaled to the largest total."""
    total = sum(counts.values(), Counter())
    if not total:
        return ["(none)"]
    keys = sorted(total) if ordinal else sorted(total, key=lambda k: (-total[k], str(k)))
    peak = max(total.values())
    lines = [f"| value | {' | '.join(counts)} | all | |", f"|---|{'---:|' * (len(counts) + 1)}---|"]
    for key in keys:
        per_split = " | ".join(str(counts[split][key]) for split in counts)
        bar = "█" * max(1, round(_BAR_WIDTH * total[key] / peak))
        lines.append(f"| {_cell(key)} | {per_split} | {total[key]} | {bar} |")
    return lines


def _dict_table(value: dict) -> list[str]:
    """Nested dicts flattened to "outer / inner" keys, one row each."""
    rows = list(_flatten_dict(value, ""))
    if not rows:
        return ["(empty)"]
    return ["| key | value |", "|---|---|", *(f"| {_cell(key)} | {_cell(v)} |" for key, v in rows)]


def _flatten_dict(value: dict, prefix: str) -> Iterator[tuple[str, Any]]:
    for key, inner in value.items():
        name = f"{prefix}{key}"
        if isinstance(inner, dict) and inner:
            yield from _flatten_dict(inner, f"{name} / ")
        else:
            yield name, inner


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    elif isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")
