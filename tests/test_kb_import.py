"""`mmsearch kb import` (FlashRAG corpus, captioned images) and `mmsearch kb check`, on small hand-written KBs."""

import csv
import itertools
import json
import os
import tracemalloc

import pytest
from PIL import Image

from data_pipeline.kb_check import check_kb
from data_pipeline.kb_import import (
    ImportStats,
    SeenIds,
    flashrag_passages,
    import_flashrag,
    import_images,
    split_contents,
)
from mmsearch.cli.main import main
from tools.config import ImageEncoderConfig, IndexBuildConfig
from tools.index.build import build_indexes
from tools.kb import KB


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def counts(notes):
    """{reason: count} of a report's {reason: {count, examples}}."""
    return {reason: note["count"] for reason, note in notes.items()}


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# -- FlashRAG corpus ------------------------------------------------------------------------------

FLASHRAG_LINES = [
    '{"id": "0", "contents": "\\"Aaron\\"\\nAaron is a prophet in the Hebrew Bible."}',
    '{"id": 1, "contents": "Zebra\\nZebras are striped.\\nThey live in Africa."}',  # int id, unquoted title
    '{"id": "2", "contents": ',  # cut off
    "",  # blank: not a record
    '{"id": "3"}',
    '{"id": "4", "contents": "\\"Only a title\\""}',
    '{"id": "0", "contents": "\\"Aaron\\"\\nA second passage with id 0."}',
    "[1, 2]",
    '{"contents": "\\"No id\\"\\nText."}',
    '{"id": "doc-a", "contents": "\\"Kestrin\\"\\nKestrin is a port city."}',
    '{"id": "doc-a", "contents": "\\"Kestrin\\"\\nAgain."}',
    '{"id": "5", "contents": "\\"\\"Quoted\\" name\\"\\nA title with quotes inside."}',
]


@pytest.fixture
def flashrag_corpus(tmp_path):
    return _write_lines(tmp_path / "wiki-mini.jsonl", FLASHRAG_LINES)


def test_flashrag_import_writes_passages_and_counts_every_skip(flashrag_corpus, tmp_path):
    kb = tmp_path / "kb"
    entry = import_flashrag(flashrag_corpus, kb, progress=False)
    assert _jsonl(kb / "passages.jsonl") == [
        {"id": "0", "title": "Aaron", "text": "Aaron is a prophet in the Hebrew Bible."},
        {"id": "1", "title": "Zebra", "text": "Zebras are striped.\nThey live in Africa."},
        {"id": "doc-a", "title": "Kestrin", "text": "Kestrin is a port city."},
        {"id": "5", "title": '"Quoted" name', "text": "A title with quotes inside."},
    ]
    assert (entry["read"], entry["written"], entry["skipped_total"]) == (11, 4, 7)
    assert counts(entry["skipped"]) == {
        "duplicate id": 2, "not JSON": 1, "no contents": 1, "empty text": 1, "not a JSON object": 1, "no id": 1}
    assert entry["skipped"]["duplicate id"]["examples"] == ["line 7 (id 0)", "line 11 (id doc-a)"]
    report = json.loads((kb / "import_report.json").read_text())
    assert report["passages.jsonl"]["written"] == 4 and report["passages.jsonl"]["format"] == "flashrag"
    assert not (kb / "passages.jsonl.partial").exists()
    assert [p.id for p in KB(kb).passages()] == ["0", "1", "doc-a", "5"]


def test_split_contents_reads_the_first_line_as_the_title():
    assert split_contents('"Aaron"\nAaron is.\nMore.') == ("Aaron", "Aaron is.\nMore.")
    assert split_contents("No quotes\n  text  ") == ("No quotes", "text")
    assert split_contents('"Title only"') == ("Title only", "")


def test_seen_ids_is_exact_around_the_integer_run():
    seen = SeenIds()
    assert [seen.add(k) for k in ["0", "1", "5", "2", "3", "4", "5", "1", "007", "7", "doc", "doc", "6", "7"]] == [
        True, True, True, True, True, True, False, False, True, True, True, False, True, False]


