"""RL algorithms as pure tensor functions: advantages, policy losses, KL estimators, loss aggregation.

Nothing here knows about models, trajectories or ranks; the RL loop composes these functions. Shapes: N
trajectories (one per row), B rows by T token positions, `mask` is 1 on the tokens the policy generated and
is trained on (tool outputs in between are 0). Every function returns float32.

Advantages (one scalar per trajectory unless said otherwise; `groups` numbers the trajectories of one prompt):
- `grpo_advantages`: GRPO (Shao et al. 2024, DeepSeekMath eq. 3), A_i = (r_i - mean(r_g)) / (std(r_g) + eps);
  `norm_std=False` is Dr. GRPO (Liu et al. 2025), A_i = r_i - mean(r_g).
- `rloo_advantages`: RLOO (Ahmadian et al. 2024), A_i = r_i - 1/(n-1) sum_{j != i} r_j.
- `reinforce_pp_advantages`: REINFORCE++ (Hu 2025), rewards whitened over the batch; with groups ("REINFORCE++
  baseline") the group mean is subtracted first.
- `gae_advantages`: GAE (Schulman et al. 2016), A_t = sum_l (gamma lam)^l delta_{t+l},
  delta_t = r_t + gamma V_{t+1} - V_t, over the generated tokens only.

Policy loss (`policy_loss`): PPO's clipped surrogate (Schulman et al. 2017), max(-A r, -A clip(r, 1-e_low, 1+e_high))
with DAPO's decoupled clip range (Yu et al. 2025, eq. 10), dual-clip (Ye et al. 2020, eq. 5) capping the loss at
-c A for A < 0, and GSPO (Zheng et al. 2025, eq. 7) where the ratio is per sequence,
s_i = exp(1/|y_i| sum_t log(pi/pi_old)). `truncated_is_weights` is truncated importance sampling (Yao et al. 2025)
correcting for the rollout engine's log-probs differing from the trainer's.

KL (`kl_estimate`): Schulman's estimators k1, k2, k3 of KL(pi || ref) from samples of pi ("Approximating KL
Divergence", 2020). `aggregate` turns the per-token loss matrix into this micro-batch's share of the mini-batch
loss; `dynamic_sampling_keep` and `overlong_penalty` are DAPO's dynamic sampling (eq. 11) and soft overlong
punishment (eq. 13).
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3", "low_var_kl")
ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
OVERLONG_MODES = ("filter", "none")

# exp() of a log-ratio beyond this overflows float32 into inf, and inf * 0 (a masked token) is NaN.
_MAX_LOG_RATIO = 20.0


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is non-zero (weighted by `mask`), along `dim` or over everything.

    A slice with no masked position has mean 0, not NaN.
    """
    mask = mask.to(torch.float32)
    x = torch.where(mask != 0, x.to(torch.float32), 0.0)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return torch.where(count > 0, total / count.clamp(min=torch.finfo(torch.float32).tiny), 0.0)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with the mean and unbiased variance over masked positions; 0 where mask is 0."""
    mask = mask.to(torch.float32)
    mean = masked_mean(x, mask)
    centered = torch.where(mask != 0, x.to(torch.float32) - mean, 0.0)
    count = mask.sum()
    var = (centered**2 * mask).sum() / (count - 1).clamp(min=1.0)
    return centered * torch.rsqrt(var + eps) * (mask != 0)


def group_index(example_ids: list[str]) -> torch.LongTensor:
    """(N,) group number per trajectory: one number per distinct example id, in order of first appearance."""
    numbers: dict[str, int] = {}
    return torch.tensor([numbers.setdefault(i, len(numbers)) for i in example_ids], dtype=torch.long)


def _group_sum(x: Tensor, groups: Tensor) -> Tensor:
    """(N,) the sum of `x` (N,) over each trajectory's group, gathered back per trajectory."""
    groups = groups.to(x.device)
    size = int(groups.max()) + 1 if groups.numel() else 0
    return torch.zeros(size, device=x.device).index_add_(0, groups, x)[groups]


