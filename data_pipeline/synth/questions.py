"""Candidate questions: a category, an anchor in the split, a path through the graph, and the wording.

A candidate carries everything the gold planner needs to answer it with the real tools: the crop
box (in the pixels the policy sees), which image to search, the text query for each hop, and the
evidence each tool result must contain. Hop correctness is by construction: the answer is read off
the graph at the end of the path, and `tests/test_synth.py` re-derives it independently.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.synth import templates as T
from data_pipeline.synth.graph import EntityGraph
from data_pipeline.synth.scenes import ComposedScene, PlacedObject, ScenePool, dominant_colour
from data_pipeline.world.scenes import POSITIONS
from tools.config import VisionResizeConfig
from tools.imaging import seen_size

VISUAL_KINDS = ("count", "position", "picture", "colour")
COLOUR_ALIASES = {"gold": ("yellow",), "grey": ("gray",), "sky blue": ("light blue", "blue"), "navy": ("dark blue", "blue"),
                  "teal": ("blue-green",), "lime": ("light green", "green")}


@dataclass(frozen=True)
class Category:
    requires_search: bool
    hops: int = 0
    view: str = ""  # whole | crop (image modality) | named | described (text modality): search-required
    visual: str = ""  # count | position | picture | colour (search-free)

    @property
    def name(self) -> str:
        return f"{self.hops}-hop {self.view}" if self.requires_search else f"search-free {self.visual}"


@dataclass
class Step:
    """One tool call of the gold path and the evidence its result must show."""

    tool: str  # crop | image_search | text_search
    arguments: dict
    subject: list[str]  # names of what the step is about (for text_search: must appear with the evidence)
    evidence: list[str]  # any of these must appear in the result
    relation: str = ""  # text_search: the relation or fact followed
    fact: bool = False  # the relation is a literal fact (a year, a population), not a link to an entity
    # text_search (text modality): the step finds the question's described first entity from the
    # description's value (`subject`), rather than following `relation` from a known entity
    describes: bool = False


@dataclass
class Candidate:
    question: str
    answers: list[str]
    category: Category
    kind: str
    images: list[Path]
    split_key: str
    steps: list[Step] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    explanation: str = ""  # search-free: what the picture shows, for the gold thinking


def make_candidate(graph: EntityGraph, category: Category, kind: str | None, split_entities: set[str],
                   scenes: ScenePool, scene_count: int, vision: VisionResizeConfig, facts_share: float,
                   rng: random.Random) -> Candidate | None:
    """A candidate of `category` about an entity of `kind` (any kind when None or unavailable), or None."""
    if not category.requires_search:
        scene = scenes.scene(rng.randrange(scene_count))
        if scene is None:
            return None
        return _visual(category, scene, graph, rng, vision if scenes.cfg.read_crops else None)
    if category.view == "crop":
        scene = scenes.scene(rng.randrange(scene_count))
        if scene is None:
            return None
        objects = [o for o in scene.objects if graph.entities[o.entity_id].kind == kind] or list(scene.objects)
        obj = rng.choice(objects)
        return _search(graph, category, obj.entity_id, split_entities, facts_share, rng, scene, obj, vision)
    pool = [e for e in scenes.pictured if graph.entities[e].kind == kind] or scenes.pictured
    if not pool:
        return None
    return _search(graph, category, rng.choice(pool), split_entities, facts_share, rng)


def follow_path(graph: EntityGraph, anchor: str, follows: int, split_entities: set[str], facts_share: float,
                rng: random.Random, avoid: frozenset[str] = frozenset()) -> list[tuple[str, str]] | None:
    """`follows` (relation, target id) steps from the anchor inside the split, visiting no entity twice
    (nor any of `avoid`); the last may be (fact, "") instead."""
    path, seen, current = [], {anchor, *avoid}, anchor
    for step in range(follows):
        entity = graph.entities[current]
        relations = [(r, t) for r, t in sorted(entity.relations.items()) if t in split_entities and t not in seen]
        facts = [(f, "") for f in sorted(entity.facts)]
        last = step == follows - 1
        if last and facts and (not relations or rng.random() < facts_share):
            path.append(rng.choice(facts))
            return path
        if not relations:
            return None
        relation, current = rng.choice(relations)
        seen.add(current)
        path.append((relation, current))
    return path


def _search(graph: EntityGraph, category: Category, anchor_id: str, split_entities: set[str], facts_share: float,
            rng: random.Random, scene: ComposedScene | None = None, obj: PlacedObject | None = None,
            vision: VisionResizeConfig | None = None) -> Candidate | None:
    anchor = graph.entities[anchor_id]
    path = follow_path(graph, anchor_id, category.hops - 1, split_entities, facts_share, rng)
    if path is None:
        return None
    position = obj.position if obj is not None else None
    steps: list[Step] = []
    if scene is not None:
        steps.append(Step("crop", {"image": 0, "bbox": _seen_box(obj.bbox, scene, vision)}, [], []))
        images = [scene.path]
        split_key = anchor_id
    else:
        image = rng.choice([i for i in graph.images[anchor_id] if graph.image_ok(i.path)] or [None])
        if image is None:
            return None
        images, split_key = [image.path], anchor_id
    steps.append(Step("image_search", {"image": len(steps)}, anchor.answers, anchor.answers))

    np_, current = T.anchor_np(rng, anchor.kind, position), anchor
    for relation, target in path:
        if target:
            query = T.relation_query(rng, relation, current.name)
            evidence = graph.entities[target].answers
        else:
            query, evidence = T.fact_query(rng, relation, current.name), [current.facts[relation]]
        steps.append(Step("text_search", {"query": query}, current.answers, evidence, relation, fact=not target))
        if target:
            np_, current = T.relation_np(rng, relation, np_), graph.entities[target]

    if not path:
        question, answers = T.identify_question(rng, anchor.kind, position), anchor.answers
    elif path[-1][1] == "":
        question, answers = T.fact_question(rng, path[-1][0], np_), [current.facts[path[-1][0]]]
    else:
        question, answers = T.entity_question(rng, current.kind, np_), current.answers
    keep = [position] if position else []
    meta = {"view": category.view, "position": position, "anchor": anchor_id,
            "path": [{"relation": r, "entity": t or None} for r, t in path],
            "entities": [anchor_id, *(t for _, t in path if t)], "keep": keep}
    if obj is not None:
        meta["bbox"] = list(obj.bbox)
        meta["scene_entities"] = [o.entity_id for o in scene.objects]
    return Candidate(question, answers, category, anchor.kind, images, split_key, steps, meta)


def _seen_box(bbox: tuple[int, int, int, int], scene: ComposedScene, vision: VisionResizeConfig) -> list[int]:
    """The object's box in the pixels the policy sees (the crop tool maps it back), rounded outwards."""
    sw, sh = seen_size(scene.width, scene.height, vision)
    x1, y1, x2, y2 = bbox
    return [math.floor(x1 * sw / scene.width), math.floor(y1 * sh / scene.height),
            min(sw, math.ceil(x2 * sw / scene.width)), min(sh, math.ceil(y2 * sh / scene.height))]


