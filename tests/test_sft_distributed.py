"""`mmsearch sft` end to end through the CLI: DDP equals accumulation, exact resume after a kill, loadable checkpoints.

Runs go through the real CLI on the tiny policy and the gold dataset: as subprocesses where a process
must be launched by torchrun or killed, otherwise through `mmsearch.cli.main.main` in this process
(a subprocess spends ~15 s importing). Every run uses one thread, so results do not depend on how
the cores are shared and in-process runs compute bit for bit what subprocesses do.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mmsearch.training.metrics import read_metrics

TOKENS = 2048  # per micro-batch: 1-2 samples of the gold set (745-1593 tokens), so a step has several of them
COMMON = ["eval.enabled=false", "log_every=1", "precision=fp32", "device=cpu", "seed=0",
          f"batch.tokens_per_batch={TOKENS}", f"batch.max_seq_tokens={TOKENS}"]
TIMEOUT = 600


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Job:
    proc: subprocess.Popen
    log: Path

    def wait(self) -> subprocess.CompletedProcess:
        try:
            rc = self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        return subprocess.CompletedProcess(self.proc.args, rc, self.log.with_suffix(".out").read_text(),
                                           self.log.with_suffix(".err").read_text())


    def stop(self) -> None:
        """Kill the job's process group (torchrun's workers too) if it still runs."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _start(argv: list[str], log: Path) -> Job:
    """`argv` in the background, stdout and stderr to files (pipes could fill up while we wait on another job)."""
    with log.with_suffix(".out").open("w") as out, log.with_suffix(".err").open("w") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=_env(), cwd=log.parent, start_new_session=True)
    return Job(proc, log)


@contextlib.contextmanager
def _stopped_on_exit(*jobs: Job):
    """No job outlives a failing fixture."""
    try:
        yield
    finally:
        for job in jobs:
            job.stop()


def _sft(policy: Path, data: Path, out: Path, *overrides: str, resume: bool = False) -> list[str]:
    return ["sft", "--model", str(policy), "--data", str(data), "--out", str(out), *(["--resume"] if resume else []),
            *COMMON, *overrides]


def _one_process(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "mmsearch.cli.main", *args]


def _torchrun(args: list[str], nproc: int) -> list[str]:
    # --standalone: torchrun picks a free rendezvous port itself (no race with another test's port)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--module", "mmsearch.cli.main", *args]


def _run_here(args: list[str]) -> subprocess.CompletedProcess:
    """`mmsearch *args` through the CLI's entry point in this process, one thread, output captured.

    The run seeds the global generators and sets environment variables; both are put back after it.
    """
    from mmsearch.cli.main import main
    from mmsearch.training.checkpoint import rng_state, set_rng_state

    out, err = io.StringIO(), io.StringIO()
    threads, rng, env = torch.get_num_threads(), rng_state(), dict(os.environ)
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(args)
    finally:
        torch.set_num_threads(threads)
        set_rng_state(rng)
        os.environ.clear()
        os.environ.update(env)
    return subprocess.CompletedProcess(["mmsearch", *args], rc, out.getvalue(), err.getvalue())


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args} failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).state_dict()


def _train_log(out: Path) -> list[dict]:
    return read_metrics(out / "metrics.jsonl", kind="train")


# -- 1. DDP (2 ranks x 1 micro-batch) == one process (2 micro-batches accumulated) ---------------------------------


