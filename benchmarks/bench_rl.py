"""RL step throughput: `mmsearch rl` (`train_rl`) against TRL's `GRPOTrainer`, side by side.

    pip install -e ".[bench]"   # trl==1.16.0
    python benchmarks/bench_rl.py --policy runs/demo/sft/final --index runs/demo/index --data runs/demo/dataset \
        [--modes single,multi] [--prompts 8] [--group 4] [--steps 4] [--warmup 1] [--max-new-tokens 96] \
        [--turns 4] [--tools text_search,image_search,crop] [--trl-micro-batch 0] [--json rl.json]

Both sides train the same policy dir on the same questions in the same order: the first
`--prompts x (warmup + steps)` train rows, saved once to a scratch dataset that both load, and handed to
TRL (no shuffling) in the order `mmsearch rl` draws them. Every setting comes from one RLConfig (the
`--config` recipe with `ours_overrides`), and `trl_arguments` derives TRL's from it:
- B = `--prompts` questions x G = `--group` samples per optimizer step (TRL: num_generations=G, B*G
  trajectories per generation batch, one generation batch per optimizer step), one pass over them
  (ppo_epochs=1 / num_iterations=1) in one mini-batch;
- the recipe's AdamW (lr, betas, no weight decay, constant schedule, grad-norm clip) and clip range,
  the token-mean loss (TRL's "dapo"), group-normalized advantages, no KL (beta=0: neither side loads a
  reference model), temperature 1, the vision tower frozen, fp32, no gradient checkpointing;
- the reward: exact match of the final <answer> with the gold answers (`mmsearch.rewards.exact_match`).

Modes (`--modes`):
- single: answer only. Ours: no tools, max_turns=1; TRL: no tools. At most `--max-new-tokens` per trajectory.
- multi: the `--tools` (default all three: the policy's SFT data always identifies the entity by image
  search before it searches text, so with text_search alone it hardly ever calls a tool), in-process over
  `--index`, at most `--turns` assistant turns of at most `--max-new-tokens` each. TRL:
  max_tool_calling_iterations = turns - 1, generation max_new_tokens per turn, max_completion_length = the
  recipe's max_total_tokens (TRL counts tool tokens into it, so it does not bind before the turn limit).
  Ours ends a trajectory at its first invalid turn (max_invalid_streak=1), as TRL ends one at its first
  turn without a tool call (a call of a tool not offered still differs: TRL answers it with an error).

What TRL 1.16 needs for multi-turn with this VLM.
- As shipped, `GRPOTrainer` refuses tools for a Qwen2.5-VL policy: its `__init__` raises "The provided
  chat template does not support tool calling" (`supports_tool_calling` renders a tool-call exchange and
  finds the call dropped: the Qwen2.5-VL chat template, the policy's and the official one TRL ships as
  `qwen2_5_vl.jinja`, renders only message content), and `add_response_schema` has no parser for that
  template ("Unrecognized chat template, failed to add response schema. Please manually set the response
  schema on the tokenizer or processor"). So the TRL side gets what those messages ask for: the chat
  template `TRL_TOOL_TEMPLATE` (the policy's, plus tool calls, and a tool result rendered as our protocol
  renders it: a user turn in <tool_response>, its images inline) and TRL's own Qwen3 response parser
  (`qwen3_template`: the same `<tool_call>{json}</tool_call>` format).
- A `tools=[...]` function gets only its arguments, but image_search and crop take an image *number* of
  the conversation; so the tools are methods of an `environment_factory` environment (experimental in
  TRL 1.16) whose `reset` receives the question's images (`tool_environment`); results with images go
  back as TRL's multimodal tool responses.
- Before its first step the TRL worker checks that TRL's prompt tokens and tool-result tokens (with an
  image) are exactly ours (`check_same_tokens`), so both sides train on the same sequences.

What still differs is how each side works, which is what is measured: ours rolls out with the agent
loop (batched generation per turn, tool calls of a turn batched); with one optimizer step per
generation batch both sides skip the old-log-prob pass (ours: `algorithm.old_logprobs=auto` takes them
from the training forward; its likelihood probe, which TRL has no counterpart of, is off:
`lld_probe_every=0`); TRL generates with `model.generate` and runs tool calls one at a time.
Ours forwards token-budget micro-batches (`algorithm.tokens_per_micro_batch`); TRL pads the step's
trajectories to the longest and, by default, runs them in one forward/backward (`--trl-micro-batch`).
Trained tokens are the generated tokens the loss covers (end-of-turn tokens included, tool results not).

Each side runs in its own process, so its peak memory is its own; the driver releases them one
optimizer step at a time (A B, B A, ...), the idle one blocked on its pipe, and the first `--warmup`
steps of each are not timed. A step is timed from its release to the end of its optimizer step (ours:
its metrics record; TRL: `on_step_end`). Each step also records how much CPU the rest of the machine
used meanwhile (`other load`). The time split: ours from `train_rl`'s own timers (metrics.jsonl);
TRL's from timers around `_generate` (less the tool calls), the tool calls, `_calculate_rewards`,
the rest of `_generate_and_score_completions` (scoring: batching, image features, log-probs it needs),
and forward/backward plus the optimizer step (update). Prints Markdown tables (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from bench_sft import PREFIX, Worker, log, machine_busy_s

from mmsearch.config import load_config
from mmsearch.rl.config import RLConfig

SIDES = {"ours": "mmsearch rl (train_rl)", "trl": "TRL 1.16 GRPOTrainer"}
MODES = {"single": "single-turn, answer only", "multi": "multi-turn with tools"}
SPLIT = ("generate", "tools", "reward", "scoring", "update", "weight_sync", "other")

# The policy's Qwen2.5-VL template plus what TRL's tool loop needs: an assistant's `tool_calls` rendered in
# the protocol's <tool_call> format, and a tool result as a user turn in <tool_response>, exactly as
# `mmsearch.trajectory.template_view` renders it for our side (DESIGN.md, "The protocol the policy speaks").
TRL_TOOL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% if message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'tool' %}{{ '\\n</tool_response>' }}{% endif %}"  # (a newline after a tag is trimmed)
    "{% if message['role'] == 'assistant' and message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "<tool_call>{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "</tool_call>{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------- the settings both sides share

def ours_overrides(args: argparse.Namespace, mode: str) -> list[str]:
    """`key=value` overrides that turn the recipe into the benchmark's run of `mode` (see the module docstring)."""
    turns = 1 if mode == "single" else args.turns
    return [
        f"model={args.policy}", f"data={args.data}", f"index={args.index}", f"steps={args.warmup + args.steps}",
        f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
        f"rollout.agent.max_turns={turns}", f"rollout.agent.max_new_tokens_per_turn={args.max_new_tokens}",
        f"rollout.agent.max_new_tokens_per_trajectory={turns * args.max_new_tokens}",
        "rollout.agent.max_invalid_streak=1", "rollout.agent.sampling.temperature=1.0",
        "rollout.agent.sampling.top_p=1.0", "rollout.agent.sampling.top_k=0",
        f"rollout.tools.enabled=[{'' if mode == 'single' else args.tools}]",
        "algorithm.advantage=grpo", "algorithm.ppo_epochs=1", "algorithm.mini_batches=1",
        "algorithm.loss_agg=token-mean", "algorithm.ratio_level=token", "algorithm.kl_coef=0",
        "algorithm.entropy_coef=0", "algorithm.lld_coef=0", "algorithm.tis_cap=0", "algorithm.dual_clip=0",
        "algorithm.dynamic_sampling=false", "algorithm.overlong=none", "algorithm.old_logprobs=auto",
        "rewards.functions=[answer]", "rewards.weights={exact_match: 1.0}",
        "optim.weight_decay=0", "lora.r=0", "guard.enabled=false", "eval.enabled=false", "logger=[jsonl]",
        "save_every=0", "log_trajectories=0", "lld_probe_every=0",
    ]


