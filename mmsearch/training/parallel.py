"""One process, DDP (torchrun) or DeepSpeed ZeRO: the same four calls for the training loop.

For each micro-batch the loop runs `module(batch)` and `backward(loss)` inside `accumulating(last)`,
then `step()` once per window. This module hides only what differs: DDP skips the gradient
all-reduce until the window's last micro-batch (`no_sync`); DeepSpeed owns the optimizer step and
the sharded optimizer state.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tools.device import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun / deepspeed set up (env vars), or run as one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(device=resolve_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        # Token counts and logged sums are all-reduced as CPU tensors: gloo carries those next to NCCL.
        dist.init_process_group("cuda:nccl,cpu:gloo" if device.startswith("cuda") else "gloo")
    return DistInfo(rank, world, local, device)


def all_sum(value: float, info: DistInfo) -> float:
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def all_max(value: float, info: DistInfo) -> float:
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


class TorchParallel:
    """One process, or DDP over the process group (gradients all-reduced on the window's last micro-batch)."""

    def __init__(self, module: nn.Module, optimizer, scheduler, info: DistInfo, max_grad_norm: float):
        self.optimizer, self.scheduler, self.max_grad_norm = optimizer, scheduler, max_grad_norm
        self.module = module
        if info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: a micro-batch without images leaves the vision tower without gradients
            self.module = DistributedDataParallel(module, find_unused_parameters=True,
                                                  device_ids=[info.local_rank] if info.device.startswith("cuda") else None)
        self.params = [p for p in module.parameters() if p.requires_grad]

    def accumulating(self, last: bool):
        """Inside it, backward only accumulates locally, except on the window's last micro-batch."""
        return self.module.no_sync() if not last and hasattr(self.module, "no_sync") else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, step the optimizer and the schedule; the gradient norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm if self.max_grad_norm > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save_state(self, folder: Path, info: DistInfo) -> None:
        if info.is_main:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       folder / "optimizer.pt")

    def load_state(self, folder: Path) -> None:
        state = torch.load(folder / "optimizer.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict | None:
        return None  # the module holds every weight


class DeepSpeedParallel:
    """DeepSpeed ZeRO-2/3 (GPU): it partitions optimizer state (and with ZeRO-3 the weights) across ranks.

    Written against deepspeed.initialize / engine.backward / engine.step; it needs CUDA, so it is not
    exercised by the CPU test suite (see the README's GPU section).
    """

    def __init__(self, module: nn.Module, optimizer, scheduler, config_path: str, grad_accum: int,
                 max_grad_norm: float, precision: str):
        import deepspeed

        with open(config_path) as f:
            config = json.load(f)
        # Our micro-batches are token-budgeted; DeepSpeed only uses this number for its own bookkeeping.
        config["train_micro_batch_size_per_gpu"] = 1
        config["gradient_accumulation_steps"] = grad_accum
        config.pop("train_batch_size", None)
        config["gradient_clipping"] = max_grad_norm
        config["bf16"] = {"enabled": precision == "bf16"}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config,
            model_parameters=[p for p in module.parameters() if p.requires_grad])
        self.module = self.engine
        self.zero_stage = config.get("zero_optimization", {}).get("stage", 0)

    def accumulating(self, last: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces at its own accumulation boundary

    def backward(self, loss: torch.Tensor) -> None:
        # our loss is already scaled by the window's token count, so DeepSpeed must not divide by grad_accum
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # applies the update only at the accumulation boundary

    def step(self) -> float:
        return float(self.engine.get_global_grad_norm() or 0.0)

    def save_state(self, folder: Path, info: DistInfo) -> None:
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")  # every rank writes its shard

    def load_state(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")

    def full_state_dict(self) -> dict | None:
        """The whole model's weights on rank 0 (ZeRO-3 gathers its shards); None where the module holds them."""
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return None
