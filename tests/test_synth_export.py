"""Export of synth work rows: the DatasetDict, parquet, card, fingerprint and the LLaMA-Factory ShareGPT files."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.synth.export import FEATURES, export_dataset, fingerprint
from data_pipeline.synth.records import SPLITS
from mmsearch.eval.loaders import load_examples

SYSTEM = "You answer questions about images. <tools>[]</tools>"
INFO = {
    "seed": 7, "kb": "/data/kb", "n_requested": 8, "trajectories": "gold",
    "vision": {"min_pixels": 3136, "max_pixels": 12845056},
    "config": "seed: 7\nn: 8\ntrajectories: gold\n",
    "filters": {"filter/dedup": 2},
    "dropped": {"no_path": {"nation": 1}},
}


def _png(path: Path, color: tuple[int, int, int], size=(32, 24)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    image.putpixel((1, 1), (color[2], color[0], color[1]))  # not a flat image: pixels must survive exactly
    image.save(path, format="PNG")
    return str(path.resolve())


def _trajectory(answer: str, n_images: int, tool: str | None) -> list[dict]:
    user = [*({"type": "image", "image": i} for i in range(n_images)), {"type": "text", "text": "What is this?"}]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    if tool == "crop":
        arguments = {"image": 0, "bbox": [0, 0, 16, 12]}
        result = [{"type": "text", "text": f"Cropped region [image {n_images}]"}, {"type": "image", "image": n_images}]
    elif tool == "text_search":
        arguments = {"query": "flag with a red field"}
        result = [{"type": "text", "text": "1. Some nation: its flag is red."}]
    if tool:
        call = json.dumps({"name": tool, "arguments": arguments})
        messages += [
            {"role": "assistant", "content": f"<think>look closer</think><tool_call>{call}</tool_call>",
             "tool_calls": [{"id": "call_0", "type": "function",
                             "function": {"name": tool, "arguments": json.dumps(arguments)}}]},
            {"role": "tool", "tool_call_id": "call_0", "name": tool, "content": result},
        ]
    messages.append({"role": "assistant", "content": f"<think>found it</think><answer>{answer}</answer>"})
    return messages


def _row(split: str, index: int, images: list[str], answer: str, hops: int, kind: str, view: str,
         tool: str | None = None, tool_images: list[str] | None = None) -> dict:
    meta = {"view": view, "template": f"t{index}"}
    if tool_images is not None:
        meta["tool_images"] = tool_images
    return {
        "id": f"{split}-{index:06d}", "split": split, "images": images,
        "question": f"Question {split} {index}: what is pictured?", "answers": [answer, f"{answer} alias"],
        "kind": kind, "hops": hops, "requires_search": hops > 0, "split_key": f"Q{index}",
        "messages": _trajectory(answer, len(images), tool) if tool else None, "meta": meta,
    }


def _make_rows(root: Path) -> list[dict]:
    red = _png(root / "kb" / "red.png", (200, 10, 10))
    same_as_red = str(root / "kb" / "red_copy.png")
    shutil.copyfile(red, same_as_red)
    green, blue = _png(root / "kb" / "green.png", (10, 200, 10)), _png(root / "kb" / "blue.png", (10, 10, 200))
    yellow, purple = _png(root / "kb" / "yellow.png", (200, 200, 10)), _png(root / "kb" / "purple.png", (120, 10, 200))
    crop = _png(root / "work" / "tool_images" / "crop0.png", (10, 220, 10), size=(16, 12))
    crop2 = _png(root / "work" / "tool_images" / "crop1.png", (130, 20, 210), size=(16, 12))
    return [
        _row("train", 0, [red], "three", 0, "count", "whole"),
        _row("train", 1, [green], "Verdania", 1, "nation", "crop", tool="crop", tool_images=[crop]),
        _row("train", 2, [blue], "Old Port City", 2, "nation", "whole", tool="text_search"),
        _row("train", 3, [same_as_red], "red", 0, "colour", "whole"),
        _row("validation", 0, [yellow], "Yellowland", 1, "nation", "crop", tool="crop"),  # its crop file is lost
        _row("validation", 1, [green], "green", 0, "colour", "whole"),
        _row("test", 0, [purple], "Purple Peak", 1, "mountain", "crop", tool="crop", tool_images=[crop2]),
        _row("test", 1, [red, blue], "two", 2, "count", "scene"),
    ]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("synth_source")
    return root, _make_rows(root)


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], dict]:
    _, rows = source
    out = tmp_path_factory.mktemp("synth_export") / "dataset"
    (out / "work").mkdir(parents=True)
    (out / "work" / "examples.jsonl").write_text("{}\n")
    result = export_dataset(out, rows, INFO, sharegpt=True)
    return out, rows, result


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_dataset_dict_has_every_split_with_the_declared_features_and_rows_in_order(exported):
    out, rows, result = exported
    assert result["counts"] == {"train": 4, "validation": 2, "test": 2}
    assert (out / "dataset_dict.json").is_file() and (out / "work" / "examples.jsonl").read_text() == "{}\n"
    loaded = datasets.load_from_disk(str(out))
    assert sorted(loaded) == sorted(SPLITS)
    for split in SPLITS:
        assert loaded[split].features == FEATURES
        expected = [r for r in rows if r["split"] == split]
        assert loaded[split]["id"] == [r["id"] for r in expected]
        for got, want in zip(loaded[split], expected):
            assert got["question"] == want["question"] and got["answers"] == want["answers"]
            assert (got["kind"], got["hops"], got["requires_search"], got["split_key"]) == (
                want["kind"], want["hops"], want["requires_search"], want["split_key"])
            assert len(got["images"]) == len(want["images"])
            for image, path in zip(got["images"], want["images"]):
                assert np.array_equal(_pixels(image), _pixels(Image.open(path)))
            assert json.loads(got["meta"]) == want["meta"]
            if want["messages"] is None:
                assert got["messages"] == ""
            else:
                assert json.loads(got["messages"]) == want["messages"]


def test_images_are_embedded_with_their_file_name_only(exported):
    out, rows, _ = exported
    raw = datasets.load_from_disk(str(out))["train"].with_format("arrow")[:1]["images"].to_pylist()[0][0]
    assert raw["path"] == "red.png"
    assert raw["bytes"] == Path(rows[0]["images"][0]).read_bytes()


def test_parquet_files_hold_every_split_with_the_same_columns(exported):
    out, rows, _ = exported
    for split in SPLITS:
        table = pq.read_table(out / "parquet" / f"{split}.parquet")
        assert table.num_rows == sum(1 for r in rows if r["split"] == split)
        assert table.column_names == list(FEATURES)
        assert table.column("id").to_pylist() == [r["id"] for r in rows if r["split"] == split]


def test_card_shows_counts_settings_histograms_and_reports(exported):
    out, _, result = exported
    card = (out / "card.md").read_text()
    for line in ("| train | 4 |", "| validation | 2 |", "| test | 2 |", "| total | 8 |"):
        assert line in card
    assert result["fingerprint"] in card
    assert "| seed | 7 |" in card and "| trajectories | gold |" in card and "| examples requested | 8 |" in card
    assert "```yaml\nseed: 7\nn: 8\ntrajectories: gold\n```" in card
    assert "| max_pixels | 12845056 |" in card
    assert "| filter/dedup | 2 |" in card and "| no_path / nation | 1 |" in card
    hops = card.split("### Hops")[1].split("###")[0]
    # hops 1: train-1, validation-0, test-0
    assert re.search(r"^\| 1 \| 1 \| 1 \| 1 \| 3 \| █+ \|$", hops, re.MULTILINE)
    assert re.search(r"^\| 2 \| 1 \| 0 \| 1 \| 2 \| █+ \|$", hops, re.MULTILINE)
    tools = card.split("### Tool calls by tool")[1].split("###")[0]
    assert re.search(r"^\| crop \| 1 \| 1 \| 1 \| 3 \|", tools, re.MULTILINE)
    assert re.search(r"^\| text_search \| 1 \| 0 \| 0 \| 1 \|", tools, re.MULTILINE)
    per_example = card.split("### Tool calls per example")[1].split("###")[0]
    assert re.search(r"^\| 0 \| 2 \| 1 \| 1 \| 4 \|", per_example, re.MULTILINE)
    views = card.split("### View")[1].split("###")[0]
    assert re.search(r"^\| scene \| 0 \| 0 \| 1 \| 1 \|", views, re.MULTILINE)
    assert "rows skipped for missing tool images: 1" in card


def test_synth_info_is_the_info_plus_fingerprint_and_counts(exported):
    out, _, result = exported
    info = json.loads((out / "synth_info.json").read_text())
    assert info["seed"] == 7 and info["dropped"] == INFO["dropped"]
    assert info["fingerprint"] == result["fingerprint"]
    assert info["counts"] == result["counts"] and info["sharegpt_skipped"] == 1


def test_fingerprint_follows_content_not_paths(exported, tmp_path: Path):
    _, rows, result = exported
    assert fingerprint(rows) == result["fingerprint"]
    # The same rows with their images copied elsewhere, exported into another dir: same fingerprint.
    moved = json.loads(json.dumps(rows))
    for row in moved:
        row["images"] = [str(shutil.copy(p, tmp_path / f"{row['id']}-{i}.png")) for i, p in enumerate(row["images"])]
        if "tool_images" in row["meta"]:
            row["meta"]["tool_images"] = [str(shutil.copy(p, tmp_path / f"{row['id']}-tool.png"))
                                          for p in row["meta"]["tool_images"]]
    again = export_dataset(tmp_path / "elsewhere", moved, {"seed": 7})
    assert again["fingerprint"] == result["fingerprint"]

    answer_changed = json.loads(json.dumps(moved))
    answer_changed[5]["answers"][0] = "teal"
    assert fingerprint(answer_changed) != result["fingerprint"]
    with Image.open(moved[2]["images"][0]) as image:
        image = image.copy()
    image.putpixel((5, 5), (0, 0, 0))
    image.save(moved[2]["images"][0])
    assert fingerprint(moved) != result["fingerprint"]
    trajectory_changed = json.loads(json.dumps(rows))
    trajectory_changed[1]["messages"][-1]["content"] = "<answer>Other</answer>"
    assert fingerprint(trajectory_changed) != result["fingerprint"]


def test_sharegpt_matches_llama_factory_multimodal_format(exported):
    out, rows, result = exported
    root = out / "sharegpt"
    assert result["sharegpt_skipped"] == 1  # validation-0: its crop is not in meta.tool_images
    info = json.loads((root / "dataset_info.json").read_text())
    assert set(info) == {f"mmsearch_{split}" for split in SPLITS}
    for split in SPLITS:
        entry = info[f"mmsearch_{split}"]
        assert entry["formatting"] == "sharegpt" and entry["file_name"] == f"{split}.json"
        assert entry["columns"]["messages"] == "messages" and entry["columns"]["images"] == "images"
        assert entry["tags"]["observation_tag"] == "observation" and entry["tags"]["role_tag"] == "role"
    examples = {split: json.loads((root / f"{split}.json").read_text()) for split in SPLITS}
    assert [len(examples[s]) for s in SPLITS] == [4, 1, 2]
    for example in (e for split in SPLITS for e in examples[split]):
        tokens = sum(m["content"].count("<image>") for m in example["messages"])
        assert tokens == len(example["images"]) > 0
        assert all((root / image).is_file() for image in example["images"])
        roles = [m["role"] for m in example["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(r == ("user", "assistant")[i % 2] or (i % 2 == 0 and r == "observation") for i, r in enumerate(roles))

    crop_example = examples["train"][1]
    assert crop_example["system"] == SYSTEM
    assert [m["role"] for m in crop_example["messages"]] == ["user", "assistant", "observation", "assistant"]
    assert crop_example["messages"][0]["content"] == "<image>What is this?"
    assert crop_example["messages"][1]["content"].startswith("<think>look closer</think><tool_call>")
    assert crop_example["messages"][2]["content"] == "Cropped region [image 1]<image>"
    crop_file = rows[1]["meta"]["tool_images"][0]
    assert (root / crop_example["images"][1]).read_bytes() == Path(crop_file).read_bytes()

    plain = examples["test"][1]  # two question images, no trajectory
    assert plain["system"] == ""
    assert plain["messages"] == [{"role": "user", "content": "<image><image>" + rows[7]["question"]},
                                 {"role": "assistant", "content": "<answer>two</answer>"}]
    # red.png and red_copy.png hold the same bytes: stored once.
    assert examples["train"][0]["images"] == examples["train"][3]["images"]
    distinct = {hashlib.sha256(Path(p).read_bytes()).hexdigest() for r in rows if r["id"] != "validation-000000"
                for p in r["images"] + r["meta"].get("tool_images", [])}
    assert len(list((root / "images").iterdir())) == len(distinct)


def test_load_examples_reads_the_exported_test_split(exported):
    out, rows, _ = exported
    examples, report = load_examples(str(out), split="test")
    expected = [r for r in rows if r["split"] == "test"]
    assert report.loaded == 2 and not report.skipped
    assert [e.id for e in examples] == [r["id"] for r in expected]
    for example, row in zip(examples, expected):
        assert example.question == row["question"] and example.answers == row["answers"]
        assert (example.hops, example.kind, example.requires_search) == (row["hops"], row["kind"], row["requires_search"])
        assert [_pixels(i).tolist() for i in example.images] == [_pixels(Image.open(p)).tolist() for p in row["images"]]


def test_reexport_replaces_previous_outputs_and_keeps_work(source, tmp_path: Path):
    _, rows = source
    out = tmp_path / "dataset"
    (out / "work").mkdir(parents=True)
    (out / "work" / "examples.jsonl").write_text("kept\n")
    export_dataset(out, rows, {}, sharegpt=True)
    assert (out / "sharegpt" / "train.json").is_file()
    train_only = [r for r in rows if r["split"] == "train"]
    result = export_dataset(out, train_only, {})
    assert result["counts"] == {"train": 4, "validation": 0, "test": 0}
    assert not (out / "sharegpt").exists() and (out / "work" / "examples.jsonl").read_text() == "kept\n"
    loaded = datasets.load_from_disk(str(out))
    assert [len(loaded[s]) for s in SPLITS] == [4, 0, 0]
    assert loaded["test"].features == FEATURES
    assert pq.read_table(out / "parquet" / "test.parquet").num_rows == 0
    assert "| test | 0 |" in (out / "card.md").read_text()


def test_bad_rows_are_clear_errors(source, tmp_path: Path):
    _, rows = source
    missing = json.loads(json.dumps(rows[:2]))
    missing[1]["images"] = [str(tmp_path / "gone.png")]
    with pytest.raises(FileNotFoundError, match="train-000001.*gone.png"):
        export_dataset(tmp_path / "a", missing, {})
    bad_split = json.loads(json.dumps(rows[:1]))
    bad_split[0]["split"] = "dev"
    with pytest.raises(ValueError, match="split 'dev' is not one of train, validation, test"):
        export_dataset(tmp_path / "b", bad_split, {})
    no_answers = [{k: v for k, v in rows[0].items() if k != "answers"}]
    with pytest.raises(ValueError, match="train-000000.*missing fields answers"):
        export_dataset(tmp_path / "c", no_answers, {})