def test_import_streams_one_line_at_a_time():
    """The importer pulls lines lazily: an endless corpus yields its first passages at once."""
    endless = (f'{{"id": "{i}", "contents": "\\"T{i}\\"\\nText {i}."}}'.encode() for i in itertools.count())
    stats = ImportStats()
    first = list(itertools.islice(flashrag_passages(endless, stats), 3))
    assert [p["id"] for p in first] == ["0", "1", "2"] and stats.read == 3


def test_import_memory_stays_flat_on_a_large_corpus(tmp_path):
    corpus = tmp_path / "big.jsonl"
    body = "lorem ipsum dolor sit amet " * 36  # ~1 KB a passage
    with corpus.open("w") as f:
        for i in range(20_000):
            f.write(json.dumps({"id": str(i), "contents": f'"Title {i}"\n{body}{i}'}) + "\n")
    size = corpus.stat().st_size
    tracemalloc.start()
    try:
        entry = import_flashrag(corpus, tmp_path / "kb", progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert entry["written"] == 20_000 and size > 19_000_000
    assert peak < size / 20, f"peak {peak} bytes for a {size}-byte corpus"


def test_imported_corpus_builds_a_bm25_index_and_is_searchable(flashrag_corpus, tmp_path, capsys):
    kb, index = tmp_path / "kb", tmp_path / "index"
    assert main(["kb", "import", "--format", "flashrag", "--corpus", str(flashrag_corpus), "--out", str(kb)]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "4 passages from 11 records" in out and "duplicate id 2" in out
    assert main(["index", "build", "--kb", str(kb), "--out", str(index), "dense=false", "image=false"]) == 0
    capsys.readouterr()
    assert main(["search", "text", "prophet Hebrew", "--index", str(index), "--mode", "bm25", "--json"]) == 0
    assert "Aaron" in json.loads(capsys.readouterr().out)["text"]


def test_import_cli_errors_are_clear(tmp_path, capsys):
    assert main(["kb", "import", "--format", "flashrag", "--out", str(tmp_path / "kb")]) == 2
    assert "--corpus" in capsys.readouterr().err
    bad = _write_lines(tmp_path / "bad.jsonl", ['{"id": "1"}', "nope"])
    assert main(["kb", "import", "--format", "flashrag", "--corpus", str(bad), "--out", str(tmp_path / "kb")]) == 2
    err = capsys.readouterr().err
    assert "nothing to import" in err and "no contents 1" in err and "not JSON 1" in err
    assert not (tmp_path / "kb" / "passages.jsonl").exists()


# -- images -------------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    """Three real PNGs (one in a subfolder), a file that is not an image and a truncated PNG."""
    root = tmp_path / "photos"
    (root / "birds").mkdir(parents=True)
    for name, colour in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255)), ("birds/owl.png", (90, 60, 30))):
        Image.new("RGB", (24, 16), colour).save(root / name)
    (root / "notes.png").write_bytes(b"this is not a png")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(root / "cut.png")
    (root / "cut.png").write_bytes((root / "cut.png").read_bytes()[:60])
    return root


CAPTION_ROWS = [
    {"file": "red.png", "caption": "A red square.", "title": "Red", "id": "img-red"},
    {"file": "birds/owl.png", "caption": "A brown owl."},  # id defaults to the file, no title
    {"file": "missing.png", "caption": "Gone."},
    {"file": "notes.png", "caption": "Not an image."},
    {"file": "cut.png", "caption": "Truncated."},
    {"file": "../outside.png", "caption": "Escapes the folder."},
    {"file": "blue.png", "caption": "A blue square.", "id": "img-red"},  # duplicate id
    {"caption": "No file."},
    {"file": "blue.png", "caption": "A blue square.", "title": "Blue"},
]


def test_images_import_checks_every_image_and_links_the_good_ones(image_folder, tmp_path):
    captions = _write_lines(tmp_path / "captions.jsonl", [json.dumps(r) for r in CAPTION_ROWS] + ["{bad json"])
    kb = tmp_path / "kb"
    entry = import_images(image_folder, captions, kb, progress=False)
    assert _jsonl(kb / "images.jsonl") == [
        {"id": "img-red", "path": "images/red.png", "title": "Red", "text": "A red square."},
        {"id": "birds/owl.png", "path": "images/birds/owl.png", "title": "", "text": "A brown owl."},
        {"id": "blue.png", "path": "images/blue.png", "title": "Blue", "text": "A blue square."},
    ]
    assert counts(entry["skipped"]) == {
        "corrupt image": 2, "image file not found": 1, "file outside the images dir": 1, "duplicate id": 1,
        "no file": 1, "not a JSON object": 1}
    assert entry["skipped"]["corrupt image"]["examples"] == ["line 4 (notes.png)", "line 5 (cut.png)"]
    assert (entry["read"], entry["written"]) == (10, 3)
    for rel in ("red.png", "blue.png", "birds/owl.png"):
        assert os.path.samefile(kb / "images" / rel, image_folder / rel)  # same filesystem: a hard link
    assert not (kb / "images" / "notes.png").exists()
    assert [r.id for r in KB(kb).images()] == ["img-red", "birds/owl.png", "blue.png"]


