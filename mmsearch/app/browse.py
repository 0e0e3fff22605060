"""The Browse view's work, without the UI: open a run dir, filter its trajectories, render one.

Two kinds of run dir hold trajectories:
- an eval run (`mmsearch eval --out DIR`): trajectories.jsonl, each record with its example's gold
  `answers`, `kind`, `hops` and its saved `image_files`; summary.json names the accuracy metric;
- an RL run (`mmsearch rl --out DIR`): trajectories/step-N.jsonl, a few sampled trajectories per step,
  without images (they show as "not saved"). Their gold answers, kind and hops are looked up in the
  dataset that rl_config.yaml names, when it is still there.
Each trajectory renders with `render_trajectory`, as the Ask view and report.html draw them.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from mmsearch.app.policies import UserError, summary
from mmsearch.eval.render import correctness, render_trajectory, run_images

log = logging.getLogger(__name__)

ALL = "all"
NO_TOOL = "no tool"
CORRECTNESS = (ALL, "correct", "wrong", "unscored")


@dataclass
class Run:
    path: str
    kind: str  # eval | rl
    records: list[dict]
    metric: str | None = None  # the reward that decides correct / wrong (None: render's default)
    notes: list[str] = field(default_factory=list)  # what was loaded, what was skipped

    def describe(self) -> str:
        what = "eval run" if self.kind == "eval" else "RL run (sampled trajectories, images not saved)"
        return f"{len(self.records)} trajectories from the {what} {self.path}" + "".join(f"; {n}" for n in self.notes)


def _read_jsonl(path: Path, skipped: list[int], **extra) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                skipped[0] += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("messages"), list):
                records.append({**extra, **record})
            else:
                skipped[0] += 1
    return records


def _step(path: Path) -> int:
    m = re.search(r"step-(\d+)\.jsonl$", path.name)
    return int(m.group(1)) if m else -1


def open_run(path: str | Path | None) -> Run:
    """The trajectories of an eval or RL run dir; UserError when the dir holds neither."""
    text = str(path or "").strip()
    if not text:
        raise UserError("Type the path of a run dir: an eval run (trajectories.jsonl) or an RL run (trajectories/).")
    run = Path(text).expanduser()
    if not run.is_dir():
        raise UserError(f"No such dir: {text}")
    skipped = [0]
    try:
        if (run / "trajectories.jsonl").is_file():
            result = Run(text, "eval", _read_jsonl(run / "trajectories.jsonl", skipped))
            result.metric = _eval_metric(run)
        else:
            folder = run / "trajectories" if (run / "trajectories").is_dir() else run
            steps = sorted(folder.glob("step-*.jsonl"), key=_step)
            if not steps:
                raise UserError(f"{text} holds no trajectories: neither trajectories.jsonl (an eval run) "
                                "nor trajectories/step-N.jsonl (an RL run).")
            records = [r for s in steps for r in _read_jsonl(s, skipped, step=_step(s))]
            result = Run(text, "rl", records)
            _add_gold(result, run if folder != run else run.parent)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"Cannot read the run dir {text}: {summary(exc)}") from exc
    if skipped[0]:
        result.notes.append(f"{skipped[0]} unreadable lines skipped")
    if not result.records:
        raise UserError(f"{text} has no readable trajectories.")
    return result


def _eval_metric(run: Path) -> str | None:
    try:
        return json.loads((run / "summary.json").read_text(encoding="utf-8")).get("overall", {}).get("accuracy_metric")
    except (OSError, ValueError, AttributeError):
        return None  # no summary: render decides by the rewards each record has


def _add_gold(run: Run, run_dir: Path) -> None:
    """Fill in answers, kind and hops from the dataset the RL run trained on (rl_config.yaml's `data`)."""
    config = run_dir / "rl_config.yaml"
    if not config.is_file():
        run.notes.append("gold answers unknown (no rl_config.yaml)")
        return
    import yaml

    try:
        data = (yaml.safe_load(config.read_text()) or {}).get("data") or ""
    except yaml.YAMLError:
        data = ""
    candidates = [Path(data), run_dir.parent / Path(data).name] if data else []
    dataset = next((p for p in candidates if (p / "dataset_dict.json").is_file()), None)
    if dataset is None:
        run.notes.append(f"gold answers unknown (dataset {data or '?'} not found)")
        return
    try:
        from datasets import load_from_disk

        gold = {}
        for split in load_from_disk(str(dataset)).values():
            columns = [c for c in ("id", "answers", "kind", "hops") if c in split.column_names]
            for row in split.select_columns(columns).to_list():
                gold[row["id"]] = row
    except Exception as exc:  # a dataset we cannot read only costs the gold column
        log.warning("cannot read %s", dataset, exc_info=True)
        run.notes.append(f"gold answers unknown ({summary(exc)})")
        return
    for record in run.records:
        row = gold.get(record.get("example_id"))
        if row is not None:
            for key in ("answers", "kind", "hops"):
                record.setdefault(key, row.get(key))
    run.notes.append(f"gold answers from {dataset}")


def find_runs(root: str | Path = "runs", depth: int = 3, limit: int = 50) -> list[str]:
    """Run dirs under `root` (eval runs, RL runs with sampled trajectories), newest first, for the Browse picker."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: dict[Path, float] = {}
    for level in range(1, depth + 1):
        stars = "/".join(["*"] * level)
        for marker in root.glob(f"{stars}/trajectories.jsonl"):
            found[marker.parent] = marker.stat().st_mtime
        for folder in root.glob(f"{stars}/trajectories"):
            steps = list(folder.glob("step-*.jsonl")) if folder.is_dir() else []
            if steps:
                found[folder.parent] = max(s.stat().st_mtime for s in steps)
    return [str(p) for p, _ in sorted(found.items(), key=lambda kv: -kv[1])[:limit]]


# -- filters -------------------------------------------------------------------------------------------------

def verdict(record: dict, metric: str | None) -> str:
    right = correctness(record, metric)
    return "unscored" if right is None else ("correct" if right else "wrong")


def tools_used(record: dict) -> set[str]:
    return {c.get("name") for c in record.get("tool_calls", []) if c.get("name")}


def _text(value) -> str:
    return "unknown" if value in (None, "", -1) else str(value)


def facets(run: Run) -> dict[str, list[str]]:
    """The choices of every filter, from the values the run's records have ("all" first)."""
    def values(key, sort=None):
        return [ALL, *sorted({_text(r.get(key)) for r in run.records}, key=sort)]

    numeric = lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v)
    tools = sorted({t for r in run.records for t in tools_used(r)})
    out = {"correct": list(CORRECTNESS), "hops": values("hops", numeric), "kind": values("kind"),
           "tool": [ALL, NO_TOOL, *tools], "stop": values("stop_reason")}
    if run.kind == "rl":
        out["step"] = values("step", numeric)
    return out


