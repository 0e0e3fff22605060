"""PPO's value model: the policy's trunk (vision included, if it has one) with a scalar head, trained beside the policy.

As in verl and Search-R1, the critic starts from the same checkpoint as the policy and is a separate
model (no shared weights), so its updates never move the policy. `values[:, t]` is the value of the
state in which token t is generated (from the hidden state at t - 1), aligned like the log-probs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmsearch.logprobs import policy_hidden_states


class ValueModel(nn.Module):
    def __init__(self, policy_path: str, device: str):
        super().__init__()
        from mmsearch.model.policy import load_model

        full = load_model(policy_path, torch.float32)
        full.lm_head = nn.Identity()  # the trunk is all a critic keeps
        self.trunk = full.to(device)
        hidden = full.config.get_text_config().hidden_size
        self.head = nn.Linear(hidden, 1).to(device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, seq) values at the trained positions, zero elsewhere."""
        hidden, prefix = policy_hidden_states(self.trunk, batch, share_prefix=True)
        trained = batch["loss_mask"][:, prefix + 1:].bool()
        rows, cols = trained.nonzero(as_tuple=True)
        picked = self.head(hidden[rows, cols]).squeeze(-1).float()
        values = torch.zeros(batch["input_ids"].shape, dtype=torch.float32, device=hidden.device)
        values = values.index_put((rows, cols + prefix + 1), picked)
        return values + hidden.sum() * 0.0 if rows.numel() == 0 else values

    def save(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        torch.save({"model": self.state_dict(), "optimizer": optimizer.state_dict()}, path)

    def load(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        state = torch.load(path, weights_only=False)
        self.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """PPO's (optionally clipped) squared value error per token; aggregated by the caller like the policy loss."""
    error = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        error = torch.maximum(error, (clipped - returns) ** 2)
    return 0.5 * error * mask
