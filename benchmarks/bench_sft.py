"""Cold-start SFT throughput: the mmsearch trainer step against a plain `transformers.Trainer`.

    python benchmarks/bench_sft.py --model runs/demo/policy --data runs/demo/dataset \
        [--samples 256] [--steps 12] [--rounds 2] [--seconds 0] [--out sft.json]

The samples are built once, here, with `mmsearch.sft.samples.load_samples` (the first `--samples`
train rows) and handed to both sides through one pickle, so both train on the same token ids,
loss masks and pixels. Each side runs in its own process (so its peak memory is its own), and the
two alternate for `--rounds` rounds (A B, B A, ...), so a load change on the machine hits both:
- ours: the step of `mmsearch/sft/train.py` from its library parts: token-budget, length-grouped
  micro-batches (`plan_epoch`), `collate`, `CausalLMLoss` (LM head on trained positions only), the
  window-normalized loss, AdamW and the schedule through `TorchParallel`;
- baseline: `transformers.Trainer` on a fresh copy of the same model, labels -100 off the loss
  mask, the batch padded to its longest, `--hf-batch-size` samples per step in random order.
Both use the recipe's optimizer settings (`--config`, default configs/sft/tiny.yaml). The first
`--warmup` steps are not timed; a step is timed from the end of the previous one, so it includes
fetching and collating its batch. Model FLOPs (formula in BENCHMARKS.md) are counted the same way
for both sides, over real tokens only, and divided by the fp32 matmul throughput measured here.
Prints a Markdown table (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import json
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

SIDES = {"ours": "mmsearch trainer", "hf": "transformers.Trainer"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- machine and model FLOPs

def matmul_gflops(device: str, n: int = 2048, reps: int = 5) -> float:
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
    """Parameter counts by where they apply (per token, per trained token, per patch) and attention widths."""
    lm, visual = model.model.language_model, model.model.visual
    tcfg, vcfg = model.config.text_config, model.config.vision_config
    merger = sum(p.numel() for p in visual.merger.parameters())
    depth = vcfg.depth
    full_blocks = len(getattr(vcfg, "fullatt_block_indexes", range(depth)))
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    return {
        "text_body": sum(p.numel() for n, p in lm.named_parameters() if not n.startswith("embed_tokens")),
        "lm_head": model.lm_head.weight.numel(),
        "vision": sum(p.numel() for p in visual.parameters()) - merger,
        "merger": merger,
        "merge": vcfg.spatial_merge_size**2,
        "layers": tcfg.num_hidden_layers, "attn_width": tcfg.num_attention_heads * head_dim,
        "vision_full_blocks": full_blocks, "vision_window_blocks": depth - full_blocks,
        "vision_width": getattr(vcfg, "hidden_size", None) or vcfg.embed_dim,
        "vision_window_patches": (getattr(vcfg, "window_size", 0) // vcfg.patch_size) ** 2,
    }


def step_flops(shape: dict, lengths: list[int], trained: int, patches: list[int]) -> float:
    """Model FLOPs of one forward + backward over real tokens (padding excluded, LM head on trained tokens)."""
    dense = 6 * (shape["text_body"] * sum(lengths) + shape["lm_head"] * trained
                 + shape["vision"] * sum(patches) + shape["merger"] * sum(patches) / shape["merge"])
    attention = 12 * shape["layers"] * shape["attn_width"] * sum(n * n for n in lengths)
    window = shape["vision_window_patches"] or 10**9
    vision_attention = 12 * shape["vision_width"] * sum(
        shape["vision_full_blocks"] * p * p + shape["vision_window_blocks"] * p * min(p, window) for p in patches)
    return dense + attention + vision_attention


# ---------------------------------------------------------------- the two workers

class StepLog:
    """Per optimizer step: wall time since the previous step ended, tokens, FLOPs."""

    def __init__(self, device: str, shape: dict, warmup: int, steps: int, seconds: float):
        self.device, self.shape, self.warmup, self.steps, self.seconds = device, shape, warmup, steps, seconds
        self.records: list[dict] = []
        self.pending: dict | None = None
        self.last: float | None = None
        self.start = self.timed_s = 0.0

    def batch(self, lengths: list[int], padded: int, trained: int, grids: list[list[int]]) -> None:
        patches = [t * h * w for t, h, w in grids]
        if self.pending is None:
            self.pending = {"samples": 0, "tokens": 0, "padded": 0, "trained": 0, "flops": 0.0}
        p = self.pending
        p["samples"] += len(lengths)
        p["tokens"] += sum(lengths)
        p["padded"] += padded
        p["trained"] += trained
        p["flops"] += step_flops(self.shape, lengths, trained, patches)

    def step_end(self) -> bool:
        """Record the step; True when the budget is spent. The clock starts at the end of the warmup steps."""
        _sync(self.device)
        now = time.perf_counter()
        self.pending["s"] = now - self.last if self.last is not None else 0.0
        self.records.append(self.pending)
        self.pending, self.last = None, now
        if len(self.records) == self.warmup:
            self.start = now
        if len(self.records) <= self.warmup:
            return False
        self.timed_s = now - self.start
        return len(self.records) - self.warmup >= self.steps or 0 < self.seconds <= self.timed_s

    def timed(self) -> list[dict]:
        return self.records[self.warmup:]


def run_ours(cfg: SFTConfig, samples, pad_id: int, image_token_id: int, device: str, steplog: StepLog) -> None:
    from mmsearch.logprobs import collate
    from mmsearch.sft.batching import plan_epoch
    from mmsearch.sft.loss import CausalLMLoss, window_scale
    from mmsearch.sft.model import load_policy, trainable_parameters
    from mmsearch.sft.parallel import DistInfo, TorchParallel
    from mmsearch.sft.train import lr_lambda

    model = load_policy(cfg, cfg.model, device)
    steplog.shape = model_shape(model)
    lengths = [len(s.token_ids) for s in samples]
    trained = [sum(s.loss_mask[1:]) for s in samples]
    total_steps = steplog.warmup + steplog.steps
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    parallel = TorchParallel(CausalLMLoss(model), optimizer, scheduler, DistInfo(device=device), cfg.optim.max_grad_norm)
    model.train()
    memory_mark(device)
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
            with parallel.accumulating(last=k == len(mine) - 1):
                loss, _ = parallel.module(batch)
                parallel.backward(loss * scale)
            steplog.batch([lengths[i] for i in ids], batch["input_ids"].numel(), sum(trained[i] for i in ids),
                          [g for i in ids for g in samples[i].image_grid_thw])
        parallel.step()
        if steplog.step_end():
            return


class _HFSamples(torch.utils.data.Dataset):
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
    """Plain padding: right-pad every field to the batch's longest; pixels concatenated in sample order."""

    def collator(items: list[dict]) -> dict:
        longest = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for row, x in enumerate(items):
            n = len(x["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = x["input_ids"], x["labels"], 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                 "mm_token_type_ids": (ids == image_token_id).int()}
        with_pixels = [x for x in items if "pixel_values" in x]
        if with_pixels:
            batch["pixel_values"] = torch.cat([x["pixel_values"] for x in with_pixels])
            batch["image_grid_thw"] = torch.cat([x["image_grid_thw"] for x in with_pixels])
        return batch

    return collator


def run_hf(cfg: SFTConfig, samples, pad_id: int, image_token_id: int, device: str, steplog: StepLog,
           batch_size: int, workdir: str) -> None:
    from transformers import AutoModelForImageTextToText, Trainer, TrainerCallback, TrainingArguments

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            memory_mark(device)  # after the Trainer has built its optimizer and dataloader

        def on_step_end(self, args, state, control, **kwargs):
            if steplog.step_end():
                control.should_training_stop = True

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            steplog.batch(mask.sum(1).tolist(), mask.numel(), int(inputs["labels"][:, 1:].ne(-100).sum()),
                          inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else [])
            return super().training_step(model, inputs, num_items_in_batch)

    model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=torch.float32)
    steplog.shape = model_shape(model)
    o = cfg.optim
    schedule = {"cosine": ("cosine_with_min_lr", {"min_lr_rate": o.min_lr_ratio}), "linear": ("linear", {}),
                "constant": ("constant_with_warmup", {})}[o.schedule]
    args = TrainingArguments(
        output_dir=workdir, max_steps=steplog.warmup + steplog.steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=cfg.batch.grad_accum, learning_rate=o.lr, adam_beta1=o.betas[0],
        adam_beta2=o.betas[1], weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm, warmup_steps=o.warmup_steps,
        lr_scheduler_type=schedule[0], lr_scheduler_kwargs=schedule[1], seed=cfg.seed, data_seed=cfg.seed,
        remove_unused_columns=False, eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=device == "cpu", dataloader_num_workers=0, bf16=False, fp16=False,
    )
    trainer = CountingTrainer(model=model, args=args, train_dataset=_HFSamples(samples),
                              data_collator=pad_to_longest(pad_id, image_token_id), callbacks=[Timer()])
    trainer.train()


_MARK: dict = {}


def memory_mark(device: str) -> None:
    """Memory when training starts (model, optimizer and samples loaded)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        _MARK["start_mib"] = torch.cuda.memory_allocated() / 2**20
    else:
        import psutil

        _MARK["start_mib"] = psutil.Process().memory_info().rss / 2**20


def memory_peak(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> None:
    from tools.device import resolve_device

    cfg = load_config(SFTConfig, args.config, {"model": args.model, "data": args.data})
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    with open(args.samples_file, "rb") as f:
        shared = pickle.load(f)
    steplog = StepLog(device, {}, args.warmup, args.steps, args.seconds)
    common = (cfg, shared["samples"], shared["pad_id"], shared["image_token_id"], device, steplog)
    if args.worker == "ours":
        run_ours(*common)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_sft_hf_") as workdir:
            run_hf(*common, args.hf_batch_size, workdir)
    timed = steplog.timed()
    result = {"side": args.worker, "device": device, "threads": torch.get_num_threads(), "steps": len(timed),
              "seconds": sum(r["s"] for r in timed), "peak_mib": memory_peak(device), "start_mib": _MARK["start_mib"],
              "shape": steplog.shape, "step_seconds": [r["s"] for r in timed]}
    for key in ("samples", "tokens", "padded", "trained", "flops"):
        result[key] = sum(r[key] for r in timed)
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------- the driver

def build_samples(args: argparse.Namespace, path: Path) -> dict:
    from transformers import AutoProcessor
    from transformers.utils import logging as hf_logging

    from mmsearch.agent.setup import vision_from_processor
    from mmsearch.sft.samples import SampleLimits, load_samples
    from mmsearch.trajectory import TrajectoryBuilder
    from tools.config import VisionResizeConfig

    cfg = load_config(SFTConfig, args.config, {"model": args.model, "data": args.data})
    hf_logging.disable_progress_bar()
    processor = AutoProcessor.from_pretrained(cfg.model)
    builder = TrajectoryBuilder(processor)
    limits = SampleLimits(cfg.batch.max_tool_response_tokens, cfg.batch.max_seq_tokens)
    t0 = time.perf_counter()
    samples, report = load_samples(cfg.data, cfg.train_split, builder, vision_from_processor(processor, VisionResizeConfig()),
                                   limits, limit=args.samples)
    info = {"samples": len(samples), "build_s": time.perf_counter() - t0,
            "mean_tokens": statistics.mean(len(s.token_ids) for s in samples),
            "mean_trained": statistics.mean(sum(s.loss_mask[1:]) for s in samples),
            "tokens_per_batch": cfg.batch.tokens_per_batch, "lr": cfg.optim.lr}
    with open(path, "wb") as f:
        pickle.dump({"samples": samples, "pad_id": processor.tokenizer.pad_token_id or 0,
                     "image_token_id": builder.image_token_id}, f)
    log(f"built {len(samples)} samples ({report}) in {info['build_s']:.1f} s")
    return info


def summarize(runs: list[dict], gflops: float) -> dict:
    seconds = sum(r["seconds"] for r in runs)
    total = {k: sum(r[k] for r in runs) for k in ("steps", "samples", "tokens", "padded", "trained", "flops")}
    return {**total, "seconds": seconds, "trained_per_s": total["trained"] / seconds,
            "tokens_per_s": total["tokens"] / seconds, "padding_share": 1 - total["tokens"] / total["padded"],
            "s_per_step": seconds / total["steps"], "samples_per_step": total["samples"] / total["steps"],
            "padded_per_step": total["padded"] / total["steps"], "model_gflops_per_s": total["flops"] / seconds / 1e9,
            "mfu": total["flops"] / seconds / 1e9 / gflops,
            "peak_mib": max(r["peak_mib"] for r in runs), "start_mib": max(r["start_mib"] for r in runs),
            "rounds_trained_per_s": [r["trained"] / r["seconds"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo/policy", help="policy dir (model + processor)")
    parser.add_argument("--data", default="runs/demo/dataset", help="dataset dir from mmsearch synth, with gold messages")
    parser.add_argument("--config", default="configs/sft/tiny.yaml", help="SFT recipe: token budget and optimizer")
    parser.add_argument("--samples", type=int, default=256, help="use the first N train rows")
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per side per round")
    parser.add_argument("--seconds", type=float, default=0, help="> 0: also stop a side's round after this many s")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both sides (A B, B A, ...)")
    parser.add_argument("--hf-batch-size", type=int, default=8, help="baseline samples per step")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--samples-file", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: a step is timed from the end of the one before")
    if args.worker:
        worker(args)
        return

    from tools.device import resolve_device

    device = resolve_device(load_config(SFTConfig, args.config).device)
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        data = build_samples(args, Path(tmp, "samples.pkl"))
        gflops = [matmul_gflops(device)]
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        for round_ in range(args.rounds):
            for side in (list(SIDES) if round_ % 2 == 0 else list(SIDES)[::-1]):
                result = Path(tmp, f"{side}-{round_}.json")
                cmd = [sys.executable, __file__, "--worker", side, "--samples-file", str(Path(tmp, "samples.pkl")),
                       "--result", str(result), "--model", args.model, "--data", args.data, "--config", args.config,
                       "--steps", str(args.steps), "--seconds", str(args.seconds), "--warmup", str(args.warmup),
                       "--hf-batch-size", str(args.hf_batch_size)]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                runs[side].append(json.loads(result.read_text()))
                r = runs[side][-1]
                log(f"round {round_ + 1} {side}: {r['steps']} steps in {r['seconds']:.1f} s, "
                    f"{r['trained'] / r['seconds']:.0f} trained tok/s, peak {r['peak_mib']:.0f} MiB")
        gflops.append(matmul_gflops(device))

    best = max(gflops)
    sides = {side: summarize(rs, best) for side, rs in runs.items()}
    ours, hf = sides["ours"], sides["hf"]
    ratios = [o["trained"] / o["seconds"] / (h["trained"] / h["seconds"]) for o, h in zip(runs["ours"], runs["hf"])]
    results = {"device": device, "threads": runs["ours"][0]["threads"], "matmul_gflops": gflops, "data": data,
               "shape": runs["ours"][0]["shape"], "args": {k: v for k, v in vars(args).items() if v is not None},
               "sides": sides, "runs": runs, "ratio_pooled": ours["trained_per_s"] / hf["trained_per_s"],
               "ratio_by_round": ratios, "ratio_median": statistics.median(ratios)}

    mem = "peak GPU MiB (over start)" if device.startswith("cuda") else "peak RSS MiB (over start)"
    print(f"| side | steps | samples/step | padded tok/step | s/step | trained tok/s | all tok/s (non-pad) | "
          f"padding share | {mem} | model GFLOP/s | MFU |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for side, s in sides.items():
        print(f"| {SIDES[side]} | {s['steps']} | {s['samples_per_step']:.1f} | {s['padded_per_step']:.0f} | "
              f"{s['s_per_step']:.2f} | **{s['trained_per_s']:.0f}** | {s['tokens_per_s']:.0f} | "
              f"{s['padding_share']:.1%} | {s['peak_mib']:.0f} ({s['peak_mib'] - s['start_mib']:+.0f}) | "
              f"{s['model_gflops_per_s']:.1f} | {s['mfu']:.1%} |")
    print(f"| **ours / baseline** | | | | | **{results['ratio_pooled']:.2f}x** | "
          f"{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x | | {ours['peak_mib'] / hf['peak_mib']:.2f}x | | |")
    print()
    print(f"{data['samples']} samples ({data['mean_tokens']:.0f} tokens, {data['mean_trained']:.0f} trained on "
          f"average), {device}, {results['threads']} torch threads; fp32 matmul {best:.0f} GFLOP/s "
          f"(best of {', '.join(f'{g:.0f}' for g in gflops)}); trained-token ratio by round: "
          f"{', '.join(f'{r:.2f}x' for r in ratios)} (median {results['ratio_median']:.2f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
