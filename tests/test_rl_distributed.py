"""RL under torchrun: 2 gloo ranks (DDP or DeepSpeed ZeRO-2), each with its own whole groups, give the single
process's update and metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEP = Path(__file__).with_name("rl_ddp_step.py")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


def _run(argv: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("parallel", ["ddp", "zero2"])
def test_two_ranks_give_the_single_process_update(policy_dir, gold_dataset, index_dir, tmp_path, parallel):
    args = [str(policy_dir), str(gold_dataset), str(index_dir)]
    ranks = args
    if parallel == "zero2":  # DeepSpeed ZeRO-2 over gloo: optimizer state and gradients sharded over the 2 ranks
        pytest.importorskip("deepspeed")
        ranks = [*args, str(CONFIGS / "zero2.json")]
    _run([sys.executable, str(STEP), str(tmp_path / "one"), *args])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(STEP),
          str(tmp_path / "two"), *ranks])
    one = json.loads((tmp_path / "one" / "record.json").read_text())
    two = json.loads((tmp_path / "two" / "record.json").read_text())
    assert one["trajectories"] == two["trajectories"] == 8 and one["reward_mean"] == 0.5
    assert set(one) == set(two)
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    assert one["grad_norm"] > 0  # the update did something
    w1 = torch.load(tmp_path / "one" / "weights.pt")
    w2 = torch.load(tmp_path / "two" / "weights.pt")
    assert w1.keys() == w2.keys()
    for name in w1:  # SGD with lr 1: equal weights after the step are equal gradients
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6, msg=name)
