"""The tool server's wire format: images as base64 PNG/JPEG, hits as JSON objects.

Server and client both use these functions, so the format is defined once. Images travel
losslessly (PNG) by default: a lossy re-encode would move CLIP embeddings and make remote results
differ from in-process ones. Scores are Python floats, which JSON round-trips exactly.
"""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from tools.search.types import Hit

MAX_PIXELS = 64_000_000  # far above any search image (the policy sees ~1 Mpx); below PIL's bomb limits


class ImageDecodeError(ValueError):
    """A request's image is not base64 or not a readable PNG/JPEG."""


def encode_image(image: Image.Image) -> str:
    """base64 of the image as PNG (lossless; compress_level=1 because CPU time matters more than bytes)."""
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")  # P, CMYK, I;16...: search converts to RGB anyway
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(data: str) -> Image.Image:
    """The image a base64 string holds, fully decoded (so a truncated file fails here, not in the encoder)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageDecodeError(f"not valid base64 ({exc})") from None
    if not raw:
        raise ImageDecodeError("empty image")
    try:
        with Image.open(io.BytesIO(raw)) as img:  # reads the header only
            if img.width * img.height > MAX_PIXELS:  # a decompression bomb: refuse before decoding
                raise ImageDecodeError(f"{img.width}x{img.height} pixels is more than the {MAX_PIXELS} allowed")
            img.load()
            return img.copy() if img.mode in ("RGB", "RGBA", "L") else img.convert("RGB")
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a PNG/JPEG image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"not a readable PNG/JPEG image ({type(exc).__name__}: {exc})") from None


def hit_to_json(hit: Hit) -> dict:
    data = hit.to_json()
    if hit.thumbnail is not None:
        data["thumbnail"] = encode_image(hit.thumbnail)
    return data


def hit_from_json(data: dict) -> Hit:
    thumbnail = data.get("thumbnail")
    return Hit(
        id=data["id"], title=data["title"], text=data["text"], score=float(data["score"]),
        entity_id=data.get("entity_id"), path=data.get("path"),
        thumbnail=decode_image(thumbnail) if thumbnail else None,
    )


def results_to_json(results: list[list[Hit]]) -> list[list[dict]]:
    return [[hit_to_json(hit) for hit in hits] for hits in results]


def results_from_json(results: list[list[dict]]) -> list[list[Hit]]:
    return [[hit_from_json(hit) for hit in hits] for hits in results]
