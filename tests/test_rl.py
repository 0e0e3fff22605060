"""`mmsearch rl` end to end on the tiny policy with the real tools: files, update direction, resume, guard, bad input.

The pure algorithms are tested in test_rl_algos.py; here the loop that composes them runs for real.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rl_test_rewards import REWARD_OVERRIDES

from mmsearch.config import load_config
from mmsearch.rl.config import RLConfig
from mmsearch.rl.guard import Collapsed, CollapseGuard
from mmsearch.rl.train import train_rl
from mmsearch.training.metrics import read_metrics

# Small enough for a 2-core CPU: 2 questions x 2 samples, short turns.
TINY = [
    "steps=2", "rollout.prompts_per_step=2", "rollout.group_size=2",
    "rollout.agent.max_turns=2", "rollout.agent.max_new_tokens_per_turn=12",
    "rollout.agent.max_new_tokens_per_trajectory=24", "rollout.tools.default_k=2",
    "eval.enabled=false", "optim.lr=1e-4",
    "guard.enabled=false",  # an untrained policy writes no protocol at near-uniform entropy: "collapsed" from the start
    "algorithm.tokens_per_micro_batch=4096", *REWARD_OVERRIDES,
]
TESTS = Path(__file__).parent

DEEPSPEED = Path(__file__).parents[1] / "configs" / "deepspeed"


def _cfg(policy_dir, gold_dataset, index_dir, out, *overrides) -> RLConfig:
    return load_config(RLConfig, overrides=[f"model={policy_dir}", f"data={gold_dataset}", f"index={index_dir}",
                                            f"out={out}", "device=cpu", *TINY, *overrides])


def _comparable(records: list[dict]) -> list[dict]:
    """Train records without wall-clock figures (they differ between any two runs)."""
    return [{k: v for k, v in r.items() if not k.startswith("time/") and not k.endswith("_per_s")}
            for r in records if r["kind"] == "train"]


def test_rl_run_writes_checkpoint_metrics_curves_and_trajectories(policy_dir, gold_dataset, index_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    cfg = _cfg(policy_dir, gold_dataset, index_dir, tmp_path / "run", "eval.enabled=true", "eval.limit=2",
               "eval.agent.max_new_tokens_per_turn=8", "eval.agent.max_turns=1", "lld_probe_every=2")
    result = train_rl(cfg, progress=False)
    out = tmp_path / "run"
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("reward_mean", "reward_std", "accuracy", "invalid_share", "searched_share", "entropy", "grad_norm",
                "clipfrac_low", "clipfrac_high", "ratio_mean", "response_tokens_mean", "turns_mean",
                "time/generate", "time/tools", "time/reward", "time/scoring", "time/update", "time/weight_sync",
                "reward/exact_match_mean", "calls/text_search"):
        assert key in train[0], key
    assert train[0]["trajectories"] == 4.0
    # one update per step: old log-probs are the training forward's own, so the ratio is 1
    assert train[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    # the likelihood probe runs on every 2nd step only, and a step without it logs nothing for it
    assert not any(k.startswith("lld/") for k in train[0])
    assert {"lld/logp_before", "lld/logp_after", "lld/delta"} <= set(train[1])
    # invariant 4 measured every step: the engine's log-probs are the trainer's on the same weights
    assert train[0]["mismatch/ratio_mean"] == pytest.approx(1.0, abs=1e-3)
    assert train[0]["mismatch/ratio_max"] < 1.01 and train[0]["mismatch/ess"] > 0.999
    assert (out / "curves.png").stat().st_size > 0 and (out / "tensorboard").is_dir()
    lines = (out / "trajectories" / "step-000002.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {json.loads(line)["step"] for line in lines} == {2}
    assert result["eval"]["overall"]["n_questions"] == 2
    model = AutoModelForImageTextToText.from_pretrained(out / "final")  # a plain HF checkpoint
    start = AutoModelForImageTextToText.from_pretrained(policy_dir)
    assert not torch.equal(model.lm_head.weight, start.lm_head.weight)  # it trained


def test_update_raises_the_likelihood_of_positive_advantage_trajectories(policy_dir, gold_dataset, index_dir,
                                                                          tmp_path):
    """One GRPO update on hand-set rewards moves each trajectory's log-prob in its advantage's direction."""
    from mmsearch.eval.loaders import load_examples
    from mmsearch.logprobs import TokenScorer, collate
    from mmsearch.rl import train as rl
    from mmsearch.rl.rollout import Rollouts
    from mmsearch.training.config import FreezeConfig, LoraConfig
    from mmsearch.training.model import load_policy
    from mmsearch.training.parallel import DistInfo, TorchParallel

    cfg = _cfg(policy_dir, gold_dataset, index_dir, tmp_path / "u", "algorithm.clip_low=10", "algorithm.clip_high=10")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(policy_dir)
    model = load_policy(str(policy_dir), "cpu", LoraConfig(), FreezeConfig(vision_tower=True))
    examples, _ = load_examples(str(gold_dataset), split="train", limit=2)
    rollouts = Rollouts(cfg, model, processor)
    trajectories, _ = rollouts.run(examples, step=1, round_=0)
    for t in trajectories:  # sample 0 of each question is the good one
        t.rewards = {"reward": 1.0 if t.sample == 0 else 0.0}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    parallel = TorchParallel(TokenScorer(model), optimizer, scheduler, DistInfo(), max_grad_norm=0.0)
    scored = rl._score(cfg, trajectories, parallel, None, None, 0, model.config.image_token_id, 1, {"scoring": 0.0},
                       torch.autocast("cpu", enabled=False), DistInfo())
    rl._advantages(cfg, trajectories, scored)
    assert [round(a, 3) for a in scored["seq_advantage"]] == [0.707, -0.707, 0.707, -0.707]
    rl._update(cfg, trajectories, scored, parallel, None, 0, model.config.image_token_id, 1, DistInfo(),
               torch.autocast("cpu", enabled=False), True)
    with torch.no_grad():
        after = TokenScorer(model)(collate(trajectories, 0, model.config.image_token_id))[0]
    for i, t in enumerate(trajectories):
        mask = scored["mask"][i]
        delta = float(((after[i, :len(mask)] - scored["old"][i]) * mask).sum())
        assert (delta > 0) == (t.sample == 0), (t.sample, delta)
    rollouts.close()


@pytest.mark.parametrize("overrides, from_update", [
    ([], True),
    (["algorithm.old_logprobs=recompute"], False),
    (["algorithm.old_logprobs=engine"], True),
    (["algorithm.mini_batches=2"], False),
    (["algorithm.ppo_epochs=2"], False),
    (["algorithm.kl_coef=0.1"], True),  # KL as a loss term compares the current log-probs with the reference's
    (["algorithm.kl_coef=0.1", "algorithm.kl_in_reward=true"], False),
    (["algorithm.advantage=gae"], False),
    (["algorithm.lld_coef=0.1"], False),
    (["lora.r=8", "lora.dropout=0.05"], False),
    (["lora.r=8"], True),
])
def test_old_logprobs_skip_their_pass_only_when_the_update_is_exactly_on_policy(overrides, from_update, tmp_path):
    from mmsearch.rl import train as rl

    cfg = load_config(RLConfig, overrides=[f"out={tmp_path}", "rewards.weights={exact_match: 1.0}", *overrides])
    cfg.check()
    assert rl._old_logprobs_from_update(cfg) is from_update


def test_tiny_recipe_recomputes_old_logprobs(tmp_path):
    from mmsearch.rl import train as rl

    cfg = load_config(RLConfig, Path(__file__).parents[1] / "configs" / "rl" / "tiny.yaml", overrides=[f"out={tmp_path}"])
    assert not rl._old_logprobs_from_update(cfg) and cfg.lld_probe_every == 5  # two mini-batches


def test_old_logprobs_from_the_update_give_the_recomputed_update(policy_dir, gold_dataset, index_dir, tmp_path):
    """On an on-policy config, `auto` skips the no-grad pass and trains exactly as `recompute` does."""
    from transformers import AutoProcessor

    from mmsearch.eval.loaders import load_examples
    from mmsearch.logprobs import TokenScorer
    from mmsearch.rl import train as rl
    from mmsearch.rl.rollout import Rollouts
    from mmsearch.training.config import FreezeConfig, LoraConfig
    from mmsearch.training.model import load_policy
    from mmsearch.training.parallel import DistInfo, TorchParallel

    processor = AutoProcessor.from_pretrained(policy_dir)
    examples, _ = load_examples(str(gold_dataset), split="train", limit=2)
    base = _cfg(policy_dir, gold_dataset, index_dir, tmp_path / "x")
    rollouts = Rollouts(base, load_policy(str(policy_dir), "cpu", LoraConfig(), FreezeConfig(vision_tower=True)),
                        processor)
    trajectories, _ = rollouts.run(examples, step=1, round_=0)
    rollouts.close()
    for t in trajectories:
        t.rewards = {"reward": 1.0 if t.sample == 0 else 0.0}
    no_autocast = torch.autocast("cpu", enabled=False)
    runs = {}
    for mode in ("auto", "recompute"):
        # TIS on: its trainer/engine ratio must come from the update's forward as well
        cfg = _cfg(policy_dir, gold_dataset, index_dir, tmp_path / mode, f"algorithm.old_logprobs={mode}",
                   "algorithm.tis_cap=2.0")
        model = load_policy(str(policy_dir), "cpu", LoraConfig(), FreezeConfig(vision_tower=True))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        scorer = TokenScorer(model)
        forwards = []  # whether each forward of the policy builds a graph
        scorer.register_forward_pre_hook(lambda module, args, seen=forwards: seen.append(torch.is_grad_enabled()))
        parallel = TorchParallel(scorer, optimizer, scheduler, DistInfo(), max_grad_norm=0.0)
        model.train()
        scored = rl._score(cfg, trajectories, parallel, None, None, 0, model.config.image_token_id, 1,
                           {"scoring": 0.0}, no_autocast, DistInfo())
        scored_forwards = len(forwards)
        rl._advantages(cfg, trajectories, scored)
        record = rl._update(cfg, trajectories, scored, parallel, None, 0, model.config.image_token_id, 1, DistInfo(),
                            no_autocast, True)
        record.update(rl._mismatch(scored["trainer"], scored["rollout"], scored["generated_mask"], DistInfo()))
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs[mode] = (scored_forwards, forwards, scored, record, weights)
    auto, recompute = runs["auto"], runs["recompute"]
    assert auto[0] == 0 and all(auto[1])  # no scoring pass: every forward is a training forward
    assert recompute[0] > 0 and not any(recompute[1][:recompute[0]])
    assert auto[2]["old_from_update"] and not recompute[2]["old_from_update"]
    for a, b in zip(auto[2]["trainer"], recompute[2]["trainer"]):  # the same pre-update log-probs
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert auto[3]["ratio_mean"] == 1.0 and auto[3]["ratio_max"] == 1.0  # old is the forward's own, detached
    assert set(auto[3]) == set(recompute[3]) and {"mismatch/ess", "is_ratio_mean", "grad_norm"} <= set(auto[3])
    for key in auto[3]:
        assert auto[3][key] == pytest.approx(recompute[3][key], rel=1e-4, abs=1e-5), key
    assert auto[3]["grad_norm"] > 0
    for name in auto[4]:
        torch.testing.assert_close(auto[4][name], recompute[4][name], rtol=1e-5, atol=1e-6, msg=name)


def test_kill_and_resume_gives_the_metrics_of_an_uninterrupted_run(policy_dir, gold_dataset, index_dir, tmp_path):
    args = [f"--model={policy_dir}", f"--data={gold_dataset}", f"--index={index_dir}", "device=cpu", *TINY,
            "steps=3", "save_every=1"]
    # the CLI, with the test reward registered first
    cmd = [sys.executable, "-c", (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import rl_test_rewards; "
           "from mmsearch.cli.main import main; sys.exit(main(sys.argv[1:]))"), "rl"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run([*cmd, f"--out={whole}", *args], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, f"--out={killed}", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-000001").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoint-000001").is_dir() and not (killed / "final").exists()
    subprocess.run([*cmd, f"--out={killed}", *args, "--resume"], check=True, env=env, capture_output=True)
    a = _comparable(read_metrics(whole / "metrics.jsonl"))
    b = _comparable(read_metrics(killed / "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3]
    assert a == b


def test_resume_with_a_changed_config_is_refused(policy_dir, gold_dataset, index_dir, tmp_path):
    out = tmp_path / "run"
    train_rl(_cfg(policy_dir, gold_dataset, index_dir, out, "steps=1", "save_every=1"), progress=False)
    changed = _cfg(policy_dir, gold_dataset, index_dir, out, "steps=1", "algorithm.clip_high=0.28")
    with pytest.raises(ValueError, match="algorithm.clip_high"):
        train_rl(changed, resume=True, progress=False)


def test_a_huge_learning_rate_is_stopped_by_the_guard(policy_dir, gold_dataset, index_dir, tmp_path):
    cfg = _cfg(policy_dir, gold_dataset, index_dir, tmp_path / "broken", "steps=6", "optim.lr=1e4",
               "optim.max_grad_norm=0", "guard.enabled=true", "guard.patience=2", "guard.max_invalid_share=1.01",
               "guard.max_entropy_ratio=1.01")
    with pytest.raises(Collapsed, match="collapsed at step") as caught:
        train_rl(cfg, progress=False)
    assert "entropy" in str(caught.value) or "not finite" in str(caught.value) or "is nan" in str(caught.value)
    assert not (tmp_path / "broken" / "final").exists()


def test_guard_needs_patience_for_soft_signals_and_none_for_nan():
    cfg = RLConfig().guard
    cfg.patience = 2
    guard = CollapseGuard(cfg, vocab_size=1000)
    healthy = {"reward_mean": 0.5, "invalid_share": 0.1, "entropy": 1.0, "loss": 0.1, "grad_norm": 1.0}
    for step in range(1, 4):
        assert guard.check(step, healthy) is None
    fallen = {**healthy, "reward_mean": 0.05}  # below 0.2 x the best 3-step mean (0.5)
    assert guard.check(4, fallen) is None  # one bad step is noise
    verdict = guard.check(5, fallen)
    assert verdict and "mean reward 0.050 < 0.2 x best 3-step mean 0.500" in verdict and "2 steps in a row" in verdict
    fresh = CollapseGuard(cfg, vocab_size=1000)
    assert "at once" in fresh.check(1, {**healthy, "loss": float("nan")})
    assert fresh.check(2, healthy) is None  # the streak resets on a healthy step
    saved = CollapseGuard(cfg, 1000, guard.state())
    assert saved.best_mean == guard.best_mean and saved.bad_streak == guard.bad_streak


@pytest.mark.parametrize("override, message", [
    ("rollout.engine=openai", "chat-level engine"),
    ("rollout.agent.sampling.temperature=0", "temperature must be > 0"),
    ("algorithm.advantage=ppo2", "algorithm.advantage must be one of"),
    ("rollout.group_size=1", "group_size must be >= 2"),
    ("algorithm.old_logprobs=trainer", "algorithm.old_logprobs must be one of auto, recompute, engine"),
    ("lld_probe_every=-1", "lld_probe_every must be >= 0"),
    (f"deepspeed={DEEPSPEED / 'zero3.json'}", "ZeRO-3: it partitions the weights the hf engine generates with"),
    ("deepspeed=no/such.json", "no such file"),
])
def test_bad_configs_are_refused_before_anything_loads(override, message, tmp_path):
    cfg = load_config(RLConfig, overrides=[f"out={tmp_path}", "rewards.weights={exact_match: 1.0}", override])
    with pytest.raises(ValueError, match=message):
        cfg.check()


def test_a_dataset_without_answers_is_refused(policy_dir, gold_dataset, index_dir, tmp_path):
    from datasets import load_from_disk

    data = load_from_disk(str(gold_dataset))
    data["train"] = data["train"].map(lambda row: {"answers": []})
    bad = tmp_path / "no_answers"
    data.save_to_disk(str(bad))
    with pytest.raises(ValueError, match="answers"):
        train_rl(_cfg(policy_dir, bad, index_dir, tmp_path / "run"), progress=False)


RECIPES = sorted((Path(__file__).parents[1] / "configs" / "rl").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_runs_a_step_at_toy_scale(recipe, policy_dir, gold_dataset, index_dir, tmp_path):
    """Each paper's recipe, its algorithm and rewards as written, shrunk only in size (and bf16 kept if set)."""
    size = ["steps=1", "rollout.prompts_per_step=2", "rollout.agent.max_turns=2",
            "rollout.agent.max_new_tokens_per_turn=12", "rollout.agent.max_new_tokens_per_trajectory=24",
            "rollout.agent.max_total_tokens=4096", "eval.enabled=false", "guard.enabled=false", "save_every=0",
            "algorithm.tokens_per_micro_batch=4096"]
    size += [] if "ppo" in recipe.stem else ["rollout.group_size=2"]
    cfg = load_config(RLConfig, recipe, overrides=[f"model={policy_dir}", f"data={gold_dataset}",
                                                   f"index={index_dir}", f"out={tmp_path / 'run'}", "device=cpu",
                                                   *size])
    train_rl(cfg, progress=False)
    [record] = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert math.isfinite(record["reward_mean"]) and record["trajectories"] % (2 * cfg.rollout.group_size) == 0


