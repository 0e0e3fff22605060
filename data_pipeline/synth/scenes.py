"""Scenes composed from one split's entity images: what crop and search-free questions show.

The layout is the world's (a 3x3 grid, one object per cell, a cluttered background; see
`data_pipeline.world.scenes`), but the pictures are the KB's own image files, so this works on any
KB, and a scene only ever holds entities of its split. Scene j of a split is a pure function of
(seed, split, j): a resumed run recomposes the same layout and reuses the file already written.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.synth.config import SceneConfig
from data_pipeline.synth.graph import EntityGraph
from data_pipeline.world.designs import PALETTE
from data_pipeline.world.scenes import POSITIONS, Picture, clutter, place_in_cell
from data_pipeline.world.seeding import derive_rng

COLOUR_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[c] for c in COLOUR_NAMES], dtype=np.int32)


@dataclass(frozen=True)
class PlacedObject:
    entity_id: str
    image: Path
    bbox: tuple[int, int, int, int]  # scene pixels, x2/y2 exclusive
    position: str


@dataclass(frozen=True)
class ComposedScene:
    path: Path
    width: int
    height: int
    objects: tuple[PlacedObject, ...]


class ScenePool:
    """Scenes of one split, laid out on demand and rendered to `root` once.

    `pictured` lists the split's entities that have a readable image, in id order: the candidates
    for whole-image questions and for scene objects alike.
    """

    def __init__(self, graph: EntityGraph, entities: set[str], cfg: SceneConfig, seed: int, split: str, root: Path):
        self.graph, self.cfg, self.seed, self.split = graph, cfg, seed, split
        self.pictured = [e for e in graph.pictured(entities) if any(graph.image_ok(i.path) for i in graph.images[e])]
        self.root = root
        self._cache: dict[int, ComposedScene | None] = {}

    def scene(self, index: int) -> ComposedScene | None:
        """Scene `index`, or None when the split has too few usable pictures for a scene."""
        if index not in self._cache:
            self._cache[index] = self._compose(index)
        return self._cache[index]

    def _compose(self, index: int) -> ComposedScene | None:
        rng = derive_rng(self.seed, "synth-scene", self.split, index)
        low, high = self.cfg.objects
        want = min(rng.randint(low, high), len(self.pictured), 9)
        if want < max(1, low):
            return None
        width, height = self.cfg.width, self.cfg.height
        xs, ys = [width * i // 3 for i in range(4)], [height * i // 3 for i in range(4)]
        objects = []
        for entity_id, cell in zip(rng.sample(self.pictured, want), sorted(rng.sample(range(9), want)), strict=True):
            image = rng.choice([i for i in self.graph.images[entity_id] if self.graph.image_ok(i.path)])
            with Image.open(image.path) as img:
                size = img.size
            row, col = divmod(cell, 3)
            placed = place_in_cell(rng, Picture(entity_id, image.id, None, size), xs[col], ys[row], xs[col + 1],
                                   ys[row + 1], POSITIONS[row][col])
            objects.append(PlacedObject(entity_id, image.path, placed.bbox, placed.position))
        path = self.root / self.split / f"scene_{index:06d}.jpg"
        if not path.exists():
            self._render(path, rng.random(), objects)
        return ComposedScene(path, width, height, tuple(objects))

    def _render(self, path: Path, background_seed: float, objects: list[PlacedObject]) -> None:
        canvas = clutter(derive_rng(self.seed, "synth-scene-background", background_seed), (self.cfg.width, self.cfg.height))
        for obj in objects:
            x1, y1, x2, y2 = obj.bbox
            with Image.open(obj.image) as img:
                canvas.paste(img.convert("RGB").resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.jpg")
        # JPEG: the grainy background costs 16 ms per scene as PNG (most of synthesis time), 2 ms as JPEG.
        canvas.save(tmp, quality=95)
        tmp.replace(path)  # a killed run never leaves a half-written scene behind


@functools.lru_cache(maxsize=65536)
def dominant_colour(image: Path, min_share: float = 0.45) -> str | None:
    """The named palette colour covering most of an image, or None when no colour clearly dominates."""
    with Image.open(image) as img:
        pixels = np.asarray(img.convert("RGB").resize((32, 32), Image.NEAREST), dtype=np.int32).reshape(-1, 3)
    nearest = ((pixels[:, None, :] - _PALETTE_RGB[None, :, :]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(nearest, minlength=len(COLOUR_NAMES)) / len(nearest)
    first, second = np.sort(counts)[::-1][:2]
    if first < min_share or second * 2 > first:
        return None
    return COLOUR_NAMES[int(counts.argmax())]