@pytest.fixture(scope="module")
def ddp_runs(policy_dir: Path, gold_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two steps each: torchrun with 2 ranks and grad_accum=1, and one process with grad_accum=2 (same micro-batches)."""
    root = tmp_path_factory.mktemp("sft_ddp")
    steps = ["max_steps=2", "optim.lr=1e-3"]  # lr high enough that the weights move far more than the tolerance
    ddp = _start(_torchrun(_sft(policy_dir, gold_dataset, root / "ddp", *steps, "batch.grad_accum=1"), 2),
                 root / "ddp.log")
    with _stopped_on_exit(ddp):
        _ok(_run_here(_sft(policy_dir, gold_dataset, root / "single", *steps, "batch.grad_accum=2")))  # meanwhile
        _ok(ddp.wait())
    return {"ddp": root / "ddp", "single": root / "single"}


def test_ddp_matches_single_process_gradient_accumulation(ddp_runs, policy_dir: Path):
    ddp_log, single_log = _train_log(ddp_runs["ddp"]), _train_log(ddp_runs["single"])
    assert [r["step"] for r in ddp_log] == [r["step"] for r in single_log] == [1, 2]
    for d, s in zip(ddp_log, single_log):
        assert d["trained_tokens"] == s["trained_tokens"]  # the same micro-batches per step
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-5, abs=0)
        assert d["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-5, abs=0)  # the global gradient, before clipping
        assert d["lr"] == s["lr"]
    assert json.loads((ddp_runs["ddp"] / "final" / "trainer_state" / "state.json").read_text())["step"] == 2

    ddp, single, start = (_state_dict(p) for p in (ddp_runs["ddp"] / "final", ddp_runs["single"] / "final", policy_dir))
    assert ddp.keys() == single.keys()
    moved = 0.0
    for name, weight in ddp.items():
        torch.testing.assert_close(weight, single[name], rtol=0, atol=1e-5 * max(1.0, float(weight.abs().max())),
                                   msg=lambda m, name=name: f"{name}: {m}")
        moved = max(moved, float((weight - start[name]).abs().max()))
    assert moved > 5e-4, "the runs barely trained, so their agreement shows nothing"


def test_loss_is_normalized_over_the_whole_window_not_per_micro_batch(ddp_runs, policy_dir: Path, gold_dataset: Path):
    """Step 1 by hand: loss and gradient of (token CE summed over both micro-batches) / (all their trained tokens).

    The logged loss checks the reported number; the logged gradient norm (before clipping) checks what
    was actually back-propagated, which a per-micro-batch mean would change even where the log did not.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmsearch.agent.setup import vision_from_processor
    from mmsearch.logprobs import MODEL_INPUTS, collate
    from mmsearch.sft.samples import SampleLimits, load_samples
    from mmsearch.training.batching import plan_epoch
    from mmsearch.trajectory import TrajectoryBuilder
    from tools.config import VisionResizeConfig

    processor = AutoProcessor.from_pretrained(policy_dir)
    builder = TrajectoryBuilder(processor)
    samples, _ = load_samples(str(gold_dataset), "train", builder, vision_from_processor(processor, VisionResizeConfig()),
                              SampleLimits(512, TOKENS))
    first_step = plan_epoch([len(s.token_ids) for s in samples], TOKENS, 2, seed=0, epoch=0).steps[0]
    assert len(first_step) == 2
    model = AutoModelForImageTextToText.from_pretrained(policy_dir, dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    sums, counts = [], []
    for micro_batch in first_step:
        batch = collate([samples[i] for i in micro_batch], processor.tokenizer.pad_token_id or 0, builder.image_token_id)
        logits = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
        nll = -logp.gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
        trained = batch["loss_mask"][:, 1:].bool()
        sums.append(nll[trained].sum())
        counts.append(int(trained.sum()))

    def grad_norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))

    window_loss = (sums[0] + sums[1]) / sum(counts)
    per_micro_batch_loss = (sums[0] / counts[0] + sums[1] / counts[1]) / 2
    window_norm, per_micro_batch_norm = grad_norm(window_loss), grad_norm(per_micro_batch_loss)
    window_loss, per_micro_batch_loss = float(window_loss.detach()), float(per_micro_batch_loss.detach())

    assert counts[0] != counts[1], "the check needs micro-batches with different trained-token counts"
    # the two normalizations are apart by far more than the tolerances below (loss ~3e-4, gradient norm ~3%)
    assert abs(window_loss - per_micro_batch_loss) > 1e-4 * window_loss
    assert abs(window_norm - per_micro_batch_norm) > 1e-2 * window_norm
    for run in ("ddp", "single"):
        step1 = _train_log(ddp_runs[run])[0]
        assert step1["trained_tokens"] == sum(counts)
        assert step1["loss"] == pytest.approx(window_loss, rel=2e-6), run
        assert step1["grad_norm"] == pytest.approx(window_norm, rel=1e-4), run


