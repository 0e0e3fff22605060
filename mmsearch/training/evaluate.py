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
    """The eval half of `mmsearch eval`, built on first use (tools, indexes) and run with the weights in training.

    Every rank holds one (`evaluate` needs them all under ZeRO-3); only rank 0 runs the eval.
    """

    def __init__(self, cfg: PeriodicEvalConfig, data: str, model, processor, out: Path, parallel):
        self.cfg, self.data, self.model, self.processor, self.out = cfg, data, model, processor, out
        self.parallel = parallel
        self.loop = None

    def __call__(self, step: int, weights: dict | None = None) -> dict:
        """Evaluate the model in training, or (ZeRO-3, where this rank holds only a shard) a whole copy with `weights`."""
        from mmsearch.agent.setup import build_loop
        from mmsearch.engines.hf import HFEngine
        from mmsearch.eval.run import run_eval

        cfg = dataclasses.replace(self.cfg, data=self.data, out=str(self.out / "eval" / f"step-{step:06d}"))
        model = hf_model(self.model) if weights is None else _whole_copy(hf_model(self.model), weights)
        engine = HFEngine(model, self.processor, max_batch=cfg.engine.max_batch)  # sets eval mode
        if self.loop is None:
            self.loop = build_loop(cfg, engine=engine)
        self.loop.engine = engine
        with torch.no_grad():
            summary = run_eval(cfg, progress=False, loop=self.loop)
        self.model.train()
        return summary


def _whole_copy(model, weights: dict):
    """A fresh model of `model`'s config holding `weights` (a whole state dict), on `model`'s device."""
    from mmsearch.model.policy import model_class

    copy = model_class(model.config).from_config(model.config)
    missing, unexpected = copy.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.get_output_embeddings().weight is model.get_input_embeddings().weight else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"the gathered weights do not fit the model: missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")
    copy.tie_weights()
    return copy.to(next(model.parameters()).device)


def evaluate(evaluator: Evaluator, metrics: MetricsLog | None, step: int, info: DistInfo,
             curves: list[tuple[str, str, str]]) -> dict | None:
    """Rank 0 evaluates while the others wait; the overall scores go to the metrics log.

    Under ZeRO-3 every rank first takes part in gathering the whole weights onto rank 0.
    """
    summary = None
    if evaluator.cfg.enabled:
        weights = evaluator.parallel.full_state_dict(hf_model(evaluator.model))
        if info.is_main:
            summary = evaluator(step, weights)
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
