"""`mmsearch synth import` on real InfoSeek-style files: bad records counted by reason, entity-disjoint splits."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from data_pipeline.synth.config import ImportConfig, SplitConfig
from data_pipeline.synth.importer import run_import
from data_pipeline.synth.records import SPLITS
from mmsearch.eval.loaders import load_examples

N_ENTITIES = 24  # two questions each; with 30% validation and 30% test every split gets some


def _save(path: Path, color: tuple[int, int, int], fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path, format=fmt)


def _truncated_jpeg(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # the header parses; the pixels are cut off


@pytest.fixture(scope="module")
def infoseek(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[dict]]:
    """Records files and images: the good records, and one bad record of each kind."""
    root = tmp_path_factory.mktemp("infoseek")
    images = root / "images"
    good: list[dict] = []
    for k in range(N_ENTITIES):
        fmt, ext = ("PNG", ".png") if k % 2 else ("JPEG", ".JPEG")
        _save(images / f"oven_{k:04d}{ext}", (10 * k, 255 - 10 * k, 40), fmt)
        for q in range(2):
            good.append({"data_id": f"infoseek_val_{k:04d}_{q}", "image_id": f"oven_{k:04d}", "entity_id": f"Q{1000 + k}",
                         "question": f"What is the {('height', 'country')[q]} of this place?", "answer": [f"answer {k} {q}"]})
    _save(images / "eiffel_a.jpg", (200, 200, 0), "JPEG")
    _save(images / "eiffel_b.jpg", (200, 180, 0), "JPEG")
    _save(images / "sub" / "bridge.png", (0, 0, 90), "PNG")
    good += [
        # no entity_id: the entity's name keeps both questions in one split
        {"data_id": "named_1", "image_id": "eiffel_a", "entity_text": "Eiffel Tower", "question": "How tall is it?",
         "answer": "330", "answer_eng": ["330", "330 m"]},
        {"data_id": "named_2", "image_id": "eiffel_b", "entity_text": "Eiffel Tower", "question": "When was it built?",
         "answer_eng": [1889]},
        # no entity at all: the image is the key; image_path instead of image_id
        {"id": "pathed_1", "image_path": "sub/bridge.png", "question": "Which river does it cross?", "answer": ["Seine"]},
    ]
    (images / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    _truncated_jpeg(images / "cut.jpg")
    bad = [
        '{"data_id": "broken", "question": ',  # malformed_json
        json.dumps({"data_id": "no_answer", "image_id": "oven_0000", "entity_id": "Q1000", "question": "Who?"}),
        json.dumps({"data_id": "no_question", "image_id": "oven_0000", "entity_id": "Q1000", "answer": ["x"]}),
        json.dumps({"data_id": "no_image", "image_id": "oven_9999", "entity_id": "Q9", "question": "?", "answer": "x"}),
        json.dumps({"data_id": "garbage", "image_id": "garbage", "entity_id": "Q7", "question": "?", "answer": "x"}),
        json.dumps({"data_id": "cut", "image_id": "cut", "entity_id": "Q8", "question": "?", "answer": "x"}),
        json.dumps({"data_id": "infoseek_val_0000_0", "image_id": "oven_0001", "question": "again?", "answer": "x"}),
    ]
    first, second = root / "infoseek_val.jsonl", root / "infoseek_extra.jsonl"
    half = len(good) // 2
    first.write_text("\n".join([*(json.dumps(r) for r in good[:half]), bad[0], bad[1], bad[2]]) + "\n")
    second.write_text("\n".join([*(json.dumps(r) for r in good[half:]), "", *bad[3:]]) + "\n")
    return images, [first, second], good


def _config(infoseek, out: Path, seed: int = 0) -> ImportConfig:
    images, files, _ = infoseek
    return ImportConfig(records=",".join(str(f) for f in files), image_root=str(images), out=str(out), seed=seed,
                        splits=SplitConfig(validation=0.3, test=0.3))


@pytest.fixture(scope="module")
def imported(infoseek, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("imported") / "dataset"
    return out, run_import(_config(infoseek, out))


def test_bad_records_are_skipped_and_counted_by_reason(infoseek, imported):
    _, _, good = infoseek
    out, summary = imported
    assert summary["skipped"] == {"malformed_json": 1, "missing_answers": 1, "missing_question": 1,
                                  "missing_image": 1, "corrupt_image": 2, "duplicate_id": 1}
    assert sum(summary["counts"].values()) == len(good)
    card = (out / "card.md").read_text()
    assert "| corrupt_image | 2 |" in card and "| malformed_json | 1 |" in card
    assert f"| total | {len(good)} |" in card and "| records read | " + str(len(good) + 7) + " |" in card


def test_splits_are_disjoint_by_entity(imported):
    out, summary = imported
    loaded = datasets.load_from_disk(str(out))
    assert sorted(loaded) == sorted(SPLITS)
    keys = {split: set(loaded[split]["split_key"]) for split in SPLITS}
    assert all(summary["counts"][split] > 0 for split in SPLITS)
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    by_id = {row["id"]: (split, row) for split in SPLITS for row in loaded[split]}
    assert by_id["named_1"][0] == by_id["named_2"][0] and by_id["named_1"][1]["split_key"] == "Eiffel Tower"
    assert by_id["pathed_1"][1]["split_key"] == "sub/bridge.png"
    assert by_id["infoseek_val_0003_1"][1]["split_key"] == "Q1003"


def test_rows_are_one_hop_search_questions_with_merged_answers(infoseek, imported):
    images, _, _ = infoseek
    out, _ = imported
    rows = {row["id"]: row for split in SPLITS for row in datasets.load_from_disk(str(out))[split]}
    named = rows["named_1"]
    assert named["answers"] == ["330", "330 m"]
    assert rows["named_2"]["answers"] == ["1889"]
    assert (named["kind"], named["hops"], named["requires_search"], named["messages"]) == ("infoseek", 1, True, "")
    assert json.loads(named["meta"]) == {"source": "infoseek_extra.jsonl", "entity_id": None,
                                         "entity_text": "Eiffel Tower", "image_id": "eiffel_a"}
    with Image.open(images / "sub" / "bridge.png") as want:
        assert np.array_equal(np.asarray(rows["pathed_1"]["images"][0].convert("RGB")), np.asarray(want.convert("RGB")))


def test_import_loads_with_load_examples_and_is_deterministic(infoseek, imported, tmp_path: Path):
    out, summary = imported
    for split in SPLITS:
        examples, report = load_examples(str(out), split=split)
        assert report.loaded == summary["counts"][split] and not report.skipped
        assert all(e.images and e.answers and e.hops == 1 and e.requires_search for e in examples)
    again = run_import(_config(infoseek, tmp_path / "again"))
    assert again == summary
    reseeded = run_import(_config(infoseek, tmp_path / "reseeded", seed=1))
    assert reseeded["fingerprint"] != summary["fingerprint"]


def test_config_errors_are_clear(infoseek, tmp_path: Path):
    images, files, _ = infoseek
    with pytest.raises(FileNotFoundError, match="records file"):
        run_import(ImportConfig(records=str(tmp_path / "none.jsonl"), image_root=str(images), out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="one or more JSONL files"):
        run_import(ImportConfig(records=" , ", image_root=str(images), out=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="image_root"):
        run_import(ImportConfig(records=str(files[0]), image_root=str(tmp_path / "nope"), out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="split shares"):
        run_import(ImportConfig(records=str(files[0]), image_root=str(images), out=str(tmp_path / "o"),
                                splits=SplitConfig(validation=0.6, test=0.6)))