def trl_arguments(cfg: RLConfig, mode: str, device: str, out: str, micro_batch: int = 0) -> dict:
    """`GRPOConfig` keyword arguments with the settings of `cfg` (a config built with `ours_overrides`).

    `micro_batch`: trajectories per TRL forward/backward (gradient accumulation makes up the step);
    0: the whole step at once.
    """
    a, r, o = cfg.algorithm, cfg.rollout, cfg.optim
    agent, sampling = r.agent, r.agent.sampling
    mirrored = {"advantage": (a.advantage, "grpo"), "loss_agg": (a.loss_agg, "token-mean"),
                "ratio_level": (a.ratio_level, "token"), "mini_batches": (a.mini_batches, 1),
                "dynamic_sampling": (a.dynamic_sampling, False), "overlong": (a.overlong, "none"),
                "lora.r": (cfg.lora.r, 0)}
    for key, (value, wanted) in mirrored.items():
        if value != wanted:
            raise ValueError(f"{key}={value!r} has no TRL counterpart here; the benchmark runs {key}={wanted!r}")
    per_step = r.prompts_per_step * r.group_size
    micro = micro_batch or per_step
    if per_step % micro or micro % r.group_size:
        raise ValueError(f"--trl-micro-batch ({micro}) must divide the {per_step} trajectories of a step and hold "
                         f"whole groups of {r.group_size}")
    schedule = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[o.schedule]
    kwargs = {
        "output_dir": out, "max_steps": cfg.steps, "seed": cfg.seed, "data_seed": cfg.seed, "shuffle_dataset": False,
        "num_generations": r.group_size, "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": per_step // micro, "num_iterations": a.ppo_epochs, "beta": a.kl_coef,
        "epsilon": a.clip_low, "epsilon_high": a.clip_high, "loss_type": "dapo", "scale_rewards": "group",
        "importance_sampling_level": "token", "mask_truncated_completions": False,
        "learning_rate": o.lr, "adam_beta1": o.betas[0], "adam_beta2": o.betas[1], "weight_decay": o.weight_decay,
        "max_grad_norm": o.max_grad_norm, "lr_scheduler_type": schedule, "warmup_steps": o.warmup_steps,
        "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
        "generation_kwargs": {"max_new_tokens": agent.max_new_tokens_per_turn},
        "max_completion_length": agent.max_new_tokens_per_trajectory if mode == "single" else agent.max_total_tokens,
        "gradient_checkpointing": cfg.gradient_checkpointing, "bf16": cfg.precision == "bf16", "fp16": False,
        "use_cpu": device == "cpu", "logging_steps": 1, "report_to": [], "save_strategy": "no", "eval_strategy": "no",
        "disable_tqdm": True, "dataloader_num_workers": 0, "remove_unused_columns": False, "log_completions": False,
    }
    if mode == "multi":
        kwargs["max_tool_calling_iterations"] = agent.max_turns - 1  # tool rounds; each is followed by one more turn
    return kwargs


