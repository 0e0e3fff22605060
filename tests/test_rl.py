"""`mmsearch rl` end to end on the tiny policy with the real tools: files, update direction, resume, guard, bad input.

The pure algorithms are tested in test_rl_algos.py; here the loop that composes them runs for real.
"""

from __future__ import annotations

import json
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
               "eval.agent.max_new_tokens_per_turn=8", "eval.agent.max_turns=1")
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
    # old log-probs are recomputed by the trainer before any update: ratio 1 exactly on the first pass
    assert train[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
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
    times: dict = {}
    times.setdefault("scoring", 0.0)
    scored = rl._score(cfg, trajectories, parallel, None, None, 0, model.config.image_token_id, 1, times,
                       torch.autocast("cpu", enabled=False))
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


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).parents[1] / "configs" / "rl").glob("*.yaml")))
def test_every_recipe_config_loads_and_checks(recipe):
    cfg = load_config(RLConfig, Path(__file__).parents[1] / "configs" / "rl" / recipe)
    cfg.check()
