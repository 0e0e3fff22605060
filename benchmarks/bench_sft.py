"""Cold-start SFT throughput: the mmsearch trainer step against a plain `transformers.Trainer`.

    python benchmarks/bench_sft.py --model runs/demo/policy --data runs/demo/dataset \
        [--samples 128] [--steps 10] [--seconds 0] [--warmup 2] [--ablate] [--out sft.json]

The samples are built once, here, with `mmsearch.sft.samples.load_samples` (the first `--samples`
train rows) and handed to every side through one pickle, so all train on the same token ids, loss
masks and pixels:
- ours: the step of `mmsearch/sft/train.py` from its library parts: token-budget, length-grouped
  micro-batches (`plan_epoch`), `collate`, `CausalLMLoss` (the prefix all rows of a micro-batch
  share run once, the LM head only on trained positions), the window-normalized loss, AdamW and
  the schedule through `TorchParallel`;
- baseline: `transformers.Trainer` on a fresh copy of the same model, labels -100 off the loss
  mask, each batch padded to its longest, `--hf-batch-size` samples per step in random order;
- with `--ablate`, ours without the shared prefix, and ours without it and with the model's own
  loss (logits at every position), which splits the ratio into its three sources.
All use the recipe's optimizer settings (`--config`, default configs/sft/tiny.yaml).

Each side runs in its own process, so its peak memory is its own. This script drives them one
optimizer step at a time (A B, B A, ...), the idle ones blocked on their pipes, so a change of load
on a shared machine hits all alike; each step also records how much CPU the rest of the machine
used meanwhile, and the steps with little of it are summarized apart (`--quiet-load`). The first
`--warmup` steps of each side are not timed. A step is timed from its release to the end of its
optimizer step, so it includes fetching and collating its batch. The fp32 matmul throughput is
measured between steps; model FLOPs (formula in BENCHMARKS.md) are counted the same way for every
side, over real tokens only. Prints Markdown tables (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmsearch.config import load_config
from mmsearch.sft.config import SFTConfig

SIDES = {"ours": "mmsearch trainer", "hf": "transformers.Trainer",
         "no_prefix": "ablation: ours without the shared prefix",
         "full_head": "ablation: ours without the shared prefix, LM head on every token"}
PREFIX = "@@bench_sft "  # protocol lines on a worker's stdout; anything else it prints is passed over


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- machine and model FLOPs

def machine_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot, summed over cores (Linux /proc/stat), else None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user .. steal; guest time is inside user


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_gflops(device: str, n: int = 2048, reps: int = 3) -> float:
    """Best-of-`reps` fp32 `torch.mm` throughput of an n x n product, in GFLOP/s."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def model_shape(model) -> dict:
    """Parameter counts by what they apply to (token, trained token, patch, merged patch) and attention widths."""
    lm, visual = model.model.language_model, model.model.visual
    tcfg, vcfg = model.config.text_config, model.config.vision_config
    merger = sum(p.numel() for p in visual.merger.parameters())
    full_blocks = len(getattr(vcfg, "fullatt_block_indexes", range(vcfg.depth)))
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    return {
        "text_body": sum(p.numel() for n, p in lm.named_parameters() if not n.startswith("embed_tokens")),
        "lm_head": model.lm_head.weight.numel(),
        "vision": sum(p.numel() for p in visual.parameters()) - merger,
        "merger": merger,
        "merge": vcfg.spatial_merge_size**2,
        "layers": tcfg.num_hidden_layers, "attn_width": tcfg.num_attention_heads * head_dim,
        "vision_full_blocks": full_blocks, "vision_window_blocks": vcfg.depth - full_blocks,
        "vision_width": getattr(vcfg, "hidden_size", None) or vcfg.embed_dim,
        "vision_window_patches": (getattr(vcfg, "window_size", 0) // vcfg.patch_size) ** 2,
    }


def step_flops(shape: dict, lengths: list[int], trained: int, patches: list[int]) -> float:
    """Model FLOPs of one forward + backward over real tokens (padding excluded, LM head on trained tokens).

    6 per parameter per token it applies to; causal text attention needs half the score matrix, so
    QK^T and AV are 2 * n^2 * width forward per layer (x3 with backward); the vision attention is
    bidirectional, full or windowed per block.
    """
    dense = 6 * (shape["text_body"] * sum(lengths) + shape["lm_head"] * trained
                 + shape["vision"] * sum(patches) + shape["merger"] * sum(patches) / shape["merge"])
    attention = 6 * shape["layers"] * shape["attn_width"] * sum(n * n for n in lengths)
    window = shape["vision_window_patches"] or 10**9
    vision_attention = 12 * shape["vision_width"] * sum(
        shape["vision_full_blocks"] * p * p + shape["vision_window_blocks"] * p * min(p, window) for p in patches)
    return dense + attention + vision_attention


def shared_prefix_flops(shape: dict, rows: int, prefix: int) -> float:
    """Model FLOPs a micro-batch does not run when its `rows` share a `prefix` that is run once."""
    return (rows - 1) * 6 * prefix * (shape["text_body"] + shape["layers"] * shape["attn_width"] * prefix)


# ---------------------------------------------------------------- the worker side

class Driven:
    """A worker's end of the protocol: report each step, then wait for the driver's "go" or "stop"."""

    def __init__(self, device: str):
        self.device = device
        self.shape: dict = {}
        self.batch_stats: dict | None = None
        self.released = self.cpu_at_release = 0.0
        self.machine_at_release: float | None = None
        self.start_mib = 0.0

    def ready(self, shape: dict) -> bool:
        """Loaded (model, optimizer, samples): mark memory and wait for the first step's release."""
        self.shape = shape
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.start_mib = torch.cuda.memory_allocated() / 2**20
        else:
            import psutil

            self.start_mib = psutil.Process().memory_info().rss / 2**20
        return self._send_and_wait({"ready": True})

    def batch(self, lengths: list[int], padded: int, trained: int, grids: list[list[int]], prefix: int = 0) -> None:
        """Count one micro-batch of the running step (`prefix`: shared tokens it runs once)."""
        patches = [t * h * w for t, h, w in grids]
        stats = self.batch_stats or {"samples": 0, "tokens": 0, "padded": 0, "trained": 0, "flops": 0.0,
                                     "skipped_flops": 0.0}
        stats["samples"] += len(lengths)
        stats["tokens"] += sum(lengths)
        stats["padded"] += padded
        stats["trained"] += trained
        stats["flops"] += step_flops(self.shape, lengths, trained, patches)
        stats["skipped_flops"] += shared_prefix_flops(self.shape, len(lengths), prefix) if prefix else 0.0
        self.batch_stats = stats

    def step_end(self) -> bool:
        """After the optimizer step: report it; True when the driver says stop."""
        _sync(self.device)
        wall, cpu, machine = time.perf_counter() - self.released, time.process_time(), machine_busy_s()
        record, self.batch_stats = {**self.batch_stats, "s": wall}, None
        if machine is not None and self.machine_at_release is not None:
            # CPU time the rest of the machine used during this step, as a share of all its cores
            others = (machine - self.machine_at_release) - (cpu - self.cpu_at_release)
            record["other_load"] = max(0.0, others) / (wall * (os.cpu_count() or 1))
        return self._send_and_wait(record)

    def finish(self) -> None:
        if self.device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(PREFIX + json.dumps({"final": True, "peak_mib": peak, "start_mib": self.start_mib, "shape": self.shape,
                                   "device": self.device, "threads": torch.get_num_threads()}), flush=True)

    def _send_and_wait(self, message: dict) -> bool:
        print(PREFIX + json.dumps(message), flush=True)
        command = sys.stdin.readline().strip()
        self.released, self.cpu_at_release, self.machine_at_release = (
            time.perf_counter(), time.process_time(), machine_busy_s())
        return command != "go"


class FullHeadLoss(torch.nn.Module):
    """Ablation of `CausalLMLoss`: the model's own causal-LM loss, with logits at every position."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        from mmsearch.logprobs import MODEL_INPUTS

        labels = torch.where(batch["loss_mask"].bool(), batch["input_ids"], -100)
        n = int(labels[:, 1:].ne(-100).sum())
        out = self.model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}, labels=labels, use_cache=False)
        return out.loss * n, n  # the sum, as CausalLMLoss returns it


def run_ours(cfg: SFTConfig, samples, pad_id: int, image_token_id: int, driven: Driven, max_steps: int,
             variant: str = "ours") -> None:
    """`mmsearch/sft/train.py`'s step; `no_prefix` runs every row whole, `full_head` also takes the model's own loss."""
    from mmsearch.logprobs import collate, shared_prefix_len, vision_token_ids
    from mmsearch.sft.loss import CausalLMLoss, window_scale
    from mmsearch.training.batching import plan_epoch
    from mmsearch.training.model import load_policy, trainable_parameters
    from mmsearch.training.parallel import DistInfo, TorchParallel
    from mmsearch.training.schedule import lr_lambda

    device = driven.device
    model = load_policy(cfg.model, device, cfg.lora, cfg.freeze, cfg.gradient_checkpointing)
    lengths = [len(s.token_ids) for s in samples]
    trained = [sum(s.loss_mask[1:]) for s in samples]
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, max_steps))
    if variant == "full_head":
        module = FullHeadLoss(model)
    else:  # as train.py builds it
        share = cfg.batch.share_prefix and not cfg.gradient_checkpointing and variant == "ours"
        module = CausalLMLoss(model, share_prefix=share)
    parallel = TorchParallel(module, optimizer, scheduler, DistInfo(device=device), cfg.optim.max_grad_norm)
    shared = getattr(module, "share_prefix", False)
    model.train()
    if driven.ready(model_shape(model)):
        return
    epoch, steps = 0, []
    while True:
        if not steps:
            steps = list(plan_epoch(lengths, cfg.batch.tokens_per_batch, cfg.batch.grad_accum, cfg.seed, epoch).steps)
            epoch += 1
        mine = steps.pop(0)
        scale, _ = window_scale(sum(trained[i] for b in mine for i in b), 1)
        for k, ids in enumerate(mine):
            batch = collate([samples[i] for i in ids], pad_id, image_token_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            prefix = shared_prefix_len(batch, vision_token_ids(model.config)) if shared else 0  # as CausalLMLoss finds it
            with parallel.accumulating(last=k == len(mine) - 1):
                loss, _ = parallel.module(batch)
                parallel.backward(loss * scale)
            driven.batch([lengths[i] for i in ids], batch["input_ids"].numel(), sum(trained[i] for i in ids),
                         [g for i in ids for g in samples[i].image_grid_thw], prefix)
        parallel.step()
        if driven.step_end():
            return


class HFSamples(torch.utils.data.Dataset):
    """Each sample as the standard HF causal-LM fields: labels are the ids, -100 where the loss mask is 0."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        ids = torch.tensor(s.token_ids)
        item = {"input_ids": ids, "labels": torch.where(torch.tensor(s.loss_mask).bool(), ids, -100)}
        if s.pixel_values:
            item["pixel_values"], item["image_grid_thw"] = s.pixel_tensor(), s.grid_tensor()
        return item


def pad_to_longest(pad_id: int, image_token_id: int):
    """Plain padding: every row right-padded to the batch's longest; pixels concatenated in sample order."""

    def collator(items: list[dict]) -> dict:
        longest = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for row, x in enumerate(items):
            n = len(x["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = x["input_ids"], x["labels"], 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                 "mm_token_type_ids": (ids == image_token_id).int()}  # Qwen2.5-VL's 3-D rotary positions need it
        with_pixels = [x for x in items if "pixel_values" in x]
        if with_pixels:
            batch["pixel_values"] = torch.cat([x["pixel_values"] for x in with_pixels])
            batch["image_grid_thw"] = torch.cat([x["image_grid_thw"] for x in with_pixels])
        return batch

    return collator


def run_hf(cfg: SFTConfig, samples, pad_id: int, image_token_id: int, driven: Driven, max_steps: int,
           batch_size: int, workdir: str) -> None:
    from transformers import AutoModelForImageTextToText, Trainer, TrainerCallback, TrainingArguments

    class Driver(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if driven.ready(model_shape(model)):
                control.should_training_stop = True

        def on_step_end(self, args, state, control, **kwargs):
            if driven.step_end():
                control.should_training_stop = True

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            driven.batch(mask.sum(1).tolist(), mask.numel(), int(inputs["labels"][:, 1:].ne(-100).sum()),
                         inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else [])
            return super().training_step(model, inputs, num_items_in_batch)

    model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=torch.float32)
    o = cfg.optim
    schedule = {"cosine": ("cosine_with_min_lr", {"min_lr_rate": o.min_lr_ratio}), "linear": ("linear", {}),
                "constant": ("constant_with_warmup", {})}[o.schedule]
    args = TrainingArguments(
        output_dir=workdir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=cfg.batch.grad_accum, learning_rate=o.lr, adam_beta1=o.betas[0],
        adam_beta2=o.betas[1], weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm, warmup_steps=o.warmup_steps,
        lr_scheduler_type=schedule[0], lr_scheduler_kwargs=schedule[1], seed=cfg.seed, data_seed=cfg.seed,
        remove_unused_columns=False, eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=driven.device == "cpu", dataloader_num_workers=0, bf16=False, fp16=False,
    )
    trainer = CountingTrainer(model=model, args=args, train_dataset=HFSamples(samples),
                              data_collator=pad_to_longest(pad_id, image_token_id), callbacks=[Driver()])
    trainer.train()


def worker(args: argparse.Namespace) -> None:
    from transformers.utils import logging as hf_logging

    from tools.device import resolve_device

    hf_logging.disable_progress_bar()
    cfg = load_config(SFTConfig, args.config, {"model": args.model, "data": args.data},
                      [f"batch.tokens_per_batch={args.tokens_per_batch}"])
    torch.manual_seed(cfg.seed)
    with open(args.samples_file, "rb") as f:
        shared = pickle.load(f)
    driven = Driven(resolve_device(cfg.device))
    common = (cfg, shared["samples"], shared["pad_id"], shared["image_token_id"], driven, args.warmup + args.steps)
    if args.worker == "hf":
        with tempfile.TemporaryDirectory(prefix="bench_sft_hf_") as workdir:
            run_hf(*common, args.hf_batch_size, workdir)
    else:
        run_ours(*common, variant=args.worker)
    driven.finish()


# ---------------------------------------------------------------- the driver

class Worker:
    def __init__(self, side: str, cmd: list[str]):
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.records: list[dict] = []
        self.done = False
        self.final: dict = {}

    def receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        raise RuntimeError(f"the {self.side} worker exited with {self.proc.wait()} (its stderr is above)")

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def step(self) -> dict:
        self.send("go")
        self.records.append(self.receive())
        return self.records[-1]

    def stop(self) -> None:
        self.send("stop")
        self.final = self.receive()
        self.proc.wait()


def build_samples(args: argparse.Namespace, path: Path) -> dict:
    from transformers import AutoProcessor
    from transformers.utils import logging as hf_logging

    from mmsearch.agent.setup import vision_from_processor
    from mmsearch.sft.samples import SampleLimits, load_samples
    from mmsearch.trajectory import TrajectoryBuilder
    from tools.config import VisionResizeConfig

    cfg = load_config(SFTConfig, args.config, {"model": args.model, "data": args.data},
                      [f"batch.tokens_per_batch={args.tokens_per_batch}"])
    hf_logging.disable_progress_bar()
    processor = AutoProcessor.from_pretrained(cfg.model)
    builder = TrajectoryBuilder(processor)
    limits = SampleLimits(cfg.batch.max_tool_response_tokens, cfg.batch.max_seq_tokens)
    vision = vision_from_processor(processor, VisionResizeConfig())
    t0 = time.perf_counter()
    samples, report = load_samples(cfg.data, cfg.train_split, builder, vision, limits, limit=args.samples)
    info = {"samples": len(samples), "build_s": time.perf_counter() - t0,
            "mean_tokens": statistics.mean(len(s.token_ids) for s in samples),
            "mean_trained": statistics.mean(sum(s.loss_mask[1:]) for s in samples),
            "tokens_per_batch": cfg.batch.tokens_per_batch, "lr": cfg.optim.lr}
    with open(path, "wb") as f:
        pickle.dump({"samples": samples, "pad_id": processor.tokenizer.pad_token_id or 0,
                     "image_token_id": builder.image_token_id}, f)
    log(f"built {len(samples)} samples ({report}) in {info['build_s']:.1f} s")
    return info


def summarize(records: list[dict], final: dict, gflops: float) -> dict:
    keys = ("samples", "tokens", "padded", "trained", "flops", "skipped_flops", "s")
    total = {k: sum(r.get(k, 0) for r in records) for k in keys}
    steps, seconds = len(records), total.pop("s")
    return {**total, "steps": steps, "seconds": seconds, "trained_per_s": total["trained"] / seconds,
            "tokens_per_s": total["tokens"] / seconds, "padding_share": 1 - total["tokens"] / total["padded"],
            "s_per_step": seconds / steps, "samples_per_step": total["samples"] / steps,
            "padded_per_step": total["padded"] / steps, "tokens_per_sample": total["tokens"] / total["samples"],
            "model_gflops_per_s": total["flops"] / seconds / 1e9, "mfu": total["flops"] / seconds / 1e9 / gflops,
            "skipped_share": total["skipped_flops"] / total["flops"],
            "mfu_of_run_flops": (total["flops"] - total["skipped_flops"]) / seconds / 1e9 / gflops,
            "peak_mib": final["peak_mib"], "start_mib": final["start_mib"],
            "other_load": statistics.mean(r.get("other_load", float("nan")) for r in records),
            "step_s": [round(r["s"], 3) for r in records],
            "step_other_load": [round(r.get("other_load", float("nan")), 3) for r in records]}


def print_table(sides: dict[str, dict], memory: str) -> dict:
    """The Markdown table of one set of steps; returns the ratios."""
    print(f"| side | timed steps | samples/step | padded tok/step | s/step | trained tok/s | real tok/s | "
          f"padding share | {memory} | model GFLOP/s | MFU | other load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def row(side: str) -> None:
        s = sides[side]
        print(f"| {SIDES[side]} | {s['steps']} | {s['samples_per_step']:.1f} | {s['padded_per_step']:.0f} | "
              f"{s['s_per_step']:.2f} | **{s['trained_per_s']:.0f}** | {s['tokens_per_s']:.0f} | "
              f"{s['padding_share']:.1%} | {s['peak_mib']:.0f} ({s['peak_mib'] - s['start_mib']:+.0f}) | "
              f"{s['model_gflops_per_s']:.1f} | {s['mfu']:.1%} | {s['other_load']:.0%} |")

    ours, hf = sides["ours"], sides["hf"]
    ratios = {"trained_per_s": ours["trained_per_s"] / hf["trained_per_s"],
              "tokens_per_s": ours["tokens_per_s"] / hf["tokens_per_s"], "peak_mib": ours["peak_mib"] / hf["peak_mib"]}
    row("ours")
    row("hf")
    print(f"| **ours / baseline** | | | | | **{ratios['trained_per_s']:.2f}x** | {ratios['tokens_per_s']:.2f}x | | "
          f"{ratios['peak_mib']:.2f}x | | | |")
    for side in ("no_prefix", "full_head"):
        if side in sides:
            row(side)
    print()
    if "no_prefix" in sides and "full_head" in sides:
        rate = {side: s["trained_per_s"] for side, s in sides.items()}
        ratios["factors"] = {"shared_prefix": rate["ours"] / rate["no_prefix"],
                             "lm_head_on_trained_only": rate["no_prefix"] / rate["full_head"],
                             "length_grouped_batches": rate["full_head"] / rate["hf"]}
        f = ratios["factors"]
        print(f"Where the ratio comes from (trained tok/s): shared prefix run once {f['shared_prefix']:.2f}x, "
              f"LM head on trained positions only {f['lm_head_on_trained_only']:.2f}x, token-budget length-grouped "
              f"batches {f['length_grouped_batches']:.2f}x (product {ratios['trained_per_s']:.2f}x).")
        print()
    print(f"Ours runs each micro-batch's shared prefix once, {ours['skipped_share']:.0%} of the model FLOPs counted "
          f"for it; on the FLOPs it does run, its utilisation is {ours['mfu_of_run_flops']:.1%}.")
    print()
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo/policy", help="policy dir (model + processor)")
    parser.add_argument("--data", default="runs/demo/dataset", help="dataset dir from mmsearch synth, with gold messages")
    parser.add_argument("--config", default="configs/sft/tiny.yaml", help="SFT recipe: token budget and optimizer")
    parser.add_argument("--samples", type=int, default=128, help="use the first N train rows")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side")
    parser.add_argument("--seconds", type=float, default=0, help="> 0: also stop a side after this many timed s")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each side")
    parser.add_argument("--hf-batch-size", type=int, default=8, help="baseline samples per step")
    parser.add_argument("--tokens-per-batch", type=int, default=8192,
                        help="our padded-token budget per step (8192: about the baseline's 8 samples of ~1k tokens)")
    parser.add_argument("--ablate", action="store_true",
                        help="also run ours without the shared prefix, and without it and with the full LM head")
    parser.add_argument("--quiet-load", type=float, default=0.1,
                        help="also report the steps during which other processes used less than this share of the CPU")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--samples-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from tools.device import resolve_device

    device = resolve_device(load_config(SFTConfig, args.config).device)
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        samples_file = Path(tmp, "samples.pkl")
        data = build_samples(args, samples_file)
        workers = {side: Worker(side, [sys.executable, __file__, "--worker", side, "--samples-file", str(samples_file),
                                       "--model", args.model, "--data", args.data, "--config", args.config,
                                       "--steps", str(args.steps), "--warmup", str(args.warmup),
                                       "--hf-batch-size", str(args.hf_batch_size),
                                       "--tokens-per-batch", str(args.tokens_per_batch)])
                   for side in SIDES if side in ("ours", "hf") or args.ablate}
        for w in workers.values():
            w.receive()  # ready: loaded and waiting
        gflops = [matmul_gflops(device)]
        order = list(workers.values())
        while not all(w.done for w in order):
            for w in order:
                if w.done:
                    continue
                r = w.step()
                timed = w.records[args.warmup:]
                w.done = len(timed) >= args.steps or 0 < args.seconds <= sum(t["s"] for t in timed)
                log(f"{w.side} step {len(w.records)}{' (warmup)' if not timed else ''}: {r['s']:.2f} s, "
                    f"{r['samples']} samples, {r['padded']} padded / {r['tokens']} real / {r['trained']} trained tokens")
            order.reverse()  # A B, B A, ...: no side always runs right after the same other
            if len(order[0].records) % 4 == 0:
                gflops.append(matmul_gflops(device))
        gflops.append(matmul_gflops(device))
        for w in workers.values():
            w.stop()

    best = max(gflops)
    final = workers["ours"].final
    results = {"device": final["device"], "threads": final["threads"], "matmul_gflops_best": best,
               "matmul_gflops_median": statistics.median(gflops), "matmul_gflops": gflops, "data": data,
               "shape": final["shape"], "args": {k: v for k, v in vars(args).items() if v is not None}}
    memory = "peak GPU MiB (over start)" if device.startswith("cuda") else "peak RSS MiB (over start)"
    print(f"{data['samples']} samples ({data['mean_tokens']:.0f} tokens, {data['mean_trained']:.1f} trained on average); "
          f"{results['device']}, {results['threads']} torch threads; fp32 matmul (2048^3) best {best:.0f} GFLOP/s, "
          f"median {results['matmul_gflops_median']:.0f} over {len(gflops)} measurements between steps.")
    print()
    print("All timed steps:")
    print()
    sides = {side: summarize(w.records[args.warmup:], w.final, best) for side, w in workers.items()}
    results["all"] = {"sides": sides, "ratios": print_table(sides, memory)}
    quiet = {side: [r for r in w.records[args.warmup:] if r.get("other_load", 1.0) < args.quiet_load]
             for side, w in workers.items()}
    if all(len(rs) == len(w.records[args.warmup:]) for rs, w in zip(quiet.values(), workers.values())):
        print(f"Other processes used less than {args.quiet_load:.0%} of the CPU during every timed step.")
        results["quiet"] = {"max_other_load": args.quiet_load, "all_steps": True}
    elif all(len(rs) >= 3 for rs in quiet.values()):
        print(f"Steps during which other processes used less than {args.quiet_load:.0%} of the CPU:")
        print()
        sides = {side: summarize(rs, workers[side].final, best) for side, rs in quiet.items()}
        results["quiet"] = {"max_other_load": args.quiet_load, "sides": sides, "ratios": print_table(sides, memory)}
    else:
        print(f"Fewer than 3 steps of some side ran while other processes used less than {args.quiet_load:.0%} "
              "of the CPU: the figures above are under load (see `other load`).")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
