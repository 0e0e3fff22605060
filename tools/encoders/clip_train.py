"""Train (or fine-tune) the CLIP model behind reverse image search on a KB's images and titles.

Two contrastive terms, summed:
- image-text, the CLIP loss between each KB image and its title, keeps the model a CLIP model;
- image-image, between two augmented views (random crops, colour jitter) of the same KB image.
  Reverse image search is image -> image: a crop of a scene must land on the KB image it shows,
  and this term is what teaches that invariance.

Evaluation is image -> image retrieval with held-out queries: crops of the objects in the KB's
`scenes.jsonl` (scenes are never trained on) searched against embeddings of every KB image;
recall@1/@5 count the query's `image_id` among the nearest. Exact boxes are easy (the crop is the
KB image, resized), so `jitter_recall@k` repeats it with every box side moved at random, as a
policy's own boxes are off: that is the number training moves.

A KB without scenes (most KBs users bring) is evaluated on random crops of its own images instead
(`kb_image_crops`): a fixed, seeded subset of the images, one crop each, searched against all of
them. That is a weaker test, and the report names which one ran (`eval_queries`): the query is
the gallery image's own pixels (no other objects, background, occlusion or change of lighting
and scale as in a scene), and the model was trained on random crops of these very images, so it
measures near-duplicate matching on seen images rather than finding an object in a new picture.
It still catches a model that learned nothing. Where there are no queries at all, recall is
recorded as null and a warning says so, never a recall over zero queries.

With `model_name` empty, a small ViT is trained from scratch (the embedded default: the generated
world on a CPU in minutes). With `model_name` (+ `pretrained`) a named open_clip model is
fine-tuned by the same loop. The output dir is open_clip's local-dir format, so
`tools.encoders.clip.load_image_encoder` (and `open_clip.create_model_and_transforms("local-dir:DIR")`)
load it; `metrics.jsonl`, TensorBoard events (`tb/`) and `report.json` sit beside the weights.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm.auto import tqdm

from tools.device import resolve_device
from tools.encoders.clip import CONFIG_FILE, WEIGHTS_FILE, ImageEncoder, model_dir_version
from tools.kb import KB, ImageRecord

log = logging.getLogger(__name__)


@dataclass
class ClipTrainConfig:
    kb: str = "runs/world"
    out: str = "runs/clip"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda

    # Fine-tune this open_clip model (a name such as "ViT-B-32", "hf-hub:org/repo", or a dir this
    # trainer wrote) with these weights (a tag such as "laion2b_s34b_b79k", or a file).
    # Empty: train the small model below from scratch.
    model_name: str = ""
    pretrained: str = ""

    # The from-scratch model: a small ViT image tower and a small text tower (open_clip's
    # SimpleTokenizer, which ships with the package).
    embed_dim: int = 128
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    # Narrow, because the token embedding is vocabulary (49408) x width and AdamW updates every
    # row each step: at width 128 it is most of the model and most of a CPU step.
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    context_length: int = 32

    # How the model's preprocessing fits an image to its square input (saved with the model, so
    # search does the same): "squash" keeps the whole object in view, as KB images are rarely
    # square; "shortest" centre-crops (open_clip's default for pretrained models), "longest" pads.
    resize_mode: str = "squash"

    # Optimisation
    steps: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4  # the cosine decay ends here
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    image_loss_weight: float = 1.0  # weight of the image-image term against the image-text term
    # Stop early once training has run this long (0: no limit). A run cut short by the clock ends
    # mid-schedule and is no longer reproducible step for step; the report says when it happened.
    time_budget_s: float = 0.0

    # Augmentation of the training views. The window's area as a fraction of the image's: below 1
    # a crop, above 1 a loose box with background around the image (as a policy's crop of a scene).
    crop_scale_min: float = 0.35
    crop_scale_max: float = 2.0
    # Brightness/contrast/saturation strength. No hue jitter: colour tells flags apart.
    color_jitter: float = 0.3

    # Logging and evaluation
    log_every: int = 10
    eval_every: int = 75  # 0: evaluate only at the end
    # Queries: scene-object crops (the first ones in file order), or, in a KB without scenes, crops
    # of this many KB images
    eval_max_queries: int = 1000
    # A second query set moves each side of each box by up to this fraction of its size, as a
    # policy's own boxes are off; it is reported as jitter_recall@k.
    eval_jitter: float = 0.2
    eval_batch_size: int = 128
    num_workers: int = 0  # DataLoader workers decoding and augmenting images


def train_clip(cfg: ClipTrainConfig, progress: bool = True) -> dict:
    """Train, evaluate, write the model dir and logs to `cfg.out`; return the report."""
    job_start = time.time()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    kb = KB(cfg.kb)
    records = list(kb.images())  # ids, paths and titles only: pixels are decoded per batch
    if len(records) < 2:
        raise ValueError(f"{cfg.kb}: CLIP training needs at least 2 images in images.jsonl, found {len(records)}")

    model, model_cfg, tokenizer = build_model(cfg)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    encoder = ImageEncoder(
        model, preprocess, name=str(out), version="training", dim=int(model_cfg["embed_dim"]),
        device=device, batch_size=cfg.eval_batch_size,
    )
    query_source, queries, jittered_queries = eval_queries(kb, records, cfg.eval_max_queries, cfg.eval_jitter)
    ids = {r.id for r in records}
    if not any(q.image_id in ids for q in queries):  # no scene objects, or none of a KB image the model sees
        log.warning("%s: no evaluation queries (%s, eval_max_queries=%d): recall is not measured and is "
                    "recorded as null", cfg.kb, query_source, cfg.eval_max_queries)

    augment = T.Compose([
        RandomRelativeCrop(scale=(cfg.crop_scale_min, cfg.crop_scale_max)),
        T.RandomApply([T.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter)], p=0.8),
        preprocess,  # the inference transform, so an unaugmented view is exactly what search sees
    ])
    dataset = TwoViews(kb, records, augment, tokenizer)
    loader = DataLoader(
        dataset, batch_size=min(cfg.batch_size, len(dataset)), shuffle=True, drop_last=True,
        num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed),
    )

    # Decay matrices only; gains, biases, the class token and the logit scale are left alone.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=True,  # fused: one kernel for all tensors, CPU or GPU
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"))
    metrics = (out / "metrics.jsonl").open("w", encoding="utf-8")

    def log_row(row: dict) -> None:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        for key, value in row.items():
            if key != "step":
                writer.add_scalar(key, value, row["step"])

    def evaluate(step: int) -> dict:
        gallery = encode_kb(encoder, kb, records)
        recall = retrieval_recall(encoder, gallery, records, queries)
        jittered = retrieval_recall(encoder, gallery, records, jittered_queries)
        recall |= {f"jitter_{k}": v for k, v in jittered.items() if k.startswith("recall")}
        recall["eval_queries"] = query_source
        measured = {k: v for k, v in recall.items() if "recall" in k and v is not None}
        if measured:  # with no queries there is no recall to log (a 0.0 would read as a broken model)
            log_row({"step": step} | measured)
        return recall

    batches = _forever(loader)
    t0 = time.time()
    step, stopped_by_time_budget = 0, False
    bar = tqdm(total=cfg.steps, desc="clip train", disable=not progress)
    while step < cfg.steps:
        if cfg.time_budget_s and time.time() - t0 > cfg.time_budget_s:
            stopped_by_time_budget = True
            break
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        view1, view2, tokens = (t.to(device, non_blocking=True) for t in next(batches))
        with autocast:
            image_features = model.encode_image(torch.cat([view1, view2]), normalize=True)
            text_features = model.encode_text(tokens, normalize=True)
        z1, z2 = image_features.float().chunk(2)
        text_features = text_features.float()
        scale = model.logit_scale.exp()
        loss_text = (contrastive_loss(z1, text_features, scale) + contrastive_loss(z2, text_features, scale)) / 2
        loss_image = contrastive_loss(z1, z2, scale)
        loss = loss_text + cfg.image_loss_weight * loss_image

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():  # CLIP's cap on the temperature: logits scaled by at most 100
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {
                "step": step, "loss": loss.item(), "loss_text": loss_text.item(), "loss_image": loss_image.item(),
                "lr": lr, "logit_scale": scale.item(), "seconds": round(time.time() - t0, 2),
            }
            log_row(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            recall = evaluate(step)
            if recall["recall@1"] is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}", r1=f"{recall['recall@1']:.3f}",
                                jr1=f"{recall['jitter_recall@1']:.3f}")
    bar.close()
    train_seconds = time.time() - t0

    recall = evaluate(step)
    save_model_dir(model, model_cfg, tokenizer, out)
    report = {
        **recall,
        "steps": step,
        "train_seconds": round(train_seconds, 1),  # the loop, periodic evaluations included
        "seconds": round(time.time() - job_start, 1),  # the whole job: loading, training, evaluation, saving
        "stopped_by_time_budget": stopped_by_time_budget,
        "params": n_params,
        "device": device,
        "version": model_dir_version(out),
        "kb": str(cfg.kb),
        "kb_fingerprint": kb.fingerprint(),
        "config": asdict(cfg),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    metrics.close()
    writer.close()
    return report


# ---------------------------------------------------------------------------------------------
# model


def build_model(cfg: ClipTrainConfig) -> tuple[torch.nn.Module, dict, object]:
    """The model to train, the `model_cfg` that rebuilds it, and its tokenizer."""
    if cfg.model_name:
        name = cfg.model_name
        if Path(name).is_dir():  # continue from a dir this trainer wrote
            name = f"local-dir:{name}"
        model, _, _ = open_clip.create_model_and_transforms(
            name, pretrained=cfg.pretrained or None, image_resize_mode=cfg.resize_mode
        )
        return model, open_clip.get_model_config(name), open_clip.get_tokenizer(name)

    if cfg.vision_width % cfg.vision_heads or cfg.text_width % cfg.text_heads:
        raise ValueError("vision_width and text_width must be multiples of vision_heads and text_heads")
    model_cfg = {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "width": cfg.vision_width,
            "layers": cfg.vision_layers,
            "head_width": cfg.vision_width // cfg.vision_heads,
        },
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": 49408,  # SimpleTokenizer's vocabulary
            "width": cfg.text_width,
            "heads": cfg.text_heads,
            "layers": cfg.text_layers,
        },
    }
    model = open_clip.CLIP(**model_cfg)
    preprocess_cfg = asdict(PreprocessCfg(size=cfg.image_size, resize_mode=cfg.resize_mode))
    open_clip.set_model_preprocess_cfg(model, preprocess_cfg)
    return model, model_cfg, open_clip.SimpleTokenizer(context_length=cfg.context_length)


def save_model_dir(model: torch.nn.Module, model_cfg: dict, tokenizer: object, out: Path) -> None:
    """open_clip's local-dir format: the config (architecture + preprocessing) and safetensors weights."""
    config = {"model_cfg": model_cfg, "preprocess_cfg": model.visual.preprocess_cfg}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(out / WEIGHTS_FILE)  # a reader never sees half-written weights
    if hasattr(tokenizer, "save_pretrained"):  # HF tokenizers: open_clip's local-dir reads them from the dir
        tokenizer.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------
