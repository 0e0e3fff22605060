"""SFT: samples, loss normalization, batching, model setup and a short real run (DDP and resume: test_sft_distributed)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

from mmsearch.agent.config import AgentConfig
from mmsearch.agent.loop import AgentLoop
from mmsearch.agent.setup import vision_from_processor
from mmsearch.engines.scripted import ScriptedEngine, replay
from mmsearch.eval.loaders import SkipRecord, load_examples
from mmsearch.logprobs import collate, shared_prefix_len
from mmsearch.sft.config import SFTConfig
from mmsearch.sft.loss import CausalLMLoss, token_loss_sum, window_scale
from mmsearch.sft.samples import SampleLimits, build_sample, check_vision, crop_toolbox, load_samples
from mmsearch.sft.train import train_sft
from mmsearch.training.batching import pack, plan_epoch, rank_share
from mmsearch.training.config import FreezeConfig, LoraConfig
from mmsearch.training.model import load_policy, save_hf
from mmsearch.training.schedule import lr_lambda
from mmsearch.trajectory import TrajectoryBuilder
from tools.config import VisionResizeConfig


@pytest.fixture(scope="module")
def processor(hf_engine):
    return hf_engine.processor


@pytest.fixture(scope="module")
def builder(processor):
    return TrajectoryBuilder(processor)


@pytest.fixture(scope="module")
def vision(processor):
    return vision_from_processor(processor, VisionResizeConfig())


@pytest.fixture(scope="module")
def samples(gold_dataset, builder, vision):
    found, report = load_samples(str(gold_dataset), "train", builder, vision, SampleLimits())
    assert not report.skipped, report
    return found


# -- samples are rollouts ----------------------------------------------------------------------

def test_sft_sample_equals_a_rollout_of_the_same_turns(gold_dataset, builder, vision, toolbox, processor):
    examples, _ = load_examples(str(gold_dataset), split="train", limit=16)
    samples, _ = load_samples(str(gold_dataset), "train", builder, vision, SampleLimits(), limit=16)
    turns = {ex.id: [m["content"] for m in json.loads(ex.meta["messages"]) if m["role"] == "assistant"]
             for ex in examples}
    loop = AgentLoop(ScriptedEngine(processor.tokenizer, replay(turns)), toolbox, builder, AgentConfig())
    rollouts = loop.run(examples)
    assert len(samples) == len(rollouts) == 16
    assert any(len(s.images) > 1 for s in samples), "no sample with a crop: the tool-image path is untested"
    for sample, rollout in zip(samples, rollouts):
        assert sample.token_ids == rollout.token_ids, sample.example_id
        assert sample.loss_mask == rollout.loss_mask
        assert sample.image_grid_thw == rollout.image_grid_thw
        assert all(torch.equal(a, b) for a, b in zip(sample.pixel_values, rollout.pixel_values, strict=True))
        assert rollout.stop_reason == "answered"


def test_loss_mask_is_exactly_the_assistant_turns(samples, processor):
    tok = processor.tokenizer
    for sample in samples[:10]:
        spans, current = [], []
        for token, m in zip(sample.token_ids, sample.loss_mask):
            if m:
                current.append(token)
            elif current:
                spans.append(current)
                current = []
        if current:
            spans.append(current)
        assistant = [m["content"] for m in sample.messages if m["role"] == "assistant"]
        assert [tok.decode(s, skip_special_tokens=False) for s in spans] == [a + "<|im_end|>" for a in assistant]
        image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
        assert not any(m for t, m in zip(sample.token_ids, sample.loss_mask) if t == image_pad)


def test_bad_trajectories_are_skipped_with_a_reason(gold_dataset, builder, vision, tmp_path):
    examples, _ = load_examples(str(gold_dataset), split="train", limit=1)
    example, crops = examples[0], crop_toolbox(vision)
    messages = json.loads(example.meta["messages"])
    cases = {
        "malformed_trajectory": messages[1:],  # no system prompt
        "too_long": messages,
    }
    for reason, bad in cases.items():
        limits = SampleLimits(max_seq_tokens=50) if reason == "too_long" else SampleLimits()
        with pytest.raises(SkipRecord) as info:
            build_sample(builder, example, bad, crops, limits)
        assert info.value.reason == reason
    # a crop result whose call is not a crop cannot be re-made
    crop_rows = [m for m in messages if m["role"] == "tool" and any(p.get("type") == "image" for p in m["content"])]
    fake = [*messages[:2], {"role": "assistant", "content": "<think>x</think><answer>y</answer>"},
            crop_rows[0] if crop_rows else {"role": "tool", "content": [{"type": "text", "text": "t"}, {"type": "image", "image": 1}]},
            messages[-1]]
    with pytest.raises(SkipRecord) as info:
        build_sample(builder, example, fake, crops, SampleLimits())
    assert info.value.reason == "tool_image_unavailable"

    # in a dataset dir, such rows are counted, never silently dropped
    ds = load_from_disk(str(gold_dataset))
    broken = ds["train"].select(range(6)).map(lambda row, i: {"messages": "{not json" if i == 0 else row["messages"]},
                                               with_indices=True)
    ds["train"] = broken
    ds.save_to_disk(str(tmp_path / "data"))
    found, report = load_samples(str(tmp_path / "data"), "train", builder, vision, SampleLimits())
    assert len(found) == 5 and report.skipped == {"malformed_trajectory": 1}


def test_a_dataset_made_for_another_resize_is_refused(gold_dataset, vision, tmp_path):
    info = json.loads((gold_dataset / "synth_info.json").read_text())
    (tmp_path / "synth_info.json").write_text(json.dumps({**info, "vision": {**info["vision"], "max_pixels": 12845056}}))
    check_vision(str(gold_dataset), vision)  # the matching one passes
    with pytest.raises(ValueError, match="--processor"):
        check_vision(str(tmp_path), vision)


# -- the loss --------------------------------------------------------------------------------

def test_token_loss_is_the_sum_over_trained_tokens_only():
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 6, 8), torch.nn.Linear(8, 11, bias=False)
    ids = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 1, 1]])
    loss, n = token_loss_sum(hidden, head, ids, mask)
    logp = torch.log_softmax(head(hidden), -1)
    expected = -sum(logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 6) if mask[b, t])
    assert n == 5 and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    zero, count = token_loss_sum(hidden, head, ids, torch.zeros_like(mask))
    assert count == 0 and zero.item() == 0.0


def test_window_normalization_weighs_every_token_equally():
    # two micro-batches with 1 and 3 trained tokens: per-micro-batch means would give the lone token 3x the weight
    sums, counts = [2.0, 3.0], [1, 3]
    scale, n = window_scale(sum(counts), world_size=1)
    assert n == 4 and sum(s * scale for s in sums) == pytest.approx(5.0 / 4)
    assert sum(s * scale for s in sums) != pytest.approx(sum(s / c for s, c in zip(sums, counts)) / 2)
    assert window_scale(0, 1) == (0.0, 0)


def test_shared_prefix_gives_the_same_loss_and_gradients(samples, policy_dir):
    cfg = SFTConfig(model=str(policy_dir))
    model = load_policy(str(policy_dir), "cpu", cfg.lora, cfg.freeze, cfg.gradient_checkpointing)
    batch = collate(samples[:4], 0, model.config.image_token_id)
    prefix = shared_prefix_len(batch, (model.config.vision_start_token_id, model.config.image_token_id))
    assert prefix > 100  # the system prompt
    results = []
    for share in (False, True):
        model.zero_grad()
        loss, n = CausalLMLoss(model, share_prefix=share)(batch)
        loss.backward()
        results.append((loss.item(), n, [p.grad.clone() for p in model.parameters()]))
    (l0, n0, g0), (l1, n1, g1) = results
    assert n0 == n1 == sum(sum(s.loss_mask[1:]) for s in samples[:4])
    assert l1 == pytest.approx(l0, rel=1e-5)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-4 * max(1.0, a.abs().max().item()))


def test_gradient_checkpointing_gives_the_same_loss(samples, policy_dir):
    losses = []
    for ckpt in (False, True):
        model = load_policy(str(policy_dir), "cpu", LoraConfig(), FreezeConfig(), gradient_checkpointing=ckpt).train()
        batch = collate(samples[:2], 0, model.config.image_token_id)
        loss, _ = CausalLMLoss(model, share_prefix=False)(batch)
        loss.backward()
        losses.append((loss.item(), model.lm_head.weight.grad.clone()))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    assert torch.allclose(losses[0][1], losses[1][1], atol=1e-5)


# -- batching and schedule ------------------------------------------------------------------------

def test_token_budget_batches_cover_every_sample_once_with_little_padding():
    lengths = [int(300 + 700 * abs(math.sin(i * 1.7))) for i in range(400)]
    batches = pack(lengths, 4096, seed=0, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(400))
    assert all(len(b) * max(lengths[i] for i in b) <= 4096 for b in batches)
    plan = plan_epoch(lengths, 4096, micro_batches_per_step=2, seed=0, epoch=0)
    assert plan.padding_waste < 0.05
    # the same plan on every call (ranks agree, resume finds its place); another epoch is another order
    assert plan_epoch(lengths, 4096, 2, 0, 0).steps == plan.steps
    assert plan_epoch(lengths, 4096, 2, 0, 1).steps != plan.steps
    # length grouping beats random batches of the same sizes
    shuffled = random.Random(0).sample(range(400), 400)
    sizes, at, random_padded = [len(b) for b in batches], 0, 0
    for size in sizes:
        random_padded += size * max(lengths[i] for i in shuffled[at:at + size])
        at += size
    assert plan.padding_waste < 1 - sum(lengths) / random_padded
    step = plan.steps[0]
    assert rank_share(step, 0, 2) == [step[0]] and rank_share(step, 1, 2) == [step[1]]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = SFTConfig()
    cfg.optim.warmup_steps, cfg.optim.min_lr_ratio = 4, 0.1
    f = lr_lambda(cfg.optim, total_steps=20)
    assert [round(f(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))
    cfg.optim.schedule = "linear"
    assert lr_lambda(cfg.optim, 20)(12) == pytest.approx(0.1 + 0.9 * 0.5)


# -- model setup ---------------------------------------------------------------------------------------

def test_freezing_the_vision_tower_keeps_the_projector_trainable(policy_dir):
    cfg = SFTConfig()
    cfg.freeze.vision_tower = True
    model = load_policy(str(policy_dir), "cpu", cfg.lora, cfg.freeze, cfg.gradient_checkpointing)
    visual = model.model.visual
    assert not any(p.requires_grad for n, p in visual.named_parameters() if not n.startswith("merger."))
    assert all(p.requires_grad for p in visual.merger.parameters())
    cfg.freeze.projector = True
    model = load_policy(str(policy_dir), "cpu", cfg.lora, cfg.freeze, cfg.gradient_checkpointing)
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert model.lm_head.weight.requires_grad


def test_lora_trains_adapters_only_and_saves_a_merged_hf_model(policy_dir, samples, processor, tmp_path):
    from transformers import AutoModelForImageTextToText

    cfg = SFTConfig()
    cfg.lora.r, cfg.freeze.vision_tower, cfg.freeze.projector = 4, True, True
    model = load_policy(str(policy_dir), "cpu", cfg.lora, cfg.freeze, cfg.gradient_checkpointing)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    for n, p in model.named_parameters():  # make the adapters do something
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    batch = collate(samples[:2], 0, model.config.image_token_id)
    with torch.no_grad():
        expected, _ = CausalLMLoss(model, share_prefix=False)(batch)
    save_hf(model, processor, tmp_path / "ckpt")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter" / "adapter_config.json").is_file()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        got, _ = CausalLMLoss(merged, share_prefix=False)(batch)
        base, _ = CausalLMLoss(AutoModelForImageTextToText.from_pretrained(policy_dir), share_prefix=False)(batch)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(base.item() - expected.item()) > 1e-3  # the merge carried the adapters


def test_config_errors_are_clear():
    cfg = SFTConfig()
    cfg.batch.tokens_per_batch = 1024
    with pytest.raises(ValueError, match="tokens_per_batch"):
        cfg.check()
    with pytest.raises(ValueError, match="precision"):
        SFTConfig(precision="fp8").check()


# -- a real run ---------------------------------------------------------------------------------------

def test_a_short_run_learns_and_writes_everything(gold_dataset, policy_dir, index_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    cfg = SFTConfig(model=str(policy_dir), data=str(gold_dataset), out=str(tmp_path / "run"), max_steps=12, log_every=1)
    cfg.batch.tokens_per_batch, cfg.batch.max_seq_tokens = 4096, 4096
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 2
    cfg.eval.index, cfg.eval.limit, cfg.eval.every = str(index_dir), 2, 6
    cfg.eval.agent.max_new_tokens_per_turn, cfg.eval.agent.max_turns = 24, 2
    cfg.eval.agent.sampling.temperature = 0.0
    result = train_sft(cfg, progress=False)
    out = Path(cfg.out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert [r["step"] for r in evals] == [6, 12] and all(0 <= r["em"] <= 1 for r in evals)
    assert (out / "eval" / "step-000012" / "summary.json").is_file()
    assert (out / "curves.png").stat().st_size > 10_000
    assert any((out / "tensorboard").iterdir())
    report = json.loads((out / "data_report.json").read_text())
    assert report["padding_waste"][0] < 0.1 and report["samples"] > 30
    state = json.loads((out / "final" / "trainer_state" / "state.json").read_text())
    assert state["step"] == 12 and result["steps"] == 12
    AutoModelForImageTextToText.from_pretrained(out / "final")
    with pytest.raises(ValueError, match="finished run"):
        train_sft(cfg, progress=False)


def test_a_copy_stage_trains_on_copy_rows_alone(policy_dir, tmp_path):
    """`data: ""` with copy rows: the stage before SFT (configs/sft/copy.yaml) runs on the same trainer."""
    cfg = SFTConfig(model=str(policy_dir), data="", out=str(tmp_path / "copy"), max_steps=40, log_every=5)
    cfg.copy_rows.rows, cfg.copy_rows.min_len, cfg.copy_rows.max_len = 600, 4, 12
    cfg.batch.tokens_per_batch, cfg.batch.max_seq_tokens = 512, 512
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 2
    with pytest.raises(ValueError, match="eval.enabled"):
        train_sft(cfg, progress=False)
    cfg.eval.enabled = False
    train_sft(cfg, progress=False)
    out = Path(cfg.out)
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train] == list(range(5, 45, 5)) and train[-1]["loss"] < train[0]["loss"] - 0.5
    report = json.loads((out / "data_report.json").read_text())
    assert report["samples"] == 600 and report["skipped"] == {}
    assert (out / "final" / "config.json").is_file()
    with pytest.raises(ValueError, match="nothing to train on"):
        SFTConfig(data="", eval=cfg.eval).check()
