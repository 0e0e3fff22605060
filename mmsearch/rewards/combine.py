"""From reward functions to one scalar: run the configured functions, merge their components, weigh them.

`compute_rewards_batch` is what training calls: it scores every trajectory with the per-trajectory
functions, then hands each group (the trajectories of one example id, wherever they sit in the batch)
to the group functions, in the order `functions` lists them; each group function sees the components
of the functions before it. `compute_rewards` scores one trajectory and refuses a config with a group
function: a lone sample scored as a group of one would silently get no group bonus. A batch holding
one sample of a question (eval with n_samples=1) is a group of one, which is well defined.

`check_reward_fields` is the check to run on a dataset before any rollout.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

from mmsearch.rewards.judge import JudgeConfig, check_judge_config, uses_judge
from mmsearch.rewards.registry import RewardFn, get_group_reward, get_reward, is_group_reward, required_fields

if TYPE_CHECKING:
    from mmsearch.example import Example
    from mmsearch.trajectory import Trajectory


@dataclass
class RewardConfig:
    # Per-trajectory and group reward names alike; per-trajectory ones run first whatever the order.
    functions: list[str] = field(default_factory=lambda: ["answer", "format", "tool_cost"])
    # component name -> weight; "reward" is the sum of weight * component. Components without a
    # weight are still computed and logged.
    weights: dict[str, float] = field(default_factory=lambda: {"exact_match": 1.0})
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    # The component group rewards read as "answered correctly" (1.0 = right).
    correct_component: str = "correct"
    # eta in R1-Searcher++'s group reward min(2 * sigma**2, eta) ("fewest_searches").
    fewest_searches_cap: float = 2.0


@cache
def _wants_cfg(fn: RewardFn) -> bool:
    return "cfg" in inspect.signature(fn).parameters


def _split_functions(cfg: RewardConfig) -> tuple[list[str], list[str]]:
    """(per-trajectory names, group names), each in config order; an unknown name raises."""
    if len(set(cfg.functions)) != len(cfg.functions):
        raise ValueError(f"a reward function is listed twice in functions {cfg.functions}")
    group = [name for name in cfg.functions if is_group_reward(name)]
    return [name for name in cfg.functions if name not in group], group


def check_reward_config(cfg: RewardConfig) -> None:
    """Every function name known and listed once; a judge endpoint and model when a function will ask the judge."""
    _split_functions(cfg)
    if uses_judge(cfg):
        check_judge_config(cfg.judge)


def _example_lacks(example: Example, name: str) -> bool:
    value = getattr(example, name, None)
    if name == "answers":
        return not any(isinstance(a, str) and a.strip() for a in value or ())
    if name == "hops":
        return value is None or value < 0  # -1 means unknown
    return value is None or value == "" or value == [] or value == {}


def check_reward_fields(cfg: RewardConfig, examples: Sequence[Example]) -> None:
    """Raise ValueError, before any rollout, if an example lacks a field a configured reward reads.

    One message lists every (reward, field) pair that fails, with how many examples lack the field
    and a few of their ids. `answers` counts as present when it holds at least one non-blank string;
    `hops` of -1 and `requires_search` of None are unknown, so missing. Also runs `check_reward_config`.
    """
    check_reward_config(cfg)
    problems = []
    for name in cfg.functions:
        for field_name in required_fields(name):
            lacking = [ex.id for ex in examples if _example_lacks(ex, field_name)]
            if lacking:
                ids = ", ".join(map(str, lacking[:3])) + (", …" if len(lacking) > 3 else "")
                problems.append(
                    f"reward {name!r} needs {field_name!r}, which {len(lacking)} of {len(examples)} examples lack "
                    f"(e.g. {ids})"
                )
    if problems:
        raise ValueError(
            "the dataset does not have what the configured rewards read: " + "; ".join(problems)
            + ". Fill those fields in, drop those examples, or configure rewards that do not need them."
        )


def _merge(components: dict[str, float], source: dict[str, str], name: str, out: Mapping[str, float]) -> None:
    for key, value in out.items():
        # Two functions writing one name would make the weight's meaning depend on their order.
        if key in components or key == "reward":
            owner = source.get(key, "compute_rewards")
            raise ValueError(f"reward component {key!r} comes from both {owner!r} and {name!r}; rename one")
        components[key], source[key] = float(value), name


def _trajectory_components(
    trajectory: Trajectory, example: Example, cfg: RewardConfig, names: Sequence[str]
) -> tuple[dict[str, float], dict[str, str]]:
    components: dict[str, float] = {}
    source: dict[str, str] = {}
    for name in names:
        fn = get_reward(name)
        _merge(components, source, name, fn(trajectory, example, cfg=cfg) if _wants_cfg(fn) else fn(trajectory, example))
    return components, source


def _weigh(trajectory: Trajectory, components: dict[str, float], cfg: RewardConfig) -> dict[str, float]:
    missing = [key for key in cfg.weights if key not in components]
    if missing:
        raise ValueError(
            f"weights name components no reward function produced: {missing}; functions {cfg.functions} "
            f"produce {sorted(components)}"
        )
    components["reward"] = sum(weight * components[key] for key, weight in cfg.weights.items())
    trajectory.rewards = components
    return components


def compute_rewards(trajectory: Trajectory, example: Example, cfg: RewardConfig | None = None) -> dict[str, float]:
    """Every component of every configured function, plus "reward"; also stored in `trajectory.rewards`.

    Only for configs without group functions: those need all samples of the question
    (`compute_rewards_batch`).
    """
    cfg = cfg or RewardConfig()
    names, group = _split_functions(cfg)
    if group:
        raise ValueError(
            f"{group} score the samples of a question together, so one trajectory cannot be scored alone; "
            "call compute_rewards_batch with every sample of the question"
        )
    components, _ = _trajectory_components(trajectory, example, cfg, names)
    return _weigh(trajectory, components, cfg)


def compute_rewards_batch(
    trajectories: Sequence[Trajectory], examples_by_id: Mapping[str, Example], cfg: RewardConfig | None = None
) -> list[dict[str, float]]:
    """Components and "reward" for each trajectory, in order (also stored in each `trajectory.rewards`).

    Group functions see the trajectories of each example id together, in batch order, whatever
    order the batch interleaves them in. Judge requests go out concurrently.
    """
    cfg = cfg or RewardConfig()
    missing = sorted({t.example_id for t in trajectories if t.example_id not in examples_by_id})
    if missing:
        raise KeyError(f"no example for trajectories of {missing[:5]}{' …' if len(missing) > 5 else ''}")
    names, group_names = _split_functions(cfg)

    def score(t: Trajectory) -> tuple[dict[str, float], dict[str, str]]:
        return _trajectory_components(t, examples_by_id[t.example_id], cfg, names)

    if uses_judge(cfg):
        check_judge_config(cfg.judge)  # one clear error instead of one per worker
        with ThreadPoolExecutor(max_workers=max(1, cfg.judge.concurrency), thread_name_prefix="judge") as pool:
            scored = list(pool.map(score, trajectories))
    else:  # only the judge waits on I/O; the rest is pure Python and gains nothing from threads
        scored = [score(t) for t in trajectories]

    groups: dict[str, list[int]] = {}
    for i, t in enumerate(trajectories):
        groups.setdefault(t.example_id, []).append(i)
    for name in group_names:
        fn = get_group_reward(name)
        for example_id, members in groups.items():
            outs = list(fn([trajectories[i] for i in members], examples_by_id[example_id],
                           [dict(scored[i][0]) for i in members], cfg))
            if len(outs) != len(members):
                raise ValueError(f"group reward {name!r} returned {len(outs)} results for {len(members)} trajectories")
            if any(set(out) != set(outs[0]) for out in outs):
                raise ValueError(f"group reward {name!r} gave the trajectories of {example_id!r} different components")
            for i, out in zip(members, outs):
                _merge(*scored[i], name, out)
    return [_weigh(t, components, cfg) for t, (components, _) in zip(trajectories, scored)]