# loss and schedule


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` matches row i of `b`; every other row is a negative."""
    logits = scale * a @ b.T
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def lr_at(step: int, cfg: ClipTrainConfig) -> float:
    """Linear warmup, then cosine decay from `lr` to `min_lr` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# data


class RandomRelativeCrop:
    """A random window over the image: `scale` of its area, aspect jittered relative to its own.

    A scale above 1 zooms out: the window overhangs the image and the rest is clutter (a random
    colour under a few random shapes), as a loose crop of a scene shows background around the
    object. torchvision's
    RandomResizedCrop draws absolute aspect ratios and never zooms out, so on a 3:2 image it never
    even yields the whole image, the very view search embeds. Uses torch's RNG, so it follows
    `torch.manual_seed`.
    """

    def __init__(self, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.scale, self.log_ratio = scale, (math.log(ratio[0]), math.log(ratio[1]))

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        area = torch.empty(1).uniform_(*self.scale).item()
        ratio = math.exp(torch.empty(1).uniform_(*self.log_ratio).item())
        w = max(1, round(width * math.sqrt(area * ratio)))
        h = max(1, round(height * math.sqrt(area / ratio)))
        # the window's top-left corner, anywhere that keeps it inside the image or the image inside it
        x = torch.randint(min(0, width - w), max(0, width - w) + 1, (1,)).item()
        y = torch.randint(min(0, height - h), max(0, height - h) + 1, (1,)).item()
        window = Image.new("RGB", (w, h), _random_colour())
        if w > width or h > height:
            _draw_clutter(window)
        window.paste(image, (-x, -y))
        return window


def _random_colour() -> tuple[int, int, int]:
    return tuple(torch.randint(0, 256, (3,)).tolist())


def _draw_clutter(image: Image.Image) -> None:
    """A few random rectangles, ellipses and lines: a background that is not a flat colour."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for _ in range(torch.randint(2, 8, (1,)).item()):
        xs = sorted(torch.randint(0, width, (2,)).tolist())
        ys = sorted(torch.randint(0, height, (2,)).tolist())
        box = (xs[0], ys[0], xs[1], ys[1])
        shape = torch.randint(0, 3, (1,)).item()
        if shape == 0:
            draw.rectangle(box, fill=_random_colour())
        elif shape == 1:
            draw.ellipse(box, fill=_random_colour())
        else:
            draw.line(box, fill=_random_colour(), width=torch.randint(1, 4, (1,)).item())


class TwoViews(Dataset):
    """KB image i -> (augmented view, another augmented view, tokenized title)."""

    def __init__(self, kb: KB, records: list[ImageRecord], augment, tokenizer):
        self.kb, self.records, self.augment = kb, records, augment
        self.tokens = tokenizer([r.title or r.text or r.id for r in records])  # titles are short: one pass

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        with Image.open(self.kb.image_path(self.records[i])) as im:
            image = im.convert("RGB")
        return self.augment(image), self.augment(image), self.tokens[i]


def _forever(loader: DataLoader):
    while True:  # each pass reshuffles from the loader's seeded generator
        yield from loader


# ---------------------------------------------------------------------------------------------
# evaluation


@dataclass
class SceneQuery:
    image: Image.Image  # the object's crop out of its scene (or out of the KB image itself)
    image_id: str  # the KB image it shows: the right answer


def eval_queries(kb: KB, records: list[ImageRecord], max_queries: int,
                 jitter: float) -> tuple[str, list[SceneQuery], list[SceneQuery]]:
    """(which test, queries, the same with jittered boxes): scene-object crops, else crops of KB images."""
    queries = scene_queries(kb, max_queries)
    if queries:
        return "scene_crops", queries, scene_queries(kb, max_queries, jitter=jitter)
    queries = image_crop_queries(kb, records, max_queries)
    if queries:
        return "kb_image_crops", queries, image_crop_queries(kb, records, max_queries, jitter=jitter)
    return "none", [], []


def image_crop_queries(kb: KB, records: list[ImageRecord], max_queries: int, jitter: float = 0.0,
                       area: tuple[float, float] = (0.25, 0.6), seed: int = 0) -> list[SceneQuery]:
    """One random crop (`area` of the image, aspect within 3:4..4:3 of its own) of each of up to
    `max_queries` KB images, a seeded subset in file order: the queries of a KB without scenes.

    Subset and boxes come from one seeded generator and the jitter (as in `scene_queries`, clipped
    to the image) from another, so the jittered set moves exactly the boxes of the plain one.
    """
    rng, jitter_rng = random.Random(seed), random.Random(seed + 1)
    chosen = sorted(rng.sample(range(len(records)), min(max(0, max_queries), len(records))))
    queries = []
    for i in chosen:
        image = _open_rgb(kb, records[i])
        fraction, ratio = rng.uniform(*area), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = min(image.width, max(1.0, image.width * math.sqrt(fraction * ratio)))
        h = min(image.height, max(1.0, image.height * math.sqrt(fraction / ratio)))
        x1, y1 = rng.uniform(0, image.width - w), rng.uniform(0, image.height - h)
        x2, y2 = x1 + w, y1 + h
        x1, x2 = x1 + jitter_rng.uniform(-jitter, jitter) * w, x2 + jitter_rng.uniform(-jitter, jitter) * w
        y1, y2 = y1 + jitter_rng.uniform(-jitter, jitter) * h, y2 + jitter_rng.uniform(-jitter, jitter) * h
        box = (max(0, round(x1)), max(0, round(y1)), min(image.width, round(x2)), min(image.height, round(y2)))
        if box[2] > box[0] and box[3] > box[1]:
            queries.append(SceneQuery(image.crop(box), records[i].id))
    return queries


def scene_queries(kb: KB, max_queries: int, jitter: float = 0.0) -> list[SceneQuery]:
    """Crops of scene objects (bbox in scene pixels), in file order, up to `max_queries`.

    With `jitter`, each side of a box moves by up to that fraction of the box's size, as a
    policy's predicted box would; the draws come from a fixed seed in file order, so every run and
    every model is scored on the same crops.
    """
    rng = random.Random(0)
    queries: list[SceneQuery] = []
    for scene in kb.scenes():
        if len(queries) >= max_queries:
            break
        path = kb.root / str(scene.get("path", ""))
        if not path.is_file():
            continue
        with Image.open(path) as im:
            image = im.convert("RGB")
        for obj in scene.get("objects", []):
            x1, y1, x2, y2 = (float(v) for v in obj["bbox"])
            w, h = x2 - x1, y2 - y1
            x1, x2 = x1 + rng.uniform(-jitter, jitter) * w, x2 + rng.uniform(-jitter, jitter) * w
            y1, y2 = y1 + rng.uniform(-jitter, jitter) * h, y2 + rng.uniform(-jitter, jitter) * h
            box = (max(0, round(x1)), max(0, round(y1)), min(image.width, round(x2)), min(image.height, round(y2)))
            if box[2] > box[0] and box[3] > box[1] and len(queries) < max_queries:
                queries.append(SceneQuery(image.crop(box), str(obj["image_id"])))
    return queries


def encode_kb(encoder: ImageEncoder, kb: KB, records: list[ImageRecord]) -> np.ndarray:
    """Embeddings of every KB image, decoded one batch at a time."""
    return np.concatenate([
        encoder.encode([_open_rgb(kb, r) for r in records[start : start + encoder.batch_size]])
        for start in range(0, len(records), encoder.batch_size)
    ])


def retrieval_recall(encoder: ImageEncoder, gallery: np.ndarray, records: list[ImageRecord], queries: list[SceneQuery]) -> dict:
    """Image -> image recall@1/@5 of crop queries against the KB images' embeddings `gallery`.

    Without an answerable query the recalls are None: there is nothing to measure.
    """
    row_of = {r.id: i for i, r in enumerate(records)}
    answerable = [q for q in queries if q.image_id in row_of]
    if not answerable:
        return {"recall@1": None, "recall@5": None, "num_queries": 0, "num_gallery": len(records)}
    scores = encoder.encode([q.image for q in answerable]) @ gallery.T
    target = np.array([row_of[q.image_id] for q in answerable])
    # rank of the right answer = how many gallery images score strictly higher
    rank = (scores > scores[np.arange(len(target)), target][:, None]).sum(axis=1)
    return {
        "recall@1": float((rank < 1).mean()),
        "recall@5": float((rank < 5).mean()),
        "num_queries": len(answerable),
        "num_gallery": len(records),
    }


def _open_rgb(kb: KB, record: ImageRecord) -> Image.Image:
    with Image.open(kb.image_path(record)) as im:
        return im.convert("RGB")
