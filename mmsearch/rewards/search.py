"""Rewards on how the policy searches: whether it retrieved at all, how often, and (over a group of samples)
whether a correct answer came with fewer searches than the others.

"Search" and "retrieval" mean the text_search and image_search tools; crop reads the image the policy
already has, so it is not retrieval. `search_calls` counts the calls the policy made, failed ones
included (each costs a turn), while `retrieval_invoked` wants a call that returned results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from mmsearch.eval.report import SEARCH_TOOLS
from mmsearch.rewards.registry import register_group_reward, register_reward

if TYPE_CHECKING:
    from mmsearch.example import Example
    from mmsearch.rewards.combine import RewardConfig
    from mmsearch.trajectory import Trajectory


def count_searches(trajectory: Trajectory) -> int:
    return sum(1 for c in trajectory.tool_calls if c.name in SEARCH_TOOLS)


@register_reward("retrieval")
def retrieval_reward(trajectory: Trajectory, example: Example) -> dict[str, float]:
    """`retrieval_invoked`: 1.0 when at least one text or image search call succeeded (returned without error).

    R1-Searcher's stage-1 retrieve-reward (arXiv 2503.05592; 0.5 in the README's reward design and in
    train/reward_server_llama_stage1.py, lines 175-190, of RUCAIBox/R1-Searcher). Its code pays the 0.5
    only when every query got its documents back; a call that failed does not count here either, so
    malformed calls cannot earn it, while one good call among failed ones does (those are priced by
    `format_penalty` and `tool_cost`). That stage-1 server also adds +1/-1 for a right/wrong answer
    (lines 155-173), which the paper's stage 1 leaves out; add `answer` with a weight to follow the code.
    """
    ok = any(c.name in SEARCH_TOOLS and not c.is_error for c in trajectory.tool_calls)
    return {"retrieval_invoked": float(ok)}


@register_reward("search_use")
def search_use_reward(trajectory: Trajectory, example: Example) -> dict[str, float]:
    """`searched`: 1.0 when the policy called a search tool at all; `search_calls`: how many times (failed calls too).

    Mostly for logging how often the policy searches (their means per step show R1-Searcher++'s effect);
    a negative weight on `search_calls` prices each search.
    """
    n = count_searches(trajectory)
    return {"searched": float(n > 0), "search_calls": float(n)}


@register_group_reward("fewest_searches")
def fewest_searches_reward(
    trajectories: Sequence[Trajectory], example: Example, components: Sequence[dict[str, float]], cfg: RewardConfig
) -> list[dict[str, float]]:
    """R1-Searcher++'s group reward (arXiv 2505.17005, §3.2.1, R_group): among the samples of one question that
    answered correctly, those with the fewest search calls get a bonus; the others and the wrong ones get 0.

    With t_1..t_k the search-call counts of the k correct samples and sigma their standard deviation,
    a correct sample with t_i = min(t) gets `fewest_searches_bonus` = min(2 * sigma**2, eta), eta =
    `RewardConfig.fewest_searches_cap` (2.0). The paper adds it to the answer and format rewards
    (R = R_format + R_answer + R_group; its Figure 1, assets/model.jpg in RUCAIBox/R1-Searcher-plus,
    shows R_group computed from the retrieval counts of the correct samples only), so weight it 1.0.
    The repository (RUCAIBox/R1-Searcher-plus) has released no code yet (its README: "Coming soon"),
    so the constants 2 and eta follow the paper alone; sigma is the population standard deviation
    (ddof 0). When every correct sample searched equally often, sigma is 0 and nobody gets a
    bonus: there is no cheaper way to be right to reward. That is how the paper rewards answering
    from the policy's own knowledge: a sample that answers right without searching, next to correct
    ones that searched, has the fewest calls. It needs no `requires_search` label.

    "Correct" is `components[i][cfg.correct_component] >= 1.0` (the `correct` of "answer_or_judge"
    by default; R1-Searcher++ used cover exact match, which "substring" approximates).
    `answered_without_search`: 1.0 for a correct sample that made no search call (for logging).
    """
    key = cfg.correct_component
    if any(key not in c for c in components):
        raise ValueError(
            f"group reward 'fewest_searches' reads correctness from component {key!r} (correct_component), "
            f"which no configured function produced; add 'answer_or_judge' to functions or set correct_component "
            f"to one of {sorted(components[0]) if components else []}"
        )
    correct = [c[key] >= 1.0 for c in components]
    counts = [count_searches(t) for t in trajectories]
    right = [n for n, ok in zip(counts, correct) if ok]
    bonus, fewest = 0.0, None
    if right:
        mean = sum(right) / len(right)
        variance = sum((n - mean) ** 2 for n in right) / len(right)
        bonus, fewest = min(2.0 * variance, cfg.fewest_searches_cap), min(right)
    return [
        {
            "fewest_searches_bonus": bonus if ok and n == fewest else 0.0,
            "answered_without_search": float(ok and n == 0),
        }
        for n, ok in zip(counts, correct)
    ]