def matches(record: dict, metric: str | None, correct: str = ALL, hops: str = ALL, kind: str = ALL,
            tool: str = ALL, stop: str = ALL, step: str = ALL) -> bool:
    """Whether a record passes every filter (each ALL, or the value the record has)."""
    if correct not in (None, ALL) and verdict(record, metric) != correct:
        return False
    for value, key in ((hops, "hops"), (kind, "kind"), (stop, "stop_reason"), (step, "step")):
        if value not in (None, ALL) and _text(record.get(key)) != str(value):
            return False
    if tool not in (None, ALL):
        used = tools_used(record)
        if (tool == NO_TOOL and used) or (tool != NO_TOOL and tool not in used):
            return False
    return True


def filter_records(run: Run, **filters: str) -> list[int]:
    """Positions (in the run) of the records that pass `filters` (correct, hops, kind, tool, stop, step)."""
    return [i for i, r in enumerate(run.records) if matches(r, run.metric, **filters)]


# -- one trajectory ------------------------------------------------------------------------------------------

def images_of(run: Run, record: dict):
    """The record's images by number: files under an eval run's images/, none for an RL run's records."""
    files = record.get("image_files")
    return run_images(Path(run.path), files) if files else None


def render_record(run: Run, index: int) -> str:
    """One trajectory of the run as HTML (`render_trajectory`), the policy's answer beside the gold."""
    record = run.records[index]
    return render_trajectory(record, images_of(run, record), metric=run.metric)


def position_line(run: Run, shown: list[int], k: int) -> str:
    """Where the page is: "3 of 12 matching (20 in the run) · #7 ex-id/sample · policy X · gold Y"."""
    if not shown:
        return f"No trajectory matches these filters ({len(run.records)} in the run)."
    record = run.records[shown[k]]
    answer = record.get("final_answer")
    gold = record.get("answers") or []
    bits = [f"{k + 1} of {len(shown)} matching ({len(run.records)} in the run)",
            f"#{shown[k]} {record.get('example_id')}/{record.get('sample', 0)}"]
    if "step" in record:
        bits.append(f"step {record['step']}")
    bits += [f"policy: {answer if answer is not None else 'no answer'}",
             f"gold: {' | '.join(map(str, gold)) if gold else 'unknown'}", verdict(record, run.metric)]
    return " · ".join(bits)