def _group_count_and_mean(rewards: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) size of each trajectory's group and (N,) the group's mean reward."""
    count = _group_sum(torch.ones_like(rewards), groups)
    return count, _group_sum(rewards, groups) / count.clamp(min=1.0)


def grpo_advantages(rewards: Tensor, groups: Tensor, norm_std: bool = True, eps: float = 1e-6) -> Tensor:
    """(N,) (r - group mean) / (group std + eps), std unbiased; `norm_std=False` is Dr. GRPO (no division).

    A group of one sample, or whose rewards are all equal, gets advantage 0.
    """
    rewards = rewards.detach().to(torch.float32)
    count, mean = _group_count_and_mean(rewards, groups)
    centered = rewards - mean
    if not norm_std:
        return centered
    std = (_group_sum(centered**2, groups) / (count - 1).clamp(min=1.0)).sqrt()
    return centered / (std + eps)


def rloo_advantages(rewards: Tensor, groups: Tensor) -> Tensor:
    """(N,) r_i minus the mean of the other samples of its group; 0 for a group of one."""
    rewards = rewards.detach().to(torch.float32)
    count, mean = _group_count_and_mean(rewards, groups)
    others_mean = (mean * count - rewards) / (count - 1).clamp(min=1.0)
    return torch.where(count > 1, rewards - others_mean, 0.0)


def reinforce_pp_advantages(rewards: Tensor, groups: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """(N,) REINFORCE++: rewards whitened over the whole batch (one value per trajectory).

    With `groups` ("REINFORCE++ baseline") each reward's group mean is subtracted first, then the batch whitened.
    """
    rewards = rewards.detach().to(torch.float32)
    if groups is not None:
        rewards = rewards - _group_count_and_mean(rewards, groups)[1]
    return masked_whiten(rewards, torch.ones_like(rewards), eps)


def gae_advantages(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float,
                   whiten: bool = True) -> tuple[Tensor, Tensor]:
    """(B, T) advantages and (B, T) returns by GAE over the positions where mask is 1 only.

    Positions where mask is 0 (tool outputs between turns, padding) are skipped entirely: the "next" value of a
    generated token is the value at the next generated token, the last generated token bootstraps 0, and rewards
    at skipped positions are ignored (put the outcome reward on the last generated token). Returns are
    advantages + values before whitening; advantages are whitened over the masked positions of the batch when
    `whiten`. Both are 0 where mask is 0.
    """
    token_rewards = token_rewards.detach().to(torch.float32)
    values = values.detach().to(torch.float32)
    live = mask.to(torch.float32) != 0
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(values.shape[0], device=values.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(live[:, t], advantage, 0.0)
        next_value = torch.where(live[:, t], values[:, t], next_value)
        next_advantage = torch.where(live[:, t], advantage, next_advantage)
    returns = torch.where(live, advantages + values, 0.0)
    if whiten:
        advantages = masked_whiten(advantages, live)
    return advantages, returns


def sequence_to_token(adv: Tensor, mask: Tensor) -> Tensor:
    """(N, T) each trajectory's advantage `adv` (N,) on its trained tokens, 0 elsewhere."""
    return adv.to(torch.float32)[:, None] * (mask.to(torch.float32) != 0)