# ---------------------------------------------------------------- the worker side

class Driven:
    """A worker's end of the protocol: report each step, then wait for the driver's "go" or "stop"."""

    def __init__(self, device: str):
        self.device = device
        self.released = self.cpu_at_release = 0.0
        self.machine_at_release: float | None = None
        self.start_mib = 0.0

    def ready(self) -> bool:
        """Loaded (model, optimizer, data, tools): mark memory and wait for the first step's release."""
        import psutil

        self.start_mib = psutil.Process().memory_info().rss / 2**20
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.start_gpu_mib = torch.cuda.memory_allocated() / 2**20
        return self._send_and_wait({"ready": True})

    def step_end(self, record: dict) -> bool:
        """After the optimizer step: report it; True when the driver says stop."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall, cpu, machine = time.perf_counter() - self.released, time.process_time(), machine_busy_s()
        record = {**record, "s": wall}
        if machine is not None and self.machine_at_release is not None:
            # CPU time the rest of the machine used during this step, as a share of all its cores
            others = (machine - self.machine_at_release) - (cpu - self.cpu_at_release)
            record["other_load"] = max(0.0, others) / (wall * (os.cpu_count() or 1))
        return self._send_and_wait(record)

    def finish(self) -> None:
        final = {"final": True, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
                 "start_mib": self.start_mib, "device": self.device, "threads": torch.get_num_threads()}
        if self.device.startswith("cuda"):
            final.update(peak_gpu_mib=torch.cuda.max_memory_allocated() / 2**20, start_gpu_mib=self.start_gpu_mib)
        print(PREFIX + json.dumps(final), flush=True)

    def _send_and_wait(self, message: dict) -> bool:
        print(PREFIX + json.dumps(message), flush=True)
        command = sys.stdin.readline().strip()
        if not command:  # the driver is gone
            sys.exit(1)
        self.released, self.cpu_at_release, self.machine_at_release = (
            time.perf_counter(), time.process_time(), machine_busy_s())
        return command != "go"


def run_ours(cfg: RLConfig, driven: Driven) -> None:
    """`train_rl` itself; its metrics log is where a step ends (its record written) and where it waits."""
    from mmsearch.rl.train import train_rl
    from mmsearch.training.metrics import MetricsLog

    init, write = MetricsLog.__init__, MetricsLog.write

    def ready_after_init(self, *a, **k):  # built after the policy, optimizer and rollouts, just before step 1
        init(self, *a, **k)
        driven.ready()

    def report_after_write(self, step: int, kind: str, values: dict) -> None:
        write(self, step, kind, values)
        if kind == "train":
            step_s = values["time/step"]
            times = {k.removeprefix("time/"): v for k, v in values.items() if k.startswith("time/") and k != "time/step"}
            driven.step_end({
                "trajectories": round(values["trajectories_per_s"] * step_s),
                "trained_tokens": round(values["trained_tokens_per_s"] * step_s), "times": times,
                "turns": values["turns_mean"], "calls": values["calls_per_trajectory"],
                "accuracy": values["accuracy"]})

    MetricsLog.__init__, MetricsLog.write = ready_after_init, report_after_write
    train_rl(cfg, progress=False)  # steps = warmup + steps: it ends when the driver stops it


def check_same_tokens(trainer, ours_processor, system: str, example, tools: list[str]) -> None:
    """TRL's prompt tokens, and its tokens for a tool result (with an image when an image tool is on), must be
    exactly what our trajectory builder makes from the policy's own processor (`ours_processor`)."""
    from trl.data_utils import prepare_multimodal_messages

    from mmsearch.protocols.qwen_tools import format_tool_call, format_turn
    from mmsearch.trajectory import TrajectoryBuilder, assistant_turn_ids

    builder = TrajectoryBuilder(ours_processor)
    ours = builder.start(example.id, 0, system, example.question, example.images)
    prompt = prepare_multimodal_messages([{"role": "system", "content": system},
                                          {"role": "user", "content": example.question}], images=example.images)
    if trainer.environment_factories is not None:
        trainer._batch_environments = [None]  # the one (unnamed) environment, as a batch sets it before tokenizing
    theirs = list(trainer._tokenize_prompts([prompt])[0][0])
    if theirs != ours.token_ids:
        raise RuntimeError(f"TRL's prompt tokens differ from ours ({len(theirs)} vs {len(ours.token_ids)} tokens)")
    results = [("text_search", "[1] Some title\nSome passage.", [])] if tools else []
    if {"crop", "image_search"} & set(tools):
        results.append(("crop", "Cropped image 0 at [0, 0, 28, 28] -> [image 1]", [example.images[0].crop((0, 0, 28, 28))]))
    for name, text, images in results:
        turn = format_turn("Look.", format_tool_call(name, {}))
        builder.add_generation(ours, assistant_turn_ids(builder.tokenizer, turn, builder.end_of_turn_id), None)
        n = builder.add_tool_response(ours, text, images, tool_call_id="call_0", name=name)
        content = [{"type": "text", "text": text}, *({"type": "image", "image": image} for image in images)]
        theirs = list(trainer._get_tool_suffix_ids([{"role": "tool", "name": name, "content": content}]))
        if theirs != ours.token_ids[-n:]:
            raise RuntimeError(f"TRL's tokens for a {name} result differ from ours: "
                               f"{builder.tokenizer.decode(theirs)!r} vs {builder.tokenizer.decode(ours.token_ids[-n:])!r}")


