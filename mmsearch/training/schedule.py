"""The learning-rate schedule both recipes use: linear warmup, then cosine / linear decay or constant."""

from __future__ import annotations

import math

from mmsearch.training.config import OptimConfig


def lr_lambda(optim: OptimConfig, total_steps: int):
    """The LambdaLR factor: linear warmup over `warmup_steps`, then decay to `min_lr_ratio` (or constant)."""
    o = optim

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * decay

    return factor


def check_optim(optim: OptimConfig) -> None:
    if optim.schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"optim.schedule must be cosine, linear or constant, got {optim.schedule!r}")
