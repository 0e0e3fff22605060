"""An eval run's numbers from its trajectory records: `summary.json`, `report.md`, `trajectories.jsonl`.

Every rate is a mean over trajectories (one trajectory is one attempt at one question, so with n
samples per question each question weighs n). Breakdowns group trajectories by their example's
hop count, kind and whether it requires search; an example the run does not know falls in
"unknown".

When examples name their dataset (`Example.meta["dataset"]`, as the FlashRAG / Search-R1 loader
sets it), the summary also has `by_dataset` (the same scores per dataset, in the order the datasets
first appear in the run) and `dataset_average`: the unweighted mean of the datasets' EM, F1 and
accuracy, the figure Search-R1 reports over NQ, TriviaQA, PopQA, HotpotQA, 2Wiki, Musique and
Bamboogle, where a pooled mean would let the largest test set decide. Questions of no named dataset
are listed as "unknown" and left out of the average.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from mmsearch.example import Example

SEARCH_TOOLS = ("text_search", "image_search")
STANDARD_TOOLS = ("text_search", "image_search", "crop")
UNKNOWN = "unknown"


def summarize(records: list[dict], examples: dict[str, Example], wall_s: float) -> dict:
    """JSON-able summary of `Trajectory.to_record()` outputs; `examples` maps example id -> Example."""
    n = len(records)
    accuracy_metric = "substring" if any("substring" in r.get("rewards", {}) for r in records) else "exact_match"

    def example_of(r: dict) -> Example | None:
        return examples.get(r["example_id"])

    def hops_key(r: dict) -> str:
        ex = example_of(r)
        return str(ex.hops) if ex is not None and ex.hops >= 0 else UNKNOWN

    def kind_key(r: dict) -> str:
        ex = example_of(r)
        return ex.kind if ex is not None and ex.kind else UNKNOWN

    def search_key(r: dict) -> str:
        ex = example_of(r)
        return UNKNOWN if ex is None or ex.requires_search is None else str(ex.requires_search).lower()

    def dataset_key(r: dict) -> str:
        ex = example_of(r)
        name = ex.meta.get("dataset") if ex is not None else None
        return str(name) if name else UNKNOWN

    by_dataset = {}
    if any(dataset_key(r) != UNKNOWN for r in records):
        by_dataset = _breakdown(records, dataset_key, accuracy_metric, sort=False)

    called = {c["name"] for r in records for c in r.get("tool_calls", [])}
    tools = [*STANDARD_TOOLS, *sorted(called - set(STANDARD_TOOLS))]
    tool_table = {}
    for tool in tools:
        calls = [[c for c in r.get("tool_calls", []) if c["name"] == tool] for r in records]
        tool_table[tool] = {
            "calls_per_question": _mean([len(cs) for cs in calls]),
            "share_used": _mean([1.0 if cs else 0.0 for cs in calls]),
            "calls": sum(len(cs) for cs in calls),
            "errors": sum(1 for cs in calls for c in cs if c.get("is_error")),
        }

    invalid = [sum(1 for t in r.get("turns", []) if t.get("action") == "invalid") for r in records]
    n_calls = sum(len(r.get("tool_calls", [])) for r in records)
    n_errors = sum(1 for r in records for c in r.get("tool_calls", []) if c.get("is_error"))
    stops = Counter(r.get("stop_reason") or "unfinished" for r in records)

    return {
        "overall": {
            "n_questions": len({r["example_id"] for r in records}),
            "n_trajectories": n,
            **_scores(records, accuracy_metric),
            "accuracy_metric": accuracy_metric,
        },
        "by_hops": _breakdown(records, hops_key, accuracy_metric, numeric=True),
        "by_kind": _breakdown(records, kind_key, accuracy_metric),
        "by_requires_search": _breakdown(records, search_key, accuracy_metric),
        **({"by_dataset": by_dataset, "dataset_average": _average(by_dataset)} if by_dataset else {}),
        "tools": tool_table,
        "search_share": _mean([1.0 if any(c["name"] in SEARCH_TOOLS for c in r.get("tool_calls", [])) else 0.0
                               for r in records]),
        # questions that need no search, answered without calling any tool (R1-Searcher++'s measure)
        "search_free_no_tool_share": _mean([0.0 if r.get("tool_calls") else 1.0 for r in records
                                            if search_key(r) == "false"]),
        "mean_turns": _mean([len(r.get("turns", [])) for r in records]),
        "mean_generated_tokens": _mean([r.get("n_generated", 0) for r in records]),
        "mean_total_tokens": _mean([r.get("n_tokens", 0) for r in records]),
        "invalid_actions_per_trajectory": _mean(invalid),
        "invalid_share": _mean([1.0 if k else 0.0 for k in invalid]),
        "tool_errors": {
            "total": n_errors,
            "per_trajectory": _mean([sum(1 for c in r.get("tool_calls", []) if c.get("is_error")) for r in records]),
            "share_of_calls": n_errors / n_calls if n_calls else 0.0,
        },
        "stop_reasons": dict(sorted(stops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "wall_s": wall_s,
        "trajectories_per_s": n / wall_s if wall_s > 0 else None,
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _scores(records: list[dict], accuracy_metric: str) -> dict:
    rewards = [r.get("rewards", {}) for r in records]
    return {
        "em": _mean([float(w.get("exact_match", 0.0)) for w in rewards]),
        "f1": _mean([float(w.get("f1", 0.0)) for w in rewards]),
        # a record scored without the substring reward falls back to its exact match
        "accuracy": _mean([float(w.get(accuracy_metric, w.get("exact_match", 0.0))) for w in rewards]),
    }


def _breakdown(records: list[dict], key, accuracy_metric: str, numeric: bool = False, sort: bool = True) -> dict:
    """Scores per group; groups sorted by key (numerically with `numeric`), or with `sort=False` in
    order of first appearance; "unknown" last either way."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)

    def order(k: str):
        if k == UNKNOWN:
            return (1, 0, k)
        if not sort:
            return (0, 0, "")  # sorted() is stable: first appearance
        return (0, int(k), k) if numeric else (0, 0, k)

    return {k: {"n": len(rs), "n_questions": len({r["example_id"] for r in rs}), **_scores(rs, accuracy_metric)}
            for k, rs in sorted(groups.items(), key=lambda kv: order(kv[0]))}


