"""The collapse guard: stop (or roll back) a run whose policy has clearly collapsed.

GRPO on search agents is known to collapse: reward falls to zero and the policy writes gibberish
(Search-R1 #88/#89/#92, ZeroSearch #23). The guard reads each step's metrics and calls a step bad
when any of these holds:
- the loss or the gradient norm is not finite (acted on at once, no patience);
- the share of trajectories with an invalid action reaches `max_invalid_share` (the policy no
  longer writes the protocol);
- the mean reward is below `reward_drop` x the best 3-step mean reward seen so far (once that best
  exceeds `min_best_reward`, so a run that never learned is not called collapsed);
- the mean token entropy exceeds `max_entropy_ratio` x log(vocabulary size) (near-uniform sampling).
`patience` bad steps in a row trigger the action.
"""

from __future__ import annotations

import math
from collections import deque

from mmsearch.rl.config import GuardConfig


class Collapsed(RuntimeError):
    """The run collapsed; the message says which signals and thresholds decided it."""


class CollapseGuard:
    def __init__(self, cfg: GuardConfig, vocab_size: int, state: dict | None = None):
        self.cfg = cfg
        self.max_entropy = cfg.max_entropy_ratio * math.log(max(2, vocab_size))
        state = state or {}
        self.best_mean = state.get("best_mean", -math.inf)
        self.recent = deque(state.get("recent", []), maxlen=3)
        self.bad_streak = state.get("bad_streak", 0)
        self.rollbacks = state.get("rollbacks", 0)

    def state(self) -> dict:
        return {"best_mean": self.best_mean, "recent": list(self.recent), "bad_streak": self.bad_streak,
                "rollbacks": self.rollbacks}

    def reasons(self, m: dict) -> list[str]:
        """Why this step looks collapsed (empty: it does not); updates the running best reward."""
        c = self.cfg
        found = []
        for key in ("loss", "grad_norm"):
            if key in m and not math.isfinite(m[key]):
                found.append(f"{key} is {m[key]}")
        if m["invalid_share"] >= c.max_invalid_share:
            found.append(f"invalid-action share {m['invalid_share']:.2f} >= {c.max_invalid_share}")
        if self.best_mean > c.min_best_reward and m["reward_mean"] < c.reward_drop * self.best_mean:
            found.append(f"mean reward {m['reward_mean']:.3f} < {c.reward_drop} x best 3-step mean {self.best_mean:.3f}")
        if m.get("entropy", 0.0) > self.max_entropy:
            found.append(f"token entropy {m['entropy']:.2f} > {c.max_entropy_ratio} x log(vocab) = {self.max_entropy:.2f}")
        self.recent.append(m["reward_mean"])
        if len(self.recent) == self.recent.maxlen:
            self.best_mean = max(self.best_mean, sum(self.recent) / len(self.recent))
        return found

    def check(self, step: int, m: dict) -> str | None:
        """None while the run is healthy; the verdict message once it must act."""
        if not self.cfg.enabled:
            return None
        found = self.reasons(m)
        self.bad_streak = self.bad_streak + 1 if found else 0
        non_finite = any(not math.isfinite(m.get(key, 0.0)) for key in ("loss", "grad_norm"))
        if found and (non_finite or self.bad_streak >= self.cfg.patience):
            streak = "at once" if non_finite else f"for {self.bad_streak} steps in a row"
            return f"the run collapsed at step {step} ({streak}): " + "; ".join(found)
        return None
