"""`mmsearch synth` on the small world: hop correctness, evidence, splits, mix, filters, determinism, resume.

Answers are re-derived here from `entities.jsonl` as plain JSON, independently of the synthesis code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline.synth.config import SplitConfig, SynthConfig
from data_pipeline.synth.filters import answer_in_question
from data_pipeline.synth.graph import EntityGraph
from data_pipeline.synth.planner import check_evidence, find_evidence, result_blocks
from data_pipeline.synth.questions import Candidate, Category, Step
from data_pipeline.synth.run import category_targets, run_synth
from mmsearch.protocols.qwen_tools import parse_action
from mmsearch.trajectory import ToolCallRecord, Trajectory


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "work" / "examples.jsonl").read_text().splitlines()]


def _entities(kb: Path) -> dict[str, dict]:
    return {e["id"]: e for e in map(json.loads, (kb / "entities.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def questions_only(world_dir: Path, tmp_path_factory) -> Path:
    """200 examples without trajectories (no tools run)."""
    out = tmp_path_factory.mktemp("synth") / "none"
    run_synth(SynthConfig(kb=str(world_dir), out=str(out), n=200, seed=3, trajectories="none", chunk=32), progress=False)
    return out


@pytest.fixture(scope="module")
def gold(gold_dataset: Path) -> Path:
    return gold_dataset


def test_answers_follow_the_graph(questions_only: Path, world_dir: Path):
    entities = _entities(world_dir)
    rows = _rows(questions_only)
    assert len(rows) >= 180  # a few hard categories (colour) fall short on this 60-entity world
    for row in rows:
        meta = row["meta"]
        if not row["requires_search"]:
            assert row["hops"] == 0
            if row["kind"] == "count":
                assert row["answers"][0] == str(len(meta["scene_entities"]))
            continue
        assert row["hops"] == 1 + len(meta["path"])
        current = entities[meta["anchor"]]
        for hop in meta["path"]:
            if hop["entity"] is None:  # a literal fact ends the path
                assert row["answers"] == [current["facts"][hop["relation"]]]
                break
            assert current["relations"][hop["relation"]] == hop["entity"]
            current = entities[hop["entity"]]
        else:
            assert row["answers"] == [current["name"], *current["aliases"]]
        if meta["view"] == "crop":
            assert meta["anchor"] in meta["scene_entities"]
        assert not answer_in_question(row["question"], row["answers"])


def test_splits_are_entity_disjoint(questions_only: Path):
    seen: dict[str, set[str]] = {}
    for row in _rows(questions_only):
        involved = set(row["meta"]["entities"]) | set(row["meta"].get("scene_entities", []))
        seen.setdefault(row["split"], set()).update(involved)
    assert set(seen) == {"train", "validation", "test"}
    assert not seen["train"] & seen["test"]
    assert not seen["train"] & seen["validation"]
    assert not seen["validation"] & seen["test"]


def test_mix_matches_config(questions_only: Path):
    rows = _rows(questions_only)
    train = [r for r in rows if r["split"] == "train"]
    targets = {c.name: k for c, k in category_targets(160, SynthConfig().mix).items()}
    kept = Counter(r["meta"]["category"] for r in train)
    assert set(kept) <= set(targets)
    assert all(kept[name] <= k for name, k in targets.items())
    # the 50:50 default between search-free and search-required, within the shortfall of hard categories
    free = sum(1 for r in train if not r["requires_search"])
    assert abs(free / len(train) - 0.5) < 0.1
    info = json.loads((questions_only / "synth_info.json").read_text())
    assert info["mix"]["train"]["1-hop whole"]["target"] == targets["1-hop whole"]
    assert "Hops" in (questions_only / "card.md").read_text() or "hops" in (questions_only / "card.md").read_text()


def test_gold_trajectories_show_their_evidence(gold: Path, world_dir: Path):
    entities = _entities(world_dir)
    rows = _rows(gold)
    assert sum(r["requires_search"] for r in rows) >= 10, "too few search examples survived the evidence check"
    for row in rows:
        messages = row["messages"]
        assert [m["role"] for m in messages[:2]] == ["system", "user"]
        assistants = [m for m in messages if m["role"] == "assistant"]
        assert all(parse_action(m["content"]).is_valid for m in assistants)
        final = parse_action(assistants[-1]["content"])
        assert final.kind == "answer" and final.answer == row["answers"][0]
        calls = [m["tool_calls"][0]["function"]["name"] for m in assistants if m.get("tool_calls")]
        results = [m["content"][0]["text"] for m in messages if m["role"] == "tool"]
        if not row["requires_search"]:
            assert calls == [] and len(assistants) == 1
            continue
        path = row["meta"]["path"]
        crop = ["crop"] if row["meta"]["view"] == "crop" else []
        assert calls == [*crop, "image_search", *["text_search"] * len(path)]
        # the identify hop: the pictured entity is the top image match
        anchor = entities[row["meta"]["anchor"]]
        top = result_blocks(results[len(crop)])[0][1]
        assert any(name in top for name in [anchor["name"], *anchor["aliases"]])
        # each followed hop: its answer is in the text-search result the trajectory read
        for hop, text in zip(path, results[len(crop) + 1:], strict=True):
            target = entities[hop["entity"]] if hop["entity"] else None
            expected = [target["name"], *target["aliases"]] if target else [row["answers"][0]]
            assert any(e.lower() in text.lower() for e in expected)
        if crop:
            assert len(row["meta"]["tool_images"]) == 1


def test_crop_box_maps_back_onto_the_object(gold: Path):
    crops = [r for r in _rows(gold) if r["meta"].get("view") == "crop"]
    assert crops
    for row in crops:
        x1, y1, x2, y2 = row["meta"]["bbox"]
        with Image.open(row["meta"]["tool_images"][0]) as crop:
            # the crop tool maps the box from the policy's pixels back to the scene's: it covers the object
            assert crop.width >= x2 - x1 - 1 and crop.height >= y2 - y1 - 1
            assert crop.width <= x2 - x1 + 8 and crop.height <= y2 - y1 + 8


def test_missing_evidence_drops_and_counts(world_dir: Path, text_index_dir: Path, tmp_path: Path):
    """Without an image index, image_search fails: every search example is dropped, and the card says why."""
    out = tmp_path / "ds"
    summary = run_synth(SynthConfig(kb=str(world_dir), index=str(text_index_dir), out=str(out), n=20, seed=0,
                                    chunk=20, max_attempts=1.0), progress=False)
    rows = _rows(out)
    assert rows and all(not r["requires_search"] for r in rows)
    assert summary["dropped"]["evidence: image_search returned an error"] > 0
    assert "image_search returned an error" in (out / "card.md").read_text()


def test_check_evidence_names_the_missing_hop():
    step = Step("text_search", {"query": "capital of Ibrovova"}, ["Ibrovova"], ["Sovugard"], "capital")
    result = "[1] Ibrovova: Government\nKotais serves as the capital of Ibrovova.\n\n[2] Sovugard\nSovugard is a city."
    assert find_evidence(step, result, 1) is None  # the answer appears, but not in a passage about the subject
    assert find_evidence(step, result.replace("Kotais", "Sovugard"), 1) == (1, "Sovugard serves as the capital of Ibrovova.")

    call = ToolCallRecord(0, "text_search", step.arguments, result, False)
    traj = Trajectory("e", 0, [], [], tool_calls=[call], final_answer="Sovugard", stop_reason="answered")
    candidate = Candidate("What is the capital?", ["Sovugard"], Category(True, 2, "whole"), "nation", [], "e", [step])
    assert check_evidence(candidate, traj, 1) == "text_search hop 0: evidence not in the results"


def test_same_seed_same_fingerprint(world_dir: Path, questions_only: Path, tmp_path: Path):
    again = tmp_path / "again"
    first = json.loads((questions_only / "synth_info.json").read_text())["fingerprint"]
    summary = run_synth(SynthConfig(kb=str(world_dir), out=str(again), n=200, seed=3, trajectories="none", chunk=32),
                        progress=False)
    assert summary["fingerprint"] == first
    other = run_synth(SynthConfig(kb=str(world_dir), out=str(tmp_path / "other"), n=200, seed=4, trajectories="none",
                                  chunk=32), progress=False)
    assert other["fingerprint"] != first


def test_resume_after_kill_matches_uninterrupted(world_dir: Path, questions_only: Path, tmp_path: Path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mmsearch.cli.main", "synth", "--kb", str(world_dir), "--out", str(out), "--n", "200",
           "--seed", "3", "--trajectories", "none", "chunk=32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = out / "work" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["bytes_written"] > 0:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    partial = json.loads(state.read_text())
    assert not partial["done"], "the run finished before it could be killed"
    with (out / "work" / "examples.jsonl").open("a") as f:
        f.write('{"id": "half a line')  # what a kill mid-write leaves behind
    subprocess.run(cmd, check=True, capture_output=True)
    rows = _rows(out)
    assert len({r["id"] for r in rows}) == len(rows)
    expected = json.loads((questions_only / "synth_info.json").read_text())["fingerprint"]
    assert json.loads((out / "synth_info.json").read_text())["fingerprint"] == expected


def test_changed_config_refuses_to_resume(world_dir: Path, tmp_path: Path):
    out = tmp_path / "ds"
    run_synth(SynthConfig(kb=str(world_dir), out=str(out), n=10, trajectories="none"), progress=False)
    with pytest.raises(ValueError, match="different config"):
        run_synth(SynthConfig(kb=str(world_dir), out=str(out), n=10, seed=9, trajectories="none"), progress=False)


def test_bad_kb_records_are_reported_and_skipped(world_dir: Path, tmp_path: Path):
    kb = tmp_path / "kb"
    shutil.copytree(world_dir, kb)
    entities = (kb / "entities.jsonl").read_text().splitlines()
    first = json.loads(entities[0])
    broken = dict(json.loads(entities[1]), id="ghost_1", relations={"capital": "no_such_entity"})
    entities += ["{not json", json.dumps({"id": "x", "kind": "city"}), json.dumps(broken), entities[0]]
    (kb / "entities.jsonl").write_text("\n".join(entities) + "\n")
    image = json.loads((kb / "images.jsonl").read_text().splitlines()[0])
    (kb / image["path"]).write_bytes(b"not a png at all")
    graph = EntityGraph.load(kb)
    skipped = graph.report.skipped
    assert skipped["entities.jsonl: unreadable line"] == 1
    assert skipped["entity: missing or empty 'name'"] == 1
    assert skipped["entity: duplicate id"] == 1
    assert skipped["relation: target not in entities.jsonl"] == 1
    assert first["id"] in graph.entities and "ghost_1" in graph.entities
    out = tmp_path / "ds"
    run_synth(SynthConfig(kb=str(kb), out=str(out), n=60, trajectories="none"), progress=False)
    info = json.loads((out / "synth_info.json").read_text())
    assert info["kb_report"]["image: corrupt file"]["count"] == 1
    assert all(image["path"] not in p for r in _rows(out) for p in r["images"])
    assert "duplicate id" in (out / "card.md").read_text()


def test_any_entity_graph_works(tmp_path: Path):
    """A KB that is not the world: planets and moons, a relation and facts the templates have never seen."""
    kb = tmp_path / "kb"
    (kb / "img").mkdir(parents=True)
    entities, images = [], []
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "magenta"]
    for i, colour in enumerate(colours):
        kind = "planet" if i < 5 else "moon"
        relations = {"orbits": f"e{i - 5}"} if kind == "moon" else {}
        entities.append({"id": f"e{i}", "name": f"Body{i}", "aliases": [f"B{i}"], "kind": kind,
                         "facts": {"mass": f"{i + 1}e22 kg"}, "relations": relations})
        Image.new("RGB", (64, 64), colour).save(kb / "img" / f"e{i}.png")
        images.append({"id": f"i{i}", "path": f"img/e{i}.png", "title": f"Body{i}", "entity_id": f"e{i}"})
    (kb / "entities.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entities))
    (kb / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in images))
    out = tmp_path / "ds"
    run_synth(SynthConfig(kb=str(kb), out=str(out), n=40, trajectories="none", splits=SplitConfig(validation=0.0, test=0.2, region_size=2)),
              progress=False)
    rows = _rows(out)
    two_hop = [r for r in rows if r["hops"] == 2]
    assert two_hop
    for row in two_hop:
        hop = row["meta"]["path"][0]
        if hop["relation"] == "orbits":
            assert "orbits" in row["question"] and row["answers"][0] == f"Body{int(hop['entity'][1:])}"
        else:
            assert hop["relation"] == "mass" and row["answers"][0].endswith("e22 kg")
    assert {r["kind"] for r in rows if r["requires_search"]} <= {"planet", "moon"}


def test_category_targets_follow_the_mix():
    targets = category_targets(100, SynthConfig().mix)
    assert sum(targets.values()) == 100
    assert sum(k for c, k in targets.items() if not c.requires_search) == 50
    assert targets[Category(True, 1, "whole")] == 10 and targets[Category(True, 3, "crop")] == 5


def test_cli_synth_and_import(world_dir: Path, tmp_path: Path, capsys):
    from mmsearch.cli.main import main

    out = tmp_path / "ds"
    assert main(["synth", "--kb", str(world_dir), "--out", str(out), "--n", "20", "--trajectories", "none",
                 "mix.search_free=1.0"]) == 0
    assert "wrote" in capsys.readouterr().out
    rows = _rows(out)
    assert rows and all(not r["requires_search"] for r in rows)

    image = tmp_path / "img" / "a.png"
    image.parent.mkdir()
    Image.new("RGB", (8, 8), "red").save(image)
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"data_id": "q1", "image_id": "a", "entity_id": "Q1", "question": "What is it?",
                                   "answer": ["a thing"]}) + "\n")
    assert main(["synth", "import", "--records", str(records), "--image-root", str(image.parent),
                 "--out", str(tmp_path / "imported")]) == 0
    assert (tmp_path / "imported" / "dataset_dict.json").exists()

    assert main(["synth", "--kb", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "not a KB dir" in capsys.readouterr().err