def test_images_import_reads_a_csv_and_shares_the_report_with_passages(image_folder, flashrag_corpus, tmp_path):
    captions = tmp_path / "captions.csv"
    with captions.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["file", "caption"], ["red.png", "A red square, with a comma"], ["notes.png", "x"]])
    kb = tmp_path / "kb"
    import_flashrag(flashrag_corpus, kb, progress=False)
    entry = import_images(image_folder, captions, kb, progress=False)
    assert _jsonl(kb / "images.jsonl") == [
        {"id": "red.png", "path": "images/red.png", "title": "", "text": "A red square, with a comma"}]
    assert entry["skipped"]["corrupt image"]["examples"] == ["row 3 (notes.png)"]
    assert set(json.loads((kb / "import_report.json").read_text())) == {"passages.jsonl", "images.jsonl"}
    headerless = _write_lines(tmp_path / "plain.csv", ["red.png,A red square"])
    with pytest.raises(ValueError, match="header row"):
        import_images(image_folder, headerless, tmp_path / "kb2", progress=False)


# -- kb check -----------------------------------------------------------------------------------------


def test_kb_check_on_the_world(world_dir, capsys):
    report = check_kb(world_dir)
    kb = KB(world_dir)
    assert report["buildable"] and report["passages"]["usable"] == sum(1 for _ in kb.passages())
    assert report["images"]["usable"] == sum(1 for _ in kb.images()) and report["images"]["skipped"] == {}
    entities = report["entities"]
    assert entities["skipped"] == {} and entities["usable"] == sum(1 for _ in kb.entities())
    assert {"nation", "city", "person"} <= set(entities["kinds"]) and "capital" in entities["relation_types"]
    pictured = sum(k["pictured"] for k in entities["kinds"].values())
    paths = entities["question_paths"]
    assert paths["1"]["total"] == pictured and paths["2"]["end_on_entity"] > 0 and paths["3"]["end_on_entity"] > 0
    assert main(["kb", "check", str(world_dir)]) == 0
    out = capsys.readouterr().out
    assert "question paths" in out and "ok: indexes can be built" in out
    assert main(["kb", "check", str(world_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))


@pytest.fixture
def small_graph_kb(tmp_path):
    """A (pictured) -> B -> C -> A, D pointing at an unknown entity; flawed passages and images."""
    kb = tmp_path / "kb"
    (kb / "images").mkdir(parents=True)
    for name in ("a.png", "c.png"):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(kb / "images" / name)
    (kb / "images" / "bad.png").write_bytes(b"\x89PNG broken")
    entities = [
        {"id": "A", "name": "Alpha", "kind": "nation", "facts": {"founded": "1900"}, "relations": {"capital": "B"}},
        {"id": "B", "name": "Beta", "kind": "city", "relations": {"mayor": "C"}},
        {"id": "C", "name": "Gamma", "kind": "person", "facts": {"born": "1950", "died": "2000"},
         "relations": {"home": "A"}},
        {"id": "D", "name": "Delta", "kind": "city", "relations": {"twin": "Z"}},
        {"id": "E", "kind": "city"},
    ]
    _write_lines(kb / "entities.jsonl", [json.dumps(e) for e in entities])
    _write_lines(kb / "images.jsonl", [json.dumps(r) for r in [
        {"id": "ia", "path": "images/a.png", "title": "Flag of Alpha", "entity_id": "A"},
        {"id": "ic", "path": "images/c.png", "title": "", "entity_id": "C"},
        {"id": "ib", "path": "images/bad.png", "title": "Seal of Beta", "entity_id": "B"},
        {"id": "ix", "path": "images/none.png", "title": "Nothing"},
    ]])
    _write_lines(kb / "passages.jsonl", [
        json.dumps({"id": "p1", "title": "Alpha", "text": "Alpha is a nation."}),
        json.dumps({"id": "p2", "title": "Beta", "text": ""}),
        json.dumps({"id": "p1", "title": "Alpha", "text": "Again."}),
        "{oops",
    ])
    return kb


def test_kb_check_counts_skips_and_question_paths_by_hand(small_graph_kb):
    report = check_kb(small_graph_kb)
    assert report["passages"]["usable"] == 2
    assert counts(report["passages"]["skipped"]) == {
        "needs a string 'id' and a non-empty string 'text'": 1, "not JSON": 1}
    assert report["passages"]["skipped"]["not JSON"]["examples"] == [
        "line 4 (Expecting property name enclosed in double quotes)"]
    assert counts(report["passages"]["kept_but"]) == {"duplicate id (indexed twice)": 1}
    assert report["images"]["usable"] == 2
    assert counts(report["images"]["skipped"]) == {"image file not found": 1, "unreadable image file": 1}
    assert counts(report["images"]["kept_but"]) == {"no title (image search shows no name for it)": 1}
    entities = report["entities"]
    assert entities["usable"] == 4 and entities["facts"] == 3
    assert counts(entities["skipped"]) == {
        "entity: missing or empty 'name'": 1, "relation: target not in entities.jsonl": 1,
        "images.jsonl: bad record": 1}
    assert entities["skipped"]["relation: target not in entities.jsonl"]["examples"] == ["D.twin -> Z"]
    assert counts(entities["kept_but"]) == {"no relations (questions about it stop at 1 hop or a fact)": 1,
                                            "no readable image (reached only through a relation)": 2}
    assert entities["kinds"] == {"city": {"entities": 2, "pictured": 0}, "nation": {"entities": 1, "pictured": 1},
                                 "person": {"entities": 1, "pictured": 1}}
    assert entities["relation_types"] == {"capital": 1, "home": 1, "mayor": 1}
    # pictured: A and C. 2 hops: A->B, C->A; facts of A (1) and C (2).
    # 3 hops: A->B->C, C->A->B; facts of B (0) and A (1).
    assert entities["question_paths"] == {
        "1": {"total": 2, "end_on_entity": 2, "end_on_fact": 0},
        "2": {"total": 5, "end_on_entity": 2, "end_on_fact": 3},
        "3": {"total": 3, "end_on_entity": 2, "end_on_fact": 1}}
    assert report["buildable"]


def test_kb_check_fails_on_a_kb_nothing_can_be_built_from(tmp_path, capsys):
    kb = tmp_path / "broken"
    kb.mkdir()
    _write_lines(kb / "passages.jsonl", [json.dumps({"id": "p1", "text": "  "}), "not json"])
    _write_lines(kb / "images.jsonl", [json.dumps({"id": "i1", "path": "images/gone.png"})])
    assert main(["kb", "check", str(kb)]) == 1
    captured = capsys.readouterr()
    assert "error: nothing can be built" in captured.out and "no usable passages and no usable images" in captured.err
    assert "image file not found" in captured.out and "e.g. line 1: images/gone.png" in captured.out
    assert main(["kb", "check", str(tmp_path / "empty")]) == 2
    assert "neither passages.jsonl nor images.jsonl" in capsys.readouterr().err


def test_imported_images_build_an_image_index(image_folder, clip_dir, tmp_path, capsys):
    captions = _write_lines(tmp_path / "captions.jsonl", [json.dumps(r) for r in CAPTION_ROWS])
    kb, index = tmp_path / "kb", tmp_path / "index"
    import_images(image_folder, captions, kb, progress=False)
    built = build_indexes(IndexBuildConfig(kb=str(kb), out=str(index), bm25=False, dense=False, device="cpu",
                                           image_encoder=ImageEncoderConfig(name=str(clip_dir))), progress=False)
    assert built["image"]["count"] == 3 and "skipped" not in built["image"]["extra"]
    assert main(["search", "image", str(image_folder / "birds" / "owl.png"), "--index", str(index), "--k", "1"]) == 0
    assert capsys.readouterr().out.startswith("[1] \nA brown owl.")  # no title: the match shows its caption only