def build_tools(cfg: RLConfig, processor):
    """The toolbox our loop builds for `cfg` (same backend, same schemas), and its system prompt."""
    from mmsearch.agent.setup import RolloutConfig, build_backend, vision_from_processor
    from mmsearch.protocols.qwen_tools import system_prompt
    from tools.registry import build_toolbox

    rollout = RolloutConfig(agent=cfg.rollout.agent, tools=cfg.rollout.tools, index=cfg.index, server=cfg.server)
    rollout.engine.device = cfg.device
    rollout.tools.vision = vision_from_processor(processor, rollout.tools.vision)
    toolbox = build_toolbox(rollout.tools, build_backend(rollout))
    return toolbox, system_prompt(toolbox.schemas())


def tool_environment(toolbox, agent, builder, clock: dict[str, float]) -> type:
    """Our enabled tools as a TRL environment class: one instance per rollout, holding its conversation's images.

    TRL passes a tool only its arguments; image_search and crop also need the conversation's images
    (numbered 0.. in order of appearance), so they live on an environment whose `reset` gets the question's
    images. Each call goes through our toolbox, and its observation is what our agent loop would write
    (`AgentLoop._take_turn` / `_run_tools` / `_respond`): the per-tool call budget, the image limit, the
    text clipped to max_tool_response_tokens, new images numbered after the conversation's.
    """
    from tools.base import ToolCall, ToolContext

    class Conversation:
        def reset(self, images=None, **row) -> None:
            self.images = list(images or [])
            self.calls: dict[str, int] = defaultdict(int)

        def _call(self, name: str, arguments: dict):
            t0 = time.perf_counter()
            arguments = {k: v for k, v in arguments.items() if v is not None}
            limit = agent.max_calls_per_tool.get(name)
            self.calls[name] += 1
            if limit is not None and self.calls[name] > limit:
                text, images = f"Error: {name} may be called at most {limit} times; answer with what you have", []
            else:
                result = toolbox.call_batch([ToolCall(name, arguments, ToolContext(list(self.images)))])[0]
                text, images = result.text, result.images
                if len(self.images) + len(images) > agent.max_images:
                    text, images = (f"Error: the conversation already has {len(self.images)} images (limit "
                                    f"{agent.max_images}); work with the images you have"), []
            text = builder.clip_text(text, agent.max_tool_response_tokens)
            self.images += images
            clock["tools"] += time.perf_counter() - t0
            if not images:
                return text
            return [{"type": "text", "text": text}, *({"type": "image", "image": image} for image in images)]

    def text_search(self, query: str, k: int | None = None):
        """Search a text knowledge base. Returns the top passages (title and text) for the query.

        Args:
            query: what to search for
            k: number of results
        """
        return self._call("text_search", {"query": query, "k": k})

    def image_search(self, image: int, k: int | None = None):
        """Reverse image search: find knowledge-base entries that look like an image.

        Args:
            image: number of the image to search with
            k: number of results
        """
        return self._call("image_search", {"image": image, "k": k})

    def crop(self, image: int, bbox: list[float]):
        """Crop a region of an image; returns the crop as a new numbered image.

        Args:
            image: number of the image to crop
            bbox: [x1, y1, x2, y2] in pixels of the image as you see it
        """
        return self._call("crop", {"image": image, "bbox": bbox})

    methods = {"text_search": text_search, "image_search": image_search, "crop": crop}
    unknown = set(toolbox.tools) - set(methods)
    if unknown:
        raise ValueError(f"no TRL counterpart for the tools {sorted(unknown)}")
    return type("Conversation", (Conversation,), {name: methods[name] for name in toolbox.tools})


