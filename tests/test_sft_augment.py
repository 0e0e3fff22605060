"""Counterfactual name swaps for SFT (mmsearch/sft/augment.py)."""

from __future__ import annotations

import json
import random

from mmsearch.sft.augment import NameSwap, message_texts

ENTITIES = [
    {"id": "n0", "kind": "nation", "name": "Ostrava", "aliases": ["Republic of Ostrava"]},
    {"id": "n1", "kind": "nation", "name": "Belmar", "aliases": ["Republic of Belmar"]},
    {"id": "n2", "kind": "nation", "name": "Quillon", "aliases": []},
    {"id": "c0", "kind": "city", "name": "Tessk", "aliases": []},
    {"id": "c1", "kind": "city", "name": "Varn", "aliases": []},
    {"id": "c2", "kind": "city", "name": "Heldout City", "aliases": []},  # never in training text
]


def row(nation: str, city: str, alias: str) -> list[dict]:
    query = f"capital of {nation}"
    return [
        {"role": "system", "content": "You are an agent. Ostrava is not named here."},
        {"role": "user", "content": [{"type": "image", "image": 0}, {"type": "text", "text": "What is the capital?"}]},
        {"role": "assistant", "content": f'<tool_call>{{"name": "text_search", "arguments": {{"query": "{query}"}}}}</tool_call>',
         "tool_calls": [{"id": "call_0", "type": "function",
                         "function": {"name": "text_search", "arguments": json.dumps({"query": query})}}]},
        {"role": "tool", "content": [{"type": "text", "text": f"[1] {nation}\nThe capital of {alias} is {city}. Tesskville is a word."}]},
        {"role": "assistant", "content": f"<answer>{city}</answer>"},
    ]


def training_swap() -> NameSwap:
    rows = [row("Ostrava", "Tessk", "Republic of Ostrava"), row("Belmar", "Varn", "Belmar"), row("Quillon", "Varn", "Quillon")]
    return NameSwap(ENTITIES, (t for r in rows for t in message_texts(r)))


def test_swap_renames_every_mention_consistently_within_kind():
    swap = training_swap()
    out = swap.swap(row("Ostrava", "Tessk", "Republic of Ostrava"), random.Random(0))
    tool = out[3]["content"][0]["text"]
    first_line, sentence = tool.split("\n")
    nation = first_line.removeprefix("[1] ")
    city = out[4]["content"].removeprefix("<answer>").removesuffix("</answer>")
    assert nation in {"Belmar", "Quillon"} and city == "Varn"  # another entity of the same kind
    alias = {"Belmar": "Republic of Belmar", "Quillon": "Quillon"}[nation]  # no alias: the name
    assert sentence == f"The capital of {alias} is Varn. Tesskville is a word."  # whole words only
    assert json.loads(out[2]["tool_calls"][0]["function"]["arguments"]) == {"query": f"capital of {nation}"}
    assert f'"capital of {nation}"' in out[2]["content"]
    assert out[0] == row("Ostrava", "Tessk", "Republic of Ostrava")[0]  # the system prompt is left alone


def test_swap_uses_only_names_seen_in_training_text():
    swap = training_swap()
    assert "Heldout City" not in swap.forms
    for seed in range(20):
        out = swap.swap(row("Belmar", "Tessk", "Belmar"), random.Random(seed))
        assert "Heldout City" not in json.dumps(out)


def test_rows_without_entities_are_not_swapped():
    swap = training_swap()
    plain = [{"role": "system", "content": "s"}, {"role": "user", "content": "How many pictures?"},
             {"role": "assistant", "content": "<answer>3</answer>"}]
    assert swap.swap(plain, random.Random(0)) is None


def test_load_samples_adds_renamed_copies_without_held_out_names(gold_dataset, policy_dir, world_dir):
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
    mixed, _ = load_samples(str(gold_dataset), "train", builder, vision, SampleLimits(),
                            name_swap=1.0, kb=str(world_dir), seed=0)
    assert len(mixed) > len(plain)
    renamed = mixed[len(plain):]
    decode = processor.tokenizer.decode
    assert any(decode(s.token_ids) != decode(p.token_ids) for s, p in zip(renamed, plain))
    # Every renamed sample is still trained on its assistant turns only.
    assert all(0 < sum(s.loss_mask) < len(s.loss_mask) for s in renamed)

    entities = [json.loads(line) for line in (world_dir / "entities.jsonl").read_text().splitlines()]
    data = load_from_disk(str(gold_dataset))
    train_text = " ".join(m for m in data["train"]["messages"])
    unseen = [e["name"] for e in entities if e["name"] not in train_text]
    renamed_text = " ".join(decode(s.token_ids) for s in renamed)
    assert unseen and not [name for name in unseen if name in renamed_text]


def test_swap_is_the_same_in_every_process():
    """Renames are a function of the seed alone, not of the process's string-hash order (DDP ranks
    and a resumed run rebuild the same samples)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = ("import json, random, sys; sys.path.insert(0, 'tests'); from test_sft_augment import row, training_swap; "
              "swap = training_swap(); "
              "print(json.dumps([swap.swap(row('Ostrava', 'Tessk', 'Republic of Ostrava'), random.Random(s)) for s in range(8)]))")
    root = Path(__file__).parents[1]
    outputs = {subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in range(1, 6)}
    assert len(outputs) == 1
