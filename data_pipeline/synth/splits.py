"""Entity-disjoint splits (DESIGN invariant 7): the entities are partitioned before any question is made.

Held-out entities are taken as small connected neighbourhoods of the relation graph (breadth-first
from a seeded start), so a validation or test question can follow two or three relations without
leaving its split; everything left is train. Every example then draws all of its entities (the
pictured one, each hop, the scene's other objects) from one part, so no entity seen in train ever
appears in validation or test.
"""

from __future__ import annotations

from collections import deque

from data_pipeline.synth.config import SplitConfig
from data_pipeline.synth.graph import EntityGraph
from data_pipeline.world.seeding import derive_rng


def partition_entities(graph: EntityGraph, cfg: SplitConfig, seed: int) -> dict[str, set[str]]:
    """split -> its entity ids. Deterministic in (graph, cfg, seed)."""
    if cfg.validation < 0 or cfg.test < 0 or cfg.validation + cfg.test >= 1:
        raise ValueError(f"split shares must be >= 0 and leave room for train, got validation={cfg.validation} "
                         f"test={cfg.test}")
    free = set(graph.entities)
    total = len(free)
    parts: dict[str, set[str]] = {}
    for split, share in (("test", cfg.test), ("validation", cfg.validation)):
        want = round(total * share)
        part: set[str] = set()
        rng = derive_rng(seed, "split", split)
        while len(part) < want and free:
            # Start regions at pictured entities so each region holds questions to ask.
            starts = sorted(free & set(graph.images)) or sorted(free)
            region = _grow(graph, rng.choice(starts), free, min(cfg.region_size, want - len(part)))
            part |= region
            free -= region
        parts[split] = part
    parts["train"] = free
    return {split: parts[split] for split in ("train", "validation", "test")}


def _grow(graph: EntityGraph, start: str, free: set[str], size: int) -> set[str]:
    region, queue = {start}, deque([start])
    while queue and len(region) < size:
        for neighbour in graph.neighbours.get(queue.popleft(), []):
            if neighbour in free and neighbour not in region:
                region.add(neighbour)
                queue.append(neighbour)
                if len(region) >= size:
                    break
    return region
