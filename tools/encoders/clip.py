"""The CLIP image encoder behind reverse image search (query image -> nearest KB images).

`load_image_encoder` takes either a dir written by `mmsearch clip train` (open_clip's own
local-dir format: `open_clip_config.json` + `open_clip_model.safetensors`, which
`open_clip.create_model_and_transforms("local-dir:DIR")` loads) or an open_clip model name with a
`pretrained` tag (`ViT-B-32` + `laion2b_s34b_b79k`, or an `hf-hub:org/repo` name). Both go through
open_clip, so the embedded tiny model and a real checkpoint take the same code path.

`version` names the weights, so an index built with one encoder is never searched with another:
for a dir it is a hash of the config and weights files; for a named model it is the name, the tag
and the open_clip version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from tools.config import ImageEncoderConfig
from tools.device import resolve_device

# File names of open_clip's local-dir / HF-hub format; the trainer writes exactly these.
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

HF_HUB_PREFIX = "hf-hub:"


class ImageEncoder:
    """An open_clip model's image tower and its inference preprocessing, as a batch function."""

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        *,
        name: str,
        version: str,
        dim: int,
        device: str = "cpu",
        batch_size: int = 64,
    ):
        self.model = model
        self.preprocess = preprocess
        self.name = name
        self.version = version
        self.dim = dim
        self.device = device
        self.batch_size = batch_size

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> np.ndarray:
        """L2-normalised float32 embeddings, shape [len(images), dim]."""
        was_training = self.model.training
        self.model.eval()  # the trainer evaluates with its live model; leave it as we found it
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in batch]).to(self.device)
            features = self.model.encode_image(pixels, normalize=True)
            out[start : start + len(batch)] = features.float().cpu().numpy()
        self.model.train(was_training)
        return out


def load_image_encoder(cfg: ImageEncoderConfig, device: str = "auto") -> ImageEncoder:
    device = resolve_device(device)
    path = Path(cfg.name)
    if path.is_dir():
        return _load_dir(path, cfg, device)
    if cfg.name.startswith(HF_HUB_PREFIX) or cfg.name in open_clip.list_models():
        return _load_named(cfg, device)
    raise ValueError(
        f"image encoder {cfg.name!r} is neither a dir written by `mmsearch clip train` "
        f"(with {CONFIG_FILE} and {WEIGHTS_FILE}) nor an open_clip model name "
        f"(see open_clip.list_models(), e.g. 'ViT-B-32' with pretrained='laion2b_s34b_b79k')"
    )


def _load_dir(path: Path, cfg: ImageEncoderConfig, device: str) -> ImageEncoder:
    model_cfg = read_model_dir_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        # open_clip would only warn and hand back random weights; an index of those is garbage.
        raise ValueError(f"{path} has {CONFIG_FILE} but no {WEIGHTS_FILE}: not a trained CLIP dir")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"could not load the CLIP model in {path}: {exc}") from exc
    return ImageEncoder(
        model.eval(), preprocess, name=cfg.name, version=model_dir_version(path),
        dim=int(model_cfg["embed_dim"]), device=device, batch_size=cfg.batch_size,
    )


def _load_named(cfg: ImageEncoderConfig, device: str) -> ImageEncoder:
    is_hub = cfg.name.startswith(HF_HUB_PREFIX)
    if not is_hub and not cfg.pretrained:
        raise ValueError(
            f"open_clip model {cfg.name!r} needs a `pretrained` tag (one of "
            f"{open_clip.list_pretrained_tags_by_model(cfg.name)}) or weights file; "
            "random weights would make a useless index"
        )
    # Hub downloads and file paths happen inside open_clip; its errors already say what was missing.
    model, _, preprocess = open_clip.create_model_and_transforms(
        cfg.name, pretrained=None if is_hub else cfg.pretrained, device=device
    )
    if Path(cfg.pretrained).is_file():
        weights_id = "sha256:" + _hash_files([Path(cfg.pretrained)])
    else:
        weights_id = cfg.pretrained
    version = f"{cfg.name}/{weights_id}@open_clip-{open_clip.__version__}"
    return ImageEncoder(
        model.eval(), preprocess, name=cfg.name, version=version,
        dim=int(open_clip.get_model_config(cfg.name)["embed_dim"]), device=device, batch_size=cfg.batch_size,
    )


def read_model_dir_config(path: Path) -> dict:
    """The `model_cfg` of a trainer-written dir; a ValueError says what is missing or wrong."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{path} is not a CLIP model dir: it has no {CONFIG_FILE} (write one with `mmsearch clip train`)")
    try:
        model_cfg = json.loads(config_path.read_text(encoding="utf-8"))["model_cfg"]
        int(model_cfg["embed_dim"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{config_path} is not an open_clip config with model_cfg.embed_dim ({exc!r})") from None
    return model_cfg


def model_dir_version(path: Path) -> str:
    """Changes whenever the weights (or the architecture/preprocess config) change."""
    return "sha256:" + _hash_files([Path(path) / CONFIG_FILE, Path(path) / WEIGHTS_FILE])


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
