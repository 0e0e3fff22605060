"""A step's trajectories: prompts drawn in a resumable order, rolled out G times each by the agent loop.

The `hf` engine generates with the very module being trained, so there is no second copy of the
weights and `push_weights` has nothing to copy; an engine that holds its own copy (vLLM) gets the
new weights there. Sampling seeds are a function of (run seed, step, refill round), so a resumed
run rolls out exactly what the uninterrupted one did.
"""

from __future__ import annotations

import random
import time

from mmsearch.agent.loop import AgentLoop, Timings
from mmsearch.agent.setup import RolloutConfig, build_backend, vision_from_processor
from mmsearch.engines.hf import HFEngine
from mmsearch.example import Example
from mmsearch.rl.config import RLConfig
from mmsearch.trajectory import Trajectory, TrajectoryBuilder


class PromptStream:
    """Examples in a fresh seeded order every epoch; its position is part of the trainer state."""

    def __init__(self, examples: list[Example], seed: int, epoch: int = 0, position: int = 0):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.seed, self.epoch, self.position = examples, seed, epoch, position
        self._order = self._shuffled(epoch)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(f"{self.seed}:prompts:{epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[Example]:
        out = []
        while len(out) < n:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            out.append(self.examples[self._order[self.position]])
            self.position += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


class Rollouts:
    """The agent loop over the policy in training, with the configured tools (in-process or a server)."""

    def __init__(self, cfg: RLConfig, model, processor, rank: int = 0):
        from tools.registry import build_toolbox

        self.cfg, self.model, self.rank = cfg, model, rank
        rollout = RolloutConfig(agent=cfg.rollout.agent, tools=cfg.rollout.tools, index=cfg.index, server=cfg.server)
        rollout.engine.device = cfg.device
        rollout.tools.vision = vision_from_processor(processor, rollout.tools.vision)
        self.engine = HFEngine(model, processor, max_batch=cfg.rollout.max_batch)
        self.toolbox = build_toolbox(rollout.tools, build_backend(rollout))
        self.loop = AgentLoop(self.engine, self.toolbox, TrajectoryBuilder(processor), cfg.rollout.agent)

    def run(self, examples: list[Example], step: int, round_: int) -> tuple[list[Trajectory], Timings]:
        """G trajectories per example, in (example, sample) order, and where the time went."""
        self.loop.timings = Timings()
        sampling = self.loop.cfg.sampling
        base_seed = sampling.seed
        # distinct seeds per (run, step, refill round, rank); the loop adds the turn number
        sampling.seed = ((self.cfg.seed * 1_000_003 + step) * 97 + round_) * 1009 + self.rank * 100_000
        try:
            trajectories = self.loop.run(examples, n_samples=self.cfg.rollout.group_size)
        finally:
            sampling.seed = base_seed
            self.model.train()  # the engine puts the module in eval mode to generate
        return trajectories, self.loop.timings

    def push_weights(self) -> float:
        """Make the engine generate with the weights just trained; seconds spent."""
        t0 = time.perf_counter()
        if self.engine.model is not self.model:
            raise RuntimeError("the hf engine must generate with the module being trained")
        # hf: the engine holds the trained module itself, so the update is already there; only its
        # KV cache (empty between runs anyway) must not outlive the old weights.
        self.engine.reset()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.toolbox.close()