def run_trl(cfg: RLConfig, mode: str, order: list[str], driven: Driven, micro_batch: int, workdir: str) -> None:
    from datasets import Dataset
    from transformers import AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    from mmsearch.eval.loaders import load_examples
    from mmsearch.protocols.qwen_tools import parse_action
    from mmsearch.rewards import exact_match
    from mmsearch.training.model import load_policy
    from mmsearch.trajectory import TrajectoryBuilder

    clock: dict[str, float] = defaultdict(float)  # this step's seconds by part
    counts: dict[str, float] = {}
    rewards: list[float] = []
    processor = AutoProcessor.from_pretrained(cfg.model)
    toolbox, system = build_tools(cfg, processor)
    environment = None
    if mode == "multi":
        processor.chat_template = TRL_TOOL_TEMPLATE
        processor.tokenizer.response_template = qwen3_template
        environment = tool_environment(toolbox, cfg.rollout.agent, TrajectoryBuilder(processor), clock)

    def exact_match_reward(completions, answers, **kwargs) -> list[float]:
        """1.0 when the last turn is an <answer> that exactly matches a gold answer (our `answer` reward)."""
        scores = []
        for completion, golds in zip(completions, answers):
            last = [m for m in completion if m["role"] == "assistant"][-1]["content"]
            action = parse_action(last if isinstance(last, str) else "".join(p.get("text", "") for p in last))
            scores.append(exact_match(action.answer, golds) if action.kind == "answer" else 0.0)
        rewards.extend(scores)
        return scores

    def timed(key: str, call):
        """`call`, adding its wall time to clock[key]."""
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                clock[key] += time.perf_counter() - t0
        return run

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts):
            out = timed("rollout", super()._generate)(prompts)
            completion_ids, tool_mask, completions = out[1], out[2], out[3]
            counts["trajectories"] = counts.get("trajectories", 0) + len(completion_ids)
            counts["trained_tokens"] = counts.get("trained_tokens", 0) + (
                sum(sum(m) for m in tool_mask) if tool_mask is not None else sum(len(c) for c in completion_ids))
            counts["turns"] = counts.get("turns", 0) + sum(m["role"] == "assistant" for c in completions for m in c)
            counts["calls"] = counts.get("calls", 0) + sum(m["role"] == "tool" for c in completions for m in c)
            return out

        def _calculate_rewards(self, *args, **kwargs):
            return timed("reward", super()._calculate_rewards)(*args, **kwargs)

        def _generate_and_score_completions(self, inputs):
            return timed("prepare", super()._generate_and_score_completions)(inputs)

        def training_step(self, *args, **kwargs):
            return timed("training_step", super().training_step)(*args, **kwargs)

        def create_optimizer(self, *args, **kwargs):
            optimizer = super().create_optimizer(*args, **kwargs)
            optimizer.step = timed("optimizer", optimizer.step)
            return optimizer

    class Driver(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if driven.ready():
                control.should_training_stop = True

        def on_step_end(self, args, state, control, **kwargs):
            c = dict(clock)
            tools_s = c.get("tools", 0.0)
            times = {"generate": c.get("rollout", 0.0) - tools_s, "tools": tools_s, "reward": c.get("reward", 0.0),
                     "scoring": c.get("prepare", 0.0) - c.get("rollout", 0.0) - c.get("reward", 0.0),
                     "update": c.get("training_step", 0.0) - c.get("prepare", 0.0) + c.get("optimizer", 0.0),
                     "weight_sync": 0.0}  # the trained module generates: nothing to copy
            n = counts.get("trajectories", 0) or 1
            record = {"trajectories": counts.get("trajectories", 0), "trained_tokens": counts.get("trained_tokens", 0),
                      "times": times, "turns": counts.get("turns", 0) / n, "calls": counts.get("calls", 0) / n,
                      "accuracy": statistics.fmean(rewards) if rewards else 0.0}
            clock.clear()
            counts.clear()
            rewards.clear()
            if driven.step_end(record):
                control.should_training_stop = True

    by_id = {ex.id: ex for ex in load_examples(cfg.data, split=cfg.train_split)[0]}
    examples = [by_id[i] for i in order]
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "system", "content": system}, {"role": "user", "content": ex.question}] for ex in examples],
        "images": [ex.images for ex in examples], "answers": [ex.answers for ex in examples]})
    model = load_policy(cfg.model, driven.device, cfg.lora, cfg.freeze, cfg.gradient_checkpointing)
    args = GRPOConfig(**trl_arguments(cfg, mode, driven.device, workdir, micro_batch))
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[exact_match_reward], args=args, train_dataset=dataset,
                               processing_class=processor, environment_factory=environment, callbacks=[Driver()])
    check_same_tokens(trainer, AutoProcessor.from_pretrained(cfg.model), system, examples[0], list(toolbox.tools))
    trainer.train()


