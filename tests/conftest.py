"""Shared fixtures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_pipeline.world import WorldConfig, build_world


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small embedded world (60 entities, seed 0) built once per session. Read it, never write it."""
    out = tmp_path_factory.mktemp("world") / "kb"
    build_world(WorldConfig(out=str(out), seed=0, entities=60), progress=False)
    return out


@pytest.fixture(scope="session")
def clip_dir(world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deliberately tiny CLIP trained for a few steps: real weights in the real format, not a good model."""
    from tools.encoders.clip_train import ClipTrainConfig, train_clip

    out = tmp_path_factory.mktemp("clip") / "model"
    train_clip(ClipTrainConfig(
        kb=str(world_dir), out=str(out), device="cpu", steps=3, batch_size=16, warmup_steps=1,
        embed_dim=32, vision_width=64, vision_layers=1, vision_heads=2, text_width=64, text_layers=1,
        eval_every=0, eval_max_queries=8, log_every=1,
    ), progress=False)
    return out


@pytest.fixture(scope="session")
def index_dir(world_dir: Path, clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BM25, dense (all-MiniLM-L6-v2) and CLIP image indexes over the small world."""
    from tools.config import ImageEncoderConfig, IndexBuildConfig
    from tools.index.build import build_indexes

    out = tmp_path_factory.mktemp("index")
    build_indexes(IndexBuildConfig(kb=str(world_dir), out=str(out), device="cpu",
                                   image_encoder=ImageEncoderConfig(name=str(clip_dir))), progress=False)
    return out


@pytest.fixture(scope="session")
def text_index_dir(index_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same index dir without its image index."""
    out = tmp_path_factory.mktemp("text_index")
    for kind in ("bm25", "dense"):
        shutil.copytree(index_dir / kind, out / kind)
    return out


@pytest.fixture(scope="session")
def search(index_dir: Path):
    """In-process search over `index_dir` (shared: tests must not change it)."""
    from tools.search.local import LocalSearch

    return LocalSearch(index_dir, device="cpu")


@pytest.fixture(scope="session")
def policy_dir(world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The untrained tiny Qwen2.5-VL policy (tokenizer trained on the small world)."""
    from mmsearch.model.tiny import TinyPolicyConfig, init_tiny

    out = tmp_path_factory.mktemp("policy") / "tiny"
    return init_tiny(TinyPolicyConfig(kb=str(world_dir), out=str(out)))


@pytest.fixture(scope="session")
def hf_engine(policy_dir: Path):
    from mmsearch.engines.hf import HFEngine

    return HFEngine.from_pretrained(str(policy_dir), device="cpu")


@pytest.fixture(scope="session")
def toolbox(search, hf_engine):
    """The real three tools over the small world's indexes, resizing as the tiny policy's processor does."""
    from mmsearch.agent.setup import vision_from_processor
    from tools.config import ToolsConfig
    from tools.registry import build_toolbox

    cfg = ToolsConfig()
    cfg.vision = vision_from_processor(hf_engine.processor, cfg.vision)
    return build_toolbox(cfg, search)


@pytest.fixture(scope="session")
def gold_dataset(world_dir: Path, toolbox, policy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 examples with gold trajectories through the real tools, crop boxes in the tiny policy's pixels."""
    from data_pipeline.synth.config import SynthConfig
    from data_pipeline.synth.run import run_synth

    out = tmp_path_factory.mktemp("synth") / "gold"
    run_synth(SynthConfig(kb=str(world_dir), out=str(out), n=60, seed=1, chunk=32, processor=str(policy_dir)),
              toolbox=toolbox, progress=False)
    return out
