"""RL steps of a randomly initialised real-size Qwen2.5-VL policy: peak memory and the time split.

    python benchmarks/gpu_rl_step.py --size 3b --out gpu_rl.json                       # on one GPU
    python benchmarks/gpu_rl_step.py --size tiny --out tiny.json --new-tokens 32         # a check on CPU

Nothing is downloaded: the model is `Qwen2_5_VLConfig` with Qwen2.5-VL-3B-Instruct's published
dimensions (or a tiny one), initialised at random directly on the device, and the tokenizer,
image processor and chat template are the tiny policy's (`mmsearch model init-tiny`; all its ids
are below the 3B vocabulary). An untrained model writes noise until the token limit, so every
turn is full length: the worst case for memory and the plain case for throughput.

Each step, as `mmsearch rl` runs it with the `hf` engine (one process, one device):
1. rollout: B prompts x G samples, each the system prompt + a question + one scene image,
   built with `TrajectoryBuilder`; two turns (the second after a short fake tool response added
   with `add_tool_response`), `HFEngine` with its turn cache. In step 1 the same rollout is
   repeated with `cache_turns=False` (transformers' generate() over whole contexts) with the
   same seeds, and the share of identical tokens is reported.
2. scoring: the trajectories' old log-probs with `TokenScorer` under bf16 autocast, no grad.
3. update: gradient checkpointing, train mode, GRPO advantages from random rewards, the PPO-clip
   policy loss with token-mean aggregation (`mmsearch.rl.algos`), micro-batches of M
   trajectories, backward, gradient clipping, AdamW (fused where the device has it).
With `--fp32-master`, scoring and the update are then repeated once on fp32 weights under bf16
autocast, which is how `mmsearch rl` holds the policy (`load_policy` loads fp32).

Every phase is timed between `torch.cuda.synchronize()` calls, with the peak allocated memory
reset before it. Prints a Markdown table and writes JSON to --out. Imports only torch,
transformers, PIL and mmsearch modules that need nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

t_import = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from mmsearch.engines.base import GenerationRequest, SamplingParams
from mmsearch.engines.hf import HFEngine
from mmsearch.logprobs import TokenScorer, collate
from mmsearch.protocols.qwen_tools import system_prompt
from mmsearch.rl import algos
from mmsearch.trajectory import Trajectory, TrajectoryBuilder

IMPORT_S = time.perf_counter() - t_import
# which version of the code was measured (the JSON records their md5)
SOURCES = ("mmsearch/engines/hf.py", "mmsearch/engines/turn_cache.py", "mmsearch/logprobs.py", "mmsearch/rl/algos.py",
           "mmsearch/trajectory.py")

# Qwen2.5-VL-3B-Instruct's config.json (the published one); the tiny size is `mmsearch model init-tiny`'s.
SIZES = {
    "3b": {
        "text": {"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                 "intermediate_size": 11008, "vocab_size": 151936, "max_position_embeddings": 128000,
                 "rms_norm_eps": 1e-6, "hidden_act": "silu"},
        "rope": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                   "out_hidden_size": 2048, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                   "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                   "hidden_act": "silu", "tokens_per_second": 2},
    },
    "tiny": {
        "text": {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2,
                 "intermediate_size": 512, "vocab_size": None, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                 "hidden_act": "silu"},
        "rope": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]},
        "vision": {"depth": 2, "hidden_size": 96, "intermediate_size": 256, "num_heads": 4, "out_hidden_size": 192,
                   "window_size": 112, "fullatt_block_indexes": [1], "patch_size": 14, "spatial_merge_size": 2,
                   "temporal_patch_size": 2, "in_channels": 3, "hidden_act": "silu", "tokens_per_second": 4},
    },
}

# Schemas as the tools publish them (the system prompt's length is the real one's), written out here
# so that nothing from tools/ (faiss, bm25s, ...) is imported.
TOOL_SCHEMAS = [
    {"type": "function", "function": {"name": "text_search", "description": "Search the knowledge base's passages.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "k": {"type": "integer"}},
                    "required": ["query"]}}},
    {"type": "function", "function": {"name": "image_search",
     "description": "Find knowledge-base entities whose images look like an image (by number).",
     "parameters": {"type": "object", "properties": {"image": {"type": "integer"}, "k": {"type": "integer"}},
                    "required": ["image"]}}},
    {"type": "function", "function": {"name": "crop", "description": "Crop an image (by number) to a box.",
     "parameters": {"type": "object", "properties": {"image": {"type": "integer"},
                    "bbox": {"type": "array", "items": {"type": "number"}}}, "required": ["image", "bbox"]}}},
]
QUESTIONS = [
    "Which entity is at the top left, and what is its capital?",
    "Who founded the organisation whose logo is in the middle of the picture?",
    "In which year was the building on the right completed?",
    "What is the population of the city shown at the bottom?",
    "Which river flows through the place in the upper right corner?",
    "Name the designer of the object closest to the centre.",
    "What language is spoken in the country whose flag is visible?",
    "How tall is the tower in the left half of the image?",
]
TOOL_TEXT = ("[1] Example passage: the entity was founded in 1891 and its capital is Vellmar. "
             "[2] Another passage that mentions the same entity and two others.")


def build_config(size: str, tok) -> Qwen2_5_VLConfig:
    spec = SIZES[size]
    text = dict(spec["text"])
    if text["vocab_size"] is None:
        text["vocab_size"] = len(tok)
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    if max(ids.values()) >= text["vocab_size"] or len(tok) > text["vocab_size"]:
        raise ValueError(f"the processor's ids do not fit a vocabulary of {text['vocab_size']}")
    text.update(bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else 0,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                rope_parameters=dict(spec["rope"]))
    config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(spec["vision"]), tie_word_embeddings=True, **ids)
    # the installed transformers must have taken every field under the name given (an unknown kwarg is kept silently)
    tc, vc = config.text_config, config.vision_config
    for key, value in spec["text"].items():
        assert value is None or getattr(tc, key) == value, (key, getattr(tc, key, None), value)
    for key, value in spec["vision"].items():
        assert getattr(vc, key) == value, (key, getattr(vc, key, None), value)
    rope = getattr(tc, "rope_parameters", None) or {}
    assert rope.get("mrope_section") == spec["rope"]["mrope_section"], rope
    assert float(rope.get("rope_theta")) == spec["rope"]["rope_theta"], rope
    assert config.tie_word_embeddings
    return config


class Clock:
    """Phases timed between device syncs, each with its own peak-memory window."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.rows: list[dict] = []

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str, **extra):
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        row = {"phase": name, **extra}
        t0 = time.perf_counter()
        yield row
        self.sync()
        row["wall_s"] = time.perf_counter() - t0
        row["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None
        row["allocated_after_gib"] = torch.cuda.memory_allocated(self.device) / 2**30 if self.cuda else None
        if row.get("tokens"):
            row["tokens_per_s"] = row["tokens"] / row["wall_s"]
        self.rows.append(row)
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f} GiB"
        print(f"  {name}: {row['wall_s']:.2f} s, peak {peak}", flush=True)


