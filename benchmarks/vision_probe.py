"""Does the policy read its images? A teacher-forced probe on search-free questions (README, "Sight and depth",
"Reading crops").

Rows are short: `[image] question <answer> ANSWER` (no system prompt), the loss on the answer's tokens.
Every 100 steps, held-out rows (the validation split, entities never trained on) are scored: the share
whose answer's first token is ranked first, with the row's own image and with another row's image
(the control: what the question alone gives). Right = shuffled means the image tells the model nothing.

- `--crop`: picture and colour questions only, the image replaced by the crop of the 3 x 3 grid cell the
  question names (what a policy that crops the right cell would see);
- `--freeze-vision`: the vision tower keeps its weights (e.g. from `--scene-stage` below);
- `--scene-stage STEPS`: first train the vision tower alone to label each cell of scenes composed
  from training-split entities (picture kind or none, dominant colour), through linear heads on the
  cell's pooled merged tokens; held-out scenes of validation entities are scored.

    python benchmarks/vision_probe.py --model runs/demo/copy/final --data runs/vis_ds --world runs/demo/world \\
        --scene-stage 600 --freeze-vision --crop --steps 300

`--data` is a dataset of search-free questions, e.g. `mmsearch synth ... mix.search_free=1.0`.
"""

from __future__ import annotations

import argparse
import collections
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

POSITIONS = ["top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right"]
PROMPT = "<|vision_start|><|image_pad|><|vision_end|>{q}\n<answer>"


