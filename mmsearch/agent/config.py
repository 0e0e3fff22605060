"""Limits and sampling for the agent loop (plain data; filled from YAML by `load_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


@dataclass
class AgentConfig:
    protocol: str = "qwen_tools"  # qwen_tools | search_r1 | r1_searcher | mmsearch_r1 (mmsearch/protocols)
    # Empty: the policy's recorded prompt (its config's `mmsearch_system_prompts`), else the protocol's own (tool
    # schemas and format). Otherwise this text, verbatim, `{tools}` replaced by the enabled tools as `name(arguments)`.
    system_prompt: str = ""
    max_turns: int = 6
    # Calls beyond a tool's budget get an error observation instead of running.
    max_calls_per_tool: dict[str, int] = field(default_factory=lambda: {"text_search": 4, "image_search": 3, "crop": 3})
    max_new_tokens_per_turn: int = 256
    max_new_tokens_per_trajectory: int = 1024
    max_total_tokens: int = 4096  # the whole sequence (prompt, images, tool responses); beyond it the trajectory is cut
    max_images: int = 8
    max_tool_response_tokens: int = 512  # longer responses are cut, with a marker saying so
    max_invalid_streak: int = 3  # consecutive invalid actions that end a trajectory
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class EngineConfig:
    kind: str = "hf"  # hf | vllm | openai
    model: str = "runs/policy"  # a model dir (hf, vllm) or the served model's name (openai)
    api_base: str = ""  # openai: e.g. http://127.0.0.1:8000/v1
    api_key: str = ""  # openai: empty reads OPENAI_API_KEY
    processor: str = ""  # openai: a processor dir whose image resize the crop tool should assume; empty: the tools' default
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 64