def start_trajectories(builder: TrajectoryBuilder, system: str, image: Image.Image, prompts: int, group: int
                       ) -> list[Trajectory]:
    questions = [QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" ({i})") for i in range(prompts)]
    return [builder.start(f"q{i}", s, system, q, [image]) for i, q in enumerate(questions) for s in range(group)]


def rollout(clock: Clock, engine: HFEngine, builder: TrajectoryBuilder, system: str, image: Image.Image,
            args, seed: int, label: str) -> tuple[list[Trajectory], list[list[list[int]]], dict]:
    """Two engine turns over B x G trajectories; the generated ids per turn, and the phase's row."""
    trajectories = start_trajectories(builder, system, image, args.prompts, args.group)
    tok = builder.tokenizer
    stops = sorted({builder.end_of_turn_id, tok.eos_token_id} - {None})
    vision = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
    suppress = sorted({i for i in tok.convert_tokens_to_ids(list(vision)) if i is not None and i != tok.unk_token_id})
    engine.reset()
    generated: list[list[list[int]]] = []
    turns = []
    with clock.phase(label) as row:
        gen_s = builder_s = 0.0
        for turn in range(args.turns):
            params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=seed + turn,
                                    suppress_token_ids=suppress)
            requests = [GenerationRequest(t.token_ids, t.images, t.pixel_tensor(), t.grid_tensor(), None, t)
                        for t in trajectories]
            context = sum(len(t.token_ids) for t in trajectories)
            clock.sync()
            t0 = time.perf_counter()
            outputs = engine.generate(requests, params, stops)
            clock.sync()
            dt = time.perf_counter() - t0
            gen_s += dt
            t1 = time.perf_counter()
            for traj, out in zip(trajectories, outputs):
                builder.add_generation(traj, out.token_ids, out.logprobs)
            if turn + 1 < args.turns:
                for traj in trajectories:
                    builder.add_tool_response(traj, TOOL_TEXT, [])
            builder_s += time.perf_counter() - t1
            n = sum(len(o.token_ids) for o in outputs)
            generated.append([o.token_ids for o in outputs])
            turns.append({"turn": turn + 1, "context_tokens": context, "generated_tokens": n, "wall_s": dt,
                          "tokens_per_s": n / dt, "stopped_early": sum(o.finish_reason == "stop" for o in outputs)})
        row["tokens"] = sum(t["generated_tokens"] for t in turns)
        row["generate_s"] = gen_s
        row["builder_s"] = builder_s
        row["turns"] = turns
    engine.reset()
    return trajectories, generated, row


