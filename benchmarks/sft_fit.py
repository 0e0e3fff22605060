"""How well a policy fits gold trajectories, teacher-forced: seen (train) against held-out rows.

For each split, the gold trajectories are rebuilt exactly as SFT builds them, the policy scores
them in one forward pass, and two numbers are reported per split:

- token accuracy: the share of trained (assistant) tokens that are the argmax prediction;
- turn k exact: the share of rows whose k-th assistant turn is predicted entirely right.

A policy that fits train but not validation is limited by data (it memorizes); one that fits
neither is limited by optimization (steps, model size). README "Cold-start SFT" quotes this.

    python benchmarks/sft_fit.py --model runs/demo/sft/final --data runs/demo/dataset --rows 80
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

from mmsearch.logprobs import MODEL_INPUTS, collate


def split_fit(model, builder, pad_id: int, samples: list, batch_size: int = 4) -> dict:
    tokens, turns = Counter(), Counter()
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = collate(samples[start:start + batch_size], pad_id, builder.image_token_id)
            predicted = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits.argmax(-1)
            for row in range(predicted.shape[0]):
                trained, ids = batch["loss_mask"][row].tolist(), batch["input_ids"][row].tolist()
                turn, turn_right = 0, True
                for t in range(1, len(ids)):
                    if not trained[t]:
                        continue
                    right = predicted[row, t - 1].item() == ids[t]
                    tokens["right"] += right
                    tokens["all"] += 1
                    turn_right &= right
                    if t + 1 == len(ids) or not trained[t + 1]:  # the turn's last token (<|im_end|>)
                        turns[turn, "right"] += turn_right
                        turns[turn, "all"] += 1
                        turn, turn_right = turn + 1, True
    n_turns = max((k for k, _ in turns), default=-1) + 1
    return {"rows": len(samples), "token_accuracy": round(tokens["right"] / max(1, tokens["all"]), 4),
            **{f"turn_{k}_exact": round(turns[k, "right"] / turns[k, "all"], 4) for k in range(n_turns)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="policy dir (an SFT checkpoint)")
    parser.add_argument("--data", required=True, help="dataset dir with gold messages")
    parser.add_argument("--splits", nargs="+", default=["train", "validation"])
    parser.add_argument("--rows", type=int, default=80, help="first N rows of each split")
    args = parser.parse_args()

    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    from mmsearch.agent.setup import vision_from_processor
    from mmsearch.sft.samples import SampleLimits, load_samples
    from mmsearch.trajectory import TrajectoryBuilder
    from tools.config import VisionResizeConfig

    hf_logging.disable_progress_bar()
    processor = AutoProcessor.from_pretrained(args.model)
    builder = TrajectoryBuilder(processor)
    vision = vision_from_processor(processor, VisionResizeConfig())
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    report = {}
    for split in args.splits:
        samples, _ = load_samples(args.data, split, builder, vision, SampleLimits(), limit=args.rows)
        report[split] = split_fit(model, builder, processor.tokenizer.pad_token_id, samples)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
