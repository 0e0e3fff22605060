"""Rewards: named reward functions of (trajectory, example) -> components, and their weighted sum.

Importing the package registers the built-ins: "answer", "format", "tool_cost" and "judge".
"""

from mmsearch.rewards.answer import exact_match, normalize_answer, score_answer, substring_match, token_f1
from mmsearch.rewards.combine import RewardConfig, compute_rewards, compute_rewards_batch
from mmsearch.rewards.judge import JudgeConfig, JudgeError, parse_verdict
from mmsearch.rewards.registry import REWARDS, get_reward, register_reward

__all__ = [
    "REWARDS", "JudgeConfig", "JudgeError", "RewardConfig", "compute_rewards", "compute_rewards_batch", "exact_match",
    "get_reward", "normalize_answer", "parse_verdict", "register_reward", "score_answer", "substring_match", "token_f1",
]
