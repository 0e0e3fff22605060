"""The generation-engine interface: token ids + images in, token ids + log-probs out.

Token-level engines (`hf`, `vllm`) continue a trajectory from its exact token ids, so the agent
loop can append what they produce verbatim. A chat-level engine (`openai`) sees only messages and
returns text; its trajectories carry no token ids and are refused for training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    max_new_tokens: int = 256
    seed: int | None = None
    # Never sampled: the vision placeholders (<|image_pad|>, <|vision_start|>, ...). A generated one
    # would claim an image that does not exist and break the next forward pass.
    suppress_token_ids: list[int] = field(default_factory=list)
    # Strings that end a turn besides the stop tokens (an inline protocol's query closer, `</search>`).
    # The turn keeps every token generated up to the one that completes the string.
    stop_strings: list[str] = field(default_factory=list)


@dataclass
class GenerationRequest:
    token_ids: list[int]
    images: list[Image.Image] = field(default_factory=list)  # every image in the sequence, in order
    pixel_values: torch.Tensor | None = None  # the processor's output for `images`, concatenated
    image_grid_thw: torch.Tensor | None = None  # (n_images, 3)
    max_new_tokens: int | None = None  # per-request cap below SamplingParams.max_new_tokens
    # The trajectory being continued: the hf engine finds its cached rows by it; scripted policies plan from it.
    trajectory: Any = None


@dataclass
class GenerationOutput:
    token_ids: list[int]  # generated tokens, the stop token included when one ended the turn
    # log p(token) under the sampling distribution's temperature (no top-k/top-p truncation);
    # greedy decoding reports temperature-1 log-probs. This is what the trainer recomputes.
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop token) | "length"


@runtime_checkable
class TokenEngine(Protocol):
    token_level: bool  # True

    def generate(self, requests: list[GenerationRequest], params: SamplingParams,
                 stop_token_ids: list[int]) -> list[GenerationOutput]: ...


@runtime_checkable
class ChatEngine(Protocol):
    token_level: bool  # False

    def chat(self, conversations: list[list[dict]], params: SamplingParams, trajectories: list | None = None) -> list[str]:
        """One assistant reply per conversation. Conversations are template-view messages whose
        image parts carry the PIL image under "image" (see `mmsearch.trajectory.template_view`).
        `trajectories` are the trajectories being continued; only policies that plan from them
        (scripted) read them."""
        ...


class EngineRefused(ValueError):
    """The engine cannot do what was asked (e.g. a chat-level engine for RL)."""
