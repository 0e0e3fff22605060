"""One forward pass over finished trajectories: the batch layout and per-token log-probs.

This is how the trainer sees a trajectory (SFT and RL alike): right-padded ids with the loss mask,
every image's pixels in order of appearance, and `mm_token_type_ids` so the model computes
multimodal rotary positions over the whole sequence, tool-returned images included (invariant 3).
"""

from __future__ import annotations

import torch

from mmsearch.engines.hf import mm_token_type_ids
from mmsearch.trajectory import Trajectory


def collate(trajectories: list[Trajectory], pad_id: int, image_token_id: int, video_token_id: int | None = None
            ) -> dict[str, torch.Tensor]:
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
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask, "rollout_logprobs": rollout_logprobs,
             "mm_token_type_ids": mm_token_type_ids(ids, image_token_id, video_token_id)}
    pixels = [t.pixel_tensor() for t in trajectories if t.pixel_values]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.cat([t.grid_tensor() for t in trajectories if t.pixel_values])
    return batch


MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def token_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """(batch, seq) log p(token_i | tokens_<i) at `temperature`; column 0 (no context) is 0."""
    inputs = {k: v.to(model.device) for k, v in batch.items() if k in MODEL_INPUTS}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    logits = model(**inputs, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    picked = logp.gather(2, inputs["input_ids"][:, 1:, None]).squeeze(2)
    return torch.nn.functional.pad(picked, (1, 0))
