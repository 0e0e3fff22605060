"""Encoders behind the search indexes. `clip`: the image encoder for reverse image search;
`clip_train`: training or fine-tuning it on a KB.

Names are resolved lazily so importing a sibling module does not pay for torch and open_clip.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ImageEncoder": "tools.encoders.clip",
    "load_image_encoder": "tools.encoders.clip",
    "ClipTrainConfig": "tools.encoders.clip_train",
    "train_clip": "tools.encoders.clip_train",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