def _scene_key(scene: ComposedScene) -> str:
    return f"scene:{scene.path.parent.name}/{scene.path.stem}"


def _describe(graph: EntityGraph, obj: PlacedObject) -> str:
    kind = graph.entities[obj.entity_id].kind
    noun = T.PICTURE_NOUN.get(kind)
    return f"the {noun}" if noun else f"the picture of a {T.kind_noun(kind)}"


def _cell_box(position: str, scene: ComposedScene, vision: VisionResizeConfig) -> list[int]:
    """The grid cell `position` names, in the pixels the policy sees (one box per position word)."""
    row, col = next((r, c) for r, cells in enumerate(POSITIONS) for c, p in enumerate(cells) if p == position)
    xs, ys = [scene.width * i // 3 for i in range(4)], [scene.height * i // 3 for i in range(4)]
    return _seen_box((xs[col], ys[row], xs[col + 1], ys[row + 1]), scene, vision)


def _visual(category: Category, scene: ComposedScene, graph: EntityGraph, rng: random.Random,
            read_crops: VisionResizeConfig | None = None) -> Candidate | None:
    """A search-free question about `scene`; with `read_crops` (the policy's resize), picture and colour
    questions crop the cell they name before answering."""
    candidate = _visual_question(category, scene, graph, rng)
    if candidate is not None and read_crops is not None and candidate.kind in ("picture", "colour"):
        position = candidate.meta["keep"][0]
        candidate.steps = [Step("crop", {"image": 0, "bbox": _cell_box(position, scene, read_crops)}, [], [])]
        candidate.meta["position"] = position
    return candidate


def _visual_question(category: Category, scene: ComposedScene, graph: EntityGraph, rng: random.Random) -> Candidate | None:
    objects = list(scene.objects)
    described = [(_describe(graph, o), o) for o in objects]
    unique = [(d, o) for d, o in described if sum(d == other for other, _ in described) == 1]
    meta = {"view": "scene", "scene_entities": [o.entity_id for o in objects], "entities": []}
    where = {o.position: d for d, o in described}
    listing = ", ".join(f"{d.removeprefix('the ')} {T.at_position(o.position)}" for d, o in described)
    if category.visual == "count":
        n = len(objects)
        question = rng.choice(T.COUNT_QUESTIONS)
        return Candidate(question, [str(n), T.NUMBER_WORDS[n]] if n < 10 else [str(n)], category, "count",
                         [scene.path], _scene_key(scene), meta=meta,
                         explanation=f"I count {n} pictures: {listing}.")
    if category.visual == "position" and unique:
        desc, obj = rng.choice(unique)
        question = rng.choice(T.POSITION_QUESTIONS).format(desc=desc)
        return Candidate(question, list(T.POSITION_WORDS[obj.position]), category, "position", [scene.path],
                         _scene_key(scene), meta={**meta, "keep": [desc.removeprefix("the ")]},
                         explanation=f"{desc[0].upper()}{desc[1:]} is {T.at_position(obj.position)} of the image.")
    if category.visual == "picture":
        obj = rng.choice(objects)
        noun = where[obj.position].removeprefix("the ").removeprefix("picture of a ")
        question = rng.choice(T.PICTURE_QUESTIONS).format(where=T.at_position(obj.position))
        return Candidate(question, [noun, f"a {noun}"], category, "picture", [scene.path], _scene_key(scene),
                         meta={**meta, "keep": [obj.position]},
                         explanation=f"The picture {T.at_position(obj.position)} is a {noun}.")
    if category.visual == "colour":
        for obj in rng.sample(objects, len(objects)):
            colour = dominant_colour(obj.image)
            if colour is not None:
                desc = where[obj.position]
                question = T.COLOUR_QUESTION.format(desc=desc, where=T.at_position(obj.position))
                return Candidate(question, [colour, *COLOUR_ALIASES.get(colour, ())], category, "colour",
                                 [scene.path], _scene_key(scene), meta={**meta, "keep": [obj.position]},
                                 explanation=f"Most of {desc} {T.at_position(obj.position)} is {colour}.")
    return None