def worker(args: argparse.Namespace) -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    from tools.device import resolve_device

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    work = Path(args.work)
    cfg = load_config(RLConfig, args.config, overrides=[
        *ours_overrides(args, args.mode), f"data={work / 'data'}", f"out={work / args.worker}"])
    driven = Driven(resolve_device(cfg.device))
    if args.worker == "ours":
        run_ours(cfg, driven)
    else:
        order = json.loads((work / "order.json").read_text())
        run_trl(cfg, args.mode, order, driven, args.trl_micro_batch, str(work / "trl"))
    driven.finish()


# ---------------------------------------------------------------- the driver

def prepare_data(args: argparse.Namespace, cfg: RLConfig, work: Path) -> dict:
    """The first B x (warmup + steps) train rows as a dataset dir both sides load, and the order ours draws them in."""
    import datasets

    from mmsearch.eval.loaders import load_examples
    from mmsearch.rl.rollout import PromptStream

    n = args.prompts * (args.warmup + args.steps)
    source = datasets.load_from_disk(args.data)[cfg.train_split]
    if len(source) < n:
        raise ValueError(f"{args.data}[{cfg.train_split}] has {len(source)} rows; the run needs {n}")
    datasets.DatasetDict({cfg.train_split: source.select(range(n))}).save_to_disk(str(work / "data"))
    examples, report = load_examples(str(work / "data"), split=cfg.train_split)
    order = [ex.id for ex in PromptStream(examples, cfg.seed).take(n)]  # what train_rl's stream will draw
    (work / "order.json").write_text(json.dumps(order))
    return {"questions": len(examples), "load_report": str(report)}