def compute_advantages(estimator: str, rewards: Tensor, groups: Tensor, **kw) -> Tensor:
    """(N,) advantages by a named outcome-reward estimator; `kw` goes to that estimator (e.g. `eps`).

    "gae" is not here: it needs the critic's values, so the loop calls `gae_advantages` itself.
    """
    if estimator == "grpo":
        return grpo_advantages(rewards, groups, norm_std=True, **kw)
    if estimator == "drgrpo":
        return grpo_advantages(rewards, groups, norm_std=False, **kw)
    if estimator == "rloo":
        return rloo_advantages(rewards, groups, **kw)
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards, None, **kw)
    if estimator == "reinforce_pp_baseline":
        return reinforce_pp_advantages(rewards, groups, **kw)
    raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {', '.join(ADVANTAGE_ESTIMATORS)}")


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi, same shape as `logp`.

    "k1": logp - ref (unbiased, high variance, can be negative); "k2": (logp - ref)^2 / 2 (biased, low variance);
    "k3" or "low_var_kl": exp(ref - logp) - (ref - logp) - 1 (unbiased, non-negative), clamped to [-10, 10].
    """
    log_ratio = logp.to(torch.float32) - ref_logp.to(torch.float32)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind in ("k3", "low_var_kl"):
        return (torch.exp(-log_ratio) + log_ratio - 1).clamp(min=-10.0, max=10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_KINDS)}")


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float, clip_high: float,
                dual_clip: float = 0.0, level: str = "token", is_weights: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """(B, T) per-token PPO clipped-surrogate loss (0 where mask is 0, not aggregated) and its statistics.

    loss = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = exp(logp - old_logp), `advantages` (B, T).
    `dual_clip` > 1 caps the loss of negative-advantage tokens at -dual_clip * A; 0 disables it.
    `level="sequence"` is GSPO: every token of row i gets s_i = exp(masked mean of logp - old_logp over row i),
    written sg[s_i] * exp(logp - sg[logp]) so its value is s_i and its gradient is GSPO's. `is_weights` (B, T),
    detached, multiply the loss. Log-ratios are clamped to [-20, 20] so exp() stays finite.
    Stats (0-d, detached, over masked tokens): clipfrac_low, clipfrac_high, clipfrac_dual, ratio_mean, ratio_max,
    approx_kl (mean of old_logp - logp).
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"unknown policy-loss level {level!r}; choose one of token, sequence")
    if dual_clip and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or 0 to disable), got {dual_clip}")
    live = mask.to(torch.float32) != 0
    logp = logp.to(torch.float32)
    log_ratio = torch.where(live, logp - old_logp.to(torch.float32), 0.0)
    if level == "sequence":
        seq_log_ratio = masked_mean(log_ratio.detach(), live, dim=-1).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        log_ratio = seq_log_ratio[:, None] + logp - logp.detach()
    else:
        log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach().to(torch.float32)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(live)
    if dual_clip:
        cap = -advantages * dual_clip
        dual_active = (advantages < 0) & (loss > cap)
        loss = torch.where(dual_active, cap, loss)
    if is_weights is not None:
        loss = loss * is_weights.detach().to(torch.float32)
    loss = torch.where(live, loss, 0.0)
    with torch.no_grad():
        stats = {
            "clipfrac_low": masked_mean(((advantages < 0) & (ratio < 1.0 - clip_low)).float(), live),
            "clipfrac_high": masked_mean(((advantages > 0) & (ratio > 1.0 + clip_high)).float(), live),
            "clipfrac_dual": masked_mean(dual_active.float(), live),
            "ratio_mean": masked_mean(ratio, live),
            "ratio_max": torch.where(live, ratio, 0.0).max(),  # ratios are > 0, so 0 only when nothing is masked
            "approx_kl": masked_mean(old_logp.to(torch.float32) - logp, live),
        }
    return loss, {k: v.detach().to(torch.float32) for k, v in stats.items()}