def compare(a: list[list[list[int]]], b: list[list[list[int]]]) -> dict:
    """How far two rollouts with the same seeds agree: identical tokens position by position, per turn."""
    per_turn = []
    for turn_a, turn_b in zip(a, b):
        same = total = whole = 0
        first_diff = []
        for x, y in zip(turn_a, turn_b):
            total += max(len(x), len(y))
            same += sum(p == q for p, q in zip(x, y))
            whole += x == y
            first_diff.append(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))))
        per_turn.append({"identical_token_share": same / max(total, 1), "identical_sequence_share": whole / len(turn_a),
                         "mean_first_divergence": sum(first_diff) / len(first_diff)})
    return {"per_turn": per_turn,
            "identical_token_share": sum(t["identical_token_share"] for t in per_turn) / len(per_turn)}


def micro_batches(n: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]


def pad_rows(rows: list[torch.Tensor], longest: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(r, (0, longest - len(r))) for r in rows])


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def score(clock: Clock, model, trajectories: list[Trajectory], args, pad_id: int, image_token_id: int,
          autocast, label: str) -> tuple[list[torch.Tensor], dict]:
    """Old log-probs per trajectory (1-D, on the CPU), as `mmsearch rl` scores them (gradient checkpointing
    on: no shared-prefix forward), and how far they are from the engine's."""
    scorer = TokenScorer(model, temperature=1.0, share_prefix=False)
    model.eval()
    old: list[torch.Tensor] = []
    with clock.phase(label, tokens=sum(len(t.token_ids) for t in trajectories)) as row, torch.no_grad():
        for ids in micro_batches(len(trajectories), args.micro):
            chunk = [trajectories[i] for i in ids]
            batch = to_device(collate(chunk, pad_id, image_token_id), clock.device, model.dtype)
            with autocast:
                logp, _ = scorer(batch)
            logp = logp.float().cpu()
            old += [logp[r, :len(t.token_ids)] for r, t in enumerate(chunk)]
    diffs = torch.cat([(o - torch.tensor(t.logprobs))[torch.tensor(t.loss_mask, dtype=torch.bool)]
                       for o, t in zip(old, trajectories)])
    row["engine_vs_trainer"] = {"mean_abs_logprob_diff": float(diffs.abs().mean()),
                                "max_abs_logprob_diff": float(diffs.abs().max()),
                                "ratio_mean": float(diffs.exp().mean())}
    return old, row


