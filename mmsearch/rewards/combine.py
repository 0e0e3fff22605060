"""From reward functions to one scalar: run the configured functions, merge their components, weigh them."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

from mmsearch.rewards.judge import JudgeConfig, check_judge_config
from mmsearch.rewards.registry import RewardFn, get_reward

if TYPE_CHECKING:
    from mmsearch.example import Example
    from mmsearch.trajectory import Trajectory


@dataclass
class RewardConfig:
    functions: list[str] = field(default_factory=lambda: ["answer", "format", "tool_cost"])
    # component name -> weight; "reward" is the sum of weight * component. Components without a
    # weight are still computed and logged.
    weights: dict[str, float] = field(default_factory=lambda: {"exact_match": 1.0})
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@cache
def _wants_cfg(fn: RewardFn) -> bool:
    return "cfg" in inspect.signature(fn).parameters


def compute_rewards(trajectory: Trajectory, example: Example, cfg: RewardConfig | None = None) -> dict[str, float]:
    """Every component of every configured function, plus "reward"; also stored in `trajectory.rewards`."""
    cfg = cfg or RewardConfig()
    components: dict[str, float] = {}
    source: dict[str, str] = {}
    for name in cfg.functions:
        fn = get_reward(name)
        out = fn(trajectory, example, cfg=cfg) if _wants_cfg(fn) else fn(trajectory, example)
        for key, value in out.items():
            # Two functions writing one name would make the weight's meaning depend on their order.
            if key in components or key == "reward":
                owner = source.get(key, "compute_rewards")
                raise ValueError(f"reward component {key!r} comes from both {owner!r} and {name!r}; rename one")
            components[key], source[key] = float(value), name
    missing = [key for key in cfg.weights if key not in components]
    if missing:
        raise ValueError(
            f"weights name components no reward function produced: {missing}; functions {cfg.functions} "
            f"produce {sorted(components)}"
        )
    components["reward"] = sum(weight * components[key] for key, weight in cfg.weights.items())
    trajectory.rewards = components
    return components


def compute_rewards_batch(
    trajectories: Sequence[Trajectory], examples_by_id: Mapping[str, Example], cfg: RewardConfig | None = None
) -> list[dict[str, float]]:
    """`compute_rewards` for each trajectory, in order; judge requests go out concurrently."""
    cfg = cfg or RewardConfig()
    missing = sorted({t.example_id for t in trajectories if t.example_id not in examples_by_id})
    if missing:
        raise KeyError(f"no example for trajectories of {missing[:5]}{' …' if len(missing) > 5 else ''}")
    if "judge" not in cfg.functions:  # only the judge waits on I/O; the rest is pure Python and gains nothing
        return [compute_rewards(t, examples_by_id[t.example_id], cfg) for t in trajectories]
    check_judge_config(cfg.judge)  # one clear error instead of one per worker
    with ThreadPoolExecutor(max_workers=max(1, cfg.judge.concurrency), thread_name_prefix="judge") as pool:
        return list(pool.map(lambda t: compute_rewards(t, examples_by_id[t.example_id], cfg), trajectories))