def test_ppo_with_a_critic_and_kl_in_the_reward(policy_dir, gold_dataset, index_dir, tmp_path):
    out = tmp_path / "ppo"
    cfg = _cfg(policy_dir, gold_dataset, index_dir, out, "steps=1", "algorithm.advantage=gae", "rollout.group_size=1",
               "rollout.prompts_per_step=4", "algorithm.kl_coef=0.01", "algorithm.kl_in_reward=true",
               "algorithm.kl_estimator=k1", "algorithm.mini_batches=2", "critic.lr=1e-3")
    train_rl(cfg, progress=False)
    [record] = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert record["value_loss"] > 0 and math.isfinite(record["value_loss"])
    assert (out / "final" / "trainer_state" / "critic.pt").is_file()


def test_kl_to_the_reference_is_zero_before_the_first_update(policy_dir, gold_dataset, index_dir, tmp_path):
    out = tmp_path / "kl"
    train_rl(_cfg(policy_dir, gold_dataset, index_dir, out, "steps=1", "algorithm.kl_coef=0.1"), progress=False)
    [record] = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert record["kl"] == pytest.approx(0.0, abs=1e-5)  # one mini-batch: the policy still equals the reference


def test_dynamic_sampling_trains_only_on_groups_whose_rewards_differ(policy_dir, gold_dataset, index_dir, tmp_path):
    out = tmp_path / "dapo"
    train_rl(_cfg(policy_dir, gold_dataset, index_dir, out, "steps=1", "algorithm.dynamic_sampling=true",
                  "algorithm.max_refills=3", "log_trajectories=8"), progress=False)
    [record] = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    rounds = record["refill_rounds"] + 1
    assert record["trajectories"] == 4 * rounds  # every round rolls out B x G
    assert record["groups_kept"] + record["groups_dropped"] >= 2 * rounds - 2  # kept groups beyond B are unused
    logged = [json.loads(line) for line in (out / "trajectories" / "step-000001.jsonl").read_text().splitlines()]
    by_example: dict[str, set] = {}
    for r in logged:
        by_example.setdefault(r["example_id"], set()).add(r["rewards"]["first_token_even"])
    assert by_example and all(len(values) == 2 for values in by_example.values())