def summarize(records: list[dict], final: dict) -> dict:
    seconds = sum(r["s"] for r in records)
    steps = len(records)
    trajectories = sum(r["trajectories"] for r in records)
    tokens = sum(r["trained_tokens"] for r in records)
    split = {k: sum(r["times"].get(k, 0.0) for r in records) / steps for k in SPLIT if k != "other"}
    split["other"] = seconds / steps - sum(split.values())
    out = {"steps": steps, "seconds": seconds, "s_per_step": seconds / steps, "trajectories": trajectories,
           "trained_tokens": tokens, "trajectories_per_s": trajectories / seconds, "trained_tokens_per_s": tokens / seconds,
           "trajectories_per_step": trajectories / steps, "trained_tokens_per_trajectory": tokens / max(trajectories, 1),
           "turns_per_trajectory": statistics.fmean(r["turns"] for r in records),
           "calls_per_trajectory": statistics.fmean(r["calls"] for r in records),
           "accuracy": statistics.fmean(r["accuracy"] for r in records), "split_s_per_step": split,
           "peak_mib": final["peak_mib"], "start_mib": final["start_mib"],
           "other_load": statistics.fmean(r.get("other_load", float("nan")) for r in records),
           "step_s": [round(r["s"], 3) for r in records]}
    if "peak_gpu_mib" in final:
        out.update(peak_gpu_mib=final["peak_gpu_mib"], start_gpu_mib=final["start_gpu_mib"])
    return out


