"""What an RL step's rollouts say about the policy: rewards, accuracy, tool use, validity, lengths.

Every value is a mean over the step's trajectories (all of them, refills included) unless its name
says otherwise. These are the signals a collapsing run shows first (README, "Reinforcement learning").
"""

from __future__ import annotations

import statistics
from collections import Counter

from mmsearch.eval.report import SEARCH_TOOLS, STANDARD_TOOLS
from mmsearch.example import Example

# metrics.jsonl -> curves.png panels: (kind, key, title)
CURVES = [
    ("train", "reward_mean", "reward (mean over trajectories)"),
    ("train", "accuracy", "train accuracy (rollouts)"),
    ("eval", "em", "validation EM (greedy, agent loop)"),
    ("train", "searched_share", "share of trajectories that searched"),
    ("train", "invalid_share", "share with an invalid action"),
    ("train", "entropy", "token entropy"),
    ("train", "lld/delta", "log-prob change of A >= 0 trajectories"),
    ("train", "response_tokens_mean", "generated tokens per trajectory"),
]

# the component read as "accuracy", by preference: a judge's verdict, then exact match
ACCURACY_KEYS = ("correct", "judge", "exact_match")


def rollout_metrics(records: list[dict], examples: dict[str, Example]) -> dict[str, float]:
    """Step metrics from `Trajectory.to_record()` dicts whose rewards are filled in."""
    if not records:
        return {"reward_mean": 0.0, "reward_std": 0.0, "accuracy": 0.0, "invalid_share": 0.0, "trajectories": 0.0}
    n = len(records)
    m: dict[str, float] = {"trajectories": float(n)}
    components = sorted({k for r in records for k in r["rewards"]})
    for key in components:
        values = [float(r["rewards"].get(key, 0.0)) for r in records]
        name = "reward" if key == "reward" else f"reward/{key}"
        m[f"{name}_mean"] = statistics.fmean(values)
        m[f"{name}_std"] = statistics.pstdev(values)
    accuracy_key = next((k for k in ACCURACY_KEYS if k in components), None)
    m["accuracy"] = m[f"reward/{accuracy_key}_mean"] if accuracy_key else 0.0

    calls = [r["tool_calls"] for r in records]
    called = {c["name"] for cs in calls for c in cs}
    for tool in [*STANDARD_TOOLS, *sorted(called - set(STANDARD_TOOLS))]:
        m[f"calls/{tool}"] = sum(1 for cs in calls for c in cs if c["name"] == tool) / n
    m["calls_per_trajectory"] = sum(len(cs) for cs in calls) / n
    m["tool_errors"] = float(sum(1 for cs in calls for c in cs if c["is_error"]))
    searched = [any(c["name"] in SEARCH_TOOLS for c in cs) for cs in calls]
    m["searched_share"] = sum(searched) / n
    m["invalid_share"] = sum(1 for r in records if any(t["action"] == "invalid" for t in r["turns"])) / n
    stops = Counter(r["stop_reason"] or "unfinished" for r in records)
    for reason, count in stops.items():
        m[f"stop/{reason}"] = count / n
    lengths = [r["n_generated"] for r in records]
    m["response_tokens_mean"] = statistics.fmean(lengths)
    m["response_tokens_max"] = float(max(lengths))
    m["turns_mean"] = statistics.fmean(len(r["turns"]) for r in records)
    # R1-Searcher++'s effect: questions the policy can answer without a tool, answered without one
    free = [not cs for r, cs in zip(records, calls)
            if examples.get(r["example_id"]) is not None and examples[r["example_id"]].requires_search is False]
    if free:
        m["search_free_no_tool_share"] = sum(free) / len(free)
    return m
