"""The CLIP image encoder and its trainer: the model dir round trip, determinism, versions, errors.

The fast tests train a very small model for a few steps on the session's 60-entity world; the
slow test trains the embedded default on the 300-entity world and checks retrieval quality.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tools.config import ImageEncoderConfig
from tools.encoders.clip import CONFIG_FILE, WEIGHTS_FILE, load_image_encoder
from tools.encoders.clip_train import ClipTrainConfig, RandomRelativeCrop, train_clip
from tools.kb import KB

TINY = {
    "embed_dim": 32, "image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 1, "vision_heads": 2,
    "text_width": 16, "text_layers": 1, "text_heads": 2, "context_length": 16,
    "steps": 3, "batch_size": 16, "warmup_steps": 1, "log_every": 1, "eval_every": 2, "eval_max_queries": 24,
    "device": "cpu",
}


def tiny_config(world_dir: Path, out: Path, **overrides) -> ClipTrainConfig:
    return ClipTrainConfig(kb=str(world_dir), out=str(out), **(TINY | overrides))


@pytest.fixture(scope="module")
def trained(world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clip") / "seed0"
    return out, train_clip(tiny_config(world_dir, out), progress=False)


def kb_images(world_dir: Path, n: int) -> list[Image.Image]:
    kb = KB(world_dir)
    return [Image.open(kb.image_path(r)) for r, _ in zip(kb.images(), range(n))]


def test_trained_dir_loads_and_encodes(trained, world_dir):
    out, report = trained
    encoder = load_image_encoder(ImageEncoderConfig(name=str(out), batch_size=2), device="cpu")
    assert encoder.dim == 32 and encoder.version == report["version"]
    # Not RGB on purpose: grey and RGBA must be converted, and 5 images cross a batch boundary.
    images = kb_images(world_dir, 3) + [Image.new("L", (50, 30), 128), Image.new("RGBA", (20, 40), (255, 0, 0, 128))]
    embeddings = encoder.encode(images)
    assert embeddings.dtype == np.float32 and embeddings.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([]).shape == (0, 32)

    again = load_image_encoder(ImageEncoderConfig(name=str(out), batch_size=2), device="cpu")
    assert again.version == encoder.version
    np.testing.assert_array_equal(again.encode(images), embeddings)


def test_report_metrics_and_logs(trained):
    out, report = trained
    assert json.loads((out / "report.json").read_text()) == report
    assert report["steps"] == 3 and report["params"] > 0 and report["seconds"] >= 0
    assert report["num_queries"] > 0 and report["num_gallery"] > 0 and report["eval_queries"] == "scene_crops"
    for key in ("recall@1", "recall@5", "jitter_recall@1", "jitter_recall@5"):
        assert 0.0 <= report[key] <= 1.0
    assert report["recall@1"] <= report["recall@5"]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "recall@1" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in train_rows)
    assert [r["step"] for r in eval_rows] == [2, 3]  # every eval_every steps, and at the end
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_same_seed_same_weights_other_seed_other_version(trained, world_dir, tmp_path):
    out, report = trained
    again = train_clip(tiny_config(world_dir, tmp_path / "again"), progress=False)
    assert again["version"] == report["version"]
    first, second = load_file(str(out / WEIGHTS_FILE)), load_file(str(tmp_path / "again" / WEIGHTS_FILE))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    other = train_clip(tiny_config(world_dir, tmp_path / "seed1", seed=1, steps=1, eval_every=0), progress=False)
    assert other["version"] != report["version"]
    assert load_image_encoder(ImageEncoderConfig(name=str(tmp_path / "seed1"))).version == other["version"]


def test_fine_tunes_from_a_trained_dir(trained, world_dir, tmp_path):
    # The same code path as fine-tuning a named open_clip model: architecture and weights come
    # from open_clip, the from-scratch dims are ignored.
    out, _ = trained
    cfg = tiny_config(world_dir, tmp_path / "ft", model_name=str(out), embed_dim=999, steps=1, eval_every=0)
    report = train_clip(cfg, progress=False)
    encoder = load_image_encoder(ImageEncoderConfig(name=str(tmp_path / "ft")), device="cpu")
    assert encoder.dim == 32 and encoder.version == report["version"]


def test_bad_encoder_names_are_clear_errors(trained, tmp_path):
    out, _ = trained
    with pytest.raises(ValueError, match=CONFIG_FILE):
        load_image_encoder(ImageEncoderConfig(name=str(tmp_path)))  # an empty dir
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / CONFIG_FILE).write_text((out / CONFIG_FILE).read_text())
    with pytest.raises(ValueError, match=WEIGHTS_FILE):
        load_image_encoder(ImageEncoderConfig(name=str(no_weights)))
    (no_weights / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="open_clip config"):
        load_image_encoder(ImageEncoderConfig(name=str(no_weights)))
    with pytest.raises(ValueError, match="neither a dir"):
        load_image_encoder(ImageEncoderConfig(name=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="pretrained"):  # random ViT-B-32 weights would index garbage
        load_image_encoder(ImageEncoderConfig(name="ViT-B-32", pretrained=""))


def test_relative_crop_covers_crops_and_loose_boxes():
    image = Image.new("RGB", (60, 40), (255, 0, 0))
    torch.manual_seed(0)
    assert RandomRelativeCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0))(image).size == (60, 40)  # the whole image
    for _ in range(20):
        crop = RandomRelativeCrop(scale=(0.3, 0.5))(image)
        assert crop.width <= 60 and crop.height <= 40 and crop.getcolors() == [(crop.width * crop.height, (255, 0, 0))]
        loose = RandomRelativeCrop(scale=(2.0, 3.0), ratio=(1.0, 1.0))(image)
        assert loose.width > 60 and loose.height > 40
        red = {colour: count for count, colour in loose.getcolors(loose.width * loose.height)}
        assert red[(255, 0, 0)] >= 60 * 40  # the whole image is inside the window


@pytest.mark.slow
def test_default_training_finds_scene_crops(tmp_path):
    from data_pipeline.world import WorldConfig, build_world

    world = tmp_path / "world"
    build_world(WorldConfig(out=str(world), seed=0, entities=300), progress=False)
    report = train_clip(replace(ClipTrainConfig(), kb=str(world), out=str(tmp_path / "clip"), device="cpu"), progress=False)
    # Measured (seed 0, 150 steps, 2-core CPU): recall@1 1.0, recall@5 1.0, jitter_recall@1 0.945,
    # jitter_recall@5 0.997. An untrained model already gets recall@1 1.0 on exact boxes (the crop is
    # the KB image resized) but jitter_recall@1 only 0.39: loose and tight boxes are what training buys.
    assert report["recall@1"] >= 0.95
    assert report["jitter_recall@1"] >= 0.88
    assert report["jitter_recall@5"] >= 0.97


# --- a KB without scenes: evaluated on crops of its own images -----------------------------------------

@pytest.fixture(scope="module")
def sceneless_kb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve generated images (a coloured shape on a coloured ground) with titles, and no scenes.jsonl."""
    from PIL import ImageDraw

    root = tmp_path_factory.mktemp("sceneless_kb")
    (root / "images").mkdir()
    rows = []
    for i in range(12):
        image = Image.new("RGB", (48 + 4 * i, 40), ((37 * i) % 256, (91 * i) % 256, (53 * i + 80) % 256))
        draw = ImageDraw.Draw(image)
        box = (4 + i, 6, 30 + 2 * i, 34)
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=((200 - 17 * i) % 256, (29 * i) % 256, 255 - 9 * i))
        image.save(root / "images" / f"{i}.png")
        rows.append({"id": f"img{i}", "path": f"images/{i}.png", "title": f"thing number {i}"})
    (root / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_sceneless_kb_is_evaluated_on_crops_of_its_images(sceneless_kb, tmp_path):
    from tools.encoders.clip_train import image_crop_queries

    assert not (sceneless_kb / "scenes.jsonl").exists()
    out = tmp_path / "clip"
    report = train_clip(tiny_config(sceneless_kb, out, batch_size=8, eval_max_queries=5), progress=False)
    assert report["eval_queries"] == "kb_image_crops"
    assert report["num_queries"] == 5 and report["num_gallery"] == 12
    for key in ("recall@1", "recall@5", "jitter_recall@1", "jitter_recall@5"):
        assert 0.0 <= report[key] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "recall@1" in r] == [2, 3]

    # The same seeded subset and boxes every time; jitter moves the boxes, not the choice of images.
    records = list(KB(sceneless_kb).images())
    plain, again = image_crop_queries(KB(sceneless_kb), records, 5), image_crop_queries(KB(sceneless_kb), records, 5)
    jittered = image_crop_queries(KB(sceneless_kb), records, 5, jitter=0.2)
    assert [q.image_id for q in plain] == [q.image_id for q in again] == [q.image_id for q in jittered]
    assert [q.image.tobytes() for q in plain] == [q.image.tobytes() for q in again]
    assert [q.image.size for q in plain] != [q.image.size for q in jittered]
    for q in plain:  # a crop strictly inside its image: a quarter to 60% of its area, give or take rounding
        full = Image.open(sceneless_kb / "images" / f"{q.image_id.removeprefix('img')}.png")
        assert 0.2 * full.width * full.height <= q.image.width * q.image.height <= 0.7 * full.width * full.height


def test_no_queries_records_null_recall_not_zero(sceneless_kb, tmp_path, caplog):
    out = tmp_path / "clip"
    with caplog.at_level("WARNING", logger="tools.encoders.clip_train"):
        report = train_clip(tiny_config(sceneless_kb, out, batch_size=8, eval_max_queries=0), progress=False)
    assert "no evaluation queries" in caplog.text
    assert report["eval_queries"] == "none" and report["num_queries"] == 0
    assert all(report[k] is None for k in ("recall@1", "recall@5", "jitter_recall@1", "jitter_recall@5"))
    assert json.loads((out / "report.json").read_text())["recall@1"] is None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any("recall@1" in r for r in rows)  # training rows only: no recall over zero queries
