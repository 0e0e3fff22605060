"""`mmsearch eval`: the agent loop over a split, scored, written as trajectories + summary + report.

OUT/trajectories.jsonl holds one record per trajectory: `Trajectory.to_record()` plus the example's
`answers`, `kind`, `hops` and `requires_search`, and `image_files`, the path (relative to OUT) of
every image by its number: the question's under images/<example>-<n>.jpg (shared by its samples),
the ones tools returned under images/<example>-<sample>-<n>.png. Each crop that ran carries `box`
(the crop tool's: where it cut, in pixels of its source image as stored). So report.html (`mmsearch.eval.render`),
or any viewer, renders a run from its dir alone.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mmsearch.agent.loop import AgentLoop, Timings
from mmsearch.agent.setup import RolloutConfig, build_loop, policy_is_text_only
from mmsearch.example import Example
from mmsearch.rewards import RewardConfig, compute_rewards_batch
from mmsearch.trajectory import Trajectory


@dataclass
class EvalConfig(RolloutConfig):
    data: str = ""  # a dataset dir, a JSONL / Parquet file, or a FlashRAG dir (see mmsearch.eval.loaders)
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
    from mmsearch.eval.render import write_html_report
    from mmsearch.eval.report import write_report

    if not cfg.data:
        raise ValueError("eval needs data= (a dataset dir or a JSONL/Parquet file)")
    # a text-only policy reads imageless questions; those with images are skipped and counted (has_image)
    text_only = (policy_is_text_only(cfg.engine, engine) if loop is None
                 else loop.builder is not None and loop.builder.text_only)
    examples, load_report = load_examples(cfg.data, split=cfg.split, limit=cfg.limit or None,
                                          image_root=cfg.image_root or None, text_only=text_only)
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
    written: set[str] = set()
    for first in range(0, len(examples), cfg.chunk):
        trajectories = loop.run(examples[first:first + cfg.chunk], n_samples=cfg.n_samples)
        compute_rewards_batch(trajectories, by_id, cfg.rewards)
        records += [_record(t, by_id[t.example_id], Path(cfg.out), written) for t in trajectories]
    bar.close()
    wall = time.perf_counter() - start
    summary = write_report(cfg.out, records, by_id, wall)
    summary["loaded"] = {"examples": len(examples), "skipped": dict(load_report.skipped)}
    summary["timings"] = {"generate_s": loop.timings.generate_s, "tools_s": loop.timings.tools_s,
                          "bookkeeping_s": loop.timings.bookkeeping_s}
    Path(cfg.out, "summary.json").write_text(json.dumps(summary, indent=2))
    write_html_report(cfg.out)
    return summary


def _record(traj: Trajectory, example: Example, out: Path, written: set[str]) -> dict:
    """The trajectory's log record, with its example's gold and labels and its saved images."""
    record = traj.to_record()
    record.update(answers=list(example.answers), kind=example.kind, hops=example.hops,
                  requires_search=example.requires_search)
    record["image_files"] = _save_images(out, traj, len(example.images), written)
    return record


def _file_stem(example_id: str) -> str:
    """A file-name-safe stem for an example id (ids with other characters get a hash, so two never collide)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", example_id)[:80]
    if stem != example_id:
        stem += "-" + hashlib.sha1(example_id.encode()).hexdigest()[:8]
    return stem


def _save_images(out: Path, traj: Trajectory, n_question: int, written: set[str]) -> list[str]:
    """Write the trajectory's images under out/images/; their paths relative to `out`, by image number.

    The question's images are JPEG (full size; one file per example, its samples share it), tool
    images PNG (crops and thumbnails are small, and exact pixels keep boxes honest).
    """
    (out / "images").mkdir(parents=True, exist_ok=True)
    stem = _file_stem(traj.example_id)
    files = []
    for n, image in enumerate(traj.images):
        if n < n_question:
            rel = f"images/{stem}-{n}.jpg"
            if rel not in written:
                image.convert("RGB").save(out / rel, "JPEG", quality=90)
                written.add(rel)
        else:
            rel = f"images/{stem}-{traj.sample}-{n}.png"
            image.save(out / rel, "PNG")
        files.append(rel)
    return files
