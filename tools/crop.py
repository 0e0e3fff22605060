"""`crop(image, bbox)`: cut a region out of a conversation image and return it as a new image."""

from __future__ import annotations

import math

from tools.base import Tool, ToolContext, ToolInputError, ToolResult, image_arg, new_image_number
from tools.config import VisionResizeConfig
from tools.imaging import seen_size, seen_to_original_box

MIN_SIDE_PX = 4  # smaller crops carry no information once the processor upsamples them


class CropTool(Tool):
    name = "crop"

    def __init__(self, vision: VisionResizeConfig):
        self.vision = vision
        self.description = (
            "Crop a region of an image to look at it closely or to search for it. `image` is the image "
            "number; `bbox` is [x1, y1, x2, y2] in pixels of that image as you see it. "
            "Returns the crop as a new numbered image."
        )
        self.parameters = {
            "type": "object",
            "properties": {
                "image": {"type": "integer", "minimum": 0, "description": "number of the image to crop"},
                "bbox": {
                    "type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                    "description": "[x1, y1, x2, y2] in pixels of the image as you see it",
                },
            },
            "required": ["image", "bbox"],
            "additionalProperties": False,
        }

    def check(self, arguments: dict, context: ToolContext) -> None:
        image = image_arg(context, arguments["image"])
        try:
            width, height = seen_size(image.width, image.height, self.vision)
        except ValueError as exc:  # e.g. an aspect ratio the processor refuses: an error the caller reads
            raise ToolInputError(f"image {arguments['image']} ({image.width}x{image.height}) cannot be cropped: {exc}") from exc
        x1, y1, x2, y2 = arguments["bbox"]
        for label, value in (("x1", x1), ("y1", y1), ("x2", x2), ("y2", y2)):
            if not math.isfinite(value):
                raise ToolInputError(f"bbox {label} is {value}; coordinates must be finite numbers")
            if value < 0:
                raise ToolInputError(f"bbox {label}={value:g} is negative; coordinates start at 0")
        for label, value, limit, side in (("x1", x1, width, "width"), ("x2", x2, width, "width"),
                                          ("y1", y1, height, "height"), ("y2", y2, height, "height")):
            if value > limit:
                raise ToolInputError(f"bbox {label}={value:g} exceeds image {side} {limit} (image {arguments['image']} is {width}x{height})")
        if x1 >= x2 or y1 >= y2:
            raise ToolInputError(f"bbox [{x1:g}, {y1:g}, {x2:g}, {y2:g}] is empty or reversed; need x1 < x2 and y1 < y2")
        if x2 - x1 < MIN_SIDE_PX or y2 - y1 < MIN_SIDE_PX:
            raise ToolInputError(f"bbox is {x2 - x1:g}x{y2 - y1:g} px; each side must be at least {MIN_SIDE_PX} px")

    def run_batch(self, calls: list[tuple[dict, ToolContext]]) -> list[ToolResult]:
        return [self._crop(args, ctx) for args, ctx in calls]

    def _crop(self, arguments: dict, context: ToolContext) -> ToolResult:
        image = context.images[arguments["image"]]
        seen = seen_size(image.width, image.height, self.vision)
        box = seen_to_original_box(tuple(arguments["bbox"]), (image.width, image.height), seen)
        crop = image.crop(box)
        shown = [round(v) for v in arguments["bbox"]]
        return ToolResult(
            text=f"Cropped image {arguments['image']} at {shown} -> [image {new_image_number(context)}]",
            images=[crop],
            box=list(box),
        )