def _average(groups: dict) -> dict:
    """The unweighted mean of the named groups' scores ("unknown" is no dataset and is left out)."""
    named = [g for k, g in groups.items() if k != UNKNOWN]
    return {"n_datasets": len(named), **{m: _mean([g[m] for g in named]) for m in ("em", "f1", "accuracy")}}


# --- Markdown --------------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _group_table(title: str, label: str, groups: dict) -> tuple[str, list[str], list[list[str]]]:
    rows = [[k, str(g["n"]), str(g["n_questions"]), _pct(g["em"]), _pct(g["f1"]), _pct(g["accuracy"])]
            for k, g in groups.items()]
    return f"By {title}", [label, "trajectories", "questions", "EM", "F1", "accuracy"], rows


def tables(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """`summarize`'s output as (title, header, rows) tables of formatted cells; the headline's title is "".

    report.md and report.html show the same tables, so they show the same numbers.
    """
    o = summary["overall"]
    headline = (
        "",
        ["questions", "trajectories", "EM", "F1", f"accuracy ({o['accuracy_metric']})", "used search",
         "mean turns", "wall s", "trajectories/s"],
        [[str(o["n_questions"]), str(o["n_trajectories"]), _pct(o["em"]), _pct(o["f1"]), _pct(o["accuracy"]),
          _pct(summary["search_share"]), _num(summary["mean_turns"]), _num(summary["wall_s"], 1),
          _num(summary["trajectories_per_s"])]],
    )
    tools = (
        "Tools",
        ["tool", "calls per question", "share of trajectories using it", "calls", "errors"],
        [[name, _num(t["calls_per_question"]), _pct(t["share_used"]), str(t["calls"]), str(t["errors"])]
         for name, t in summary["tools"].items()],
    )
    errors = summary["tool_errors"]
    behaviour = (
        "Behaviour",
        ["measure", "value"],
        [["mean turns", _num(summary["mean_turns"])],
         ["mean generated tokens", _num(summary["mean_generated_tokens"], 1)],
         ["mean total tokens", _num(summary["mean_total_tokens"], 1)],
         ["invalid actions per trajectory", _num(summary["invalid_actions_per_trajectory"])],
         ["trajectories with an invalid action", _pct(summary["invalid_share"])],
         ["tool errors (total)", str(errors["total"])],
         ["tool errors per trajectory", _num(errors["per_trajectory"])],
         ["share of tool calls that failed", _pct(errors["share_of_calls"])]],
    )
    datasets = []
    if summary.get("by_dataset"):  # summaries of runs without dataset names (and older runs) have none
        title, header, rows = _group_table("dataset", "dataset", summary["by_dataset"])
        average = summary["dataset_average"]
        rows.append([f"average of {average['n_datasets']} datasets (unweighted)", "–", "–", _pct(average["em"]),
                     _pct(average["f1"]), _pct(average["accuracy"])])
        datasets = [(title, header, rows)]
    n = o["n_trajectories"]
    stops = ("Stop reasons", ["stop reason", "trajectories", "share"],
             [[k, str(v), _pct(v / n if n else 0.0)] for k, v in summary["stop_reasons"].items()])
    return [
        headline,
        _group_table("hop count", "hops", summary["by_hops"]),
        _group_table("kind", "kind", summary["by_kind"]),
        _group_table("requires search", "requires search", summary["by_requires_search"]),
        *datasets,
        tools,
        behaviour,
        stops,
    ]


def markdown(summary: dict) -> str:
    """A readable report of `summarize`'s output: headline, breakdowns, tools, behaviour, stop reasons."""
    sections = [(f"## {title}\n\n" if title else "") + _table(header, rows) for title, header, rows in tables(summary)]
    return "\n\n".join(["# Evaluation report", *sections]) + "\n"


def write_report(out_dir: str | Path, records: list[dict], examples: dict[str, Example], wall_s: float) -> dict:
    """Write trajectories.jsonl, summary.json and report.md under `out_dir`; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "trajectories.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False, default=str) + "\n" for record in records)
    summary = summarize(records, examples, wall_s)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(summary), encoding="utf-8")
    return summary


def compare(summaries: dict[str, dict]) -> str:
    """A side-by-side table of eval summaries (e.g. {"SFT": ..., "SFT + RL": ...}), with the change."""
    names = list(summaries)
    rows: list[tuple[str, list[float | None], bool]] = []  # (measure, values, is a rate)
    pick = lambda f: [f(s) for s in summaries.values()]
    rows.append(("EM, all questions", pick(lambda s: s["overall"]["em"]), True))
    hops = sorted({k for s in summaries.values() for k in s["by_hops"]}, key=lambda k: (k == UNKNOWN, k))
    rows += [(f"EM, {k} hops", pick(lambda s, k=k: s["by_hops"].get(k, {}).get("em")), True) for k in hops]
    for key, label in (("true", "requires search"), ("false", "search-free")):
        rows.append((f"EM, {label}", pick(lambda s, key=key: s["by_requires_search"].get(key, {}).get("em")), True))
    # per dataset where any run has them; a run without a dataset shows "–"
    datasets = list(dict.fromkeys(k for s in summaries.values() for k in s.get("by_dataset", {})))
    rows += [(f"EM, {k}", pick(lambda s, k=k: s.get("by_dataset", {}).get(k, {}).get("em")), True) for k in datasets]
    if datasets:
        rows.append(("EM, dataset average", pick(lambda s: s.get("dataset_average", {}).get("em")), True))
    rows.append(("tool calls per question", pick(lambda s: sum(t["calls_per_question"] for t in s["tools"].values())),
                 False))
    for tool in ("crop", "image_search", "text_search"):
        rows.append((f"  {tool} calls per question", pick(lambda s, t=tool: s["tools"].get(t, {}).get(
            "calls_per_question")), False))
    rows.append(("share of trajectories that searched", pick(lambda s: s["search_share"]), True))
    rows.append(("search-free questions answered without a tool",
                 pick(lambda s: s.get("search_free_no_tool_share")), True))
    rows.append(("trajectories with an invalid action", pick(lambda s: s["invalid_share"]), True))
    table = []
    for label, values, rate in rows:
        shown = [("–" if v is None else _pct(v) if rate else _num(v)) for v in values]
        first, last = values[0], values[-1]
        if first is None or last is None:
            change = "–"
        else:
            change = f"{100 * (last - first):+.1f} pts" if rate else f"{last - first:+.2f}"
        table.append([label, *shown, change])
    return _table(["measure", *names, "change"], table) + "\n"
