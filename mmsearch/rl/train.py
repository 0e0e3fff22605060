"""`mmsearch rl`: GRPO-family RL (and PPO) on live multi-turn rollouts with the real tools, top to bottom.

One step:
1. Draw B questions (a seeded order per epoch; its position is trainer state) and roll out G samples
   of each through the agent loop, generating with the very module being trained (`hf` engine) or
   with a vLLM copy colocated on the same GPU (`vllm` engine, `rollout.vllm`).
2. Score every trajectory with the configured reward functions (`mmsearch.rewards`). With DAPO's
   dynamic sampling, groups whose rewards are all equal are dropped and more questions rolled out.
3. Scoring pass without gradients: the trainer's log-probs of the generated tokens (not when the step
   is exactly on-policy, `algorithm.old_logprobs`: then the update's own forward, on the weights that
   generated them, gives them), the reference policy's (only when kl_coef > 0) and the critic's values
   (PPO only).
4. Advantages from groups formed by example id (GRPO, Dr. GRPO, RLOO, REINFORCE++), or per token by
   GAE with the critic (PPO, Search-R1's main setting).
5. K passes of mini-batch updates of the clipped surrogate over the generated tokens only (the loss
   mask, DESIGN.md invariant 2); every mini-batch's loss is normalised over the whole mini-batch
   across ranks, whatever the micro-batching.
6. Push the weights to the engine (nothing to copy for `hf`; `vllm` loads them, LoRA merged), log (the
   engine/trainer mismatch every step, the likelihood probe every `lld_probe_every` steps), check for
   collapse, checkpoint, eval.

How it departs from textbook GRPO (DeepSeekMath): no KL term by default (kl_coef=0, as DAPO and
Dr. GRPO argue; no reference model is even loaded), a constant small learning rate, tool outputs
masked out of the loss, and old log-probs that are the trainer's (recomputed before the update unless the
step is exactly on-policy, `algorithm.old_logprobs`) so the engine's numerics only enter through the
truncated importance-sampling correction (optional with `hf`; required with `vllm`, whose separate copy
never scores exactly as the trainer does).

Launch: `mmsearch rl --config configs/rl/tiny.yaml --model runs/sft/final --data runs/dataset
--index runs/index --out runs/rl`; on a GPU with vLLM rollouts add `rollout.engine=vllm algorithm.tis_cap=2`;
on several GPUs `torchrun --nproc_per_node N $(which mmsearch) rl ...` (each rank rolls out its own share
of whole groups, with its own colocated vLLM under `rollout.engine=vllm`; gradients are all-reduced by DDP).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from mmsearch.config import to_yaml
from mmsearch.logprobs import TRAIN_INPUTS, TokenScorer, collate
from mmsearch.rewards import compute_rewards_batch
from mmsearch.rl import algos
from mmsearch.rl.config import RLConfig
from mmsearch.rl.critic import ValueModel, value_loss
from mmsearch.rl.guard import Collapsed, CollapseGuard
from mmsearch.rl.metrics import CURVES, rollout_metrics
from mmsearch.rl.rollout import PromptStream, Rollouts
from mmsearch.training.batching import pack
from mmsearch.training.checkpoint import (
    check_resumable,
    checkpoint_name,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
    saved_state,
    seed_everything,
)
from mmsearch.training.config import FreezeConfig, LoraConfig
from mmsearch.training.evaluate import Evaluator, evaluate
from mmsearch.training.metrics import MetricsLog, plot_curves
from mmsearch.training.model import hf_model, load_policy, trainable_parameters
from mmsearch.training.parallel import (
    DistInfo,
    TorchParallel,
    all_max,
    all_sum,
    barrier,
    init_distributed,
    make_parallel,
    share_prefix,
    split_to,
)
from mmsearch.training.schedule import lr_lambda
from mmsearch.trajectory import Trajectory


def train_rl(cfg: RLConfig, resume: bool = False, progress: bool = True) -> dict:
    cfg.check()
    info = init_distributed(cfg.device)
    if cfg.rollout.prompts_per_step % info.world_size:
        raise ValueError(f"rollout.prompts_per_step ({cfg.rollout.prompts_per_step}) must divide evenly over "
                         f"{info.world_size} ranks (whole groups stay on one rank)")
    out = Path(cfg.out)
    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg))
    resume_from = latest_checkpoint(out) if resume else None
    if resume and resume_from is None and info.is_main:
        print(f"no checkpoint in {out} to resume: starting a new run")
    if resume_from is not None:
        check_resumable(saved_state(resume_from)["config"], config_dict, resume_from)
    if resume_from is None and info.is_main and (out / "final").exists():
        raise ValueError(f"{out} already holds a finished run; pass --resume to continue it or choose another out dir")
    seed_everything(cfg.seed)

    # data and the reward functions' needs, checked before anything heavy is loaded
    from mmsearch.agent.setup import check_image_tools
    from mmsearch.eval.loaders import load_examples
    from mmsearch.model.policy import is_text_only, load_processor
    from mmsearch.protocols import get_protocol
    from mmsearch.rewards import check_reward_fields

    processor = load_processor(cfg.model)  # a text-only policy's: its tokenizer
    text_only = is_text_only(processor)
    check_image_tools(cfg.rollout.tools.enabled, text_only, "rollout.tools.enabled")
    get_protocol(cfg.rollout.agent.protocol).check_tools(cfg.rollout.tools.enabled)  # before the weights load
    if cfg.eval.enabled:
        check_image_tools(cfg.eval.tools.enabled, text_only, "eval.tools.enabled")
    examples, load_report = load_examples(cfg.data, split=cfg.train_split, text_only=text_only)
    if not examples:
        raise ValueError(f"no usable examples in {cfg.data}[{cfg.train_split}] ({load_report})")
    check_reward_fields(cfg.rewards, examples)
    by_id = {ex.id: ex for ex in examples}

    # the policy, its optimizer, the reference policy and the critic
    a = cfg.algorithm
    updates_per_step = a.ppo_epochs * a.mini_batches
    start_weights = str(resume_from) if resume_from and cfg.lora.r == 0 else cfg.model
    model = load_policy(start_weights, info.device, cfg.lora, cfg.freeze, cfg.gradient_checkpointing)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.steps * updates_per_step))
    temperature = cfg.rollout.agent.sampling.temperature
    share = share_prefix(True, cfg.gradient_checkpointing, cfg.deepspeed)
    parallel = make_parallel(TokenScorer(model, temperature, share), optimizer, scheduler, info, cfg.optim.max_grad_norm,
                             cfg.deepspeed, cfg.precision)
    ref = None
    if a.kl_coef > 0:  # kl_coef = 0 loads no reference model at all
        ref = TokenScorer(load_policy(cfg.model, info.device, LoraConfig(), FreezeConfig(True, True)).eval(),
                          temperature, share).requires_grad_(False)
    critic = critic_parallel = None
    if a.advantage == "gae":
        critic = ValueModel(cfg.model, info.device)
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic.lr, foreach=True)
        critic_sched = torch.optim.lr_scheduler.LambdaLR(critic_opt, lambda _: 1.0)
        critic_parallel = TorchParallel(critic, critic_opt, critic_sched, info, cfg.optim.max_grad_norm)

    stream = PromptStream(examples, cfg.seed)
    guard = CollapseGuard(cfg.guard, model.config.get_text_config().vocab_size)
    state = {"step": 0, "train_s": 0.0}
    if resume_from is not None:
        saved = _restore(resume_from, model, parallel, critic, critic_parallel, info)
        state = {k: saved[k] for k in state}
        stream = PromptStream(examples, cfg.seed, **saved["stream"])
        guard = CollapseGuard(cfg.guard, model.config.get_text_config().vocab_size, saved["guard"])
        if state["step"] >= cfg.steps and (out / "result.json").is_file():
            if info.is_main:
                print(f"{out} already finished ({state['step']} steps); its result is {out / 'result.json'}")
            return json.loads((out / "result.json").read_text())
        if info.is_main:
            print(f"resuming from {resume_from} at step {state['step']}")

    rollouts = Rollouts(cfg, model, processor, info.rank)
    # the engine starts from exactly the trainer's weights (a resumed run's, LoRA merged); nothing to copy for hf
    rollouts.push_weights()
    metrics = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rl_config.yaml").write_text(to_yaml(cfg))
        metrics = MetricsLog(out, resume_step=state["step"] if resume_from else None,
                             tensorboard="tensorboard" in cfg.logger,
                             wandb_config=dict(config_dict) if "wandb" in cfg.logger else None)
        print(f"rl: {len(examples)} training questions ({load_report}); {cfg.rollout.prompts_per_step} x "
              f"{cfg.rollout.group_size} trajectories per step, {a.advantage}, {cfg.steps} steps")
    eval_cfg = cfg.eval
    eval_cfg.index, eval_cfg.server = cfg.index, list(cfg.server)
    eval_cfg.agent.protocol = cfg.rollout.agent.protocol  # the policy is evaluated in the protocol it learns
    evaluator = Evaluator(eval_cfg, cfg.data, model, processor, out, parallel)
    autocast = (torch.autocast(device_type=info.device.split(":")[0], dtype=torch.bfloat16)
                if cfg.precision == "bf16" else contextlib.nullcontext())
    pad_id = processor.tokenizer.pad_token_id or 0
    image_token_id = getattr(model.config, "image_token_id", None)  # None: a text-only policy

    def save(name: str) -> Path:
        def extra(folder: Path) -> None:
            if critic is not None:
                critic.save(folder / "critic.pt", critic_parallel.optimizer)

        full_state = {**state, "stream": stream.state(), "guard": guard.state(), "config": config_dict}
        return save_checkpoint(out, name, model, processor, parallel, full_state, info, cfg.keep_checkpoints, extra)

    bar = tqdm(total=cfg.steps, initial=state["step"], desc="rl", unit="step", disable=not (progress and info.is_main))
    last_eval = None
    model.train()
    while state["step"] < cfg.steps:
        step = state["step"] + 1
        t_step = time.perf_counter()
        times: dict[str, float] = defaultdict(float)

        # 1-2. rollouts and rewards (with dynamic sampling's refills)
        groups, generated, sampling_info = _collect(cfg, rollouts, stream, by_id, step, info, times)
        flat = [t for g in groups for t in g]

        # 3-5. scoring, advantages, updates
        update = {}
        if flat:
            batch = _score(cfg, flat, parallel, ref, critic, pad_id, image_token_id, step, times, autocast, info)
            _advantages(cfg, flat, batch)
            t0 = time.perf_counter()
            train_policy = critic is None or step > cfg.critic.warmup_steps
            update = _update(cfg, flat, batch, parallel, critic_parallel, pad_id, image_token_id, step, info,
                             autocast, train_policy)
            times["update"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            # invariant 4, measured: how far the engine's log-probs are from the trainer's on the same weights
            update.update(_mismatch(batch["trainer"], batch["rollout"], batch["generated_mask"], info))
            if cfg.lld_probe_every and step % cfg.lld_probe_every == 0:
                update.update(_likelihood_probe(flat, batch, parallel, pad_id, image_token_id, autocast, info))
            times["scoring"] += time.perf_counter() - t0
        times["weight_sync"] += rollouts.push_weights()
        step_s = time.perf_counter() - t_step
        state["train_s"] += step_s
        state["step"] = step
        bar.update(1)

        # 6. metrics, trajectories, collapse guard, checkpoint, eval
        record = rollout_metrics(_gather(generated, info), by_id)
        record.update(update)
        record.update(sampling_info)
        record.update({f"time/{k}": v for k, v in times.items()})
        record.update({"time/step": step_s, "lr": parallel.optimizer.param_groups[0]["lr"],
                       "trajectories_per_s": all_sum(len(flat), info) / step_s,
                       "trained_tokens_per_s": all_sum(sum(batch["n_trained"]) if flat else 0, info) / step_s})
        verdict = guard.check(step, record)
        if info.is_main:
            metrics.write(step, "train", record)
            _write_trajectories(out, step, groups, cfg.log_trajectories)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record['accuracy']:.2f}")
        if verdict is not None:
            _act_on_collapse(cfg, out, verdict, guard, model, parallel, info)
            rollouts.push_weights()  # a rollback changed the weights the engine must generate with
            continue
        saving = bool(cfg.save_every) and step % cfg.save_every == 0 and step < cfg.steps
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.steps:
            last_eval = evaluate(evaluator, metrics, step, info, CURVES)
            model.train()
        if saving:
            save(checkpoint_name(step))
            if info.is_main:
                plot_curves(out / "metrics.jsonl", out / "curves.png", CURVES)
    bar.close()

    last_eval = evaluate(evaluator, metrics, state["step"], info, CURVES) or last_eval
    final = save("final")
    rollouts.close()
    result = {"final": str(final), "steps": state["step"], "train_s": state["train_s"], "eval": last_eval}
    if info.is_main:
        metrics.close()
        result["curves"] = str(plot_curves(out / "metrics.jsonl", out / "curves.png", CURVES))
        (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


# -- 1-2. rollouts and rewards ------------------------------------------------------------------------

def _collect(cfg: RLConfig, rollouts: Rollouts, stream: PromptStream, by_id: dict, step: int, info: DistInfo,
             times: dict) -> tuple[list[list[Trajectory]], list[Trajectory], dict]:
    """This rank's groups to train on, every trajectory generated this step, and dynamic sampling's counts."""
    a, r = cfg.algorithm, cfg.rollout
    want = r.prompts_per_step // info.world_size
    kept: list[list[Trajectory]] = []
    generated: list[Trajectory] = []
    uninformative: list[list[Trajectory]] = []
    dropped = 0
    for round_ in range(1 + (a.max_refills if a.dynamic_sampling else 0)):
        prompts = stream.take(r.prompts_per_step)[info.rank::info.world_size]  # every rank advances alike
        trajectories, timings = rollouts.run(prompts, step, round_)
        times["generate"] += timings.generate_s
        times["tools"] += timings.tools_s
        t0 = time.perf_counter()
        compute_rewards_batch(trajectories, by_id, cfg.rewards)
        if a.overlong == "penalty":
            lengths = torch.tensor([float(t.n_generated) for t in trajectories])
            limit = cfg.rollout.agent.max_new_tokens_per_trajectory
            penalties = algos.overlong_penalty(lengths, limit, min(a.overlong_buffer, limit), a.overlong_penalty)
            for t, p in zip(trajectories, penalties.tolist()):
                t.rewards["overlong_penalty"] = p
                t.rewards["reward"] += p
        times["reward"] += time.perf_counter() - t0
        generated += trajectories
        groups = _groups(trajectories)
        if a.dynamic_sampling:
            rewards = torch.tensor([t.rewards["reward"] for t in trajectories])
            keep = algos.dynamic_sampling_keep(rewards, algos.group_index([t.example_id for t in trajectories]))
            position = {id(t): i for i, t in enumerate(trajectories)}
            informative = [g for g in groups if keep[position[id(g[0])]]]
            uninformative += [g for g in groups if not keep[position[id(g[0])]]]
            dropped += len(groups) - len(informative)
            groups = informative
        kept += groups
        # every rank rolls out the same number of rounds, so the prompt streams stay in step
        if all_sum(float(len(kept) < want), info) == 0:
            break
    info_record = {"groups_kept": float(min(len(kept), want))}
    if a.dynamic_sampling:
        info_record.update({"groups_dropped": float(dropped), "refill_rounds": float(round_)})
    if info.world_size > 1 and len(kept) < want:
        # every rank must run the same mini-batches (their collectives pair up): top up with dropped groups,
        # whose advantages are zero
        kept += uninformative[:want - len(kept)]
    return kept[:want], generated, info_record


def _groups(trajectories: list[Trajectory]) -> list[list[Trajectory]]:
    """Trajectories grouped by example id (never by position), groups in order of first appearance."""
    by_example: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        by_example.setdefault(t.example_id, []).append(t)
    return list(by_example.values())


# -- 3. scoring pass ------------------------------------------------------------------------------------------

def _micro_batches(lengths: list[int], budget: int, tag: str) -> list[list[int]]:
    """Token-budget micro-batches of positions in `lengths`, in a fixed order per `tag` (a longer sample goes alone)."""
    return pack(lengths, max(budget, max(lengths)), seed=0, epoch=tag)


def _old_logprobs_from_update(cfg: RLConfig) -> bool:
    """Whether the trainer's pre-update log-probs come from the training forward itself, with no pass of their own.

    Only where that is the same number: one optimizer update per step (each trajectory is scored by the
    training forward on exactly the weights that generated it, before any step), the engine is the module
    being trained, nothing needs them before the update (GAE's critic, KL in the reward), and no dropout
    (a second forward would draw another mask). LLD's hinge (relu(old - logp)) sits at its kink there, so
    the recomputed pass's float noise would pick its gradient: with lld_coef > 0 the pass runs as before.
    """
    a = cfg.algorithm
    return (a.old_logprobs != "recompute" and a.ppo_epochs == 1 and a.mini_batches == 1
            and cfg.rollout.engine == "hf" and a.advantage != "gae" and not (a.kl_coef > 0 and a.kl_in_reward)
            and a.lld_coef == 0 and (cfg.lora.r == 0 or cfg.lora.dropout == 0))


@torch.no_grad()
def _score(cfg: RLConfig, flat: list[Trajectory], parallel, ref, critic, pad_id: int, image_token_id: int,
           step: int, times: dict, autocast, info: DistInfo) -> dict:
    """Per-trajectory 1-D tensors: old, trainer, rollout and reference log-probs, values, loss masks.

    With `_old_logprobs_from_update`, "trainer" (and "old", unless they are the engine's) stay None here:
    `_update` fills them from its forward, before it steps.
    """
    t0 = time.perf_counter()
    a = cfg.algorithm
    n = len(flat)
    recompute = not _old_logprobs_from_update(cfg)
    out: dict = {k: [None] * n for k in ("trainer", "ref", "values")}
    out["old_from_update"] = not recompute
    out["mask"] = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in flat]
    out["rollout"] = [torch.tensor(t.logprobs, dtype=torch.float32) for t in flat]
    scorer = parallel.module.module if hasattr(parallel.module, "module") else parallel.module
    batches = (_micro_batches([len(t.token_ids) for t in flat], a.tokens_per_micro_batch, f"score:{step}")
               if recompute or ref is not None or critic is not None else [])
    for ids in batches:
        batch = _batch([flat[i] for i in ids], pad_id, image_token_id, scorer)
        with autocast:
            trainer_logp = scorer(batch)[0].float() if recompute else None
            ref_logp = ref(batch)[0].float() if ref is not None else None
            values = critic(batch).float() if critic is not None else None
        for row, i in enumerate(ids):
            length = len(flat[i].token_ids)
            if trainer_logp is not None:
                out["trainer"][i] = trainer_logp[row, :length].cpu()
            if ref_logp is not None:
                out["ref"][i] = ref_logp[row, :length].cpu()
            if values is not None:
                out["values"][i] = values[row, :length].cpu()
    out["n_trained"] = [int(m[1:].sum()) for m in out["mask"]]
    out["old"] = list(out["rollout"] if a.old_logprobs == "engine" else out["trainer"])
    out["generated_mask"] = list(out["mask"])  # the mismatch covers every generated token, filtered or not
    if a.overlong == "filter":  # trajectories cut by the token limit carry no loss
        for i, t in enumerate(flat):
            if t.stop_reason == "max_tokens":
                out["mask"][i] = torch.zeros_like(out["mask"][i])
    times["scoring"] += time.perf_counter() - t0
    return out


def _mismatch(trainer: list[torch.Tensor], rollout: list[torch.Tensor], masks: list[torch.Tensor], info: DistInfo
              ) -> dict[str, float]:
    """Mean and max of exp(trainer - engine log-prob) over generated tokens, and its effective sample size share."""
    ratios = torch.cat([torch.exp(t - r)[m.bool()] for t, r, m in zip(trainer, rollout, masks)])
    n = all_sum(float(ratios.numel()), info)
    total, squares = all_sum(float(ratios.sum()), info), all_sum(float((ratios ** 2).sum()), info)
    return {"mismatch/ratio_mean": total / max(n, 1.0),
            "mismatch/ratio_max": all_max(float(ratios.max()) if ratios.numel() else 0.0, info),
            "mismatch/ess": total ** 2 / (n * squares) if squares > 0 else 0.0}


def _batch(trajectories: list[Trajectory], pad_id: int, image_token_id: int, scorer) -> dict:
    device = next(scorer.parameters()).device
    batch = collate(trajectories, pad_id, image_token_id)
    return {k: v.to(device) if k in TRAIN_INPUTS else v for k, v in batch.items()}


# -- 4. advantages -------------------------------------------------------------------------------------------

def _advantages(cfg: RLConfig, flat: list[Trajectory], batch: dict) -> None:
    """Fills batch["advantages"] (per-token 1-D tensors) and, for PPO, batch["returns"]."""
    a = cfg.algorithm
    rewards = torch.tensor([t.rewards["reward"] for t in flat], dtype=torch.float32)
    kl_sums = None
    if a.kl_coef > 0 and a.kl_in_reward:
        kl_sums = [(algos.kl_estimate(o, r, a.kl_estimator) * m).sum() for o, r, m in
                   zip(batch["old"], batch["ref"], batch["mask"])]
    if a.advantage == "gae":
        longest = max(len(m) for m in batch["mask"])
        mask = _pad(batch["mask"], longest)
        token_rewards = torch.zeros_like(mask)
        for i, m in enumerate(batch["mask"]):
            trained = m.nonzero()
            if len(trained):
                token_rewards[i, int(trained[-1])] = rewards[i]
        if kl_sums is not None:
            kl = algos.kl_estimate(_pad(batch["old"], longest), _pad(batch["ref"], longest), a.kl_estimator)
            token_rewards -= a.kl_coef * kl * mask
        adv, returns = algos.gae_advantages(token_rewards, _pad(batch["values"], longest), mask, a.gamma, a.lam)
        batch["advantages"] = [adv[i, :len(m)] for i, m in enumerate(batch["mask"])]
        batch["returns"] = [returns[i, :len(m)] for i, m in enumerate(batch["mask"])]
        batch["seq_advantage"] = [float(algos.masked_mean(x, m)) if m.sum() else 0.0
                                  for x, m in zip(batch["advantages"], batch["mask"])]
        return
    if kl_sums is not None:
        rewards = rewards - a.kl_coef * torch.stack(kl_sums)
    groups = algos.group_index([t.example_id for t in flat])
    seq_adv = algos.compute_advantages(a.advantage, rewards, groups)
    batch["seq_advantage"] = seq_adv.tolist()
    batch["advantages"] = [float(s) * m for s, m in zip(seq_adv, batch["mask"])]


def _pad(rows: list[torch.Tensor], longest: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(r, (0, longest - len(r))) for r in rows])


# -- 5. updates -----------------------------------------------------------------------------------------------

def _update(cfg: RLConfig, flat: list[Trajectory], scored: dict, parallel, critic_parallel, pad_id: int,
            image_token_id: int, step: int, info: DistInfo, autocast, train_policy: bool) -> dict:
    """K passes of mini-batch updates; the token-weighted means of the loss terms and statistics."""
    a = cfg.algorithm
    n = len(flat)
    sums: dict[str, float] = defaultdict(float)  # token-weighted statistics
    counts: dict[str, float] = defaultdict(float)
    losses: dict[str, float] = defaultdict(float)  # loss terms: summed over micro-batches, averaged over updates
    grad_norms = []
    norm_len = a.norm_len or cfg.rollout.agent.max_new_tokens_per_trajectory
    scorer = parallel.module
    order = list(range(n))
    for epoch in range(a.ppo_epochs):
        random.Random(f"{cfg.seed}:update:{step}:{epoch}").shuffle(order)
        size = math.ceil(n / a.mini_batches)
        for start in range(0, n, size):
            mini = order[start:start + size]
            global_tokens = all_sum(float(sum(scored["mask"][i][1:].sum() for i in mini)), info)
            global_seqs = all_sum(float(len(mini)), info)
            micro = _micro_batches([len(flat[i].token_ids) for i in mini], a.tokens_per_micro_batch,
                                   f"update:{step}:{epoch}:{start}")
            micro = split_to(micro, int(all_max(float(len(micro)), info)))  # as many on every rank (ZeRO)
            for k, positions in enumerate(micro):
                ids = [mini[p] for p in positions]
                batch = _batch([flat[i] for i in ids], pad_id, image_token_id, scorer)
                longest = batch["input_ids"].shape[1]
                device = batch["input_ids"].device
                mask = _pad([scored["mask"][i] for i in ids], longest).to(device)
                adv = _pad([scored["advantages"][i] for i in ids], longest).to(device)
                last = k == len(micro) - 1
                if train_policy:
                    with parallel.accumulating(last=last):
                        with autocast:
                            logp, entropy = scorer(batch, with_entropy=True)
                        logp = logp.float()
                        if scored["old_from_update"]:  # no step yet: these are the weights that generated them
                            for row, i in enumerate(ids):
                                scored["trainer"][i] = logp[row, :len(flat[i].token_ids)].detach().cpu()
                                if a.old_logprobs != "engine":
                                    scored["old"][i] = scored["trainer"][i]
                        old = _pad([scored["old"][i] for i in ids], longest).to(device)
                        loss, terms, stats = _policy_objective(cfg, logp, entropy.float(), old, adv, mask,
                                                               scored, ids, global_tokens, global_seqs, norm_len,
                                                               longest, device)
                        parallel.backward(loss * info.world_size)  # DDP averages gradients: make it the sum
                    tokens = float(mask.sum())
                    for key, value in stats.items():
                        sums[key] += value * tokens
                        counts[key] += tokens
                    for key, value in terms.items():
                        losses[key] += value
                if critic_parallel is not None:
                    with critic_parallel.accumulating(last=last):
                        with autocast:
                            values = critic_parallel.module(batch).float()
                        old_values = _pad([scored["values"][i] for i in ids], longest).to(device)
                        returns = _pad([scored["returns"][i] for i in ids], longest).to(device)
                        vl = algos.aggregate(value_loss(values, old_values, returns, mask, cfg.critic.value_clip),
                                             mask, "token-mean", global_tokens, global_seqs)
                        critic_parallel.backward(vl * info.world_size)
                    losses["value_loss"] += float(vl.detach())
            if train_policy:
                grad_norms.append(parallel.step())
            if critic_parallel is not None:
                critic_parallel.step()
    # over all ranks: statistics weighted by each rank's tokens, loss terms summed (each rank's is its share)
    record = {key: all_sum(sums[key], info) / all_sum(counts[key], info) for key in sorted(sums)
              if all_sum(counts[key], info) > 0}
    record.update({key: all_sum(value, info) / (a.ppo_epochs * a.mini_batches) for key, value in sorted(losses.items())})
    if grad_norms:
        record["grad_norm"] = max(grad_norms)
    return record


def _policy_objective(cfg: RLConfig, logp, entropy, old, adv, mask, scored: dict, ids: list[int],
                      global_tokens: float, global_seqs: float, norm_len: int, longest: int, device
                      ) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
    """This micro-batch's share of the mini-batch loss: clipped surrogate (+ KL, - entropy, + LLD term).

    Returns the loss, its terms (shares of the mini-batch's, to be summed) and token-mean statistics.
    """
    a = cfg.algorithm
    is_weights, stats, terms = None, {}, {}
    if a.tis_cap > 0:
        trainer = _pad([scored["trainer"][i] for i in ids], longest).to(device)
        rollout = _pad([scored["rollout"][i] for i in ids], longest).to(device)
        is_weights, is_stats = algos.truncated_is_weights(trainer, rollout, mask, a.tis_cap)
        stats.update({k: float(v) for k, v in is_stats.items()})
    pg, pg_stats = algos.policy_loss(logp, old, adv, mask, a.clip_low, a.clip_high, a.dual_clip, a.ratio_level,
                                     is_weights)
    agg = lambda x: algos.aggregate(x, mask, a.loss_agg, global_tokens, global_seqs, norm_len)
    pg_loss = agg(pg)
    loss = pg_loss
    stats.update({k: float(v) for k, v in pg_stats.items()})
    terms["pg_loss"] = float(pg_loss.detach())
    stats["entropy"] = float(algos.masked_mean(entropy.detach(), mask))
    if a.entropy_coef > 0:
        loss = loss - a.entropy_coef * agg(entropy)
    if a.kl_coef > 0:
        ref = _pad([scored["ref"][i] for i in ids], longest).to(device)
        kl = algos.kl_estimate(logp, ref, a.kl_estimator)
        stats["kl"] = float(algos.masked_mean(kl.detach(), mask))
        if not a.kl_in_reward:
            loss = loss + a.kl_coef * agg(kl)
    if a.lld_coef > 0:  # keep non-negative-advantage trajectories from losing likelihood (LLDS-style)
        keep = (adv >= 0).float() * mask
        lld = agg(torch.relu(old - logp) * keep)
        terms["lld_loss"] = float(lld.detach())
        loss = loss + a.lld_coef * lld
    terms["loss"] = float(loss.detach())
    return loss, terms, stats


@torch.no_grad()
def _likelihood_probe(flat: list[Trajectory], scored: dict, parallel, pad_id: int, image_token_id: int,
                      autocast, info: DistInfo) -> dict:
    """Mean per-token log-prob of the non-negative-advantage trajectories before vs after the update.

    A fall step after step is Lazy Likelihood Displacement (arXiv 2512.04220), a published cause of
    GRPO collapse: the update pushes down the very trajectories it should reinforce.
    """
    chosen = [i for i, s in enumerate(scored["seq_advantage"]) if s >= 0 and scored["mask"][i].sum() > 0]
    scorer = parallel.module.module if hasattr(parallel.module, "module") else parallel.module
    before = after = tokens = 0.0
    for positions in _micro_batches([len(flat[i].token_ids) for i in chosen], 1 << 14, "probe") if chosen else []:
        ids = [chosen[p] for p in positions]
        batch = _batch([flat[i] for i in ids], pad_id, image_token_id, scorer)
        with autocast:
            logp = scorer(batch)[0].float().cpu()
        for row, i in enumerate(ids):
            m = scored["mask"][i]
            after += float((logp[row, :len(m)] * m).sum())
            before += float((scored["trainer"][i] * m).sum())
            tokens += float(m.sum())
    before, after, tokens = (all_sum(x, info) for x in (before, after, tokens))
    if not tokens:
        return {}
    return {"lld/logp_before": before / tokens, "lld/logp_after": after / tokens,
            "lld/delta": (after - before) / tokens}


# -- 6. logging, collapse, resume ---------------------------------------------------------------------------

def _gather(trajectories: list[Trajectory], info: DistInfo) -> list[dict]:
    """Every rank's trajectory records (rewards included), on every rank."""
    records = [t.to_record() for t in trajectories]
    if info.world_size == 1:
        return records
    import torch.distributed as dist

    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, records)
    return [r for part in gathered for r in part]


def _write_trajectories(out: Path, step: int, groups: list[list[Trajectory]], n: int) -> None:
    """A sample of the step's trajectories (one per group first), for a person to read."""
    if n <= 0:
        return
    picked = [g[s] for s in range(max(len(g) for g in groups)) for g in groups if s < len(g)][:n] if groups else []
    folder = out / "trajectories"
    folder.mkdir(exist_ok=True)
    with (folder / f"step-{step:06d}.jsonl").open("w") as f:
        for t in picked:
            f.write(json.dumps({"step": step, **t.to_record()}, ensure_ascii=False, default=str) + "\n")


def _act_on_collapse(cfg: RLConfig, out: Path, verdict: str, guard: CollapseGuard, model, parallel,
                     info: DistInfo) -> None:
    last = latest_checkpoint(out)
    if cfg.guard.action == "rollback" and last is not None and guard.rollbacks < cfg.guard.max_rollbacks:
        guard.rollbacks += 1
        guard.bad_streak = 0
        _load_weights(model, last)
        load_trainer_state(last, model, parallel, info)
        if info.is_main:
            print(f"rl: {verdict}; rolled back to {last} (rollback {guard.rollbacks} of {cfg.guard.max_rollbacks}); "
                  "continuing with the next questions")
        return
    where = f"the last checkpoint is {last}" if last is not None else "no checkpoint was written"
    raise Collapsed(f"{verdict}. Stopped ({where}). Lower optim.lr, raise kl_coef, or set guard.action=rollback.")


def _load_weights(model, folder: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(f))
    hf_model(model).load_state_dict(state, strict=False)


def _restore(folder: Path, model, parallel, critic, critic_parallel, info: DistInfo) -> dict:
    saved = load_trainer_state(folder, model, parallel, info)
    if critic is not None:
        critic.load(folder / "trainer_state" / "critic.pt", critic_parallel.optimizer)
    barrier(info)
    return saved
