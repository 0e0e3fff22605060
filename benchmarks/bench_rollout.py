"""Rollout throughput: the batched agent loop against one trajectory at a time, side by side.

    python benchmarks/bench_rollout.py --kb WORLD --index INDEX --policy POLICY [--trajectories 16]
        [--group-size G] [--no-cache] [--json out.json]

Both modes run the same AgentLoop, engine, tools and limits on the same examples with the same
seed; the only difference is whether the 16 trajectories advance together (one engine call and
one tool batch per turn) or one after another. With `--group-size G` they are 16/G examples
sampled G times each, as in RL (one at a time, each sample is rolled out alone). The `hf` engine
keeps each trajectory's KV cache across turns and prefills a group's shared prompt once;
`--no-cache` runs transformers' generate() over every whole context instead. Two policies:
- `tiny`: the tiny Qwen2.5-VL policy sampling (untrained: it writes until the per-turn limit);
- `scripted+tools`: a scripted policy that crops, image-searches and text-searches, so the tool
  side of a turn is measured too.
Prints a Markdown table with trajectories/s, generated tokens/s, the speedup, and the share of
wall time in generation, tools and bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from mmsearch.agent.config import AgentConfig, SamplingConfig
from mmsearch.agent.loop import AgentLoop
from mmsearch.agent.setup import RolloutConfig, build_loop
from mmsearch.engines.hf import HFEngine
from mmsearch.engines.scripted import ScriptedEngine
from mmsearch.example import Example
from mmsearch.protocols.qwen_tools import format_tool_call, format_turn


def examples(kb: Path, n: int) -> list[Example]:
    scenes = [json.loads(line) for line in (kb / "scenes.jsonl").read_text().splitlines()[:n]]
    return [Example(s["id"], "Which entity is at the top left, and what is its capital?",
                    [Image.open(kb / s["path"]).convert("RGB")], ["unknown"]) for s in scenes]


def scripted_turn(traj) -> str:
    step = len(traj.turns)
    if step == 0:
        return format_turn("Crop the top left.", format_tool_call("crop", {"image": 0, "bbox": [0, 0, 120, 84]}))
    if step == 1:
        return format_turn("Search for the crop.", format_tool_call("image_search", {"image": 1, "k": 3}))
    if step == 2:
        return format_turn("Look up its capital.", format_tool_call("text_search", {"query": f"capital {traj.example_id}"}))
    return format_turn("Done.", "<answer>unknown</answer>")


def measure(loop: AgentLoop, items: list[Example], batched: bool, group_size: int = 1) -> dict:
    loop.timings = type(loop.timings)()
    start = time.perf_counter()
    if batched:
        trajectories = loop.run(items, n_samples=group_size)
    else:
        trajectories = [t for ex in items for _ in range(group_size) for t in loop.run([ex])]
    wall = time.perf_counter() - start
    t = loop.timings
    generated = sum(tr.n_generated for tr in trajectories)
    return {"wall_s": wall, "trajectories_per_s": len(trajectories) / wall, "generated_tokens_per_s": generated / wall,
            "turns": sum(len(tr.turns) for tr in trajectories), "generated_tokens": generated,
            "tool_calls": sum(len(tr.tool_calls) for tr in trajectories),
            "share_generate": t.generate_s / t.total_s, "share_tools": t.tools_s / t.total_s,
            "share_bookkeeping": t.bookkeeping_s / t.total_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kb", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=1, help="samples per example (trajectories / G examples)")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[32, 128], help="max new tokens per turn (one row each)")
    parser.add_argument("--no-cache", action="store_true", help="hf engine: re-encode every whole context each turn")
    parser.add_argument("--json")
    args = parser.parse_args()

    engine = HFEngine.from_pretrained(args.policy, device="cpu", cache_turns=not args.no_cache)
    if args.trajectories % args.group_size:
        parser.error("--trajectories must be a multiple of --group-size")
    items = examples(Path(args.kb), args.trajectories // args.group_size)
    n = args.trajectories
    header = ("| policy | new tokens/turn | mode | wall s | trajectories/s | generated tok/s | tool calls | generate | "
              "tools | bookkeeping |\n|---|---|---|---|---|---|---|---|---|---|")
    rows, results = [], {}
    for new_tokens in args.new_tokens:
        agent = AgentConfig(max_turns=4, max_new_tokens_per_turn=new_tokens, max_invalid_streak=4,
                            sampling=SamplingConfig(temperature=1.0, seed=0))
        cfg = RolloutConfig(agent=agent, index=args.index)
        cfg.engine.device = "cpu"
        tiny = build_loop(cfg, engine=engine)
        loops = [("tiny", tiny)]
        if new_tokens == args.new_tokens[0]:
            loops.append(("scripted+tools", AgentLoop(ScriptedEngine(engine.tokenizer, scripted_turn), tiny.toolbox,
                                                      tiny.builder, agent)))
        measure(tiny, items[:2], batched=True)  # warm-up: first-call allocations, index pages, thread pools
        for name, loop in loops:
            one = measure(loop, items, batched=False, group_size=args.group_size)
            many = measure(loop, items, batched=True, group_size=args.group_size)
            speedup = many["trajectories_per_s"] / one["trajectories_per_s"]
            results[f"{name}@{new_tokens}"] = {"sequential": one, "batched": many, "speedup": speedup}
            for mode, r in (("one at a time", one), (f"batched ({n})", many)):
                rows.append(f"| {name} | {new_tokens} | {mode} | {r['wall_s']:.2f} | {r['trajectories_per_s']:.2f} | "
                            f"{r['generated_tokens_per_s']:.0f} | {r['tool_calls']} | {100 * r['share_generate']:.0f}% | "
                            f"{100 * r['share_tools']:.0f}% | {100 * r['share_bookkeeping']:.0f}% |")
            rows.append(f"| {name} | {new_tokens} | **speedup** | | **{speedup:.2f}x** | | | | | |")
    print(f"{n} trajectories ({len(items)} examples x {args.group_size} samples), at most 4 turns, CPU, "
          f"torch threads {torch.get_num_threads()}, hf turn cache {'off' if args.no_cache else 'on'}\n")
    print(header)
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
