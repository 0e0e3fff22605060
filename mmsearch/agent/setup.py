"""Small builders that wire an engine, the tools and a trajectory builder into an AgentLoop."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmsearch.agent.config import AgentConfig, EngineConfig
from mmsearch.agent.loop import AgentLoop, EventHook
from mmsearch.model.policy import IMAGE_TOOLS, is_text_only, reads_images, recorded_system_prompt
from mmsearch.protocols import Protocol, get_protocol
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
    """The policy's processor: the model dir's own (a text-only policy's tokenizer, as a `TextProcessor`), or for
    openai an optional local one."""
    from mmsearch.model.policy import load_processor as load

    path = cfg.processor or (cfg.model if cfg.kind != "openai" else "")
    return load(path) if path else None


def policy_is_text_only(cfg: EngineConfig, engine=None) -> bool:
    """Whether the policy reads text only (a causal LM with a tokenizer): from the engine's processor, else
    from the checkpoint's config alone, before any weights load. An endpoint with no local processor counts
    as reading images (its server decides what it accepts)."""
    processor = getattr(engine, "processor", None)
    if processor is not None:
        return is_text_only(processor)
    path = cfg.processor or (cfg.model if cfg.kind != "openai" else "")
    return bool(path) and not reads_images(path)


def check_image_tools(enabled: list[str], text_only: bool, key: str = "tools.enabled") -> None:
    """A text-only policy cannot use the tools that take or return images: refused at start-up, saying what
    to enable instead (`key`: the config key that lists the tools)."""
    refused = [name for name in enabled if name in IMAGE_TOOLS]
    if text_only and refused:
        raise ValueError(f"this policy is text-only (a causal LM with a tokenizer, no image processor), so it cannot "
                         f"use {', '.join(refused)}: they need images. Enable only text_search: {key}=[text_search]")


def vision_from_processor(processor, default: VisionResizeConfig) -> VisionResizeConfig:
    """The crop tool must map boxes from the size this processor resizes images to (a text-only policy: no crops)."""
    if processor is None or is_text_only(processor):
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


def protocol_for(agent: AgentConfig, tools: ToolsConfig) -> Protocol:
    """The loop's protocol, checked against the enabled tools; text_search writes passages its way
    unless `tools.passage_format` says otherwise."""
    protocol = get_protocol(agent.protocol)
    protocol.check_tools(tools.enabled)
    tools.passage_format = tools.passage_format or protocol.passage_format
    return protocol


def use_recorded_prompt(agent: AgentConfig, policy) -> None:
    """Serve the policy the system prompt it records (a model, its config or its dir) unless
    `agent.system_prompt` names one: a policy trained on its own prompt must be asked in it."""
    agent.system_prompt = agent.system_prompt or recorded_system_prompt(policy, agent.protocol)


def build_loop(cfg: RolloutConfig, engine=None, on_event: EventHook | None = None) -> AgentLoop:
    from tools.registry import build_toolbox

    protocol = protocol_for(cfg.agent, cfg.tools)  # before anything heavy loads
    check_image_tools(cfg.tools.enabled, policy_is_text_only(cfg.engine, engine))
    engine = engine or build_engine(cfg.engine, max_images=cfg.agent.max_images)
    model = getattr(engine, "model", None)  # the hf engine's transformers model (the weights in training, too)
    use_recorded_prompt(cfg.agent, model if hasattr(model, "config") else cfg.engine.model)
    processor = getattr(engine, "processor", None) or load_processor(cfg.engine)
    cfg.tools.vision = vision_from_processor(processor, cfg.tools.vision)
    toolbox = build_toolbox(cfg.tools, build_backend(cfg))
    builder = TrajectoryBuilder(processor, protocol=protocol) if processor is not None else None
    return AgentLoop(engine, toolbox, builder, cfg.agent, on_event=on_event)