# -- 1b. DeepSpeed ZeRO-2 and ZeRO-3 (2 gloo ranks on the CPU) == the same single process ------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


@pytest.fixture(scope="module")
def deepspeed_runs(ddp_runs, policy_dir: Path, gold_dataset: Path, index_dir: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """ddp_runs' two steps under DeepSpeed ZeRO-2 and ZeRO-3; ZeRO-3 also evaluates at the end (rank 0 only)."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("sft_deepspeed")
    steps = ["max_steps=2", "optim.lr=1e-3", "batch.grad_accum=1"]
    runs = {}
    for stage in (2, 3):
        extra = [f"deepspeed={CONFIGS / f'zero{stage}.json'}"]
        if stage == 3:  # an eval with a sharded model: every rank gathers, rank 0 evaluates a whole copy
            extra += [f"eval.index={index_dir}", "eval.enabled=true", "eval.limit=2", "eval.split=validation"]
        job = _start(_torchrun(_sft(policy_dir, gold_dataset, root / f"zero{stage}", *steps, *extra), 2),
                     root / f"zero{stage}.log")
        with _stopped_on_exit(job):
            _ok(job.wait())
        runs[stage] = root / f"zero{stage}"
    return runs


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_single_process_gradient_accumulation(deepspeed_runs, ddp_runs, stage: int):
    """Same losses, gradient norms and final weights; the final dir is a plain Hugging Face checkpoint."""
    zero_log, single_log = _train_log(deepspeed_runs[stage]), _train_log(ddp_runs["single"])
    assert [r["step"] for r in zero_log] == [r["step"] for r in single_log] == [1, 2]
    for z, s in zip(zero_log, single_log):
        assert z["trained_tokens"] == s["trained_tokens"]
        assert z["loss"] == pytest.approx(s["loss"], rel=1e-5, abs=0)
        assert z["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4, abs=0)
        assert z["lr"] == pytest.approx(s["lr"], rel=1e-12)
    final = deepspeed_runs[stage] / "final"
    assert (final / "trainer_state" / "deepspeed").is_dir()  # every rank's optimizer shard
    zero, single = _state_dict(final), _state_dict(ddp_runs["single"] / "final")
    assert zero.keys() == single.keys()
    # ZeRO-3 gathers its shards under the model's own names. DeepSpeed runs without the shared-prefix forward
    # (`parallel.share_prefix`), so sums run in another order; Adam turns that noise in near-zero gradients into
    # steps of up to ~2e-5 on single elements (the weights move by > 5e-4)
    for name, weight in zero.items():
        torch.testing.assert_close(weight, single[name], rtol=0, atol=5e-5 * max(1.0, float(weight.abs().max())),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_deepspeed_zero3_evaluates_a_whole_copy_of_the_sharded_policy(deepspeed_runs):
    evals = read_metrics(deepspeed_runs[3] / "metrics.jsonl", kind="eval")
    assert [r["step"] for r in evals] == [2]
    summary = json.loads((deepspeed_runs[3] / "eval" / "step-000002" / "summary.json").read_text())
    assert summary["overall"]["n_trajectories"] == 2
    trajectories = (deepspeed_runs[3] / "eval" / "step-000002" / "trajectories.jsonl").read_text().splitlines()
    assert len(trajectories) == 2 and all(json.loads(t)["n_generated"] > 0 for t in trajectories)


# -- 2. exact resume after SIGKILL -----------------------------------------------------------------------------------


STEPS = 7  # killed after step 5: steps 6-7 and two saves are the margin for the kill to land before the end
RESUME_RUN = [f"max_steps={STEPS}", "save_every=2", "keep_checkpoints=2"]


@dataclass
class ResumeRuns:
    straight: Path  # uninterrupted
    resumed: Path  # killed after step 5 (last checkpoint: step 4), then resumed
    killed_log: list[dict]  # the resumed dir's metrics as the kill left them
    resumed_stdout: str
    refused: subprocess.CompletedProcess  # a resume with optim.lr changed, on a copy of the killed run's dir
    refused_dir: Path


def _wait_for_step(job: Job, out: Path, step: int) -> None:
    """Until a checkpoint at `step - 1` exists and the log has `step` in it (so it must be cut back on resume)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if (out / f"checkpoint-{step - 1:06d}").is_dir() and any(r["step"] >= step for r in _train_log(out)):
            return
        if job.proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {job.proc.returncode}) before step {step}: "
                                 f"{job.log.with_suffix('.err').read_text()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {TIMEOUT} s")