def cell_crop(image, position: str):
    row, col = divmod(POSITIONS.index(position), 3)
    w, h = image.size
    return image.crop((col * w // 3, row * h // 3, (col + 1) * w // 3, (row + 1) * h // 3))


def named_position(question: str) -> str | None:
    if "in the center" in question:
        return "center"
    return next((p for p in sorted(POSITIONS, key=len, reverse=True) if f"at the {p}" in question), None)


def probe_rows(dataset, split: str, crop: bool, limit: int | None = None) -> list[tuple]:
    rows = []
    for r in dataset[split]:
        if r["requires_search"]:
            continue
        image = r["images"][0].convert("RGB")
        if crop:
            position = named_position(r["question"]) if r["kind"] in ("picture", "colour") else None
            if position is None:
                continue
            image = cell_crop(image, position)
        rows.append((image, r["question"], r["answers"][0], r["kind"]))
        if limit and len(rows) >= limit:
            break
    return rows


def encode(processor, items):
    """Right-padded batch; labels on the answer tokens; where each answer starts."""
    texts = [PROMPT.format(q=q) + f" {a}</answer>" for _, q, a, _ in items]
    enc = processor(text=texts, images=[[img] for img, *_ in items], return_tensors="pt", padding=True)
    labels = torch.full_like(enc["input_ids"], -100)
    starts = []
    for i, (img, q, _, _) in enumerate(items):
        start = len(processor(text=[PROMPT.format(q=q)], images=[[img]], return_tensors="pt")["input_ids"][0])
        end = int(enc["attention_mask"][i].sum())
        labels[i, start:end] = enc["input_ids"][i, start:end]
        starts.append(start)
    return enc, labels, starts


@torch.no_grad()
def score(model, processor, held, shuffle: bool) -> tuple[dict, float]:
    model.eval()
    hits, counts = collections.Counter(), collections.Counter()
    images = [h[0] for h in held]
    if shuffle:
        images = images[1:] + images[:1]
    for i in range(0, len(held), 32):
        part = [(images[j], *held[j][1:]) for j in range(i, min(i + 32, len(held)))]
        enc, _, starts = encode(processor, part)
        logits = model(**enc).logits
        for r, s in enumerate(starts):
            hits[part[r][3]] += int(logits[r, s - 1].argmax() == enc["input_ids"][r, s])
            counts[part[r][3]] += 1
    model.train()
    return {k: round(hits[k] / counts[k], 3) for k in sorted(counts)}, round(sum(hits.values()) / len(held), 3)


def scene_stage(model, processor, world: str, seed: int, steps: int, batch: int, lr: float) -> None:
    """Train the vision tower (and merger) to label the 3 x 3 cells of scenes of training-split entities."""
    from PIL import Image

    from data_pipeline.synth.config import SceneConfig, SplitConfig
    from data_pipeline.synth.graph import EntityGraph
    from data_pipeline.synth.scenes import COLOUR_NAMES, ScenePool, dominant_colour
    from data_pipeline.synth.splits import partition_entities
    from data_pipeline.synth.templates import PICTURE_NOUN

    graph = EntityGraph.load(world)
    parts = partition_entities(graph, SplitConfig(), seed)
    kinds, colours = ["none", *sorted(set(PICTURE_NOUN.values()))], ["none", *COLOUR_NAMES]
    root = Path(tempfile.mkdtemp(prefix="scene_stage_"))
    pools = {s: ScenePool(graph, parts[s], SceneConfig(), seed + 777, s, root) for s in ("train", "validation")}
    colour_of: dict[Path, str | None] = {}

    def labels(scene):
        kind, colour = [0] * 9, [0] * 9
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.bbox
            cell = int((y1 + y2) / 2 * 3 // scene.height) * 3 + int((x1 + x2) / 2 * 3 // scene.width)
            kind[cell] = kinds.index(PICTURE_NOUN[graph.entities[obj.entity_id].kind])
            if obj.image not in colour_of:
                colour_of[obj.image] = dominant_colour(obj.image)
            colour[cell] = colours.index(colour_of[obj.image]) if colour_of[obj.image] else 0
        return kind, colour

    visual = model.model.visual
    dim = model.config.text_config.hidden_size
    heads = torch.nn.ModuleDict({"kind": torch.nn.Linear(dim, len(kinds)), "colour": torch.nn.Linear(dim, len(colours))})
    opt = torch.optim.AdamW([*visual.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)

    def run(split: str, indices, train: bool):
        scenes = [s for s in (pools[split].scene(i) for i in indices) if s is not None]
        kind, colour = (torch.tensor(x) for x in zip(*[labels(s) for s in scenes]))
        pixels = processor.image_processor(images=[Image.open(s.path).convert("RGB") for s in scenes], return_tensors="pt")
        grids = pixels["image_grid_thw"]
        with torch.set_grad_enabled(train):
            tokens = visual(pixels["pixel_values"], grid_thw=grids)
            tokens = getattr(tokens, "pooler_output", tokens)  # the merged tokens
            merge, start, feats = visual.spatial_merge_size, 0, []
            for _, h, w in grids.tolist():
                hh, ww = h // merge, w // merge
                grid = tokens[start:start + hh * ww].view(hh, ww, -1)
                start += hh * ww
                feats.append(torch.stack([grid[r * hh // 3:(r + 1) * hh // 3, c * ww // 3:(c + 1) * ww // 3].reshape(-1, dim).mean(0)
                                          for r in range(3) for c in range(3)]))
            feats = torch.stack(feats)
            lk, lc = heads["kind"](feats), heads["colour"](feats)
            loss = F.cross_entropy(lk.flatten(0, 1), kind.flatten()) + F.cross_entropy(lc.flatten(0, 1), colour.flatten())
        counted = ((lk.argmax(-1) > 0).sum(1) == (kind > 0).sum(1)).float().mean().item()
        return loss, (lk.argmax(-1) == kind).float().mean().item(), (lc.argmax(-1) == colour)[colour > 0].float().mean().item(), counted

    t0 = time.time()
    for step in range(1, steps + 1):
        loss, *_ = run("train", random.Random(step).sample(range(4000), batch), True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            _, kind_acc, colour_acc, counted = run("validation", range(200), False)
            print(f"scene stage {step}: loss {loss.item():.3f}; held-out scenes: cell kind {kind_acc:.2f}, "
                  f"colour {colour_acc:.2f}, counted {counted:.2f} ({time.time() - t0:.0f}s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a dataset dir with search-free questions")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--crop", action="store_true")
    parser.add_argument("--freeze-vision", action="store_true")
    parser.add_argument("--scene-stage", type=int, default=0, metavar="STEPS")
    parser.add_argument("--world", help="the KB dir the dataset was made from (for --scene-stage)")
    parser.add_argument("--seed", type=int, default=0, help="the dataset's synth seed (its entity split)")
    args = parser.parse_args()

    from datasets import load_from_disk
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "right"
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    if args.scene_stage:
        scene_stage(model, processor, args.world, args.seed, args.scene_stage, batch=32, lr=2e-3)
    if args.freeze_vision:
        model.model.visual.requires_grad_(False)
    dataset = load_from_disk(args.data)
    train, held = probe_rows(dataset, "train", args.crop), probe_rows(dataset, "validation", args.crop, 400)
    print(f"probe: {len(train)} training rows, {len(held)} held-out rows", flush=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rng, t0 = random.Random(0), time.time()
    model.train()
    for step in range(1, args.steps + 1):
        enc, labels, _ = encode(processor, rng.sample(train, args.batch))
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 100 == 0 or step == args.steps:
            right, shuffled = score(model, processor, held, False), score(model, processor, held, True)
            print(f"step {step} ({time.time() - t0:.0f}s): right image {right[1]:.3f} {right[0]} | "
                  f"another row's image {shuffled[1]:.3f} {shuffled[0]}", flush=True)


if __name__ == "__main__":
    main()