def make_optimizer(model, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.999), weight_decay=0.0,
                                 fused=device.type == "cuda"), device.type == "cuda"
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.999), weight_decay=0.0, foreach=True), False


def enable_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x (as load_policy)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def update(clock: Clock, model, optimizer, trajectories: list[Trajectory], old: list[torch.Tensor], args,
           pad_id: int, image_token_id: int, autocast, label: str, seed: int) -> list[dict]:
    """One GRPO update over the whole batch (one mini-batch, micro-batches of `args.micro`)."""
    model.train()
    scorer = TokenScorer(model, temperature=1.0, share_prefix=False)
    n = len(trajectories)
    rewards = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    groups = algos.group_index([t.example_id for t in trajectories])
    seq_adv = algos.grpo_advantages(rewards, groups)
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajectories]
    global_tokens = float(sum(m[1:].sum() for m in masks))
    global_seqs = float(n)
    trained = sum(len(t.token_ids) for t in trajectories)
    stats: dict[str, float] = {}
    with clock.phase(f"{label} forward+backward", tokens=trained, micro_batches=math.ceil(n / args.micro)) as fb:
        total_loss = 0.0
        for ids in micro_batches(n, args.micro):
            chunk = [trajectories[i] for i in ids]
            batch = to_device(collate(chunk, pad_id, image_token_id), clock.device, model.dtype)
            longest = batch["input_ids"].shape[1]
            mask = batch["loss_mask"].float()
            old_logp = pad_rows([old[i] for i in ids], longest).to(clock.device)
            adv = seq_adv[ids].to(clock.device)[:, None] * mask
            with autocast:
                logp, _entropy = scorer(batch, with_entropy=True)  # the trainer's forward computes both
            loss, pg_stats = algos.policy_loss(logp.float(), old_logp, adv, mask, 0.2, 0.28)
            loss = algos.aggregate(loss, mask, "token-mean", global_tokens, global_seqs)
            loss.backward()
            total_loss += float(loss.detach())
            stats = {k: float(v) for k, v in pg_stats.items()}
        fb["loss"] = total_loss
        fb["last_micro_batch_stats"] = stats
    with clock.phase(f"{label} optimizer step") as st:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        st["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    st["optimizer_state_gib"] = sum(v.numel() * v.element_size() for s in optimizer.state.values()
                                    for v in s.values() if torch.is_tensor(v)) / 2**30
    return [fb, st]


