"""Reading rows for SFT (mmsearch/sft/reading.py): fragments of renamed gold rows, trained where a name is read."""

from __future__ import annotations

import json

import pytest

from mmsearch.sft.config import SFTConfig
from mmsearch.sft.copying import CopyRowsConfig
from mmsearch.sft.reading import ReadingRowsConfig, trained_runs
from mmsearch.training.config import PeriodicEvalConfig


def test_trained_runs_are_the_assistant_turns():
    assert trained_runs([0, 0, 1, 1, 0, 1, 0, 0, 1]) == [(2, 4), (5, 6), (8, 9)]
    assert trained_runs([0, 0]) == []


def test_reading_rows_need_data():
    with pytest.raises(ValueError, match="reading_rows"):
        SFTConfig(data="", copy_rows=CopyRowsConfig(rows=10), reading_rows=ReadingRowsConfig(rows=5),
                  eval=PeriodicEvalConfig(enabled=False)).check()
    with pytest.raises(ValueError, match=">= 0"):
        ReadingRowsConfig(rows=-1).check()


def test_reading_rows_train_a_renamed_name_the_result_holds(gold_dataset, policy_dir, world_dir):
    from datasets import load_from_disk
    from transformers import AutoProcessor

    from mmsearch.agent.setup import vision_from_processor
    from mmsearch.sft.samples import SampleLimits, load_samples
    from mmsearch.trajectory import TrajectoryBuilder
    from tools.config import VisionResizeConfig

    processor = AutoProcessor.from_pretrained(policy_dir)
    builder = TrajectoryBuilder(processor)
    vision = vision_from_processor(processor, VisionResizeConfig())
    plain, _ = load_samples(str(gold_dataset), "train", builder, vision, SampleLimits())
    mixed, _ = load_samples(str(gold_dataset), "train", builder, vision, SampleLimits(), kb=str(world_dir),
                            reading_rows=40, seed=0)
    reads = mixed[len(plain):]
    assert len(reads) == 40 and all(r.example_id.startswith("read-") for r in reads)
    tok = processor.tokenizer
    entities = [json.loads(line) for line in (world_dir / "entities.jsonl").read_text().splitlines()]
    names = {form for e in entities for form in [e["name"], *e.get("aliases", [])]}
    train_text = " ".join(load_from_disk(str(gold_dataset))["train"]["messages"])
    for r in reads:
        assert not r.pixel_values and builder.image_token_id not in r.token_ids  # text results only
        assert tok.decode(r.token_ids).startswith("<|im_start|>assistant\n")
        start = r.loss_mask.index(1)
        assert set(r.loss_mask[start:]) == {1} and r.token_ids[-1] == builder.end_of_turn_id
        context, trained = tok.decode(r.token_ids[:start]), tok.decode(r.token_ids[start:])
        name = next(n for n in sorted(names, key=len, reverse=True) if trained.lstrip().startswith(n))
        assert name in train_text  # renamed to a training entity: no held-out name enters training
        assert name in context.split("<tool_response>")[-1]  # the tool result holds the name the turn writes
    # Renaming is drawn afresh per fragment: the same gold row gives other names.
    assert len({tok.decode(r.token_ids[r.loss_mask.index(1):]) for r in reads}) > 20