def print_tables(title: str, sides: dict[str, dict]) -> dict:
    """The throughput and time-split tables of one mode; returns ours / TRL ratios."""
    gpu = all("peak_gpu_mib" in s for s in sides.values())
    print(f"### {title}")
    print()
    print("| side | timed steps | trajectories/step | turns/traj | tool calls/traj | trained tok/traj | s/step | "
          "**trajectories/s** | **trained tok/s** | peak RSS MiB (over start) |"
          + (" peak GPU MiB (over start) |" if gpu else "") + " train accuracy | other load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "") + "---:|---:|")
    for side, s in sides.items():
        print(f"| {SIDES[side]} | {s['steps']} | {s['trajectories_per_step']:.0f} | {s['turns_per_trajectory']:.2f} | "
              f"{s['calls_per_trajectory']:.2f} | {s['trained_tokens_per_trajectory']:.1f} | {s['s_per_step']:.2f} | "
              f"**{s['trajectories_per_s']:.2f}** | **{s['trained_tokens_per_s']:.0f}** | "
              f"{s['peak_mib']:.0f} ({s['peak_mib'] - s['start_mib']:+.0f}) |"
              + (f" {s['peak_gpu_mib']:.0f} ({s['peak_gpu_mib'] - s['start_gpu_mib']:+.0f}) |" if gpu else "")
              + f" {s['accuracy']:.1%} | {s['other_load']:.0%} |")
    ours, trl = sides["ours"], sides["trl"]
    ratios = {key: ours[key] / trl[key] for key in ("trajectories_per_s", "trained_tokens_per_s", "peak_mib")}
    print(f"| **ours / TRL** | | | | | | {ours['s_per_step'] / trl['s_per_step']:.2f}x | "
          f"**{ratios['trajectories_per_s']:.2f}x** | **{ratios['trained_tokens_per_s']:.2f}x** | "
          f"{ratios['peak_mib']:.2f}x |" + (" |" if gpu else "") + " | |")
    print()
    print("Where a step's time goes (s per step, share of the step):")
    print()
    print("| side | " + " | ".join(k.replace("_", " ") for k in SPLIT) + " |")
    print("|---|" + "---:|" * len(SPLIT))
    for side, s in sides.items():
        total = s["s_per_step"]
        cells = [f"{s['split_s_per_step'][k]:.2f} ({s['split_s_per_step'][k] / total:.0%})" for k in SPLIT]
        print(f"| {SIDES[side]} | " + " | ".join(cells) + " |")
    print()
    return ratios


def drive(workers: dict[str, Worker], mode: str, steps: int, warmup: int) -> None:
    """Release the sides one optimizer step at a time (A B, B A, ...), then stop them."""
    for w in workers.values():
        w.receive()  # ready: loaded and waiting
        log(f"{mode}: {w.side} ready")
    order = list(workers.values())
    for step in range(1, steps + 1):
        for w in order:
            r = w.step()
            log(f"{mode} {w.side} step {step}{' (warmup)' if step <= warmup else ''}: {r['s']:.2f} s, "
                f"{r['trajectories']} trajectories, {r['trained_tokens']} trained tokens, {r['turns']:.2f} turns, "
                f"{r['calls']:.2f} tool calls, accuracy {r['accuracy']:.2f}")
        order.reverse()  # no side always runs right after the other
    for w in workers.values():
        w.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="runs/demo/sft/final", help="policy dir (model + processor)")
    parser.add_argument("--index", default="runs/demo/index", help="index dir for the text_search tool")
    parser.add_argument("--data", default="runs/demo/dataset", help="dataset dir from mmsearch synth")
    parser.add_argument("--config", default="configs/rl/tiny.yaml", help="RL recipe: optimizer, clip range, seed")
    parser.add_argument("--modes", default="single,multi", help="comma-separated: single, multi")
    parser.add_argument("--prompts", type=int, default=8, help="B: questions per optimizer step")
    parser.add_argument("--group", type=int, default=4, help="G: samples per question")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each side")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="new tokens per assistant turn")
    parser.add_argument("--turns", type=int, default=4, help="multi: assistant turns per trajectory")
    parser.add_argument("--tools", default="text_search,image_search,crop", help="multi: the tools both sides get")
    parser.add_argument("--trl-micro-batch", type=int, default=0,
                        help="TRL trajectories per forward/backward (0: the whole step at once)")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    results: dict = {"args": vars(args), "modes": {}}
    for mode in modes:
        cfg = load_config(RLConfig, args.config, overrides=ours_overrides(args, mode))
        cfg.check()
        trl_arguments(cfg, mode, "cpu", "", args.trl_micro_batch)  # refuse what TRL cannot mirror before any load
        with tempfile.TemporaryDirectory(prefix="bench_rl_") as tmp:
            work = Path(tmp)
            data = prepare_data(args, cfg, work)
            flags = ["--policy", args.policy, "--index", args.index, "--data", args.data, "--config", args.config,
                     "--prompts", str(args.prompts), "--group", str(args.group), "--steps", str(args.steps),
                     "--warmup", str(args.warmup), "--max-new-tokens", str(args.max_new_tokens),
                     "--turns", str(args.turns), "--tools", args.tools, "--trl-micro-batch", str(args.trl_micro_batch),
                     "--mode", mode, "--work", tmp]
            workers = {side: Worker(side, [sys.executable, __file__, "--worker", side, *flags]) for side in SIDES}
            try:
                drive(workers, mode, args.warmup + args.steps, args.warmup)
            finally:
                for w in workers.values():
                    if w.proc.poll() is None:
                        w.proc.kill()
        sides = {side: summarize(w.records[args.warmup:], w.final) for side, w in workers.items()}
        results["modes"][mode] = {"data": data, "sides": sides, "trl_arguments": {
            k: v for k, v in trl_arguments(cfg, mode, "cpu", "", args.trl_micro_batch).items()
            if k not in ("output_dir", "use_cpu")}}
        final = workers["ours"].final
        results.update(device=final["device"], threads=final["threads"])

    print(f"B={args.prompts} questions x G={args.group} samples per optimizer step, {args.steps} timed steps after "
          f"{args.warmup} warmup per side, at most {args.max_new_tokens} new tokens per turn (multi: {args.turns} turns); "
          f"{results['device']}, {results['threads']} torch threads.")
    print()
    for mode, result in results["modes"].items():
        title = MODES[mode] + (f" ({args.tools}, at most {args.turns} turns)" if mode == "multi" else "")
        result["ratios"] = print_tables(title, result["sides"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
