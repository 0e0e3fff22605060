"""RL algorithms: each function against hand-computed values, and against loop-by-loop references on random tensors."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch.testing import assert_close

from mmsearch.rl.algos import (
    aggregate,
    compute_advantages,
    dynamic_sampling_keep,
    entropy_from_logits,
    gae_advantages,
    group_index,
    grpo_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    overlong_mask,
    overlong_penalty,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_to_token,
    truncated_is_weights,
)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------- independent references (plain Python loops)

def ref_grpo(rewards: list[float], ids: list[str], norm_std: bool, eps: float) -> list[float]:
    by_id: dict[str, list[float]] = {}
    for r, i in zip(rewards, ids):
        by_id.setdefault(i, []).append(r)
    out = []
    for r, i in zip(rewards, ids):
        members = by_id[i]
        if len(members) == 1:
            out.append(0.0)
            continue
        centered = r - statistics.fmean(members)
        out.append(centered / (statistics.stdev(members) + eps) if norm_std else centered)
    return out


def ref_ppo_token_loss(logp: float, old: float, adv: float, low: float, high: float, dual: float) -> float:
    ratio = math.exp(logp - old)
    loss = max(-adv * ratio, -adv * min(max(ratio, 1 - low), 1 + high))
    if dual and adv < 0:
        loss = min(loss, -dual * adv)
    return loss


def ref_kl(logp: float, ref: float, kind: str) -> float:
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return (logp - ref) ** 2 / 2
    x = ref - logp
    return min(max(math.exp(x) - x - 1, -10.0), 10.0)


def ref_aggregate(loss: list[list[float]], mask: list[list[int]], mode: str, norm_len: float) -> float:
    """The mini-batch loss computed in one piece, straight from the definitions."""
    rows = len(loss)
    sums = [sum(v for v, m in zip(lr, mr) if m) for lr, mr in zip(loss, mask)]
    counts = [sum(mr) for mr in mask]
    if mode == "token-mean":
        return sum(sums) / sum(counts)
    if mode == "seq-mean-token-mean":
        return sum(s / c for s, c in zip(sums, counts) if c) / rows
    if mode == "seq-mean-token-sum":
        return sum(sums) / rows
    return sum(sums) / (rows * norm_len)


def ref_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """Textbook GAE over a contiguous sequence, bootstrapping 0 after the end."""
    out = [0.0] * len(rewards)
    running = 0.0
    for i in reversed(range(len(rewards))):
        following = values[i + 1] if i + 1 < len(values) else 0.0
        running = rewards[i] + gamma * following - values[i] + gamma * lam * running
        out[i] = running
    return out


# ---------------------------------------------------------------- groups and outcome advantages

def test_two_samples_of_one_prompt_share_a_group_and_two_prompts_never_do():
    ids = ["b", "a", "b", "a", "c"]
    groups = group_index(ids)
    assert groups.dtype == torch.long
    assert groups.tolist() == [0, 1, 0, 1, 2]  # numbered in order of first appearance
    for i in range(len(ids)):
        for j in range(len(ids)):
            assert (groups[i] == groups[j]) == (ids[i] == ids[j])


def test_grpo_groups_by_example_id_not_by_position():
    # ids b, a, b, a, c. Group b = {1, 3}: mean 2, unbiased std sqrt((1 + 1) / 1) = 1.41421 -> -0.70711, +0.70711.
    # Group a = {0, 0}: all equal -> 0, 0. Group c = {5}: one sample -> 0.
    # Grouping by position (pairs (1, 0), (3, 0), (5)) would give +-0.70711 at every one of the first four.
    rewards = t([1.0, 0.0, 3.0, 0.0, 5.0])
    groups = group_index(["b", "a", "b", "a", "c"])
    s = 1 / math.sqrt(2)
    assert_close(grpo_advantages(rewards, groups), t([-s, 0.0, s, 0.0, 0.0]))
    # Dr. GRPO: r - group mean = 1 - 2, 0 - 0, 3 - 2, 0 - 0, 5 - 5.
    assert_close(grpo_advantages(rewards, groups, norm_std=False), t([-1.0, 0.0, 1.0, 0.0, 0.0]))


def test_grpo_unbiased_std_group_of_one_and_equal_rewards():
    # Group 0 = {1, 2, 3, 6}: mean 3, deviations -2 -1 0 3, sum of squares 14, unbiased var 14/3, std 2.160247.
    # Group 1 = {7, 7}: std 0 -> 0 / (0 + eps) = 0. Group 2 = {4}: one sample -> 0.
    rewards = t([1.0, 2.0, 3.0, 6.0, 7.0, 7.0, 4.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    std = math.sqrt(14 / 3)
    expected = t([-2 / (std + 1e-6), -1 / (std + 1e-6), 0.0, 3 / (std + 1e-6), 0.0, 0.0, 0.0])
    out = grpo_advantages(rewards, groups)
    assert out.dtype == torch.float32
    assert_close(out, expected)
    assert not out.isnan().any()
    assert_close(rewards[:4].std().item(), std)  # torch.std's default is the unbiased one, as verl uses


def test_grpo_matches_reference_on_random_rewards():
    gen = torch.Generator().manual_seed(0)
    ids = [str(int(i)) for i in torch.randint(0, 7, (40,), generator=gen)] + ["lonely"]
    rewards = torch.randn(len(ids), generator=gen)
    for norm_std in (True, False):
        expected = ref_grpo(rewards.tolist(), ids, norm_std, eps=1e-6)
        assert_close(grpo_advantages(rewards, group_index(ids), norm_std=norm_std), t(expected))


def test_rloo():
    # Group {1, 2, 3, 6}: 1 - (2+3+6)/3 = -2.66667, 2 - (1+3+6)/3 = -1.33333, 3 - (1+2+6)/3 = 0, 6 - (1+2+3)/3 = 4.
    # Group {4}: one sample -> 0.
    rewards = t([1.0, 4.0, 2.0, 3.0, 6.0])
    groups = torch.tensor([0, 1, 0, 0, 0])
    assert_close(rloo_advantages(rewards, groups), t([-8 / 3, 0.0, -4 / 3, 0.0, 4.0]))


def test_reinforce_pp():
    # No groups: {1, 2, 3, 6} whitened over the batch: mean 3, unbiased var 14/3.
    std = math.sqrt(14 / 3 + 1e-6)
    assert_close(reinforce_pp_advantages(t([1.0, 2.0, 3.0, 6.0])), t([-2 / std, -1 / std, 0.0, 3 / std]))
    # Baseline: groups {1, 3} (mean 2) and {10, 14} (mean 12) -> -1 1 -2 2; batch mean 0, unbiased var
    # (1 + 1 + 4 + 4) / 3 = 10/3, std 1.825742 -> -0.547723 0.547723 -1.095445 1.095445.
    std = math.sqrt(10 / 3 + 1e-6)
    out = reinforce_pp_advantages(t([1.0, 3.0, 10.0, 14.0]), torch.tensor([0, 0, 1, 1]))
    assert_close(out, t([-1 / std, 1 / std, -2 / std, 2 / std]))
    assert_close(reinforce_pp_advantages(t([5.0])), t([0.0]))  # a batch of one has nothing to whiten against


def test_compute_advantages_dispatches_and_rejects_unknown_names():
    rewards = t([1.0, 0.0, 3.0, 0.0, 5.0])
    groups = group_index(["b", "a", "b", "a", "c"])
    assert_close(compute_advantages("grpo", rewards, groups), grpo_advantages(rewards, groups))
    assert_close(compute_advantages("drgrpo", rewards, groups), grpo_advantages(rewards, groups, norm_std=False))
    assert_close(compute_advantages("rloo", rewards, groups), rloo_advantages(rewards, groups))
    assert_close(compute_advantages("reinforce_pp", rewards, groups), reinforce_pp_advantages(rewards))
    assert_close(compute_advantages("reinforce_pp_baseline", rewards, groups, eps=1e-3),
                 reinforce_pp_advantages(rewards, groups, eps=1e-3))
    with pytest.raises(ValueError, match="reinforce_pp_baseline"):
        compute_advantages("gae", rewards, groups)


def test_dynamic_sampling_keeps_groups_with_different_rewards():
    # Groups by id: b = {1, 1} (all equal: drop), a = {0, 1} (keep), c = {0.5} alone (drop: nothing to compare).
    rewards = t([1.0, 0.0, 1.0, 1.0, 0.5])
    keep = dynamic_sampling_keep(rewards, group_index(["b", "a", "b", "a", "c"]))
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, True, False, True, False]
    assert dynamic_sampling_keep(t([1.0, 1.0 + 1e-9]), torch.tensor([0, 0])).tolist() == [False, False]


# ---------------------------------------------------------------- GAE and token broadcasting

def test_gae_skips_tool_output_positions():
    # mask 1 1 0 1 0 (generated, generated, tool output, generated, padding); gamma 0.9, lam 0.8 (gamma*lam 0.72).
    # The reward 7 and the value 9 at masked positions must be ignored.
    # t=3: delta = 1 + 0.9*0 - 0.8 = 0.2 (last generated token bootstraps 0); A3 = 0.2
    # t=1: next value is v3 = 0.8: delta = 0.9*0.8 - 0.4 = 0.32; A1 = 0.32 + 0.72*0.2 = 0.464
    # t=0: delta = 0.9*0.4 - 0.5 = -0.14; A0 = -0.14 + 0.72*0.464 = 0.19408
    # returns = A + V = 0.69408, 0.864, -, 1.0, -
    rewards = t([[0.0, 0.0, 7.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    values = t([[0.5, 0.4, 9.0, 0.8, 9.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]])  # the second row has nothing generated
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8, whiten=False)
    assert_close(adv, t([[0.19408, 0.464, 0.0, 0.2, 0.0], [0.0] * 5]))
    assert_close(ret, t([[0.69408, 0.864, 0.0, 1.0, 0.0], [0.0] * 5]))
    whitened, ret_w = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(ret_w, ret)  # returns are never whitened
    live = whitened[mask.bool()]
    assert_close(live.mean(), torch.tensor(0.0))
    assert_close(live.std(), torch.tensor(1.0))
    assert_close(whitened[~mask.bool()], torch.zeros(7))


def test_gae_with_gaps_equals_textbook_gae_on_the_generated_tokens_alone():
    gen = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(3, 9, generator=gen), torch.randn(3, 9, generator=gen)
    mask = (torch.rand(3, 9, generator=gen) > 0.35).long()
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.95, lam=0.9, whiten=False)
    for row in range(3):
        keep = [i for i in range(9) if mask[row, i]]
        expected = ref_gae([rewards[row, i].item() for i in keep], [values[row, i].item() for i in keep], 0.95, 0.9)
        assert_close(adv[row, keep], t(expected))
        assert_close(ret[row, keep], t(expected) + values[row, keep])


def test_sequence_to_token():
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert_close(sequence_to_token(t([2.0, -1.0]), mask), t([[2.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))


def test_masked_mean_and_whiten():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert_close(masked_mean(x, mask, dim=-1), t([1.5, 0.0]))  # an empty row has mean 0, not NaN
    assert_close(masked_mean(x, mask), torch.tensor(1.5))
    # {1, 2, 3} (the 100 is masked): mean 2, unbiased var 1 -> -1, 0, 1; 0 at the masked position.
    assert_close(masked_whiten(t([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0])), t([-1.0, 0.0, 1.0, 0.0]))


# ---------------------------------------------------------------- KL estimators

def test_kl_estimators_by_hand():
    logp, ref = t([-1.0, -2.0, 0.0]), t([-2.0, -1.0, 20.0])
    # k1 = logp - ref: 1, -1, -20.  k2 = (logp - ref)^2 / 2: 0.5, 0.5, 200.
    # k3 = exp(ref - logp) - (ref - logp) - 1: e^-1 + 1 - 1 = 0.367879; e^1 - 1 - 1 = 0.718282; e^20 - 21 -> clamped 10.
    assert_close(kl_estimate(logp, ref, "k1"), t([1.0, -1.0, -20.0]))
    assert_close(kl_estimate(logp, ref, "k2"), t([0.5, 0.5, 200.0]))
    assert_close(kl_estimate(logp, ref, "k3"), t([math.exp(-1), math.e - 2, 10.0]))
    assert_close(kl_estimate(logp, ref, "low_var_kl"), kl_estimate(logp, ref, "k3"))
    with pytest.raises(ValueError, match="low_var_kl"):
        kl_estimate(logp, ref, "k4")


def test_kl_estimators_match_reference_on_random_tensors():
    gen = torch.Generator().manual_seed(2)
    logp, ref = -torch.rand(4, 6, generator=gen) * 3, -torch.rand(4, 6, generator=gen) * 3
    for kind in ("k1", "k2", "k3"):
        expected = [[ref_kl(a, b, kind) for a, b in zip(ra, rb)] for ra, rb in zip(logp.tolist(), ref.tolist())]
        assert_close(kl_estimate(logp, ref, kind), t(expected))


# ---------------------------------------------------------------- policy loss

def _hand_case():
    # clip range [0.8, 1.28]; one token per situation, plus a masked token with a wild log-ratio.
    ratios = [1.5, 0.5, 0.5, 1.5, 4.0, 1.0]
    advantages = t([[1.0, -1.0, 1.0, -1.0, -2.0, 1.0]])
    old = t([[-1.0] * 6])
    logp = (old + torch.log(t([ratios]))).clone()
    logp[0, 5] = 100.0  # masked: exp(101) would overflow, and must not turn into NaN
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    return logp, old, advantages, mask


def test_policy_loss_clips_at_both_ends_and_dual_clip_caps():
    logp, old, adv, mask = _hand_case()
    # A=+1 r=1.5: max(-1.5, -1.28) = -1.28 (upper clip active)
    # A=-1 r=0.5: max(0.5, 0.8)    =  0.8  (lower clip active)
    # A=+1 r=0.5: max(-0.5, -0.8)  = -0.5  (no clip: a lower ratio with A>0 is not clipped)
    # A=-1 r=1.5: max(1.5, 1.28)   =  1.5  (no clip: a higher ratio with A<0 is not clipped)
    # A=-2 r=4:   max(8, 2.56)     =  8, capped by dual clip 3 at -3 * -2 = 6
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    assert_close(loss, t([[-1.28, 0.8, -0.5, 1.5, 6.0, 0.0]]))
    # Over the 5 masked tokens: one each clipped low, high and dual; ratios 1.5 0.5 0.5 1.5 4 (mean 1.6, max 4);
    # approx_kl = mean(old - logp) = -(2 ln 1.5 + 2 ln 0.5 + ln 4) / 5 = -2 ln 1.5 / 5 = -0.162186.
    assert_close(stats["clipfrac_low"], torch.tensor(0.2))
    assert_close(stats["clipfrac_high"], torch.tensor(0.2))
    assert_close(stats["clipfrac_dual"], torch.tensor(0.2))
    assert_close(stats["ratio_mean"], torch.tensor(1.6))
    assert_close(stats["ratio_max"], torch.tensor(4.0))
    assert_close(stats["approx_kl"], torch.tensor(-2 * math.log(1.5) / 5))
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    # Without dual clip the last token keeps its loss 8; symmetric clip 0.2 puts the upper clip at 1.2.
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert_close(loss, t([[-1.2, 0.8, -0.5, 1.5, 8.0, 0.0]]))
    assert stats["clipfrac_dual"].item() == 0.0


def test_policy_loss_gradient_is_zero_where_clipped():
    logp, old, adv, mask = _hand_case()
    logp.requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    loss.sum().backward()
    # d/dlogp of -A r is -A r where the unclipped term is the one taken: -0.5 (A=+1 r=0.5), +1.5 (A=-1 r=1.5).
    assert_close(logp.grad, t([[0.0, 0.0, -0.5, 1.5, 0.0, 0.0]]))


def test_policy_loss_importance_weights_multiply_and_validation():
    logp, old, adv, mask = _hand_case()
    weights = t([[2.0, 1.0, 0.5, 1.0, 1.0, 1.0]])
    loss, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0, is_weights=weights)
    assert_close(loss, t([[-2.56, 0.8, -0.25, 1.5, 6.0, 0.0]]))
    with pytest.raises(ValueError, match="sequence"):
        policy_loss(logp, old, adv, mask, 0.2, 0.2, level="seq")
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, mask, 0.2, 0.2, dual_clip=0.5)


def test_policy_loss_matches_reference_on_random_tensors():
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(5, 7, generator=gen) * 2
    logp = old + torch.randn(5, 7, generator=gen) * 0.6  # ratios from about 0.2 to 5: every branch is taken
    adv = torch.randn(5, 7, generator=gen)
    mask = (torch.rand(5, 7, generator=gen) > 0.25).long()
    for dual in (0.0, 2.0):
        loss, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.3, dual_clip=dual)
        expected = [[ref_ppo_token_loss(logp[b, i].item(), old[b, i].item(), adv[b, i].item(), 0.2, 0.3, dual)
                     if mask[b, i] else 0.0 for i in range(7)] for b in range(5)]
        assert_close(loss, t(expected))


def test_gspo_value_and_gradient():
    # Row 0: log-ratios 0.1, -0.3 -> s = exp(-0.1) = 0.904837, A = +1, inside [0.8, 1.28]: loss -0.904837.
    # Row 1: log-ratios 0.5, 0.3, 0.4 -> s = exp(0.4) = 1.491825, A = +1: clipped at 1.28, so no gradient.
    # Row 2: log-ratios 0.2, (masked 5.0), 0.0 -> s = exp(0.1) = 1.105171, A = -2: loss 2.210342.
    old = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0], [-0.5, -0.5, -0.5]])
    logp = (old + t([[0.1, -0.3, 0.0], [0.5, 0.3, 0.4], [0.2, 5.0, 0.0]])).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 1]])
    seq_adv = t([1.0, 1.0, -2.0])
    adv = sequence_to_token(seq_adv, mask)
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, level="sequence")
    s0, s2 = math.exp(-0.1), math.exp(0.1)
    assert_close(loss.detach(), t([[-s0, -s0, 0.0], [-1.28] * 3, [2 * s2, 0.0, 2 * s2]]))
    assert_close(stats["clipfrac_high"], torch.tensor(3 / 7))  # row 1's three tokens out of 7 masked tokens
    total = aggregate(loss, mask, "seq-mean-token-mean", global_tokens=7, global_seqs=3)
    (grad,) = torch.autograd.grad(total, logp)
    # GSPO's gradient: d/dlogp_t of (1/G) sum_i -A_i s_i with s_i = exp(mean_t log-ratio) is -A_i s_i / (G |y_i|):
    # row 0: -1 * 0.904837 / (3 * 2) = -0.150806; row 1 clipped: 0; row 2: 2 * 1.105171 / (3 * 2) = 0.368390.
    assert_close(grad, t([[-s0 / 6, -s0 / 6, 0.0], [0.0] * 3, [2 * s2 / 6, 0.0, 2 * s2 / 6]]))
    # The same, by differentiating the sequence-level objective written out directly (no stop-gradient trick).
    logp2 = logp.detach().clone().requires_grad_(True)
    s = torch.exp(((logp2 - old) * mask).sum(-1) / mask.sum(-1))
    objective = torch.maximum(-seq_adv * s, -seq_adv * s.clamp(0.8, 1.28)).mean()
    (grad2,) = torch.autograd.grad(objective, logp2)
    assert_close(grad, grad2)


# ---------------------------------------------------------------- aggregation

def test_aggregate_modes_by_hand():
    loss = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the last row has no trained token
    # masked sums 3, 4, 0; counts 2, 1, 0; 3 tokens, 3 rows
    assert_close(aggregate(loss, mask, "token-mean", 3, 3), torch.tensor(7 / 3))  # (1+2+4) / 3
    assert_close(aggregate(loss, mask, "seq-mean-token-mean", 3, 3), torch.tensor(5.5 / 3))  # (1.5 + 4 + 0) / 3
    assert_close(aggregate(loss, mask, "seq-mean-token-sum", 3, 3), torch.tensor(7 / 3))  # (3 + 4 + 0) / 3
    assert_close(aggregate(loss, mask, "seq-mean-token-sum-norm", 3, 3, norm_len=4), torch.tensor(7 / 12))
    with pytest.raises(ValueError, match="norm_len"):
        aggregate(loss, mask, "seq-mean-token-sum-norm", 3, 3)
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        aggregate(loss, mask, "mean", 3, 3)
    assert aggregate(loss, torch.zeros_like(mask), "token-mean", 0, 3).item() == 0.0  # nothing to train: 0, not NaN


MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_matches_reference_and_does_not_depend_on_micro_batching(mode):
    gen = torch.Generator().manual_seed(4)
    loss = torch.randn(8, 6, generator=gen)
    lengths = [6, 1, 3, 0, 5, 2, 6, 4]  # ragged, one row empty
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    tokens, seqs = float(mask.sum()), 8.0
    whole = aggregate(loss, mask, mode, tokens, seqs, norm_len=6)
    assert_close(whole, torch.tensor(ref_aggregate(loss.tolist(), mask.tolist(), mode, 6), dtype=torch.float32))
    for sizes in ([3, 5], [1, 1, 6], [2, 2, 2, 2], [1] * 8):
        parts = zip(loss.split(sizes), mask.split(sizes))
        assert_close(sum(aggregate(lp, mp, mode, tokens, seqs, norm_len=6) for lp, mp in parts), whole)


def test_normalising_per_micro_batch_would_differ():
    # The test above has teeth: averaging each micro-batch's own token-mean is not the mini-batch token-mean
    # when micro-batches hold different numbers of tokens (here 4 and 1): (1+1+1+1)/4 and 5/1 -> 3 vs 9/5.
    loss = t([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    per_micro = (aggregate(loss[:1], mask[:1], "token-mean", 4, 1) + aggregate(loss[1:], mask[1:], "token-mean", 1, 1)) / 2
    assert_close(per_micro, torch.tensor(3.0))
    assert_close(aggregate(loss, mask, "token-mean", 5, 2), torch.tensor(9 / 5))


# ---------------------------------------------------------------- entropy, importance sampling, overlong

def test_entropy_from_logits():
    # Uniform over 4: ln 4 = 1.386294. p = (1/4, 3/4) from logits (0, ln 3): 0.25 ln 4 + 0.75 ln(4/3) = 0.562335.
    assert_close(entropy_from_logits(torch.zeros(2, 3, 4)), torch.full((2, 3), math.log(4)))
    assert_close(entropy_from_logits(t([[0.0, math.log(3)]])), t([0.25 * math.log(4) + 0.75 * math.log(4 / 3)]))
    huge = entropy_from_logits(t([[1000.0, 0.0], [-1000.0, -1000.0]]).to(torch.bfloat16))
    assert huge.dtype == torch.float32
    assert_close(huge, t([0.0, math.log(2)]))  # exp(-1000) is 0: no NaN; -1000 twice: exactly ln 2


def test_truncated_is_weights():
    # Ratios 2, 0.5, 4 on masked tokens (and 100 on a masked-out one), cap 3 -> w = 2, 0.5, 3, 0.
    # ratio mean (2 + 0.5 + 4)/3 = 2.166667, max 4; 1 of 3 capped; ESS (5.5)^2 / (3 * (4 + 0.25 + 9)) = 0.761006.
    rollout = t([[-1.0, -1.0, -1.0, -1.0]])
    trainer = (rollout + torch.log(t([[2.0, 0.5, 4.0, 100.0]]))).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0]])
    w, stats = truncated_is_weights(trainer, rollout, mask, cap=3.0)
    assert not w.requires_grad
    assert_close(w, t([[2.0, 0.5, 3.0, 0.0]]))
    assert_close(stats["is_ratio_mean"], torch.tensor(6.5 / 3))
    assert_close(stats["is_ratio_max"], torch.tensor(4.0))
    assert_close(stats["is_capped_frac"], torch.tensor(1 / 3))
    assert_close(stats["is_ess"], torch.tensor(5.5**2 / (3 * 13.25)))
    _, on_policy = truncated_is_weights(rollout, rollout, mask, cap=3.0)
    assert_close(on_policy["is_ess"], torch.tensor(1.0))  # equal weights: full sample size


def test_overlong_mask_and_penalty():
    truncated = torch.tensor([True, False, True])
    assert_close(overlong_mask(truncated, "filter"), t([0.0, 1.0, 0.0]))
    assert_close(overlong_mask(truncated, "none"), t([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="filter"):
        overlong_mask(truncated, "drop")
    # max_len 100, buffer 20: free up to 80; 90 is halfway into the buffer -> -0.5 * 2; 100 and beyond -> -2.
    lengths = torch.tensor([50, 80, 90, 100, 120])
    assert_close(overlong_penalty(lengths, max_len=100, buffer=20, penalty=2.0), t([0.0, 0.0, -1.0, -2.0, -2.0]))
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, max_len=100, buffer=0, penalty=1.0)
