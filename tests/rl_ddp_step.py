"""One RL update on fixed trajectories, as one process or as a torchrun rank; test_rl_distributed compares the two.

Sampling depends on how rows are batched, so the trajectories come from the `scripted` engine instead:
sample 0 of each question replays its gold turns (right), sample 1 answers "nobody" (wrong). Each
rank rolls out its share of whole groups, exactly as `mmsearch rl` does, then scores, computes
advantages and runs one update (SGD, so weights differ by the gradients); rank 0 writes the weights and the
step's metrics.

    python tests/rl_ddp_step.py OUT POLICY DATA INDEX
    python -m torch.distributed.run --nproc_per_node 2 tests/rl_ddp_step.py OUT POLICY DATA INDEX [DEEPSPEED_JSON]

With DEEPSPEED_JSON the update runs under DeepSpeed ZeRO (`mmsearch rl deepspeed=...`) instead of DDP.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(out: str, policy: str, data: str, index: str, deepspeed: str = "") -> None:
    from transformers import AutoProcessor

    from mmsearch.agent.config import AgentConfig
    from mmsearch.agent.loop import AgentLoop
    from mmsearch.agent.setup import vision_from_processor
    from mmsearch.config import load_config
    from mmsearch.engines.scripted import ScriptedEngine
    from mmsearch.eval.loaders import load_examples
    from mmsearch.logprobs import TokenScorer
    from mmsearch.rewards import compute_rewards_batch
    from mmsearch.rl import train as rl
    from mmsearch.rl.config import RLConfig
    from mmsearch.training.config import FreezeConfig, LoraConfig
    from mmsearch.training.model import load_policy
    from mmsearch.training.parallel import init_distributed, make_parallel
    from mmsearch.trajectory import TrajectoryBuilder
    from tools.config import ToolsConfig
    from tools.registry import build_toolbox
    from tools.search.local import LocalSearch

    info = init_distributed("cpu")
    torch.manual_seed(0)
    cfg = load_config(RLConfig, overrides=[f"model={policy}", f"data={data}", "device=cpu",
                                           "rewards.weights={exact_match: 1.0}", "algorithm.tokens_per_micro_batch=2048",
                                           "algorithm.clip_high=0.28"])
    processor = AutoProcessor.from_pretrained(policy)
    model = load_policy(policy, "cpu", LoraConfig(), FreezeConfig(vision_tower=True))
    examples, _ = load_examples(data, split="train", limit=4)
    gold = {ex.id: [m["content"] for m in json.loads(ex.meta["messages"]) if m["role"] == "assistant"]
            for ex in examples}

    def write_turn(traj) -> str:
        if traj.sample == 1:
            return "<think>I do not know.</think><answer>nobody</answer>"
        return gold[traj.example_id][min(len(traj.turns), len(gold[traj.example_id]) - 1)]

    tools = ToolsConfig()
    tools.vision = vision_from_processor(processor, tools.vision)
    toolbox = build_toolbox(tools, LocalSearch(index, device="cpu"))
    loop = AgentLoop(ScriptedEngine(processor.tokenizer, write_turn), toolbox, TrajectoryBuilder(processor),
                     AgentConfig(max_new_tokens_per_turn=256))
    flat = loop.run(examples[info.rank::info.world_size], n_samples=2)  # whole groups per rank
    compute_rewards_batch(flat, {ex.id: ex for ex in examples}, cfg.rewards)

    # plain SGD: the weights move by exactly lr x the gradient (Adam would magnify float noise in near-zero gradients)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    parallel = make_parallel(TokenScorer(model), optimizer, scheduler, info, 1.0, deepspeed)
    no_autocast = torch.autocast("cpu", enabled=False)
    scored = rl._score(cfg, flat, parallel, None, None, 0, model.config.image_token_id, 1, {"scoring": 0.0},
                       no_autocast, info)
    rl._advantages(cfg, flat, scored)
    record = rl._update(cfg, flat, scored, parallel, None, 0, model.config.image_token_id, 1, info, no_autocast, True)
    # one update per step: the trainer's log-probs came from the update's forward (no scoring pass)
    assert scored["old_from_update"]
    record.update(rl._mismatch(scored["trainer"], scored["rollout"], scored["generated_mask"], info))
    record.update(rl.rollout_metrics(rl._gather(flat, info), {ex.id: ex for ex in examples}))
    if info.is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, Path(out) / "weights.pt")
        (Path(out) / "record.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:6])