def test_a_tool_server_dying_mid_rollout_becomes_counted_error_observations(policy_dir, gold_dataset, index_dir,
                                                                          search, tmp_path):
    """The policy's calls after the server died read as errors; the step finishes and counts them."""
    from transformers import AutoProcessor

    from mmsearch.engines.scripted import ScriptedEngine
    from mmsearch.eval.loaders import load_examples
    from mmsearch.rl.metrics import rollout_metrics
    from mmsearch.rl.rollout import PromptStream, Rollouts
    from mmsearch.rl.train import _collect
    from mmsearch.training.config import FreezeConfig, LoraConfig
    from mmsearch.training.model import load_policy
    from mmsearch.training.parallel import DistInfo
    from tools.config import ServeConfig
    from tools.server.app import BackgroundServer, create_app

    examples, _ = load_examples(str(gold_dataset), split="train")
    by_id = {ex.id: ex for ex in examples}
    searching = lambda traj: ('<think>look it up</think><tool_call>{"name": "text_search", "arguments": '
                              '{"query": "capital"}}</tool_call>' if not traj.tool_calls else
                              "<think>done</think><answer>x</answer>")
    processor = AutoProcessor.from_pretrained(policy_dir)
    model = load_policy(str(policy_dir), "cpu", LoraConfig(), FreezeConfig())
    with BackgroundServer(create_app(search, ServeConfig(index=str(index_dir)))) as server:
        cfg = _cfg(policy_dir, gold_dataset, index_dir, tmp_path / "x", f"server=[{server.url}]",
                   "rollout.agent.max_new_tokens_per_turn=64", "rollout.agent.max_new_tokens_per_trajectory=128")
        rollouts = Rollouts(cfg, model, processor)
        rollouts.loop.engine = ScriptedEngine(processor.tokenizer, searching)
        stream, times = PromptStream(examples, seed=0), {"generate": 0.0, "tools": 0.0, "reward": 0.0}
        _, alive, _ = _collect(cfg, rollouts, stream, by_id, 1, DistInfo(), times)
    # the server is gone now
    _, dead, _ = _collect(cfg, rollouts, stream, by_id, 2, DistInfo(), times)
    rollouts.close()
    assert rollout_metrics([t.to_record() for t in alive], by_id)["tool_errors"] == 0
    metrics = rollout_metrics([t.to_record() for t in dead], by_id)
    assert metrics["tool_errors"] == 4 and metrics["calls/text_search"] == 1.0
    assert all(t.stop_reason == "answered" for t in dead)
    assert all(t.tool_calls[0].result.startswith("Error") for t in dead)
