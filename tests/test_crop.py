"""Crop boxes live in the pixels the policy sees (after the Qwen2-VL smart resize); check the mapping."""

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessor

from tools.base import Toolbox, ToolContext
from tools.config import VisionResizeConfig
from tools.crop import CropTool
from tools.imaging import seen_size, seen_to_original_box

VISION = VisionResizeConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 256)
ODD_SIZES = [(333, 517), (1001, 77), (29, 29), (448, 336), (17, 901), (640, 479), (2000, 1999)]


@pytest.fixture(scope="module")
def processor():
    return Qwen2VLImageProcessor(
        patch_size=VISION.patch_size, merge_size=VISION.merge_size,
        min_pixels=VISION.min_pixels, max_pixels=VISION.max_pixels,
    )


@pytest.mark.parametrize("width,height", ODD_SIZES)
def test_seen_size_matches_the_processor(processor, width, height):
    image = Image.new("RGB", (width, height), "white")
    _, grid_h, grid_w = processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert seen_size(width, height, VISION) == (grid_w * VISION.patch_size, grid_h * VISION.patch_size)


@pytest.mark.parametrize("width,height", ODD_SIZES)
def test_crop_of_seen_box_contains_the_marked_region(width, height):
    """Paint a red rectangle in original pixels; the box the policy would draw around it (in seen
    pixels) must crop that rectangle out of the original, with at most a pixel of slack per side."""
    rng = np.random.default_rng(width * 7919 + height)
    original = Image.new("RGB", (width, height), "white")
    ox1, oy1 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    ox2, oy2 = ox1 + max(width // 3, 8), oy1 + max(height // 3, 8)
    ox2, oy2 = min(ox2, width), min(oy2, height)
    original.paste((255, 0, 0), (ox1, oy1, ox2, oy2))

    sw, sh = seen_size(width, height, VISION)
    seen_box = [ox1 * sw / width, oy1 * sh / height, ox2 * sw / width, oy2 * sh / height]
    if min(seen_box[2] - seen_box[0], seen_box[3] - seen_box[1]) < 4:
        pytest.skip("region too small to crop at this scale")
    result = Toolbox([CropTool(VISION)]).call("crop", {"image": 0, "bbox": seen_box}, ToolContext([original]))
    assert not result.is_error, result.text
    crop = np.asarray(result.images[0])
    assert abs(crop.shape[1] - (ox2 - ox1)) <= 2 and abs(crop.shape[0] - (oy2 - oy1)) <= 2
    red = (crop[..., 0] == 255) & (crop[..., 1] == 0)
    # All of the marked region and (by the size check above) little else: not shifted, not rescaled.
    assert red.sum() == (ox2 - ox1) * (oy2 - oy1)
    assert "[image 1]" in result.text


def test_box_mapping_rounds_outward_and_clamps():
    assert seen_to_original_box((10.2, 10.2, 20.7, 20.7), (200, 100), (100, 50)) == (20, 20, 42, 42)
    assert seen_to_original_box((0, 0, 100, 50), (201, 99), (100, 50)) == (0, 0, 201, 99)


def test_an_image_the_processor_refuses_is_an_error_result_not_a_crash():
    """Qwen's resize refuses an aspect ratio over 200: the policy (or an MCP client) reads why (invariant 5)."""
    result = Toolbox([CropTool(VISION)]).call("crop", {"image": 0, "bbox": [0, 0, 10, 10]},
                                               ToolContext([Image.new("RGB", (2000, 8), "white")]))
    assert result.is_error and "image 0 (2000x8) cannot be cropped" in result.text
