"""Checkpoints: a Hugging Face model dir plus `trainer_state/` for an exact resume.

    out/checkpoint-000040/            config.json, model.safetensors, processor files (+ adapter/ with LoRA)
        trainer_state/state.json      step, epoch, step in epoch, counters, the config it was trained with
        trainer_state/optimizer.pt    optimizer + LR schedule (deepspeed/ under DeepSpeed: every rank's shard)
        trainer_state/rng-rank{r}.pt  Python, NumPy and torch generator states of each rank
        trainer_state/trainable.pt    LoRA runs only: the trained tensors (the model dir holds them merged)

A checkpoint is written to `<name>.tmp` and renamed when complete, so a run killed while saving
resumes from the previous one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mmsearch.training.model import hf_model, save_hf
from mmsearch.training.parallel import DistInfo, barrier

# Keys that may change between a run and its resume without changing what is trained.
RESUME_FREE_KEYS = {"eval", "log_every", "save_every", "keep_checkpoints", "out"}


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint with the highest step in `out` (`final` included); None when there is none."""
    found = []
    for folder in [*out.glob("checkpoint-*"), out / "final"]:
        state = folder / "trainer_state" / "state.json"
        if state.is_file() and not folder.name.endswith(".tmp"):
            found.append((json.loads(state.read_text())["step"], folder.name == "final", folder))
    return max(found)[2] if found else None


def save_checkpoint(out: Path, name: str, model, processor, parallel, state: dict, info: DistInfo,
                    keep: int, save_extra=None) -> Path:
    """Write checkpoint `name`; `save_extra(trainer_state_dir)` adds a recipe's own state (e.g. RL's critic)."""
    final = out / name
    tmp = out / f"{name}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainer_state").mkdir(parents=True)
    barrier(info)
    full = parallel.full_state_dict(hf_model(model))  # collective under ZeRO-3: every rank takes part
    if info.is_main:
        save_hf(model, processor, tmp, state_dict=full)
        if hasattr(model, "get_base_model"):
            torch.save({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                       tmp / "trainer_state" / "trainable.pt")
        (tmp / "trainer_state" / "state.json").write_text(json.dumps(state, indent=2))
        if save_extra is not None:
            save_extra(tmp / "trainer_state")
    parallel.save_state(tmp / "trainer_state", info)
    torch.save(rng_state(), tmp / "trainer_state" / f"rng-rank{info.rank}.pt")
    barrier(info)
    if info.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _prune(out, keep)
    barrier(info)
    return final


def _prune(out: Path, keep: int) -> None:
    steps = sorted(out.glob("checkpoint-[0-9]*[0-9]"))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(folder: Path, model, parallel, info: DistInfo) -> dict:
    """Restore optimizer, schedule, RNG (and LoRA tensors) from `folder`; the saved state dict."""
    state_dir = folder / "trainer_state"
    if hasattr(model, "get_base_model"):
        trained = torch.load(state_dir / "trainable.pt", weights_only=True)
        missing = set(trained) - {n for n, _ in model.named_parameters()}
        if missing:
            raise ValueError(f"{folder}: trained tensors {sorted(missing)[:3]} do not exist in this model (lora config changed?)")
        model.load_state_dict(trained, strict=False)
    parallel.load_state(state_dir)
    rng_file = state_dir / f"rng-rank{info.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return saved_state(folder)


def saved_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state" / "state.json").read_text())


def check_resumable(saved_config: dict, config: dict, folder: Path) -> None:
    """Refuse to resume with a config that trains differently (e.g. optim.lr), naming the changed keys."""
    old, new = _flatten(saved_config), _flatten(config)
    changed = sorted(k for k in set(old) | set(new)
                     if k.split(".")[0] not in RESUME_FREE_KEYS and old.get(k) != new.get(k))
    if changed:
        raise ValueError(f"cannot resume from {folder}: the config changed in {', '.join(changed)} "
                         f"(only {', '.join(sorted(RESUME_FREE_KEYS))} may change); start a new out dir instead")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch's global generators (a run's start; a resume restores their states instead)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

