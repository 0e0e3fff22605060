"""`mmsearch eval`: the agent loop over a split, scored, written as trajectories + summary + report."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mmsearch.agent.loop import AgentLoop, Timings
from mmsearch.agent.setup import RolloutConfig, build_loop
from mmsearch.rewards import RewardConfig, compute_rewards_batch


@dataclass
class EvalConfig(RolloutConfig):
    data: str = ""  # a dataset dir, or a JSONL / Parquet file (see mmsearch.eval.loaders)
    split: str = "test"
    limit: int = 0  # 0: every example
    image_root: str = ""  # InfoSeek-style records: where <image_id>.jpg lives
    n_samples: int = 1
    chunk: int = 64  # examples rolled out together (bounds memory on big splits)
    out: str = "runs/eval"
    rewards: RewardConfig = field(default_factory=RewardConfig)


def run_eval(cfg: EvalConfig, engine=None, progress: bool = True, loop: AgentLoop | None = None) -> dict:
    """Roll out, score and report; `loop` reuses a built agent loop (SFT's periodic eval), else one is built."""
    from mmsearch.eval.loaders import load_examples
    from mmsearch.eval.report import write_report

    if not cfg.data:
        raise ValueError("eval needs data= (a dataset dir or a JSONL/Parquet file)")
    examples, load_report = load_examples(cfg.data, split=cfg.split, limit=cfg.limit or None,
                                          image_root=cfg.image_root or None)
    if not examples:
        raise ValueError(f"no usable examples in {cfg.data} ({load_report})")
    by_id = {ex.id: ex for ex in examples}
    bar = tqdm(total=len(examples) * cfg.n_samples, desc="eval", unit="traj", disable=not progress)
    on_event = lambda traj, kind, _: bar.update(1) if kind == "done" else None
    if loop is None:
        loop = build_loop(cfg, engine=engine, on_event=on_event)
    else:
        loop.on_event = on_event
        loop.timings = Timings()
    start = time.perf_counter()
    records = []
    for first in range(0, len(examples), cfg.chunk):
        trajectories = loop.run(examples[first:first + cfg.chunk], n_samples=cfg.n_samples)
        compute_rewards_batch(trajectories, by_id, cfg.rewards)
        records += [t.to_record() for t in trajectories]
    bar.close()
    wall = time.perf_counter() - start
    summary = write_report(cfg.out, records, by_id, wall)
    summary["loaded"] = {"examples": len(examples), "skipped": dict(load_report.skipped)}
    summary["timings"] = {"generate_s": loop.timings.generate_s, "tools_s": loop.timings.tools_s,
                          "bookkeeping_s": loop.timings.bookkeeping_s}
    Path(cfg.out, "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
