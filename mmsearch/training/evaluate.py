"""Periodic eval during training: the `mmsearch eval` code run with the weights being trained (SFT and RL)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mmsearch.training.config import PeriodicEvalConfig
from mmsearch.training.metrics import MetricsLog, plot_curves
from mmsearch.training.model import hf_model
from mmsearch.training.parallel import DistInfo, barrier


class Evaluator:
    """The eval half of `mmsearch eval`, built once (tools, indexes) and run with the weights in training."""

    def __init__(self, cfg: PeriodicEvalConfig, data: str, model, processor, out: Path):
        self.cfg, self.data, self.model, self.processor, self.out = cfg, data, model, processor, out
        self.loop = None

    def __call__(self, step: int) -> dict:
        from mmsearch.agent.setup import build_loop
        from mmsearch.engines.hf import HFEngine
        from mmsearch.eval.run import run_eval

        cfg = dataclasses.replace(self.cfg, data=self.data, out=str(self.out / "eval" / f"step-{step:06d}"))
        engine = HFEngine(hf_model(self.model), self.processor, max_batch=cfg.engine.max_batch)  # sets eval mode
        if self.loop is None:
            self.loop = build_loop(cfg, engine=engine)
        self.loop.engine = engine
        with torch.no_grad():
            summary = run_eval(cfg, progress=False, loop=self.loop)
        self.model.train()
        return summary


def evaluate(evaluator: Evaluator | None, metrics: MetricsLog | None, step: int, info: DistInfo,
             curves: list[tuple[str, str, str]]) -> dict | None:
    """Rank 0 evaluates while the others wait; the overall scores go to the metrics log."""
    summary = None
    if evaluator is not None and evaluator.cfg.enabled:
        summary = evaluator(step)
        metrics.write(step, "eval", eval_record(summary))
        plot_curves(metrics.path, metrics.path.parent / "curves.png", curves)
    barrier(info)
    return summary


def eval_record(summary: dict) -> dict:
    """The scalars of an eval summary that go to the metrics log."""
    overall = summary["overall"]
    return {"em": overall["em"], "f1": overall["f1"], "accuracy": overall["accuracy"],
            "invalid_share": summary["invalid_share"], "search_share": summary["search_share"],
            "mean_turns": summary["mean_turns"], **{f"em_hops_{k}": v["em"] for k, v in summary["by_hops"].items()}}
