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

from mmsearch.logprobs import policy_hidden_states, unwrap_peft


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
    most of an agent trajectory's prompt) is run once (see `mmsearch.logprobs.policy_hidden_states`).
    """

    def __init__(self, model: nn.Module, share_prefix: bool = True):
        super().__init__()
        self.model = model
        self.share_prefix = share_prefix

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        hidden, prefix = policy_hidden_states(self.model, batch, self.share_prefix)
        lm_head = unwrap_peft(self.model).lm_head
        return token_loss_sum(hidden, lm_head, batch["input_ids"][:, prefix:], batch["loss_mask"][:, prefix:])
