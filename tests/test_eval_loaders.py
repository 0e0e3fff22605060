"""Eval loaders on real files: a saved DatasetDict, JSONL (generic, InfoSeek, MMSearch-R1) and parquet."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmsearch.eval.loaders import load_examples


def _image(color=(255, 0, 0), size=(16, 12), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color if mode == "RGB" else (*color, 128))


def _bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _garbage(n: int = 256) -> bytes:
    return os.urandom(n).replace(b"\x89PNG", b"xxxx")  # random bytes are no image format


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


# --- dataset dir -------------------------------------------------------------------------------------

FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "images": datasets.List(datasets.Image()),
    "question": datasets.Value("string"),
    "answers": datasets.List(datasets.Value("string")),
    "kind": datasets.Value("string"),
    "hops": datasets.Value("int32"),
    "requires_search": datasets.Value("bool"),
    "split_key": datasets.Value("string"),
})


def _rows(prefix: str, n: int) -> dict:
    return {
        "id": [f"{prefix}{i}" for i in range(n)],
        "images": [[{"bytes": _bytes(_image((i * 40, 0, 0))), "path": None}] for i in range(n)],
        "question": [f"question {i}?" for i in range(n)],
        "answers": [[f"answer {i}", f"alias {i}"] for i in range(n)],
        "kind": ["bridge" if i % 2 else "attribute" for i in range(n)],
        "hops": [1 + i % 2 for i in range(n)],
        "requires_search": [bool(i % 2) for i in range(n)],
        "split_key": [f"entity-{i}" for i in range(n)],
    }


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    test = _rows("t", 4)
    test["images"][2] = [{"bytes": _garbage(), "path": None}]  # a corrupt image in the saved dataset
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(_rows("r", 2), features=FEATURES),
        "test": datasets.Dataset.from_dict(test, features=FEATURES),
    })
    out = tmp_path / "ds"
    dd.save_to_disk(str(out))
    return out


def test_dataset_dir_loads_split_and_counts_corrupt_image(dataset_dir: Path):
    examples, report = load_examples(str(dataset_dir), split="test")
    assert [e.id for e in examples] == ["t0", "t1", "t3"]
    assert report.loaded == 3 and report.skipped == {"corrupt_image": 1} and report.format == "dataset_dir"
    assert len(report.examples_of_skipped) == 1 and report.examples_of_skipped[0].startswith("row 2: corrupt_image")
    e = examples[1]
    assert e.question == "question 1?" and e.answers == ["answer 1", "alias 1"]
    assert (e.kind, e.hops, e.requires_search) == ("bridge", 2, True)
    assert e.meta["split_key"] == "entity-1"
    assert e.images[0].mode == "RGB" and e.images[0].size == (16, 12)
    assert e.images[0].getpixel((0, 0)) == (40, 0, 0)

    train, _ = load_examples(str(dataset_dir), split="train")
    assert [e.id for e in train] == ["r0", "r1"]


def test_dataset_dir_missing_split_lists_available(dataset_dir: Path):
    with pytest.raises(ValueError, match=r"split 'validation'.*available splits: test, train"):
        load_examples(str(dataset_dir), split="validation")


def test_single_saved_dataset_and_limit(tmp_path: Path):
    out = tmp_path / "single"
    datasets.Dataset.from_dict(_rows("s", 5), features=FEATURES).save_to_disk(str(out))
    examples, report = load_examples(str(out), limit=2)
    assert [e.id for e in examples] == ["s0", "s1"] and report.loaded == 2 and not report.skipped
    again, _ = load_examples(str(out), limit=2)
    assert [e.id for e in again] == [e.id for e in examples]


# --- generic JSONL -----------------------------------------------------------------------------------

def test_generic_jsonl_resolves_images_and_counts_bad_records(tmp_path: Path):
    (tmp_path / "img").mkdir()
    _image((0, 255, 0)).save(tmp_path / "img" / "a.png")
    _image((0, 0, 255)).save(tmp_path / "img" / "b.jpg", quality=95)
    _image(mode="RGBA").save(tmp_path / "img" / "rgba.png")
    (tmp_path / "img" / "corrupt.jpg").write_bytes(_garbage())
    path = _write_jsonl(tmp_path / "set.jsonl", [
        {"id": "q1", "question": "What?", "answer": "Paris", "image": "img/a.png", "source": "web"},
        {"question": "Which?", "answers": ["Oslo", "oslo city"], "images": ["img/b.jpg", "img/rgba.png"],
         "hops": 2, "kind": "bridge", "requires_search": True},
        '{"id": "broken", "question": ',  # malformed JSON line
        {"id": "q4", "question": "Bad image?", "answer": "x", "image": "img/corrupt.jpg"},
        {"id": "q5", "question": "No file?", "answer": "x", "image": "img/nope.png"},
        {"id": "q6", "answer": "x", "image": "img/a.png"},
        {"id": "q7", "question": "No answer?", "answer": [], "image": "img/a.png"},
        {"id": "q1", "question": "Again?", "answer": "x", "image": "img/a.png"},
        {"id": "q9", "question": "Numeric?", "answer": [1969, "nineteen sixty-nine"], "image": str(tmp_path / "img" / "a.png")},
        "",
        {"id": "q10", "question": "Bad hops?", "answer": "x", "image": "img/a.png", "hops": "two"},
    ])
    examples, report = load_examples(str(path))
    assert [e.id for e in examples] == ["q1", "set-1", "q9"]
    assert report.format == "jsonl" and report.loaded == 3
    assert report.skipped == {"malformed_json": 1, "corrupt_image": 1, "missing_image": 1, "missing_question": 1,
                              "missing_answers": 1, "duplicate_id": 1, "malformed_record": 1}
    assert report.examples_of_skipped[0].startswith("line 3: malformed_json")
    assert "corrupt.jpg" in report.examples_of_skipped[1]
    q1, q2, q9 = examples
    assert q1.answers == ["Paris"] and q1.meta == {"source": "web"}
    assert (q1.kind, q1.hops, q1.requires_search) == ("", -1, None)
    assert q1.images[0].getpixel((0, 0)) == (0, 255, 0)
    assert (q2.hops, q2.kind, q2.requires_search) == (2, "bridge", True) and q2.answers == ["Oslo", "oslo city"]
    assert [im.mode for im in q2.images] == ["RGB", "RGB"]
    assert q9.answers == ["1969", "nineteen sixty-nine"]
    assert "loaded 3" in str(report) and "malformed_json=1" in str(report)


def test_generic_jsonl_image_root(tmp_path: Path):
    (tmp_path / "images").mkdir()
    _image().save(tmp_path / "images" / "x.png")
    (tmp_path / "data").mkdir()
    path = _write_jsonl(tmp_path / "data" / "set.jsonl", [{"question": "Q?", "answer": "A", "image": "x.png"}])
    examples, report = load_examples(str(path))
    assert examples == [] and report.skipped == {"missing_image": 1}
    examples, report = load_examples(str(path), image_root=str(tmp_path / "images"))
    assert len(examples) == 1 and not report.skipped


# --- InfoSeek ----------------------------------------------------------------------------------------

def test_infoseek_records_resolve_under_image_root(tmp_path: Path):
    root = tmp_path / "oven"
    root.mkdir()
    _image().save(root / "oven_001.jpg")
    _image().save(root / "oven_002.JPEG", format="JPEG")
    _image().save(root / "oven_003.png")
    path = _write_jsonl(tmp_path / "infoseek_val.jsonl", [
        {"data_id": "infoseek_val_1", "image_id": "oven_001", "question": "Which country is this in?",
         "answer": ["Sweden"], "answer_eval": ["Sweden", "Kingdom of Sweden"], "data_split": "val_unseen_question"},
        {"data_id": "infoseek_val_2", "image_id": "oven_002", "question": "How tall is it (m)?",
         "answer": ["9.0"], "answer_eval": [{"wikidata": 9.0, "range": [8.1, 9.9]}], "data_split": "val_unseen_entity"},
        {"data_id": "infoseek_val_3", "image_id": "oven_003", "question": "When built?",
         "answer": ["1902"], "answer_eval": {"wikidata": 1902, "range": [1901, 1903]}},
        {"data_id": "infoseek_val_4", "image_id": "oven_missing", "question": "?", "answer": ["x"]},
    ])
    examples, report = load_examples(str(path), image_root=str(root))
    assert [e.id for e in examples] == ["infoseek_val_1", "infoseek_val_2", "infoseek_val_3"]
    assert report.skipped == {"missing_image": 1}
    sweden, height, year = examples
    assert sweden.answers == ["Sweden", "Kingdom of Sweden"]
    assert sweden.meta == {"image_id": "oven_001", "data_split": "val_unseen_question"}
    assert height.answers == ["9.0", "9"]
    assert height.meta["numeric_answers"] == [{"wikidata": 9.0, "range": [8.1, 9.9]}]
    assert year.answers == ["1902"] and year.meta["numeric_answers"][0]["range"] == [1901, 1903]
    assert height.images[0].mode == "RGB"


def test_infoseek_without_image_root_is_a_clear_error(tmp_path: Path):
    path = _write_jsonl(tmp_path / "infoseek.jsonl", [
        {"data_id": "a", "image_id": "oven_1", "question": "?", "answer": ["x"]}])
    with pytest.raises(ValueError, match="image_root"):
        load_examples(str(path))


# --- MMSearch-R1 / FVQA ------------------------------------------------------------------------------

def _fvqa_row(i: int, image: bytes, category: str, candidates: list[str]) -> dict:
    return {
        "data_source": "mmsearch_r1/fvqa_test",
        "prompt": [{"role": "user", "content": f"<image>What is shown in picture {i}?"}],
        "images": [{"bytes": image, "path": None}],
        "reward_model": {"candidate_answers": json.dumps(candidates), "ground_truth": f"thing {i}", "style": "rule"},
        "data_id": f"fvqa_test_{i}",
        "category": category,
    }


def test_mmsearch_r1_parquet_with_image_bytes(tmp_path: Path):
    rows = [
        _fvqa_row(0, _bytes(_image(mode="RGBA")), "search_free", []),
        _fvqa_row(1, _garbage(), "search_required", []),
        _fvqa_row(2, _bytes(_image((9, 9, 9)), "JPEG"), "search_required", ["thing two", "thing 2"]),
    ]
    path = tmp_path / "fvqa_test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    examples, report = load_examples(str(path))
    assert report.format == "parquet" and report.skipped == {"corrupt_image": 1}
    assert "fvqa_test.parquet row 1: corrupt_image" in report.examples_of_skipped[0]
    free, required = examples
    assert free.id == "fvqa_test_0" and free.question == "What is shown in picture 0?"
    assert free.answers == ["thing 0"] and free.requires_search is False
    assert free.images[0].mode == "RGB" and free.images[0].size == (16, 12)
    assert required.answers == ["thing 2", "thing two"] and required.requires_search is True
    assert required.meta["data_source"] == "mmsearch_r1/fvqa_test" and required.meta["category"] == "search_required"

    # a directory of parquet files: the split picks the file
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "fvqa_train.parquet")
    test, _ = load_examples(str(tmp_path), split="test")
    assert [e.id for e in test] == ["fvqa_test_0", "fvqa_test_2"]
    with pytest.raises(ValueError, match="validation.*fvqa_test.parquet"):
        load_examples(str(tmp_path), split="validation")


def test_mmsearch_r1_jsonl_with_image_paths(tmp_path: Path):
    _image().save(tmp_path / "0.png")
    row = {"data_source": "mmsearch_r1/fvqa_test", "data_id": "fvqa_test_0", "category": "search_required",
           "prompt": [{"role": "system", "content": "be helpful"},
                      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who built this?"}]}],
           "images": [{"path": "0.png"}], "reward_model": {"ground_truth": ["Eiffel", "Gustave Eiffel"]}}
    path = _write_jsonl(tmp_path / "fvqa.jsonl", [row])
    (example,), report = load_examples(str(path))
    assert example.question == "Who built this?" and example.answers == ["Eiffel", "Gustave Eiffel"]
    assert example.requires_search is True and not report.skipped


# --- path errors -------------------------------------------------------------------------------------

def test_missing_path_and_unknown_format(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        load_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unrecognised dataset format"):
        load_examples(str(tmp_path / "data.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a saved datasets"):
        load_examples(str(tmp_path / "empty"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable parquet"):
        load_examples(str(tmp_path / "bad.parquet"))
