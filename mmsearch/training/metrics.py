"""Training metrics: one JSON line per record and TensorBoard scalars, plus a picture of the curves.

On resume the log is cut back to the checkpoint's step (JSONL lines and TensorBoard events after it
are dropped), so a resumed run's files read exactly like an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """`wandb_config`: also log to Weights & Biases (`WANDB_MODE=offline` works without a network)."""

    def __init__(self, out: str | Path, resume_step: int | None = None, tensorboard: bool = True,
                 wandb_config: dict | None = None):
        self.path = Path(out) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [line for line in _lines(self.path) if json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)
        self.wandb = None
        if wandb_config is not None:
            try:
                import wandb
            except ImportError:
                raise ValueError("logger=wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_config.pop("project", "mmsearch"), dir=str(out), config=wandb_config,
                                    resume="allow" if resume_step is not None else None)

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        """Append one record; `kind` ("train", "eval") prefixes the TensorBoard tags."""
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    records = [json.loads(line) for line in _lines(Path(path))]
    return [r for r in records if kind is None or r.get("kind") == kind]


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


SMOOTH = 5  # steps in the moving mean drawn over long, noisy curves


def _moving_mean(values: tuple[float, ...], window: int) -> list[float]:
    """The mean of each value and up to `window - 1` before it."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_curves(metrics: str | Path, out: str | Path, panels: list[tuple[str, str, str]]) -> Path:
    """A PNG with one panel per (kind, key, title) found in the metrics log; panels with no data are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    shown = [(kind, key, title) for kind, key, title in panels
             if any(r.get("kind") == kind and key in r for r in records)]
    cols = min(4, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    for ax, (kind, key, title) in zip(axes.flat, shown):
        steps, values = zip(*[(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r])
        if len(values) >= 2 * SMOOTH:  # noisy per-step curves (RL): the raw points faint, a moving mean over them
            ax.plot(steps, values, alpha=0.3, linewidth=1)
            ax.plot(steps, _moving_mean(values, SMOOTH), linewidth=2, color="C0")
        else:
            ax.plot(steps, values, marker="o" if len(values) < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