@pytest.fixture(scope="module")
def resume_runs(policy_dir: Path, gold_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> ResumeRuns:
    root = tmp_path_factory.mktemp("sft_resume")
    straight = _start(_one_process(_sft(policy_dir, gold_dataset, root / "straight", *RESUME_RUN)), root / "straight.log")
    killed = _start(_one_process(_sft(policy_dir, gold_dataset, root / "resumed", *RESUME_RUN)), root / "killed.log")
    with _stopped_on_exit(straight, killed):
        _wait_for_step(killed, root / "resumed", 5)
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait()
        assert killed.proc.returncode == -signal.SIGKILL
        assert not (root / "resumed" / "final").exists(), "the run finished before it was killed"
        killed_log = _train_log(root / "resumed")

        # A checkpoint killed half-way through its save: higher step, but never renamed from .tmp.
        half = root / "resumed" / "checkpoint-000099.tmp" / "trainer_state"
        half.mkdir(parents=True)
        (half / "state.json").write_text(json.dumps({"step": 99}))
        shutil.copytree(root / "resumed", root / "refused")

        # eval.* may change on resume (what is trained stays the same); optim.lr may not.
        resumed = _ok(_run_here(_sft(policy_dir, gold_dataset, root / "resumed", *RESUME_RUN, "eval.limit=3",
                                     "eval.split=test", resume=True)))
        refused = _run_here(_sft(policy_dir, gold_dataset, root / "refused", *RESUME_RUN, "optim.lr=5e-4", resume=True))
        _ok(straight.wait())
    return ResumeRuns(root / "straight", root / "resumed", killed_log, resumed.stdout, refused, root / "refused")


def test_resume_after_kill_matches_the_uninterrupted_run(resume_runs: ResumeRuns):
    straight, resumed = _train_log(resume_runs.straight), _train_log(resume_runs.resumed)
    assert [r["step"] for r in straight] == list(range(1, STEPS + 1))
    assert max(r["step"] for r in resume_runs.killed_log) >= 5  # the kill left steps past the checkpoint in the log
    assert "checkpoint-000004 at step 4" in resume_runs.resumed_stdout  # not the half-written checkpoint-000099.tmp
    # the log was cut back to the checkpoint and continued: no step twice, the same numbers as without the kill
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(straight, resumed):
        for key in ("loss", "grad_norm", "lr", "trained_tokens", "epoch"):
            assert a[key] == b[key], (a["step"], key)
    for run in (resume_runs.straight, resume_runs.resumed):
        state = json.loads((run / "final" / "trainer_state" / "state.json").read_text())
        assert state["step"] == STEPS
    assert json.loads((resume_runs.resumed / "final" / "trainer_state" / "state.json").read_text())["config"]["eval"][
        "split"] == "test"
    for name in ("final", "checkpoint-000006"):
        a, b = _state_dict(resume_runs.straight / name), _state_dict(resume_runs.resumed / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    # the optimizer state too: a further resume would go on identically
    a = torch.load(resume_runs.straight / "final" / "trainer_state" / "optimizer.pt", weights_only=False)
    b = torch.load(resume_runs.resumed / "final" / "trainer_state" / "optimizer.pt", weights_only=False)
    assert a["scheduler"] == b["scheduler"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # step checkpoints were pruned to the last two; the half-written one is left alone and never used
    names = sorted(p.name for p in resume_runs.resumed.glob("checkpoint-*"))
    assert names == ["checkpoint-000004", "checkpoint-000006", "checkpoint-000099.tmp"]


def test_resume_refuses_a_changed_training_key(resume_runs: ResumeRuns):
    refused = resume_runs.refused
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "mmsearch: error:" in refused.stderr and "optim" in refused.stderr
    assert "Traceback" not in refused.stderr
    # refused before touching the run: no final weights, the killed run's log not cut back
    assert not (resume_runs.refused_dir / "final").exists()
    assert _train_log(resume_runs.refused_dir) == resume_runs.killed_log


# -- 3. a checkpoint is a plain Hugging Face dir -----------------------------------------------------------------------


def test_checkpoint_loads_with_transformers_and_generates(resume_runs: ResumeRuns, policy_dir: Path, gold_dataset: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmsearch.engines.base import GenerationRequest, SamplingParams
    from mmsearch.engines.hf import HFEngine
    from mmsearch.eval.loaders import load_examples
    from mmsearch.trajectory import TrajectoryBuilder

    checkpoint = resume_runs.resumed / "checkpoint-000004"
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(checkpoint)
    assert processor.tokenizer.get_vocab() == AutoProcessor.from_pretrained(policy_dir).tokenizer.get_vocab()
    start = _state_dict(policy_dir)
    assert any(not torch.equal(t, start[k]) for k, t in model.state_dict().items())  # trained weights, not the start

    engine = HFEngine(model, processor)
    builder = TrajectoryBuilder(processor)
    (example,), _ = load_examples(str(gold_dataset), split="validation", limit=1)
    messages = example.meta["messages"]
    system = (json.loads(messages) if isinstance(messages, str) else messages)[0]["content"]
    traj = builder.start(example.id, 0, system, example.question, example.images)
    request = GenerationRequest(traj.token_ids, traj.images, traj.pixel_tensor(), traj.grid_tensor())
    vision_ids = [builder.image_token_id, builder.vision_start_id]
    (out,) = engine.generate([request], SamplingParams(temperature=0.0, max_new_tokens=8, suppress_token_ids=vision_ids),
                             [builder.end_of_turn_id])
    assert all(math.isfinite(lp) and lp <= 0 for lp in out.logprobs)
    assert not set(out.token_ids) & set(vision_ids)
    builder.add_generation(traj, out.token_ids, out.logprobs)  # the turn continues the trajectory token for token
    assert traj.token_ids[-len(out.token_ids):] == out.token_ids
    # the reloaded checkpoint scores its own generation as the engine did (invariant 4)
    from mmsearch.logprobs import collate, token_logprobs

    with torch.no_grad():
        rescored = token_logprobs(model, collate([traj], 0, builder.image_token_id))[0, -len(out.token_ids):]
    assert torch.allclose(rescored, torch.tensor(out.logprobs), atol=1e-4)


# -- 4. what every rank needs from the parallel helpers ---------------------------------------------------------------


def test_split_to_evens_out_micro_batches_without_losing_a_sample():
    from mmsearch.training.parallel import split_to

    assert split_to([[0, 1, 2, 3], [4]], 2) == [[0, 1, 2, 3], [4]]
    evened = split_to([[0, 1, 2, 3], [4]], 4)
    assert len(evened) == 4 and sorted(i for b in evened for i in b) == [0, 1, 2, 3, 4]
    assert all(evened)  # no empty micro-batch: every rank runs a real forward and backward
    with pytest.raises(RuntimeError, match="cannot fill 3 micro-batches"):
        split_to([[0], [1]], 3)


def test_deepspeed_configs_are_checked_before_anything_loads(tmp_path: Path):
    from mmsearch.config import load_config
    from mmsearch.sft.config import SFTConfig

    broken = tmp_path / "broken.json"
    broken.write_text("{stage: 2")
    for override, message in [(f"deepspeed={broken}", "not valid JSON"), ("deepspeed=no/such.json", "no such file"),
                              (f"deepspeed={CONFIGS / 'zero3.json'}", "ZeRO-3, which partitions the base weights"),
                              (f"deepspeed={CONFIGS / 'zero3.json'} lora.r=0 copy_rows.rows=10", "hold no image")]:
        cfg = load_config(SFTConfig, overrides=["data=x", "lora.r=8", *override.split()])
        with pytest.raises(ValueError, match=message):
            cfg.check()
    load_config(SFTConfig, overrides=["data=x", "lora.r=8", f"deepspeed={CONFIGS / 'zero2.json'}"]).check()
