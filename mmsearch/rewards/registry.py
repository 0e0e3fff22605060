"""Reward functions by name, and the built-in ones.

A reward function maps `(trajectory, example)` to named float components; `RewardConfig.weights`
turns components into one scalar. Users add their own with `@register_reward("name")` and list the
name in `RewardConfig.functions`. A function that also takes a `cfg` keyword gets the whole
`RewardConfig` (that is how the judge finds its endpoint).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from mmsearch.rewards.answer import score_answer
from tools.config import ToolsConfig

if TYPE_CHECKING:
    from mmsearch.example import Example
    from mmsearch.trajectory import Trajectory

RewardFn = Callable[..., dict[str, float]]
REWARDS: dict[str, RewardFn] = {}

# Every tool gets a count, used or not, so a weight on one tool never names a missing component.
# The default toolbox enables every tool there is (tools.registry has the same names, but importing
# it pulls in transformers).
KNOWN_TOOLS = tuple(ToolsConfig().enabled)


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def decorator(fn: RewardFn) -> RewardFn:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"a reward named {name!r} is already registered ({REWARDS[name].__qualname__})")
        REWARDS[name] = fn
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known: {sorted(REWARDS)}")
    return REWARDS[name]


@register_reward("answer")
def answer_reward(trajectory: Trajectory, example: Example) -> dict[str, float]:
    """`exact_match`, `f1`, `substring` of the final answer against the gold and its aliases."""
    return score_answer(trajectory.final_answer, example.answers)


@register_reward("format")
def format_reward(trajectory: Trajectory, example: Example) -> dict[str, float]:
    """`format`: share of turns that are a valid action after a <think> block; `invalid_actions`: a count."""
    turns = trajectory.turns
    well_formed = sum(1 for t in turns if t.action != "invalid" and t.has_think)
    return {
        "format": well_formed / len(turns) if turns else 0.0,
        "invalid_actions": float(sum(1 for t in turns if t.action == "invalid")),
    }


@register_reward("tool_cost")
def tool_cost_reward(trajectory: Trajectory, example: Example) -> dict[str, float]:
    """`tool_calls`, `tool_errors`, and `tool_calls/<name>` per tool, so weights can price each tool."""
    per_tool = Counter({name: 0 for name in KNOWN_TOOLS})
    per_tool.update(c.name for c in trajectory.tool_calls)
    return {
        "tool_calls": float(len(trajectory.tool_calls)),
        "tool_errors": float(sum(1 for c in trajectory.tool_calls if c.is_error)),
        **{f"tool_calls/{name}": float(n) for name, n in per_tool.items()},
    }
