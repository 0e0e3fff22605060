"""Reward functions by name, and the built-in ones.

A reward function maps `(trajectory, example)` to named float components; `RewardConfig.weights`
turns components into one scalar. Users add their own with `@register_reward("name")` and list the
name in `RewardConfig.functions`. A function that also takes a `cfg` keyword gets the whole
`RewardConfig` (that is how the judge finds its endpoint).

A group reward function scores all samples of one question together (R1-Searcher++'s bonus for the
correct sample that searched least needs the others): `fn(trajectories, example, components, cfg)`
gets the group's trajectories, their example, the components the per-trajectory functions gave each
one, and the config, and returns one dict of extra components per trajectory, in the same order.
Register it with `@register_group_reward("name")` and list the name in `RewardConfig.functions`
like any other: one namespace, so a name means one function.

Both decorators take `requires`: the `Example` fields the function reads, so that
`check_reward_fields` can reject a dataset that lacks them before any rollout.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mmsearch.rewards.answer import score_answer
from tools.config import ToolsConfig

if TYPE_CHECKING:
    from mmsearch.example import Example
    from mmsearch.trajectory import Trajectory

RewardFn = Callable[..., dict[str, float]]
GroupRewardFn = Callable[..., Sequence[dict[str, float]]]
REWARDS: dict[str, RewardFn] = {}
GROUP_REWARDS: dict[str, GroupRewardFn] = {}
# reward name -> the Example fields it reads (kept by name, so a wrapped or patched function keeps it)
REQUIRES: dict[str, tuple[str, ...]] = {}

# Every tool gets a count, used or not, so a weight on one tool never names a missing component.
# The default toolbox enables every tool there is (tools.registry has the same names, but importing
# it pulls in transformers).
KNOWN_TOOLS = tuple(ToolsConfig().enabled)


def _register(registry: dict, other: dict, other_kind: str, name: str, requires: Sequence[str]) -> Callable:
    def decorator(fn):
        if name in registry and registry[name] is not fn:
            raise ValueError(f"a reward named {name!r} is already registered ({registry[name].__qualname__})")
        if name in other:
            raise ValueError(f"a {other_kind} named {name!r} is already registered ({other[name].__qualname__})")
        registry[name] = fn
        REQUIRES[name] = tuple(requires)
        return fn

    return decorator


def register_reward(name: str, requires: Sequence[str] = ()) -> Callable[[RewardFn], RewardFn]:
    """Register `fn(trajectory, example[, cfg=...]) -> {component: value}` under `name`."""
    return _register(REWARDS, GROUP_REWARDS, "group reward", name, requires)


def register_group_reward(name: str, requires: Sequence[str] = ()) -> Callable[[GroupRewardFn], GroupRewardFn]:
    """Register `fn(trajectories, example, components, cfg) -> [{component: value}, ...]` under `name`."""
    return _register(GROUP_REWARDS, REWARDS, "reward", name, requires)


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown reward {name!r}; known: {sorted({*REWARDS, *GROUP_REWARDS})}")


def get_reward(name: str) -> RewardFn:
    if name in GROUP_REWARDS:
        raise ValueError(f"{name!r} is a group reward: it scores the samples of a question together")
    if name not in REWARDS:
        raise _unknown(name)
    return REWARDS[name]


def get_group_reward(name: str) -> GroupRewardFn:
    if name not in GROUP_REWARDS:
        raise _unknown(name) if name not in REWARDS else ValueError(f"{name!r} is not a group reward")
    return GROUP_REWARDS[name]


def is_group_reward(name: str) -> bool:
    """Whether `name` is a group reward; raises for a name registered as neither kind."""
    if name not in REWARDS and name not in GROUP_REWARDS:
        raise _unknown(name)
    return name in GROUP_REWARDS


def required_fields(name: str) -> tuple[str, ...]:
    is_group_reward(name)  # an unknown name is an error here too
    return REQUIRES.get(name, ())


@register_reward("answer", requires=("answers",))
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


@register_reward("format_penalty")
def format_penalty_reward(trajectory: Trajectory, example: Example) -> dict[str, float]:
    """`format_ok` = 1.0 when every turn is a valid action after a <think> block and the policy answered, else 0;
    `format_bad` = 1 - `format_ok`.

    All-or-nothing, unlike `format`'s share: R1-Searcher (arXiv 2503.05592) adds 0.5 for a well-formed
    rollout in stage 1 (weights {format_ok: 0.5}) and subtracts 2 for a malformed one in stage 2
    (weights {format_bad: -2}). Its own check also counts tags, bans Chinese text and answers over 10
    words (train/reward_server_qwen_zero.py, lines 198-250); ours is the protocol's notion of a valid turn.
    """
    turns = trajectory.turns
    ok = bool(turns) and trajectory.final_answer is not None and all(
        t.action != "invalid" and t.has_think for t in turns
    )
    return {"format_ok": float(ok), "format_bad": float(not ok)}


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
