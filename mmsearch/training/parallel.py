"""One process, DDP (torchrun) or DeepSpeed ZeRO: the same four calls for the training loop.

For each micro-batch the loop runs `module(batch)` and `backward(loss)` inside `accumulating(last)`,
then `step()` once per window. This module hides only what differs: DDP skips the gradient
all-reduce until the window's last micro-batch (`no_sync`); DeepSpeed owns the optimizer step and
the sharded optimizer state, and its window ends where the loop says (`accumulating(last=True)`),
not after a fixed number of micro-batches. ZeRO reduce-scatters gradients on every backward, so
every rank must run as many micro-batches as the others: `split_to` evens them out.
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


def make_parallel(module: nn.Module, optimizer, scheduler, info: DistInfo, max_grad_norm: float, deepspeed: str = "",
                  precision: str = "fp32"):
    """DeepSpeed ZeRO when a DeepSpeed JSON is named, otherwise DDP over the process group (or one process)."""
    if deepspeed:
        return DeepSpeedParallel(module, optimizer, scheduler, deepspeed, max_grad_norm, precision)
    return TorchParallel(module, optimizer, scheduler, info, max_grad_norm)


def zero_stage(config_path: str) -> int:
    """The ZeRO stage a DeepSpeed JSON asks for (0 when it has none); a clear error for a missing or broken file."""
    path = Path(config_path)
    if not path.is_file():
        raise ValueError(f"deepspeed={config_path}: no such file (see configs/deepspeed/zero2.json, zero3.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed={config_path} is not valid JSON: {e}") from None
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_deepspeed(config_path: str, lora_r: int) -> int:
    """The ZeRO stage of a DeepSpeed JSON a recipe may train with; a clear error for what is not supported."""
    stage = zero_stage(config_path)
    if stage == 3 and lora_r > 0:
        raise ValueError(f"deepspeed={config_path} is ZeRO-3, which partitions the base weights LoRA merges into its "
                         "checkpoints; use configs/deepspeed/zero2.json with LoRA (its optimizer state is small anyway)")
    return stage


def share_prefix(wanted: bool, gradient_checkpointing: bool, deepspeed: str) -> bool:
    """Whether a micro-batch's shared prompt prefix may run once for all its rows (`logprobs.policy_hidden_states`).

    Not with gradient checkpointing, and not under DeepSpeed: measured on 2 gloo ranks, ZeRO-2's gradients
    with the prefix's separate forward differ from the single process's by 3.5% in norm (without it they
    are equal), and under ZeRO-3 every rank must run the same forwards while the prefix's extra forward
    happens only in micro-batches of several rows.
    """
    return wanted and not gradient_checkpointing and not deepspeed


def split_to(micro_batches: list[list[int]], count: int) -> list[list[int]]:
    """The micro-batches with the largest split in two until there are `count` of them.

    Every ZeRO rank must run as many micro-batches as the others (`count`: the most any rank has); the loss
    is normalised over the whole window, so how a window is cut into micro-batches changes no number.
    """
    batches = [list(b) for b in micro_batches]
    while len(batches) < count:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[largest]) < 2:
            raise RuntimeError(f"{sum(map(len, batches))} samples cannot fill {count} micro-batches: every rank must "
                               "hold at least as many samples as any rank has micro-batches")
        half = len(batches[largest]) // 2
        batches[largest:largest + 1] = [batches[largest][:half], batches[largest][half:]]
    return batches


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

    def full_state_dict(self, model: nn.Module) -> dict | None:
        return None  # the module holds every weight


class DeepSpeedParallel:
    """DeepSpeed ZeRO-2/3: it partitions optimizer state and gradients (with ZeRO-3 the weights too) across ranks.

    Written against deepspeed.initialize / engine.backward / engine.step /
    engine.set_gradient_accumulation_boundary. On a CPU, DeepSpeed runs over gloo: the test suite checks
    2 ranks against one process (tests/test_sft_distributed.py, tests/test_rl_distributed.py).
    """

    def __init__(self, module: nn.Module, optimizer, scheduler, config_path: str, max_grad_norm: float,
                 precision: str):
        import deepspeed

        self.zero_stage = zero_stage(config_path)  # a clear error for a missing or broken file
        config = json.loads(Path(config_path).read_text())
        # Our micro-batches are token-budgeted and a window ends where the loop says (set_gradient_accumulation_
        # boundary); DeepSpeed only uses these numbers for its own bookkeeping.
        config["train_micro_batch_size_per_gpu"] = 1
        config["gradient_accumulation_steps"] = 1
        config.pop("train_batch_size", None)
        config.setdefault("zero_allow_untested_optimizer", True)  # torch's own optimizers (AdamW; SGD in tests)
        config["gradient_clipping"] = max_grad_norm
        config["bf16"] = {"enabled": precision == "bf16"}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config,
            model_parameters=[p for p in module.parameters() if p.requires_grad])
        self.module = self.engine

    def accumulating(self, last: bool):
        """The window ends at `last`: DeepSpeed steps its optimizer after that micro-batch's backward."""
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # our loss is already scaled by the window's token count, so DeepSpeed must not divide by grad_accum
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # applies the update only at the window's last micro-batch

    def step(self) -> float:
        return float(self.engine.get_global_grad_norm() or 0.0)

    def save_state(self, folder: Path, info: DistInfo) -> None:
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")  # every rank writes its shard

    def load_state(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")

    def full_state_dict(self, model: nn.Module) -> dict | None:
        """`model`'s whole weights under its own names, on rank 0 (ZeRO-3 gathers its shards; a collective: every
        rank calls it); None where the module holds them (ZeRO-2, and ZeRO-3 on the other ranks)."""
        if self.zero_stage != 3:
            return None
        full = self.engine._zero3_consolidated_16bit_state_dict()  # named as in the wrapper DeepSpeed was given
        if full is None:
            return None
        prefix = next(name for name, m in self.engine.module.named_modules() if m is model)
        prefix = f"{prefix}." if prefix else ""
        return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
