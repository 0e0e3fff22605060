"""A reward that varies between the samples of an untrained policy, so tests see non-zero advantages.

An untrained policy never answers right, so every real reward is 0 for every sample and GRPO has
nothing to learn from; the parity of the first generated token is a coin flip per sample instead.
Imported by test_rl.py, and by the subprocess it kills and resumes.
"""

from mmsearch.rewards import register_reward

REWARD_OVERRIDES = ["rewards.functions=[answer, format, tool_cost, first_token_even]",
                    "rewards.weights={first_token_even: 1.0}"]


@register_reward("first_token_even")
def first_token_even(trajectory, example) -> dict[str, float]:
    first = next((t for t, m in zip(trajectory.token_ids, trajectory.loss_mask) if m), 1)
    return {"first_token_even": float(first % 2 == 0)}
