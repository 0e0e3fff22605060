"""The embedded world: a deterministic generator of a synthetic knowledge base (KB dir).

Entities with invented names, facts and multi-hop relations (graph.py), a rendered picture per
entity (designs.py, render.py), encyclopedia passages and distractors (articles.py), and scenes
that compose several pictures into one question image (scenes.py). `build_world` writes it all.
"""

from data_pipeline.world.build import build_world
from data_pipeline.world.config import KindShares, WorldConfig

__all__ = ["KindShares", "WorldConfig", "build_world"]
