"""Config pieces every training recipe (SFT, RL) shares: optimizer, frozen parts, LoRA, periodic eval."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmsearch.eval.run import EvalConfig


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float = 1.0  # 0: no clipping
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine/linear decay floor, as a fraction of lr


@dataclass
class FreezeConfig:
    vision_tower: bool = False  # the ViT blocks and patch embedding
    projector: bool = False  # the merger that maps vision features into the language model


@dataclass
class LoraConfig:
    r: int = 0  # 0: full fine-tuning
    alpha: int = 16
    dropout: float = 0.0
    # Suffixes of the language model's linear layers to adapt (the vision tower is never LoRA-adapted).
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])


@dataclass
class PeriodicEvalConfig(EvalConfig):
    """Periodic eval through the agent loop (the `mmsearch eval` code) with the weights being trained (SFT and RL)."""

    enabled: bool = True  # False: no eval (e.g. no index at hand)
    split: str = "validation"
    limit: int = 64
    every: int = 0  # optimizer steps between evals; 0: only at the end
