"""Rewards: named reward functions of (trajectory, example) -> components, and their weighted sum.

Importing the package registers the built-ins: "answer", "format", "format_penalty", "tool_cost",
"judge", "answer_or_judge", "retrieval", "search_use", and the group reward "fewest_searches".
"""

from mmsearch.rewards import search  # noqa: F401  (registers the search rewards)
from mmsearch.rewards.answer import exact_match, normalize_answer, score_answer, substring_match, token_f1
from mmsearch.rewards.combine import (
    RewardConfig,
    check_reward_config,
    check_reward_fields,
    compute_rewards,
    compute_rewards_batch,
)
from mmsearch.rewards.judge import JudgeConfig, JudgeError, parse_verdict
from mmsearch.rewards.registry import (
    GROUP_REWARDS,
    REWARDS,
    get_group_reward,
    get_reward,
    register_group_reward,
    register_reward,
    required_fields,
)

__all__ = [
    "GROUP_REWARDS", "REWARDS", "JudgeConfig", "JudgeError", "RewardConfig", "check_reward_config",
    "check_reward_fields", "compute_rewards", "compute_rewards_batch", "exact_match", "get_group_reward", "get_reward",
    "normalize_answer", "parse_verdict", "register_group_reward", "register_reward", "required_fields", "score_answer",
    "substring_match", "token_f1",
]
