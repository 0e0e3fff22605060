"""The embedded world's config: plain data, filled by `mmsearch.config.load_config`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KindShares:
    """Relative share of each entity kind. Normalised; every kind gets at least one entity."""

    nation: float = 0.06
    city: float = 0.24
    river: float = 0.08
    person: float = 0.28
    organisation: float = 0.18
    artwork: float = 0.16


@dataclass
class WorldConfig:
    out: str = "runs/world"
    seed: int = 0
    entities: int = 300
    kinds: KindShares = field(default_factory=KindShares)
    # Passages that name related entities together without stating how they are related, so that
    # matching names alone does not find the answer.
    distractors_per_entity: float = 1.0
    scenes_per_entity: float = 1.0
    scene_width: int = 448
    scene_height: int = 336
    scene_objects_min: int = 2
    scene_objects_max: int = 4
    flag_width: int = 168
    flag_height: int = 112
    # Seals, emblems, portraits and paintings are square.
    emblem_size: int = 128
    # Processes rendering images and scenes; the output is identical for any value.
    workers: int = 1
