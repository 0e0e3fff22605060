"""One forward pass over finished trajectories: the batch layout and per-token log-probs.

This is how the trainer sees a trajectory (SFT and RL alike): right-padded ids with the loss mask,
every image's pixels in order of appearance, and `mm_token_type_ids` so the model computes
multimodal rotary positions over the whole sequence, tool-returned images included (invariant 3).
A text-only policy's batch has neither pixels nor modality types, and its positions are 1-D.
"""

from __future__ import annotations

import torch
from torch import nn

from mmsearch.engines.hf import cache_kwarg, mm_token_type_ids
from mmsearch.rl.algos import entropy_from_logits
from mmsearch.trajectory import Trajectory


def collate(trajectories: list[Trajectory], pad_id: int, image_token_id: int | None, video_token_id: int | None = None
            ) -> dict[str, torch.Tensor]:
    """The batch; `image_token_id` None: a text-only policy's (no modality types, no pixels)."""
    if any(not t.token_exact for t in trajectories):
        raise ValueError("trajectories from a text-only engine have no token ids and cannot be scored or trained on")
    longest = max(len(t.token_ids) for t in trajectories)
    ids = torch.full((len(trajectories), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    loss_mask = torch.zeros_like(ids)
    rollout_logprobs = torch.zeros(ids.shape, dtype=torch.float32)
    for row, t in enumerate(trajectories):
        n = len(t.token_ids)
        ids[row, :n] = torch.tensor(t.token_ids)
        mask[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(t.loss_mask)
        rollout_logprobs[row, :n] = torch.tensor(t.logprobs)
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask, "rollout_logprobs": rollout_logprobs}
    if image_token_id is not None:
        batch["mm_token_type_ids"] = mm_token_type_ids(ids, image_token_id, video_token_id)
    pixels = [t.pixel_tensor() for t in trajectories if t.pixel_values]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.cat([t.grid_tensor() for t in trajectories if t.pixel_values])
    return batch


MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
TRAIN_INPUTS = (*MODEL_INPUTS, "loss_mask")  # what training moves to the device (collate's rollout log-probs stay)


def token_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """(batch, seq) log p(token_i | tokens_<i) at `temperature`; column 0 (no context) is 0."""
    inputs = {k: v.to(model.device) for k, v in batch.items() if k in MODEL_INPUTS}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    logits = model(**inputs, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    picked = logp.gather(2, inputs["input_ids"][:, 1:, None]).squeeze(2)
    return torch.nn.functional.pad(picked, (1, 0))


def policy_hidden_states(model: nn.Module, batch: dict[str, torch.Tensor], share_prefix: bool = True
                         ) -> tuple[torch.Tensor, int]:
    """(last hidden states of positions `prefix:`, prefix): the trunk's forward for training and scoring.

    With `share_prefix`, the text prefix every row shares (the system prompt) is run once and its
    key/value cache repeated for every row; gradients flow back through the repeat, so everything
    computed from the hidden states equals the unshared forward.
    """
    inner = unwrap_peft(model)
    prefix = shared_prefix_len(batch, vision_token_ids(inner.config)) if share_prefix else 0
    if prefix:
        return forward_after_shared_prefix(inner.model, batch, prefix), prefix
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    return inner.model(**inputs, use_cache=False).last_hidden_state, 0


def vision_token_ids(config) -> tuple[int, ...]:
    """The ids that open or fill an image or video run (never part of a shared text prefix)."""
    ids = (getattr(config, k, None) for k in ("vision_start_token_id", "image_token_id", "video_token_id"))
    return tuple(t for t in ids if t is not None)


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
    # a trained token and the position that predicts it stay per-row, so every scored prediction is computed there
    predicts_trained = trained.bool().any(0)
    same &= ~predicts_trained
    same[:-1] &= ~predicts_trained[1:]
    n = int(same.long().cumprod(0).sum())
    n = min(n, ids.shape[1] - 1)
    return n if n >= MIN_SHARED_PREFIX else 0


def forward_after_shared_prefix(inner: nn.Module, batch: dict[str, torch.Tensor], prefix: int) -> torch.Tensor:
    """Hidden states of positions `prefix:` with the prefix computed once (a Qwen-VL `model.model`, or a text-only
    causal LM's, whose batch has no `mm_token_type_ids` and whose positions are 1-D)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    grid = batch.get("image_grid_thw")
    multimodal = "mm_token_type_ids" in batch
    # Multimodal rotary positions over each whole row, as the unshared forward computes them (invariant 3).
    if grid is not None:
        positions, _ = inner.get_rope_index(ids, image_grid_thw=grid, attention_mask=mask,
                                            mm_token_type_ids=batch["mm_token_type_ids"])
    else:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        positions = positions[None].expand(3, -1, -1) if multimodal else positions
    cache_arg = cache_kwarg(inner)
    head = inner(input_ids=ids[:1, :prefix], attention_mask=mask[:1, :prefix], position_ids=positions[..., :1, :prefix],
                 use_cache=True)
    cache = getattr(head, cache_arg)
    cache.batch_repeat_interleave(ids.shape[0])
    rest = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    if multimodal:
        rest["mm_token_type_ids"] = batch["mm_token_type_ids"][:, prefix:]
    out = inner(input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions[..., prefix:],
                use_cache=True, **{cache_arg: cache}, **rest)
    return out.last_hidden_state


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model (with LoRA layers injected in place when peft wraps it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class TokenScorer(nn.Module):
    """Log-probs (and entropies) the policy gives the trained tokens of a batch: RL's forward pass.

    Returns (batch, seq) tensors aligned with `input_ids` (column i scores token i from tokens < i),
    zero wherever `loss_mask` is 0. Only the hidden states that predict a trained token go through
    the LM head, so the (tokens x vocab) logits of the prompt and tool output are never built.
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0, share_prefix: bool = True):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.share_prefix = share_prefix

    def forward(self, batch: dict[str, torch.Tensor], with_entropy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, prefix = policy_hidden_states(self.model, batch, self.share_prefix)
        ids, mask = batch["input_ids"], batch["loss_mask"]
        trained = mask[:, prefix + 1:].bool()  # hidden[:, c] predicts token prefix + 1 + c
        rows, cols = trained.nonzero(as_tuple=True)
        logits = unwrap_peft(self.model).lm_head(hidden[rows, cols]).float() / self.temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        picked = logp_all.gather(1, ids[rows, cols + prefix + 1][:, None]).squeeze(1)
        logp = torch.zeros(ids.shape, dtype=torch.float32, device=hidden.device)
        logp = logp.index_put((rows, cols + prefix + 1), picked)
        if rows.numel() == 0:
            logp = logp + hidden.sum() * 0.0  # keeps the graph: DDP needs every rank to backward
        if not with_entropy:
            return logp, None
        entropy = torch.zeros_like(logp).index_put((rows, cols + prefix + 1), entropy_from_logits(logits))
        return logp, entropy
