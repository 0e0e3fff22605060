"""Scenes: question images that place a few entity pictures on a cluttered background.

The scene is cut into a 3x3 grid and each object sits inside its own cell, so objects never overlap
and each has a distinct position phrase ("top-left", "center", ...) that a question can use to
point at it. Scenes are not KB entries: they are what questions show.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from data_pipeline.world.designs import Design
from data_pipeline.world.render import render
from data_pipeline.world.seeding import derive_rng

POSITIONS = (("top-left", "top", "top-right"), ("left", "center", "right"), ("bottom-left", "bottom", "bottom-right"))
CELL_PADDING = 4
NOISE_LEVELS = bytes(b % 4 * 20 for b in range(256))


@dataclass(frozen=True)
class Picture:
    """An entity's picture as the scene needs it: what to draw, at what native size."""

    entity_id: str
    image_id: str
    design: Design
    size: tuple[int, int]


@dataclass(frozen=True)
class SceneObject:
    picture: Picture
    bbox: tuple[int, int, int, int]  # x1, y1, x2, y2 in scene pixels; x2, y2 exclusive (PIL box)
    position: str

    def record(self) -> dict:
        return {"entity_id": self.picture.entity_id, "image_id": self.picture.image_id,
                "bbox": list(self.bbox), "position": self.position}


@dataclass(frozen=True)
class Scene:
    id: str
    path: str
    width: int
    height: int
    objects: tuple[SceneObject, ...]
    seed: int  # the world's seed; with the id it keys the clutter's random stream

    def record(self) -> dict:
        return {"id": self.id, "path": self.path, "width": self.width, "height": self.height,
                "objects": [o.record() for o in self.objects]}


def plan_scenes(pictures: list[Picture], count: int, seed: int, size: tuple[int, int],
                objects: tuple[int, int]) -> list[Scene]:
    """Lay out `count` scenes. Pictures are dealt from a shuffled deck, so every one appears before
    any appears twice."""
    width, height = size
    xs = [width * i // 3 for i in range(4)]
    ys = [height * i // 3 for i in range(4)]
    deck: list[Picture] = []
    rounds, scenes = 0, []
    for index in range(count):
        rng = derive_rng(seed, "scene", index)
        chosen: list[Picture] = []
        want = min(rng.randint(*objects), len(pictures))
        while len(chosen) < want:
            if not deck:
                deck = pictures[:]
                derive_rng(seed, "scene-deck", rounds).shuffle(deck)
                rounds += 1
            picture = deck.pop()
            # At a reshuffle the new deck may repeat a picture already in this scene.
            if all(picture.entity_id != c.entity_id for c in chosen):
                chosen.append(picture)
        placed = []
        for picture, cell in zip(chosen, sorted(rng.sample(range(9), want)), strict=True):
            row, col = divmod(cell, 3)
            placed.append(place_in_cell(rng, picture, xs[col], ys[row], xs[col + 1], ys[row + 1], POSITIONS[row][col]))
        scene_id = f"scene_{index:06d}"
        scenes.append(Scene(scene_id, f"scenes/{scene_id}.png", width, height, tuple(placed), seed))
    return scenes


def place_in_cell(rng: random.Random, picture: Picture, x0: int, y0: int, x1: int, y1: int, position: str) -> SceneObject:
    """Scale the picture to fill most of its cell and drop it somewhere inside."""
    room_w, room_h = x1 - x0 - 2 * CELL_PADDING, y1 - y0 - 2 * CELL_PADDING
    w, h = picture.size
    scale = min(room_w / w, room_h / h) * rng.uniform(0.7, 1.0)
    ow, oh = max(1, round(w * scale)), max(1, round(h * scale))
    x = x0 + CELL_PADDING + rng.randint(0, room_w - ow)
    y = y0 + CELL_PADDING + rng.randint(0, room_h - oh)
    return SceneObject(picture, (x, y, x + ow, y + oh), position)


def render_scene(scene: Scene) -> Image.Image:
    rng = derive_rng(scene.seed, "scene-background", scene.id)
    img = clutter(rng, (scene.width, scene.height))
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.bbox
        img.paste(render(obj.picture.design, obj.picture.size).resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
    return img


def _muted(rng: random.Random) -> tuple[int, int, int]:
    """A dull colour: half way between a random one and mid grey, so objects stand out."""
    return tuple((rng.randint(40, 220) + 128) // 2 for _ in range(3))  # type: ignore[return-value]


def clutter(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, _muted(rng))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(30, 60)):
        colour, roll = _muted(rng), rng.random()
        xa, xb = sorted(rng.randint(-20, w + 20) for _ in range(2))
        ya, yb = sorted(rng.randint(-20, h + 20) for _ in range(2))
        if roll < 0.3:
            d.rectangle((xa, ya, xb, yb), fill=colour)
        elif roll < 0.55:
            d.ellipse((xa, ya, xb, yb), fill=colour)
        elif roll < 0.85:
            d.line((xa, ya, xb, yb) if rng.random() < 0.5 else (xa, yb, xb, ya), fill=colour, width=rng.randint(1, 5))
        else:
            d.polygon([(rng.randint(0, w), rng.randint(0, h)) for _ in range(rng.randint(3, 5))], fill=colour)
    # Grain in 4x4 blocks of four levels: texture that still compresses (smooth per-pixel noise
    # made scenes 6x larger and PNG encoding 4x slower).
    grain = (w // 4, h // 4)
    levels = rng.randbytes(grain[0] * grain[1]).translate(NOISE_LEVELS)
    noise = Image.frombytes("L", grain, levels).resize(size, Image.NEAREST)
    return Image.blend(img, Image.merge("RGB", (noise, noise, noise)), 0.12)
