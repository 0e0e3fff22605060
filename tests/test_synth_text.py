"""`mmsearch synth ... modality=text`: text-only questions from the small world.

The first entity is named, or described by a fact or relation unique in the KB; rows have no images;
gold trajectories call text_search only; hops count text searches (one per relation or fact
followed, plus one when the first entity is described). Answers, uniqueness and split membership
are re-derived here from `entities.jsonl` as plain JSON, independently of the synthesis code.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.synth.config import MixConfig, SplitConfig, SynthConfig
from data_pipeline.synth.filters import answer_in_question
from data_pipeline.synth.graph import EntityGraph
from data_pipeline.synth.planner import result_blocks
from data_pipeline.synth.questions import Category
from data_pipeline.synth.run import category_targets, run_synth
from data_pipeline.synth.splits import partition_entities
from data_pipeline.synth.text_questions import KBNames
from mmsearch.protocols.qwen_tools import parse_action
from mmsearch.rewards.answer import normalize_answer


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "work" / "examples.jsonl").read_text().splitlines()]


def _entities(kb: Path) -> dict[str, dict]:
    return {e["id"]: e for e in map(json.loads, (kb / "entities.jsonl").read_text().splitlines())}


def _names(entity: dict) -> list[str]:
    return [entity["name"], *entity.get("aliases", [])]


def _says(text: str, name: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE) is not None


def _text_cfg(world_dir: Path, out: Path, **kw) -> SynthConfig:
    return SynthConfig(kb=str(world_dir), out=str(out), modality="text", **kw)


@pytest.fixture(scope="module")
def text_questions(world_dir: Path, tmp_path_factory) -> tuple[Path, SynthConfig]:
    """200 text questions without trajectories (no tools run)."""
    out = tmp_path_factory.mktemp("synth") / "text_none"
    cfg = _text_cfg(world_dir, out, n=200, seed=3, trajectories="none", chunk=32)
    run_synth(cfg, progress=False)
    return out, cfg


@pytest.fixture(scope="module")
def text_gold(world_dir: Path, search, tmp_path_factory) -> Path:
    """60 text questions with gold trajectories through the real tools. The toolbox handed in has all three
    tools: the text modality must narrow it to text_search."""
    from tools.config import ToolsConfig
    from tools.registry import build_toolbox

    out = tmp_path_factory.mktemp("synth") / "text_gold"
    run_synth(_text_cfg(world_dir, out, n=60, seed=1, chunk=32), toolbox=build_toolbox(ToolsConfig(), search),
              progress=False)
    return out


def test_text_rows_have_no_images(text_questions, text_gold: Path):
    import datasets

    from mmsearch.eval.loaders import load_examples

    out, _ = text_questions
    for rows in (_rows(out), _rows(text_gold)):
        assert rows and all(r["images"] == [] and r["requires_search"] for r in rows)
        assert not list((out / "work").glob("scenes/**/*.jpg"))  # nothing rendered for a text set
    saved = datasets.load_from_disk(str(text_gold))
    assert isinstance(saved["train"].features["images"].feature, datasets.Image)
    assert all(images == [] for split in saved.values() for images in split["images"])
    # the eval loader reads them as text questions, for image-reading and text-only policies alike
    for text_only in (False, True):
        examples, report = load_examples(str(text_gold), split="train", text_only=text_only)
        assert not report.skipped and len(examples) == saved["train"].num_rows
        assert all(ex.images == [] and ex.requires_search for ex in examples)


def test_text_questions_name_or_uniquely_describe_their_first_entity(text_questions, world_dir: Path):
    entities = _entities(world_dir)
    rows = _rows(text_questions[0])
    views = Counter(r["meta"]["view"] for r in rows)
    assert views["named"] > 0 and views["described"] > 0
    assert {r["kind"] for r in rows} <= {e["kind"] for e in entities.values()}  # no search-free kinds
    for row in rows:
        meta, anchor = row["meta"], entities[row["meta"]["anchor"]]
        if meta["view"] == "named":
            assert _says(row["question"], anchor["name"])
            others = [e for e in entities.values() if e["id"] != anchor["id"]]
            assert not any(normalize_answer(anchor["name"]) == normalize_answer(n) for e in others for n in _names(e))
            assert row["hops"] == len(meta["path"])
        else:
            described = meta["description"]
            assert _says(row["question"], described["value"])
            relation, value = described["relation"], described["value"]
            if described["fact"]:
                fits = [e for e in entities.values()
                        if normalize_answer(str(e["facts"].get(relation, ""))) == normalize_answer(value)]
            else:
                assert entities[described["entity"]]["name"] == value
                fits = [e for e in entities.values() if e["relations"].get(relation) == described["entity"]]
            assert [e["id"] for e in fits] == [anchor["id"]], f"{row['question']}: not unique in the KB"
            assert not any(_says(row["question"], n) for n in _names(anchor))
            assert row["hops"] == 1 + len(meta["path"])
        # the answer is read off the graph at the end of the path
        current = anchor
        for hop in meta["path"]:
            if hop["entity"] is None:
                assert row["answers"] == [str(current["facts"][hop["relation"]])]
                break
            assert current["relations"][hop["relation"]] == hop["entity"]
            current = entities[hop["entity"]]
        else:
            assert row["answers"] == _names(current)
        assert not answer_in_question(row["question"], row["answers"])
    assert Counter(r["hops"] for r in rows).keys() == {1, 2, 3}
    # every configured hop count is made, and no other (named: one search per relation; described: one more)
    assert {r["hops"] for r in rows} == {int(h) for h in SynthConfig().mix.hops}


def test_text_questions_never_name_an_entity_of_another_split(text_questions, world_dir: Path):
    out, cfg = text_questions
    entities = _entities(world_dir)
    parts = partition_entities(EntityGraph.load(world_dir), cfg.splits, cfg.seed)
    rows = _rows(out)
    assert {r["split"] for r in rows} == {"train", "validation", "test"}
    for row in rows:
        split = parts[row["split"]]
        assert set(row["meta"]["entities"]) <= split and row["split_key"] in split
        for entity_id, entity in entities.items():
            if entity_id not in split:
                named = [n for n in _names(entity) if _says(row["question"], n)]
                assert not named, f"{row['id']} ({row['split']}) names {named} of another split: {row['question']}"


def test_text_gold_calls_only_text_search_and_ends_on_the_answer(text_gold: Path, world_dir: Path):
    entities = _entities(world_dir)
    rows = _rows(text_gold)
    assert Counter(r["meta"]["view"] for r in rows)["described"] > 0
    for row in rows:
        messages = row["messages"]
        assert [m["role"] for m in messages[:2]] == ["system", "user"]
        tools = re.search(r"<tools>\n(.*)\n</tools>", messages[0]["content"], re.DOTALL).group(1).splitlines()
        assert [json.loads(t)["function"]["name"] for t in tools] == ["text_search"]
        assert messages[1]["content"] == [{"type": "text", "text": row["question"]}]
        assistants = [parse_action(m["content"]) for m in messages if m["role"] == "assistant"]
        assert all(a.is_valid for a in assistants)
        assert assistants[-1].kind == "answer" and assistants[-1].answer == row["answers"][0]
        calls = [a.name for a in assistants if a.kind == "tool_call"]
        assert calls == ["text_search"] * row["hops"]  # one text search per hop
        results = [m["content"][0]["text"] for m in messages if m["role"] == "tool"]
        assert all(len(m["content"]) == 1 for m in messages if m["role"] == "tool")  # no tool images
        meta = row["meta"]
        if meta["view"] == "described":  # the first search shows the described entity by name
            anchor = entities[meta["anchor"]]
            assert any(any(_says(block, n) for n in _names(anchor)) and _says(block, meta["description"]["value"])
                       for _, block in result_blocks(results[0]))
            results = results[1:]
        for hop, text in zip(meta["path"], results, strict=True):
            expected = _names(entities[hop["entity"]]) if hop["entity"] else [row["answers"][0]]
            assert any(_says(text, e) for e in expected)


def test_text_gold_rows_are_sft_samples(text_gold: Path, hf_engine):
    from mmsearch.agent.setup import vision_from_processor
    from mmsearch.sft.samples import SampleLimits, load_samples
    from mmsearch.trajectory import TrajectoryBuilder
    from tools.config import VisionResizeConfig

    processor = hf_engine.processor
    vision = vision_from_processor(processor, VisionResizeConfig())
    samples, report = load_samples(str(text_gold), "train", TrajectoryBuilder(processor), vision, SampleLimits())
    assert samples and not report.skipped, report
    assert all(s.images == [] and not s.image_grid_thw for s in samples)


def test_text_info_and_card_say_the_modality(text_gold: Path):
    info = json.loads((text_gold / "synth_info.json").read_text())
    assert info["modality"] == "text" and info["vision"] is None  # no crop boxes to check against a processor
    assert "described" in info["hop_count"]
    assert set(info["mix"]["train"]) <= {f"{h}-hop {v}" for h in (1, 2, 3) for v in ("named", "described")}
    card = (text_gold / "card.md").read_text()
    assert "Modality: **text**" in card and "| modality | text |" in card
    assert info["hop_count"] in card


def test_same_seed_same_text_dataset(world_dir: Path, text_questions, tmp_path: Path):
    out, _ = text_questions
    first = json.loads((out / "synth_info.json").read_text())["fingerprint"]
    again = run_synth(_text_cfg(world_dir, tmp_path / "again", n=200, seed=3, trajectories="none", chunk=32),
                      progress=False)
    assert again["fingerprint"] == first
    assert _rows(tmp_path / "again") == _rows(out)
    other = run_synth(_text_cfg(world_dir, tmp_path / "other", n=200, seed=4, trajectories="none", chunk=32),
                      progress=False)
    assert other["fingerprint"] != first


def test_text_category_targets():
    targets = category_targets(100, MixConfig(), "text")
    assert sum(targets.values()) == 100 and all(c.requires_search for c in targets)
    assert sum(k for c, k in targets.items() if c.view == "described") == 30
    assert targets[Category(True, 1, "named")] == 28 and targets[Category(True, 3, "described")] == 6
    assert {c.view for c in category_targets(100, MixConfig(described=0.0), "text")} == {"named"}
    with pytest.raises(ValueError, match="mix.described"):
        category_targets(10, MixConfig(described=1.5), "text")


def test_descriptions_are_unique_and_stay_in_the_split(tmp_path: Path):
    """A KB without images: facts shared by two entities, a value giving a name away, a value naming an
    entity of another split, and a name two entities share."""
    kb = tmp_path / "kb"
    kb.mkdir()
    entities = [
        {"id": "a", "name": "Alpha", "kind": "nation", "aliases": [], "relations": {"capital": "c"},
         "facts": {"founded": "1200", "currency": "gold mark", "official_language": "Alphan",
                   "motto": "Delta forever"}},
        {"id": "b", "name": "Beta", "kind": "nation", "aliases": [], "relations": {"capital": "d"},
         "facts": {"founded": "1200", "currency": "bead"}},
        {"id": "c", "name": "Gamma", "kind": "city", "aliases": [], "facts": {}, "relations": {"country": "a"}},
        {"id": "d", "name": "Delta", "kind": "city", "aliases": ["Alpha"], "facts": {}, "relations": {"country": "b"}},
    ]
    (kb / "entities.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entities))
    (kb / "passages.jsonl").write_text(json.dumps({"id": "p", "title": "Alpha", "text": "Alpha is a nation."}) + "\n")
    names = KBNames(EntityGraph.load(kb))
    found = {(d.relation, d.value) for d in names.descriptions("a", {"a", "c"})}
    # founded 1200 is Beta's too, Alphan gives Alpha away, Delta is not in the split
    assert found == {("currency", "gold mark"), ("capital", "Gamma")}
    assert {(d.relation, d.value) for d in names.descriptions("a", {"a", "c", "d"})} == {
        ("currency", "gold mark"), ("capital", "Gamma"), ("motto", "Delta forever")}
    assert not names.unique_name("a")  # Delta's alias is Alpha
    assert names.unique_name("b") and names.named_in("the bead of Beta") == {"b"}

    out = tmp_path / "ds"
    run_synth(SynthConfig(kb=str(kb), out=str(out), n=8, modality="text", trajectories="none",
                          splits=SplitConfig(validation=0.0, test=0.0)), progress=False)
    rows = _rows(out)
    assert rows and all(r["images"] == [] for r in rows)
    assert not [r for r in rows if r["meta"]["view"] == "named" and r["meta"]["anchor"] == "a"]


def test_cli_synth_text(world_dir: Path, tmp_path: Path, capsys):
    from mmsearch.cli.main import main

    out = tmp_path / "ds"
    assert main(["synth", "--kb", str(world_dir), "--out", str(out), "--n", "20", "--trajectories", "none",
                 "modality=text"]) == 0
    assert "wrote" in capsys.readouterr().out
    rows = _rows(out)
    assert rows and all(r["images"] == [] and r["requires_search"] for r in rows)
    assert json.loads((out / "synth_info.json").read_text())["modality"] == "text"
    with pytest.raises(ValueError, match="modality must be one of image, text"):
        run_synth(SynthConfig(kb=str(world_dir), out=str(tmp_path / "bad"), modality="audio"), progress=False)
