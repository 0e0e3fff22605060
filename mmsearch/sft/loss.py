"""The SFT loss: summed token cross-entropy on trained tokens, normalized once per optimizer step.

Normalizing per micro-batch (the mean over each micro-batch, then averaged) weighs a token in a
short micro-batch more than one in a long one, and changes with how samples happen to be grouped
or sharded. Here every micro-batch returns its *sum* and its token count; each rank scales its
sums by `world_size / trained tokens in the whole window over all ranks`, so after DDP averages
gradients the step's gradient is exactly d(mean over every trained token of the window).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mmsearch.logprobs import MODEL_INPUTS


def shifted_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, targets): flat indices into the (batch, seq-1) predictions whose next token is trained."""
    trained = loss_mask[:, 1:].bool()
    return trained.nonzero(as_tuple=True), input_ids[:, 1:][trained]


def token_loss_sum(hidden: torch.Tensor, lm_head: nn.Module, input_ids: torch.Tensor, loss_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the trained tokens and their count.

    Only the hidden states that predict a trained token go through the LM head: on agent
    trajectories most tokens are prompt and tool output, so this skips most of the (tokens x vocab)
    logits a plain causal-LM loss would build.
    """
    (rows, cols), targets = shifted_targets(input_ids, loss_mask)
    if targets.numel() == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph (DDP needs every rank to backward)
    logits = lm_head(hidden[rows, cols]).float()
    return nn.functional.cross_entropy(logits, targets, reduction="sum"), targets.numel()


def window_scale(local_tokens: int, world_size: int, group=None) -> tuple[float, int]:
    """(scale, global tokens) for a window: each rank multiplies its loss sums by `scale`.

    DDP averages gradients over ranks, so the `world_size` factor turns that average back into a
    sum, and the division makes the step's loss the mean over all trained tokens of the window.
    """
    total = torch.tensor([local_tokens], dtype=torch.long)
    if world_size > 1:
        dist.all_reduce(total, group=group)
    n = int(total.item())
    return (world_size / n if n else 0.0), n


class CausalLMLoss(nn.Module):
    """The policy and its loss as one module, so DDP/DeepSpeed wrap exactly what forward runs.

    With `share_prefix`, the text prefix every row of the micro-batch shares (the system prompt,
    most of an agent trajectory's prompt) is run once and its key/value cache repeated for every
    row; gradients flow back through the repeat, so loss and gradients equal the unshared forward.
    """

    def __init__(self, model: nn.Module, share_prefix: bool = True):
        super().__init__()
        self.model = model
        self.share_prefix = share_prefix
        config = _unwrap_peft(model).config
        self.vision_token_ids = tuple(t for t in (getattr(config, k, None) for k in (
            "vision_start_token_id", "image_token_id", "video_token_id")) if t is not None)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        model = _unwrap_peft(self.model)
        prefix = shared_prefix_len(batch, self.vision_token_ids) if self.share_prefix else 0
        if prefix:
            hidden = _forward_after_shared_prefix(model.model, batch, prefix)
        else:
            hidden = model.model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}, use_cache=False).last_hidden_state
        return token_loss_sum(hidden, model.lm_head, batch["input_ids"][:, prefix:], batch["loss_mask"][:, prefix:])


MIN_SHARED_PREFIX = 32  # below this, a separate prefix forward saves nothing


def shared_prefix_len(batch: dict[str, torch.Tensor], vision_token_ids: tuple[int, ...]) -> int:
    """Tokens every row shares from the start, ending before the first image and the first trained token.

    Images stay out of the prefix so each row's pixels are encoded with its own tokens; trained
    tokens stay out so every prediction that is scored comes from the per-row part.
    """
    ids, mask, trained = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(0) & mask.bool().all(0)
    for t in vision_token_ids:
        same &= ~(ids[0] == t)
    same &= ~trained.bool().any(0)
    n = int(same.long().cumprod(0).sum())
    n = min(n, ids.shape[1] - 1)  # the first trained token is predicted from the last shared one: keep it per-row
    return n if n >= MIN_SHARED_PREFIX else 0


def _forward_after_shared_prefix(inner: nn.Module, batch: dict[str, torch.Tensor], prefix: int) -> torch.Tensor:
    """Hidden states of positions `prefix:` with the prefix computed once (a Qwen-VL `model.model`)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    grid = batch.get("image_grid_thw")
    # Multimodal rotary positions over each whole row, as the unshared forward computes them (invariant 3).
    if grid is not None:
        positions, _ = inner.get_rope_index(ids, image_grid_thw=grid, attention_mask=mask,
                                            mm_token_type_ids=batch["mm_token_type_ids"])
    else:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
    head = inner(input_ids=ids[:1, :prefix], attention_mask=mask[:1, :prefix], position_ids=positions[:, :1, :prefix],
                 use_cache=True)
    cache = head.past_key_values
    cache.batch_repeat_interleave(ids.shape[0])
    rest = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    out = inner(input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions[:, :, prefix:],
                mm_token_type_ids=batch["mm_token_type_ids"][:, prefix:], past_key_values=cache, use_cache=True, **rest)
    return out.last_hidden_state


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model (with LoRA layers injected in place when peft wraps it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
