"""Small builders that wire an engine, the tools and a trajectory builder into an AgentLoop."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmsearch.agent.config import AgentConfig, EngineConfig
from mmsearch.agent.loop import AgentLoop, EventHook
from mmsearch.trajectory import TrajectoryBuilder
from tools.config import ToolsConfig, VisionResizeConfig


@dataclass
class RolloutConfig:
    """What `ask`, `eval` and data generation share: a policy, the tools and the loop's limits."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    index: str = "runs/index"  # in-process search over this index dir ...
    server: list[str] = field(default_factory=list)  # ... or these tool-server URLs


def is_url(model: str) -> bool:
    return model.startswith(("http://", "https://"))


def build_engine(cfg: EngineConfig, max_images: int = 8):
    if cfg.kind == "hf":
        from mmsearch.engines.hf import HFEngine

        return HFEngine.from_pretrained(cfg.model, device=cfg.device, dtype=cfg.dtype, max_batch=cfg.max_batch)
    if cfg.kind == "vllm":
        from mmsearch.engines.vllm_engine import VLLMEngine

        return VLLMEngine(cfg.model, dtype=cfg.dtype, max_images_per_prompt=max_images)
    if cfg.kind == "openai":
        from mmsearch.engines.openai_chat import OpenAIChatEngine

        if not cfg.api_base:
            raise ValueError("engine.kind=openai needs engine.api_base (e.g. http://127.0.0.1:8000/v1)")
        return OpenAIChatEngine(api_base=cfg.api_base, model=cfg.model, api_key=cfg.api_key or None)
    raise ValueError(f"unknown engine.kind {cfg.kind!r}; choose hf, vllm or openai")


def load_processor(cfg: EngineConfig):
    """The policy's processor: the model dir's own, or for openai an optional local one."""
    from transformers import AutoProcessor

    path = cfg.processor or (cfg.model if cfg.kind != "openai" else "")
    return AutoProcessor.from_pretrained(path) if path else None


def vision_from_processor(processor, default: VisionResizeConfig) -> VisionResizeConfig:
    """The crop tool must map boxes from the size this processor resizes images to."""
    if processor is None:
        return default
    ip = processor.image_processor
    size = getattr(ip, "size", None) or {}
    return VisionResizeConfig(
        patch_size=ip.patch_size, merge_size=ip.merge_size,
        min_pixels=size.get("shortest_edge", getattr(ip, "min_pixels", default.min_pixels)),
        max_pixels=size.get("longest_edge", getattr(ip, "max_pixels", default.max_pixels)),
    )


def build_backend(cfg: RolloutConfig):
    """The search backend, or None when only crop is enabled."""
    from tools.registry import open_backend

    if all(name == "crop" for name in cfg.tools.enabled):
        return None
    device = cfg.engine.device if cfg.engine.kind == "hf" else "auto"
    return open_backend(cfg.index, cfg.server, cfg.tools, device=device)


def build_loop(cfg: RolloutConfig, engine=None, on_event: EventHook | None = None) -> AgentLoop:
    from tools.registry import build_toolbox

    engine = engine or build_engine(cfg.engine, max_images=cfg.agent.max_images)
    processor = getattr(engine, "processor", None) or load_processor(cfg.engine)
    cfg.tools.vision = vision_from_processor(processor, cfg.tools.vision)
    toolbox = build_toolbox(cfg.tools, build_backend(cfg))
    builder = TrajectoryBuilder(processor) if processor is not None else None
    return AgentLoop(engine, toolbox, builder, cfg.agent, on_event=on_event)