def aggregate(loss: Tensor, mask: Tensor, mode: str, global_tokens: float, global_seqs: float,
              norm_len: float = 0.0) -> Tensor:
    """0-d: this micro-batch's contribution to the mini-batch loss; the micro-batches' returns sum to that loss.

    `global_tokens` and `global_seqs` count the masked tokens and the rows of the WHOLE mini-batch (all ranks, all
    micro-batches), so the result does not depend on how the mini-batch is split:
    "token-mean": sum(loss * mask) / global_tokens;
    "seq-mean-token-mean": sum over rows of the row's masked mean / global_seqs (a row with no token adds 0);
    "seq-mean-token-sum": sum over rows of the row's masked sum / global_seqs;
    "seq-mean-token-sum-norm": sum(loss * mask) / (global_seqs * norm_len), Dr. GRPO's constant normaliser.
    Denominators are clamped to at least 1, so a mini-batch with nothing to train on gives 0, not NaN.
    """
    loss = loss.to(torch.float32)
    mask = mask.to(torch.float32)
    if mode == "token-mean":
        return (loss * mask).sum() / max(global_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        return masked_mean(loss, mask, dim=-1).sum() / max(global_seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return (loss * mask).sum() / max(global_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        if norm_len <= 0:
            raise ValueError("seq-mean-token-sum-norm needs norm_len > 0 (the constant length, e.g. max response len)")
        return (loss * mask).sum() / max(global_seqs * norm_len, 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(AGGREGATION_MODES)}")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """(...) entropy -sum(p log p) of p = softmax(`logits`) over the last dim (finite logits), in float32.

    log p comes from log_softmax (x - logsumexp(x), shifted by the max), which stays exact where the textbook
    logsumexp(x) - sum(p x) loses digits to cancellation for large logits.
    """
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def truncated_is_weights(trainer_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cap: float
                         ) -> tuple[Tensor, dict[str, Tensor]]:
    """(B, T) detached TIS weights min(exp(trainer_logp - rollout_logp), cap), 0 where mask is 0, and stats.

    Stats (0-d, over masked tokens): is_ratio_mean and is_ratio_max (before the cap), is_ess (effective sample
    size share (sum w)^2 / (n sum w^2), in (0, 1]), is_capped_frac (share of ratios above the cap).
    """
    with torch.no_grad():
        live = mask.to(torch.float32) != 0
        log_ratio = torch.where(live, trainer_logp.to(torch.float32) - rollout_logp.to(torch.float32), 0.0)
        ratio = torch.exp(log_ratio.clamp(max=_MAX_LOG_RATIO))
        weights = torch.where(live, ratio.clamp(max=cap), 0.0)
        n = live.sum().to(torch.float32)
        square_sum = (weights**2).sum()
        stats = {
            "is_ratio_mean": masked_mean(ratio, live),
            "is_ratio_max": torch.where(live, ratio, 0.0).max(),
            "is_ess": torch.where(square_sum > 0, weights.sum() ** 2 / (n * square_sum).clamp(min=1e-30), 0.0),
            "is_capped_frac": masked_mean((ratio > cap).float(), live),
        }
    return weights, stats


def dynamic_sampling_keep(rewards: Tensor, groups: Tensor, eps: float = 1e-8) -> torch.BoolTensor:
    """(N,) True for trajectories whose group's rewards are not all equal (max - min > eps); DAPO dynamic sampling."""
    rewards = rewards.to(torch.float32)
    groups = groups.to(rewards.device)
    size = int(groups.max()) + 1 if groups.numel() else 0
    high = torch.full((size,), -torch.inf, device=rewards.device).scatter_reduce(0, groups, rewards, "amax")
    low = torch.full((size,), torch.inf, device=rewards.device).scatter_reduce(0, groups, rewards, "amin")
    return (high - low)[groups] > eps


def overlong_mask(truncated: Tensor, mode: str) -> Tensor:
    """(N,) loss weight per trajectory: "filter" gives truncated trajectories 0 (no loss), "none" all ones."""
    if mode == "filter":
        return (~truncated.bool()).to(torch.float32)
    if mode == "none":
        return torch.ones(truncated.shape, dtype=torch.float32, device=truncated.device)
    raise ValueError(f"unknown overlong mode {mode!r}; choose one of {', '.join(OVERLONG_MODES)}")


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float) -> Tensor:
    """(N,) DAPO's soft overlong punishment, added to the reward.

    0 up to max_len - buffer tokens, then linear down to -penalty at max_len, and -penalty beyond.
    """
    if buffer <= 0 or buffer > max_len:
        raise ValueError(f"overlong buffer must be in [1, max_len={max_len}], got {buffer}")
    excess = (lengths.to(torch.float32) - (max_len - buffer)) / buffer
    return -penalty * excess.clamp(min=0.0, max=1.0)