def table(rows: list[dict]) -> str:
    lines = ["| phase | wall (s) | peak (GiB) | tokens/s |", "|---|---:|---:|---:|"]
    for r in rows:
        peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        lines.append(f"| {r['phase']} | {r['wall_s']:.2f} | {peak} | {tps} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--processor", default="runs/demo/policy", help="a tiny policy dir (its processor files only)")
    ap.add_argument("--image", default="runs/demo/world/scenes/scene_000000.png")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on cuda, else fp32")
    ap.add_argument("--prompts", type=int, default=8, help="B")
    ap.add_argument("--group", type=int, default=4, help="G")
    ap.add_argument("--new-tokens", type=int, default=128, help="per turn")
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--micro", type=int, default=8, help="trajectories per micro-batch")
    ap.add_argument("--steps", type=int, default=2, help="RL steps (each also runs the no-cache rollout for comparison)")
    ap.add_argument("--max-pixels", type=int, default=0,
                    help="the image processor's pixel budget (0: the processor's own; 3b default 12845056, Qwen's)")
    ap.add_argument("--fp32-master", action="store_true", help="then scoring + update once on fp32 weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_rl.json"))
    args = ap.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    clock = Clock(device)
    processor = AutoProcessor.from_pretrained(args.processor)
    max_pixels = args.max_pixels or (12845056 if args.size == "3b" else 0)
    if max_pixels:
        processor.image_processor.size = {"shortest_edge": 3136, "longest_edge": max_pixels}
        processor.image_processor.max_pixels = max_pixels
    tok = processor.tokenizer
    config = build_config(args.size, tok)
    image = Image.open(args.image).convert("RGB")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}, dtype {dtype}",
          flush=True)

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    clock.sync()
    init_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if clock.cuda else None
    print(f"{args.size}: {n_params / 1e9:.3f} B parameters ({n_vision / 1e6:.0f} M vision), initialised in "
          f"{init_s:.1f} s, attention {model.config._attn_implementation}", flush=True)

    builder = TrajectoryBuilder(processor)
    system = system_prompt(TOOL_SCHEMAS)
    engine = HFEngine(model, processor, max_batch=64, cache_turns=True)
    reference = HFEngine(model, processor, max_batch=64, cache_turns=False)
    pad_id = tok.pad_token_id or 0
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    probe = start_trajectories(builder, system, image, 1, 1)[0]
    prompt_info = {"prompt_tokens": len(probe.token_ids), "image_grid_thw": probe.image_grid_thw,
                   "image_tokens": sum(i == config.image_token_id for i in probe.token_ids),
                   "image_size": list(image.size)}
    print(f"prompt: {prompt_info}", flush=True)

    # warm-up (kernels, cuBLAS handles), outside every timed phase
    warm = argparse.Namespace(**{**vars(args), "prompts": 2, "group": 2, "new_tokens": 4})
    rollout(clock, engine, builder, system, image, warm, args.seed, "warm-up cached")
    rollout(clock, reference, builder, system, image, warm, args.seed, "warm-up generate()")
    clock.rows.clear()

    optimizer, fused = make_optimizer(model, device)
    comparison = None
    last = None
    for step in range(1, args.steps + 1):
        print(f"step {step}", flush=True)
        seed = args.seed + 1000 * step
        trajectories, cached_ids, _ = rollout(clock, engine, builder, system, image, args, seed,
                                              f"s{step} rollout (turn cache)")
        # every step, so that a warm step compares the two paths (the first calls at full shapes are slow)
        _, plain_ids, _ = rollout(clock, reference, builder, system, image, args, seed,
                                  f"s{step} rollout (cache_turns=False)")
        comparison = compare(cached_ids, plain_ids)
        print(f"  identical tokens, cached vs generate(): {comparison['identical_token_share']:.3f}", flush=True)
        if clock.cuda:
            torch.cuda.empty_cache()
        old, _ = score(clock, model, trajectories, args, pad_id, config.image_token_id, autocast,
                       f"s{step} scoring (old log-probs)")
        if step == 1:
            enable_checkpointing(model)
        update(clock, model, optimizer, trajectories, old, args, pad_id, config.image_token_id, autocast,
               f"s{step} update", seed)
        last = trajectories

    fp32 = None
    if args.fp32_master:
        print("fp32 master weights", flush=True)
        del optimizer
        model.float()
        if clock.cuda:
            torch.cuda.empty_cache()
        fp32_weights = torch.cuda.memory_allocated(device) / 2**30 if clock.cuda else None
        optimizer, _ = make_optimizer(model, device)
        old, _ = score(clock, model, last, args, pad_id, config.image_token_id, autocast,
                       "fp32 master: scoring (bf16 autocast)")
        update(clock, model, optimizer, last, old, args, pad_id, config.image_token_id, autocast,
               "fp32 master: update", args.seed + 99)
        fp32 = {"weights_gib": fp32_weights}

    result = {
        "size": args.size, "device": torch.cuda.get_device_name(device) if clock.cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "dtype": str(dtype), "parameters": n_params, "vision_parameters": n_vision, "init_s": init_s,
        "import_s": IMPORT_S, "weights_gib": weights_gib, "attention": model.config._attn_implementation,
        "fused_adamw": fused, "prompts": args.prompts, "group": args.group, "new_tokens_per_turn": args.new_tokens,
        "turns": args.turns, "micro_batch": args.micro, "steps": args.steps, "max_pixels": max_pixels,
        **prompt_info, "trajectory_tokens_last_step": [len(t.token_ids) for t in last],
        "cached_vs_generate": comparison, "fp32_master": fp32, "phases": clock.rows,
        "source_md5": {name: hashlib.md5((ROOT / name).read_bytes()).hexdigest() for name in SOURCES},
    }
    print()
    print(table(clock.rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
