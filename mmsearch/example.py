"""One question the agent answers: what eval loaders produce and rollouts consume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Example:
    id: str
    question: str
    images: list[Image.Image]  # the question's images, numbered 0.. in the conversation
    answers: list[str]  # gold answer and its aliases
    kind: str = ""
    hops: int = -1  # -1: unknown
    requires_search: bool | None = None
    meta: dict[str, Any] = field(default_factory=dict)
