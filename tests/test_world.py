"""The embedded world generator: determinism, KB format, graph consistency, text, pictures, scenes."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.world import KindShares, WorldConfig, build_world
from data_pipeline.world.graph import RELATIONS
from data_pipeline.world.names import REAL_NAMES
from tools.kb import KB

# relation -> (subject kind, target kind)
SCHEMA = {
    "capital": ("nation", "city"), "country": ("city", "nation"), "flows_through": ("river", "nation"),
    "birthplace": ("person", "city"), "founder": ("organisation", "person"),
    "headquarters": ("organisation", "city"), "creator": ("artwork", "person"),
    "housed_in": ("artwork", "organisation"),
}


def _config_of(world_dir: Path, **changes) -> WorldConfig:
    """The config a world was built with, as world.json records it, with `changes` applied."""
    recorded = json.loads((world_dir / "world.json").read_text())["config"]
    recorded["kinds"] = KindShares(**recorded["kinds"])
    return WorldConfig(**{**recorded, **changes})


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def entities(world_dir: Path) -> dict[str, dict]:
    return {e["id"]: e for e in _jsonl(world_dir / "entities.jsonl")}


@pytest.fixture(scope="module")
def passages(world_dir: Path) -> list[dict]:
    return _jsonl(world_dir / "passages.jsonl")


def test_same_config_gives_identical_bytes_with_any_worker_count(world_dir: Path, tmp_path: Path):
    again = tmp_path / "again"
    build_world(_config_of(world_dir, out=str(again), workers=2), progress=False)
    first, second = _files(world_dir), _files(again)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_different_seed_gives_a_different_world(world_dir: Path, tmp_path: Path):
    other = tmp_path / "other"
    build_world(_config_of(world_dir, out=str(other), seed=1), progress=False)
    for name in ("entities.jsonl", "passages.jsonl", "scenes.jsonl", "images/nation/nation_0000.png"):
        assert (world_dir / name).read_bytes() != (other / name).read_bytes(), name


def test_every_record_reads_through_the_kb_reader(world_dir: Path):
    kb = KB(world_dir)
    counts = json.loads((world_dir / "world.json").read_text())["counts"]
    assert len(list(kb.passages())) == counts["passages"]
    images = list(kb.images(check_files=True))
    assert len(images) == counts["images"]
    assert len(list(kb.entities())) == counts["entities"] == 60
    assert len(list(kb.scenes())) == counts["scenes"] > 0
    assert {name: r.skipped for name, r in kb.skips.items() if r.skipped} == {}
    assert all(img.entity_id and img.title and img.text for img in images)
    # Scenes are question images, not KB entries.
    assert not any(img.path.startswith("scenes/") for img in images)


def test_names_and_aliases_are_unique_and_invented(entities: dict[str, dict]):
    seen: dict[str, str] = {}
    for e in entities.values():
        assert set(e) == {"id", "name", "aliases", "kind", "facts", "relations"}
        assert e["facts"] and all(isinstance(v, str) and v for v in e["facts"].values())
        for label in [e["name"], *e["aliases"]]:
            assert seen.setdefault(label.casefold(), e["id"]) == e["id"], f"{label!r} is used twice"
            assert not set(re.findall(r"[a-z]+", label.casefold())) & REAL_NAMES, label


def test_relations_point_at_existing_entities_of_the_right_kind(entities: dict[str, dict]):
    for e in entities.values():
        assert {r for r, (kind, _) in SCHEMA.items() if kind == e["kind"]} == set(e["relations"])
        for relation, target in e["relations"].items():
            assert relation in RELATIONS
            assert entities[target]["kind"] == SCHEMA[relation][1], (e["id"], relation)


def test_facts_agree_with_relations(entities: dict[str, dict]):
    def population(value: str) -> float:
        return float(value.split()[0]) * 1e6 if value.endswith("million") else float(value.replace(",", ""))

    for e in entities.values():
        rel, facts = e["relations"], e["facts"]
        if e["kind"] == "nation":
            assert entities[rel["capital"]]["relations"]["country"] == e["id"]
            own_cities = [c for c in entities.values() if c["relations"].get("country") == e["id"]]
            assert population(facts["population"]) > sum(population(c["facts"]["population"]) for c in own_cities)
        if e["kind"] == "organisation":
            founder = entities[rel["founder"]]["facts"]
            assert int(founder["born"]) < int(facts["founded"]) <= int(founder["died"])
        if e["kind"] == "artwork":
            creator = entities[rel["creator"]]["facts"]
            assert creator["occupation"] == "painter"
            assert int(creator["born"]) < int(facts["year"]) <= int(creator["died"])
            assert entities[rel["housed_in"]]["facts"]["type"] in ("art museum", "art gallery", "art collection")


def test_relations_chain_over_three_hops(entities: dict[str, dict]):
    def longest_chain(entity_id: str, seen: tuple[str, ...] = ()) -> int:
        steps = [t for t in entities[entity_id]["relations"].values() if t not in seen]
        return max((1 + longest_chain(t, seen + (entity_id,)) for t in steps), default=0)

    # artwork -creator-> person -birthplace-> city -country-> nation -capital-> city
    for e in entities.values():
        if e["kind"] == "artwork":
            person = entities[e["relations"]["creator"]]
            city = entities[person["relations"]["birthplace"]]
            nation = entities[city["relations"]["country"]]
            assert entities[nation["relations"]["capital"]]["kind"] == "city"
    assert max(longest_chain(eid) for eid in entities) >= 4


def test_each_relation_and_fact_is_stated_in_the_entity_own_passages(entities, passages):
    own: dict[str, list[str]] = {}
    for p in passages:
        if p.get("entity_id"):
            own.setdefault(p["entity_id"], []).append(p["text"])
    for e in entities.values():
        texts = own[e["id"]]
        assert len(texts) >= 3, e["id"]
        for relation, target in e["relations"].items():
            assert any(entities[target]["name"] in t and e["name"] in t for t in texts), (e["id"], relation)
        for name, value in e["facts"].items():
            assert any(value in t for t in texts), (e["id"], name)


def test_distractors_name_related_entities_without_stating_relations(entities, passages):
    distractors = [p for p in passages if not p.get("entity_id")]
    assert len(distractors) == len(entities)
    names = [e["name"] for e in entities.values()]
    related = {frozenset((e["id"], t)) for e in entities.values() for t in e["relations"].values()}
    by_name = {e["name"]: e["id"] for e in entities.values()}
    for p in distractors:
        named = [n for n in names if n in p["text"]]
        assert len(named) >= 2, p["text"]
        assert any(frozenset((by_name[a], by_name[b])) in related for a, b in itertools.combinations(named, 2))
        assert not re.search(r"capital|born|found|headquarter|painted|flows|collection", p["text"]), p["text"]


def _pixels(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    return np.asarray(image.resize(size, Image.LANCZOS) if size else image, dtype=np.float32)


def test_pictures_are_pairwise_distinct(world_dir: Path):
    records = _jsonl(world_dir / "images.jsonl")
    thumbs = np.stack([_pixels(world_dir / r["path"], (16, 16)).ravel() for r in records])
    distance = np.abs(thumbs[:, None, :] - thumbs[None, :, :]).mean(-1)
    np.fill_diagonal(distance, np.inf)
    assert distance.min() > 2.0  # mean absolute difference, in 0-255 levels per channel


def test_scene_objects_sit_apart_inside_the_scene_and_show_their_picture(world_dir: Path):
    images = {r["id"]: r for r in _jsonl(world_dir / "images.jsonl")}
    config = _config_of(world_dir)
    for scene in _jsonl(world_dir / "scenes.jsonl"):
        w, h = scene["width"], scene["height"]
        pixels = _pixels(world_dir / scene["path"])
        assert pixels.shape == (h, w, 3)
        objects = scene["objects"]
        assert config.scene_objects_min <= len(objects) <= config.scene_objects_max
        assert len({o["position"] for o in objects}) == len(objects)
        for o in objects:
            x1, y1, x2, y2 = o["bbox"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            column = ("left", "", "right")[min(2, 3 * (x1 + x2) // (2 * w))]
            row = ("top", "", "bottom")[min(2, 3 * (y1 + y2) // (2 * h))]
            assert o["position"] == ("-".join(filter(None, (row, column))) or "center")
            assert images[o["image_id"]]["entity_id"] == o["entity_id"]
            expected = _pixels(world_dir / images[o["image_id"]]["path"], (x2 - x1, y2 - y1))
            assert np.abs(pixels[y1:y2, x1:x2] - expected).mean() < 1.0
        for a, b in itertools.combinations(objects, 2):
            (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a["bbox"], b["bbox"]
            assert ax2 <= bx1 or bx2 <= ax1 or ay2 <= by1 or by2 <= ay1, (scene["id"], a, b)


def test_every_picture_appears_in_some_scene(world_dir: Path):
    shown = {o["image_id"] for s in _jsonl(world_dir / "scenes.jsonl") for o in s["objects"]}
    assert shown == {r["id"] for r in _jsonl(world_dir / "images.jsonl")}


def test_rebuild_replaces_a_world_but_never_a_foreign_dir(tmp_path: Path):
    out = tmp_path / "kb"
    build_world(WorldConfig(out=str(out), entities=6, scenes_per_entity=0.5), progress=False)
    summary = build_world(WorldConfig(out=str(out), entities=7, scenes_per_entity=0.5), progress=False)
    assert summary["entities"] == len(_jsonl(out / "entities.jsonl")) == 7
    assert not (tmp_path / "kb.partial").exists()
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_world(WorldConfig(out=str(foreign), entities=6), progress=False)
    assert (foreign / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("changes", [{"entities": 5}, {"scene_objects_max": 10}, {"workers": 0}])
def test_bad_config_is_refused(tmp_path: Path, changes: dict):
    with pytest.raises(ValueError):
        build_world(WorldConfig(out=str(tmp_path / "kb"), **changes), progress=False)
