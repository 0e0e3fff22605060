"""Eval report numbers checked by hand on four trajectories over three questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmsearch.eval.report import compare, markdown, summarize, write_report
from mmsearch.example import Example
from mmsearch.trajectory import ToolCallRecord, Trajectory, TurnRecord


def _example(id: str, hops: int, kind: str, requires_search: bool | None) -> Example:
    return Example(id=id, question=f"{id}?", images=[Image.new("RGB", (4, 4))], answers=["a"], kind=kind,
                   hops=hops, requires_search=requires_search)


EXAMPLES = {e.id: e for e in [
    _example("q1", 1, "attribute", False),
    _example("q2", 2, "bridge", True),
    _example("q3", 2, "comparison", True),
]}


def _record(example_id: str, sample: int, rewards: dict, actions: list[tuple[str, int]],
            calls: list[tuple[str, bool]], n_tokens: int, stop: str) -> dict:
    traj = Trajectory(example_id, sample, messages=[], images=[], stop_reason=stop, rewards=rewards,
                      token_ids=list(range(n_tokens)))
    traj.turns = [TurnRecord(text="", action=a, error="bad" if a == "invalid" else "", has_think=True, n_tokens=k)
                  for a, k in actions]
    traj.tool_calls = [ToolCallRecord(turn=i, name=name, arguments={}, result="", is_error=err)
                       for i, (name, err) in enumerate(calls)]
    return traj.to_record()


def _records() -> list[dict]:
    return [
        _record("q1", 0, {"exact_match": 1.0, "f1": 1.0, "substring": 1.0}, [("answer", 10)], [], 100, "answered"),
        _record("q1", 1, {"exact_match": 0.0, "f1": 0.5, "substring": 1.0},
                [("invalid", 5), ("tool_call", 8), ("answer", 7)], [("text_search", False)], 200, "answered"),
        _record("q2", 0, {"exact_match": 0.0, "f1": 0.0, "substring": 0.0},
                [("tool_call", 10), ("tool_call", 10), ("invalid", 10), ("invalid", 10)],
                [("image_search", False), ("crop", True)], 300, "invalid_actions"),
        _record("q3", 0, {"exact_match": 0.0, "f1": 0.25, "substring": 0.0}, [("tool_call", 15), ("tool_call", 15)],
                [("text_search", False), ("image_search", True)], 150, "max_turns"),
    ]


def test_summary_matches_hand_computed_values():
    s = summarize(_records(), EXAMPLES, wall_s=2.0)
    assert s["overall"] == {"n_questions": 3, "n_trajectories": 4, "em": 0.25, "f1": 0.4375, "accuracy": 0.5,
                            "accuracy_metric": "substring"}
    assert s["by_hops"] == {
        "1": {"n": 2, "n_questions": 1, "em": 0.5, "f1": 0.75, "accuracy": 1.0},
        "2": {"n": 2, "n_questions": 2, "em": 0.0, "f1": 0.125, "accuracy": 0.0},
    }
    assert s["by_kind"] == {
        "attribute": {"n": 2, "n_questions": 1, "em": 0.5, "f1": 0.75, "accuracy": 1.0},
        "bridge": {"n": 1, "n_questions": 1, "em": 0.0, "f1": 0.0, "accuracy": 0.0},
        "comparison": {"n": 1, "n_questions": 1, "em": 0.0, "f1": 0.25, "accuracy": 0.0},
    }
    assert list(s["by_requires_search"]) == ["false", "true"]
    assert s["by_requires_search"]["true"] == {"n": 2, "n_questions": 2, "em": 0.0, "f1": 0.125, "accuracy": 0.0}
    assert s["tools"] == {
        "text_search": {"calls_per_question": 0.5, "share_used": 0.5, "calls": 2, "errors": 0},
        "image_search": {"calls_per_question": 0.5, "share_used": 0.5, "calls": 2, "errors": 1},
        "crop": {"calls_per_question": 0.25, "share_used": 0.25, "calls": 1, "errors": 1},
    }
    assert s["search_share"] == 0.75
    assert s["search_free_no_tool_share"] == 0.5  # q1 is search-free: sample 0 used no tool, sample 1 searched
    assert s["mean_turns"] == 2.5
    assert s["mean_generated_tokens"] == 25.0
    assert s["mean_total_tokens"] == 187.5
    assert s["invalid_actions_per_trajectory"] == 0.75 and s["invalid_share"] == 0.5
    assert s["tool_errors"] == {"total": 2, "per_trajectory": 0.5, "share_of_calls": pytest.approx(0.4)}
    assert s["stop_reasons"] == {"answered": 2, "invalid_actions": 1, "max_turns": 1}
    assert s["wall_s"] == 2.0 and s["trajectories_per_s"] == 2.0
    json.dumps(s)  # JSON-able


def test_accuracy_falls_back_to_exact_match_and_unknown_examples_group_apart():
    records = _records()
    for r in records:
        r["rewards"].pop("substring")
    records.append(_record("ghost", 0, {"exact_match": 1.0, "f1": 1.0}, [("answer", 3)], [("calculator", True)],
                           10, None))
    s = summarize(records, EXAMPLES, wall_s=0.0)
    assert s["overall"]["accuracy_metric"] == "exact_match"
    assert s["overall"]["accuracy"] == s["overall"]["em"] == pytest.approx(0.4)
    assert list(s["by_hops"]) == ["1", "2", "unknown"] and s["by_hops"]["unknown"]["n"] == 1
    assert s["by_kind"]["unknown"]["em"] == 1.0 and "unknown" in s["by_requires_search"]
    assert list(s["tools"]) == ["text_search", "image_search", "crop", "calculator"]
    assert s["tools"]["calculator"]["errors"] == 1
    assert s["stop_reasons"]["unfinished"] == 1
    assert s["trajectories_per_s"] is None


def test_empty_run_does_not_crash():
    s = summarize([], EXAMPLES, wall_s=0.0)
    assert s["overall"]["n_trajectories"] == 0 and s["overall"]["em"] == 0.0 and s["stop_reasons"] == {}
    assert "# Evaluation report" in markdown(s)


def test_markdown_has_headline_and_breakdown_tables():
    md = markdown(summarize(_records(), EXAMPLES, wall_s=2.0))
    assert "| questions | trajectories | EM | F1 | accuracy (substring) |" in md
    assert "| 3 | 4 | 25.0% | 43.8% | 50.0% | 75.0% | 2.50 | 2.0 | 2.00 |" in md
    for section in ("## By hop count", "## By kind", "## By requires search", "## Tools", "## Behaviour",
                    "## Stop reasons"):
        assert section in md
    assert "| 1 | 2 | 1 | 50.0% | 75.0% | 100.0% |" in md
    assert "| comparison | 1 | 1 | 0.0% | 25.0% | 0.0% |" in md
    assert "| true | 2 | 2 | 0.0% | 12.5% | 0.0% |" in md
    assert "| image_search | 0.50 | 50.0% | 2 | 1 |" in md
    assert "| answered | 2 | 50.0% |" in md
    assert "| trajectories with an invalid action | 50.0% |" in md


def test_write_report_writes_the_three_files(tmp_path: Path):
    records = _records()
    out = tmp_path / "run" / "eval"
    summary = write_report(out, records, EXAMPLES, wall_s=2.0)
    lines = (out / "trajectories.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "report.md").read_text() == markdown(summary)


def test_compare_puts_runs_side_by_side_with_the_change():
    before = summarize(_records(), EXAMPLES, wall_s=2.0)
    better = _records()
    better[2]["rewards"] = {"exact_match": 1.0, "f1": 1.0, "substring": 1.0}  # q2 (2 hops, needs search) now right
    after = summarize(better, EXAMPLES, wall_s=2.0)
    table = compare({"SFT": before, "SFT + RL": after})
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines()[2:]}
    assert rows["EM, all questions"] == ["25.0%", "50.0%", "+25.0 pts |"]
    assert rows["EM, 2 hops"] == ["0.0%", "50.0%", "+50.0 pts |"]
    assert rows["EM, search-free"] == ["50.0%", "50.0%", "+0.0 pts |"]
    assert rows["tool calls per question"] == ["1.25", "1.25", "+0.00 |"]
    assert rows["search-free questions answered without a tool"][0] == "50.0%"
