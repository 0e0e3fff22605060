"""`mmsearch sft`: cold-start supervised fine-tuning on gold tool-use trajectories, top to bottom.

1. Samples: each gold trajectory rebuilt by the rollout's trajectory code (loss mask = assistant tokens).
2. Plan: token-budget, length-grouped micro-batches; `grad_accum x world_size` of them per step.
3. Model: fp32 weights (bf16 autocast if asked), frozen parts, LoRA, gradient checkpointing.
4. Loop: per window, scale loss sums by the window's trained-token count over all ranks, step,
   log, checkpoint, and evaluate through the agent loop on the validation split.
Launch with `mmsearch sft` (one process), `torchrun --nproc_per_node N .../mmsearch sft` (DDP) or
`deepspeed .../mmsearch sft deepspeed=configs/deepspeed/zero2.json` (ZeRO).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from mmsearch.config import to_yaml
from mmsearch.eval.loaders import LoadReport
from mmsearch.logprobs import TRAIN_INPUTS, collate
from mmsearch.sft.config import SFTConfig
from mmsearch.sft.copying import copy_rows
from mmsearch.sft.loss import CausalLMLoss, window_scale
from mmsearch.sft.samples import SampleLimits, load_samples
from mmsearch.training.batching import plan_epoch, rank_share
from mmsearch.training.checkpoint import (
    check_resumable,
    checkpoint_name,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
    saved_state,
    seed_everything,
)
from mmsearch.training.evaluate import Evaluator, evaluate
from mmsearch.training.metrics import MetricsLog, plot_curves
from mmsearch.training.model import load_policy, trainable_parameters
from mmsearch.training.parallel import all_sum, init_distributed, make_parallel, share_prefix
from mmsearch.training.schedule import lr_lambda

log = logging.getLogger(__name__)

CURVES = [("train", "loss", "train loss (per trained token)"), ("train", "lr", "learning rate"),
          ("eval", "em", "validation EM (agent loop)"), ("eval", "invalid_share", "validation: share with an invalid turn")]


def train_sft(cfg: SFTConfig, resume: bool = False, progress: bool = True) -> dict:
    cfg.check()
    info = init_distributed(cfg.device)
    out = Path(cfg.out)
    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg))
    resume_from = latest_checkpoint(out) if resume else None
    if resume and resume_from is None and info.is_main:
        print(f"no checkpoint in {out} to resume: starting a new run")
    if resume_from is not None:  # before anything is loaded, so a changed config fails with its own message
        check_resumable(saved_state(resume_from)["config"], config_dict, resume_from)
    if resume_from is None and info.is_main and (out / "final").exists():
        raise ValueError(f"{out} already holds a finished run; pass --resume to continue it or choose another out dir")
    seed_everything(cfg.seed)

    # 1. samples (every rank builds the same list; it is cheap next to training)
    from transformers.utils import logging as hf_logging

    from mmsearch.agent.setup import check_image_tools, vision_from_processor
    from mmsearch.model.policy import load_processor
    from mmsearch.protocols import get_protocol
    from mmsearch.trajectory import TrajectoryBuilder
    from tools.config import VisionResizeConfig

    hf_logging.disable_progress_bar()
    processor = load_processor(cfg.model)  # a text-only policy's: its tokenizer
    builder = TrajectoryBuilder(processor, protocol=get_protocol(cfg.protocol))
    cfg.eval.agent.protocol = cfg.protocol  # the policy is evaluated in the protocol it learns
    if cfg.eval.enabled:  # refused now, not at the first eval
        check_image_tools(cfg.eval.tools.enabled, builder.text_only, "eval.tools.enabled")
    vision = vision_from_processor(processor, VisionResizeConfig())
    limits = SampleLimits(cfg.batch.max_tool_response_tokens, cfg.batch.max_seq_tokens)
    if cfg.data:
        samples, report = load_samples(cfg.data, cfg.train_split, builder, vision, limits,
                                       name_swap=cfg.name_swap, kb=cfg.name_swap_kb, seed=cfg.seed,
                                       reading_rows=cfg.reading_rows.rows)
        if not samples:
            raise ValueError(f"no trainable samples in {cfg.data}[{cfg.train_split}] ({report})")
    else:  # a copy stage: copy rows only (configs/sft/copy.yaml)
        samples, report = [], LoadReport()
    mismatch = _prompt_mismatch(samples, cfg, builder.protocol)
    samples += copy_rows(processor.tokenizer, cfg.copy_rows, cfg.seed)
    lengths = [len(s.token_ids) for s in samples]
    trained_tokens = [sum(s.loss_mask[1:]) for s in samples]

    # 2. the plan: every epoch's steps, known up front so the schedule spans the whole run
    per_step = cfg.batch.grad_accum * info.world_size
    plans = [plan_epoch(lengths, cfg.batch.tokens_per_batch, per_step, cfg.seed, e) for e in range(cfg.epochs)]
    if not plans[0].steps:
        raise ValueError(f"{len(samples)} samples make fewer than {per_step} micro-batches: lower batch.tokens_per_batch "
                         "or batch.grad_accum")
    total_steps = sum(len(p.steps) for p in plans)
    if cfg.max_steps > 0:
        while total_steps < cfg.max_steps:  # more epochs until max_steps fit
            plans.append(plan_epoch(lengths, cfg.batch.tokens_per_batch, per_step, cfg.seed, len(plans)))
            total_steps += len(plans[-1].steps)
        total_steps = cfg.max_steps

    # 3. model, optimizer, schedule, parallelism
    model = load_policy(str(resume_from) if resume_from and cfg.lora.r == 0 else cfg.model, info.device, cfg.lora,
                        cfg.freeze, cfg.gradient_checkpointing)
    if cfg.precision == "bf16":
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)  # frozen weights need no fp32 copy
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, total_steps))
    module = CausalLMLoss(model, share_prefix=share_prefix(cfg.batch.share_prefix, cfg.gradient_checkpointing,
                                                          cfg.deepspeed))
    parallel = make_parallel(module, optimizer, scheduler, info, cfg.optim.max_grad_norm, cfg.deepspeed, cfg.precision)

    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "trained_tokens": 0, "seen_tokens": 0, "train_s": 0.0}
    if resume_from is not None:
        saved = load_trainer_state(resume_from, model, parallel, info)
        state = {k: saved[k] for k in state}
        if state["step"] >= total_steps and (out / "result.json").is_file():
            if info.is_main:
                print(f"{out} already finished ({state['step']} steps); its result is {out / 'result.json'}")
            return json.loads((out / "result.json").read_text())
        if info.is_main:
            print(f"resuming from {resume_from} at step {state['step']}")
    metrics = MetricsLog(out, resume_step=state["step"] if resume_from else None) if info.is_main else None
    if info.is_main:
        _write_run_info(out, cfg, report, plans, samples, trained_tokens, params, model, mismatch)
    evaluator = Evaluator(cfg.eval, cfg.data, model, processor, out, parallel)

    # 4. the loop
    model.train()
    autocast = (torch.autocast(device_type=info.device.split(":")[0], dtype=torch.bfloat16)
                if cfg.precision == "bf16" else contextlib.nullcontext())
    pad_id = processor.tokenizer.pad_token_id or 0
    bar = tqdm(total=total_steps, initial=state["step"], desc="sft", unit="step", disable=not (progress and info.is_main))
    window = new_window()
    last_eval = None
    while state["step"] < total_steps:
        plan = plans[state["epoch"]]
        if state["step_in_epoch"] >= len(plan.steps):
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            continue
        mine = rank_share(plan.steps[state["step_in_epoch"]], info.rank, info.world_size)
        scale, window_tokens = window_scale(sum(trained_tokens[i] for b in mine for i in b), info.world_size)
        t0 = time.perf_counter()
        loss_sum = 0.0
        lr = optimizer.param_groups[0]["lr"]  # the rate this step applies (DeepSpeed steps inside the last backward)
        for k, batch_ids in enumerate(mine):
            batch = collate([samples[i] for i in batch_ids], pad_id, builder.image_token_id)
            batch = {key: value.to(info.device) for key, value in batch.items() if key in TRAIN_INPUTS}
            with parallel.accumulating(last=k == len(mine) - 1):
                with autocast:
                    micro_loss, _ = parallel.module(batch)
                parallel.backward(micro_loss * scale)
            loss_sum += float(micro_loss.detach())
        grad_norm = parallel.step()
        step_s = time.perf_counter() - t0
        state["train_s"] += step_s
        state["step"] += 1
        state["step_in_epoch"] += 1
        state["trained_tokens"] += window_tokens
        seen = int(all_sum(sum(lengths[i] for b in mine for i in b), info))
        state["seen_tokens"] += seen
        window["loss_sum"] += all_sum(loss_sum, info)
        window["tokens"] += window_tokens
        window["seen"] += seen
        window["train_s"] += step_s
        window["grad_norm"] = max(window["grad_norm"], grad_norm)
        bar.update(1)

        saving = bool(cfg.save_every) and state["step"] % cfg.save_every == 0
        # a checkpoint step always closes a logging window, so a resumed run logs the same windows
        if info.is_main and (state["step"] % cfg.log_every == 0 or state["step"] == total_steps or saving):
            elapsed = max(window["train_s"], 1e-9)  # eval and checkpoint time are not training throughput
            record = {"loss": window["loss_sum"] / max(1, window["tokens"]), "lr": lr,
                      "grad_norm": window["grad_norm"], "epoch": state["epoch"],
                      "trained_tokens_per_s": window["tokens"] / elapsed, "tokens_per_s": window["seen"] / elapsed,
                      "trained_tokens": state["trained_tokens"], "train_s": state["train_s"]}
            metrics.write(state["step"], "train", record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
            window = new_window()
        done = state["step"] == total_steps
        if cfg.eval.every and (state["step"] % cfg.eval.every == 0) and not done:
            last_eval = evaluate(evaluator, metrics, state["step"], info, CURVES)
            model.train()
        if saving and not done:
            save_checkpoint(out, checkpoint_name(state["step"]), model, processor, parallel,
                            {**state, "config": config_dict}, info, cfg.keep_checkpoints)
            if info.is_main:
                plot_curves(out / "metrics.jsonl", out / "curves.png", CURVES)
    bar.close()

    last_eval = evaluate(evaluator, metrics, state["step"], info, CURVES) or last_eval
    final = save_checkpoint(out, "final", model, processor, parallel, {**state, "config": config_dict}, info,
                            cfg.keep_checkpoints)
    result = {"final": str(final), "steps": state["step"], "trained_tokens": state["trained_tokens"],
              "train_s": state["train_s"], "eval": last_eval}
    if info.is_main:
        metrics.close()
        result["curves"] = str(plot_curves(out / "metrics.jsonl", out / "curves.png", CURVES))
        (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def new_window() -> dict:
    """Sums over the steps since the last train record."""
    return {"loss_sum": 0.0, "tokens": 0, "seen": 0, "train_s": 0.0, "grad_norm": 0.0}



def _prompt_mismatch(samples, cfg: SFTConfig, protocol) -> int:
    """Gold rows whose system prompt is not the one the policy will be served with (its recorded prompt or
    the protocol's, for the eval's tools): a policy trained on one prompt and asked in another fails quietly."""
    from mmsearch.agent.setup import use_recorded_prompt
    from mmsearch.protocols.base import system_prompt_for
    from tools.registry import tool_schemas

    use_recorded_prompt(cfg.eval.agent, cfg.model)  # what the eval's loop will resolve, resolved once here
    served = system_prompt_for(protocol, cfg.eval.agent.system_prompt, tool_schemas(cfg.eval.tools))
    systems = [s.messages[0]["content"] for s in samples if s.messages and s.messages[0]["role"] == "system"]
    mismatch = sum(system != served for system in systems)
    if mismatch:
        log.warning("%d of %d rows were written with another system prompt than the one %s will be served with; "
                    "synthesize with --processor %s, or set agent.system_prompt where it is served",
                    mismatch, len(systems), cfg.model, cfg.model)
    return mismatch


def _write_run_info(out: Path, cfg: SFTConfig, report, plans, samples, trained_tokens, params, model,
                    prompt_mismatch: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_config.yaml").write_text(to_yaml(cfg))
    total = sum(p.numel() for p in model.parameters())
    info = {
        "samples": len(samples), "skipped": dict(report.skipped), "skipped_examples": report.examples_of_skipped,
        "tokens_per_epoch": sum(len(s.token_ids) for s in samples), "trained_tokens_per_epoch": sum(trained_tokens),
        "steps_per_epoch": [len(p.steps) for p in plans],
        "padding_waste": [round(p.padding_waste, 4) for p in plans],
        "dropped_micro_batches": [p.dropped_batches for p in plans],
        "parameters": total, "trainable_parameters": sum(p.numel() for p in params),
        "system_prompt_mismatch": prompt_mismatch,
    }
    (out / "data_report.json").write_text(json.dumps(info, indent=2))
    print(f"sft: {len(samples)} samples ({report}), {sum(trained_tokens)} trained of {info['tokens_per_epoch']} tokens "
          f"per epoch, padding waste {plans[0].padding_waste:.1%}, {info['trainable_parameters']:,} of {total:,} "
          f"parameters trained")
