"""Image geometry shared by the tools: the size the policy sees an image at, and crop-box mapping.

Qwen2-VL-family processors resize every image ("smart resize") to sides that are multiples of
patch_size × merge_size, within [min_pixels, max_pixels]. The policy reads coordinates off that
resized image, so crop boxes arrive in its pixels and must be mapped back to the original's.
"""

from __future__ import annotations

import math

from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from tools.config import VisionResizeConfig


def seen_size(width: int, height: int, vision: VisionResizeConfig) -> tuple[int, int]:
    """(width, height) of the image as the policy sees it after the processor's resize."""
    h, w = smart_resize(
        height, width, factor=vision.patch_size * vision.merge_size,
        min_pixels=vision.min_pixels, max_pixels=vision.max_pixels,
    )
    return w, h


def seen_to_original_box(
    bbox: tuple[float, float, float, float], original: tuple[int, int], seen: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Map a box in seen pixels to original pixels, rounding outward so the crop never loses edges."""
    (ow, oh), (sw, sh) = original, seen
    x1, y1, x2, y2 = bbox
    sx, sy = ow / sw, oh / sh
    box = (math.floor(x1 * sx), math.floor(y1 * sy), math.ceil(x2 * sx), math.ceil(y2 * sy))
    return max(0, box[0]), max(0, box[1]), min(ow, box[2]), min(oh, box[3])
