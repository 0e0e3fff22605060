"""A step's trajectories: prompts drawn in a resumable order, rolled out G times each by the agent loop.

The `hf` engine generates with the very module being trained, so there is no second copy of the
weights and `push_weights` has nothing to copy. The `vllm` engine is a copy colocated on the rank's
GPU, in this process (as TRL's `vllm_mode="colocate"`): `push_weights` loads the trainer's weights
into it (LoRA merged), and with `rollout.vllm.sleep_level` > 0 it releases its GPU memory between
rollouts (sleep after generating; wake the weights for the push, the KV cache for the next rollout).
Sampling seeds are a function of (run seed, step, refill round, rank), so a resumed run rolls out
exactly what the uninterrupted one did.
"""

from __future__ import annotations

import os
import random
import time

from mmsearch.agent.loop import AgentLoop, Timings
from mmsearch.agent.setup import RolloutConfig, build_backend, protocol_for, use_recorded_prompt, vision_from_processor
from mmsearch.engines.hf import HFEngine
from mmsearch.example import Example
from mmsearch.rl.config import RLConfig
from mmsearch.training.model import hf_model, merged_weights
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
    """The agent loop over the policy in training, with the configured tools (in-process or a server).

    `model` is the trained model as `load_policy` returns it (a peft model with LoRA): the `hf` engine
    generates with its transformers module, the `vllm` engine gets its merged weights.
    """

    def __init__(self, cfg: RLConfig, model, processor, rank: int = 0):
        from tools.registry import build_toolbox

        self.cfg, self.model, self.rank = cfg, model, rank
        rollout = RolloutConfig(agent=cfg.rollout.agent, tools=cfg.rollout.tools, index=cfg.index, server=cfg.server)
        rollout.engine.device = cfg.device
        rollout.tools.vision = vision_from_processor(processor, rollout.tools.vision)
        protocol = protocol_for(rollout.agent, rollout.tools)
        use_recorded_prompt(rollout.agent, hf_model(model))
        if cfg.rollout.engine == "vllm":
            self.engine = colocated_vllm(cfg, model)
        else:
            self.engine = HFEngine(hf_model(model), processor, max_batch=cfg.rollout.max_batch)
        self.toolbox = build_toolbox(rollout.tools, build_backend(rollout))
        self.loop = AgentLoop(self.engine, self.toolbox, TrajectoryBuilder(processor, protocol=protocol), cfg.rollout.agent)

    @property
    def vllm(self) -> bool:
        return self.cfg.rollout.engine == "vllm"

    def run(self, examples: list[Example], step: int, round_: int) -> tuple[list[Trajectory], Timings]:
        """G trajectories per example, in (example, sample) order, and where the time went.

        A sleeping vLLM engine is woken for the rollout and put back to sleep after it; that time counts
        as generation.
        """
        self.loop.timings = Timings()
        sampling = self.loop.cfg.sampling
        base_seed = sampling.seed
        # distinct seeds per (run, step, refill round, rank); the loop adds the turn number
        sampling.seed = ((self.cfg.seed * 1_000_003 + step) * 97 + round_) * 1009 + self.rank * 100_000
        memory_s = 0.0
        try:
            if self.vllm:
                t0 = time.perf_counter()
                self.engine.wake_up()
                memory_s += time.perf_counter() - t0
            trajectories = self.loop.run(examples, n_samples=self.cfg.rollout.group_size)
        finally:
            sampling.seed = base_seed
            if self.vllm and self.cfg.rollout.vllm.sleep_level:
                t0 = time.perf_counter()
                self.engine.sleep(self.cfg.rollout.vllm.sleep_level)
                memory_s += time.perf_counter() - t0
            if not self.vllm:
                self.model.train()  # the hf engine puts the module in eval mode to generate
        self.loop.timings.generate_s += memory_s
        return trajectories, self.loop.timings

    def push_weights(self) -> float:
        """Make the engine generate with the weights just trained; seconds spent."""
        t0 = time.perf_counter()
        if self.vllm:
            with merged_weights(self.model) as weights:
                self.engine.update_weights(weights, chunk_bytes=self.cfg.rollout.vllm.weight_chunk_mb << 20)
            return time.perf_counter() - t0
        if self.engine.model is not hf_model(self.model):
            raise RuntimeError("the hf engine must generate with the module being trained")
        # hf: the engine holds the trained module itself, so the update is already there; only its
        # KV cache (empty between runs anyway) must not outlive the old weights.
        self.engine.reset()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.toolbox.close()


def vllm_dtype(cfg: RLConfig) -> str:
    """The vLLM engine's dtype: rollout.vllm.dtype, or with auto the trainer's precision."""
    dtype = cfg.rollout.vllm.dtype
    return cfg.precision if dtype == "auto" else dtype  # check() allows only fp32 | bf16 as precision


def colocated_vllm(cfg: RLConfig, model):
    """This rank's vLLM engine, on the GPU the trainer uses, in this process.

    Under torchrun each rank holds its own engine and rolls out its own groups; vLLM's
    `external_launcher` backend makes it join the ranks' existing process group instead of starting
    workers (as TRL's colocate mode does), each rank a tensor-parallel group of one.
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"rollout.engine=vllm needs the policy on a CUDA GPU (it is on {device}); "
                         "use rollout.engine=hf on a CPU")
    from mmsearch.engines.vllm_engine import VLLMEngine

    v, agent = cfg.rollout.vllm, cfg.rollout.agent
    llm_kwargs = {"enable_sleep_mode": v.sleep_level > 0, "max_num_seqs": cfg.rollout.max_batch,
                  "enforce_eager": v.enforce_eager}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        llm_kwargs["distributed_executor_backend"] = "external_launcher"
    return VLLMEngine(cfg.model, dtype=vllm_dtype(cfg), gpu_memory_utilization=v.gpu_memory_utilization,
                      max_model_len=v.max_model_len or agent.max_total_tokens, max_images_per_prompt=agent.max_images,
                      seed=cfg.seed, in_process=True, llm_kwargs=llm_kwargs)
