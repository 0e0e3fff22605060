"""Symbols drawn into a box: the charges on flags, seals and emblems.

Each glyph paints a mask (mode "L": 255 where the glyph is, cut-outs painted back to 0), which the
caller fills with one colour; that keeps holes (a ring, a key's bow) right on any background.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from PIL import Image, ImageDraw

Box = tuple[float, float, float, float]
ON, OFF = 255, 0


def _at(box: Box, points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Unit-square points placed in `box`."""
    x0, y0, x1, y1 = box
    return [(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in points]


def _star_points(n: int, inner: float, turn: float = -math.pi / 2) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        r = 0.5 if i % 2 == 0 else 0.5 * inner
        a = turn + i * math.pi / n
        pts.append((0.5 + r * math.cos(a), 0.5 + r * math.sin(a)))
    return pts


def star(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.polygon(_at(box, _star_points(5, 0.42)), fill=ON)


def disc(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.ellipse(_at(box, [(0.1, 0.1), (0.9, 0.9)]), fill=ON)


def ring(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.ellipse(_at(box, [(0.05, 0.05), (0.95, 0.95)]), fill=ON)
    d.ellipse(_at(box, [(0.27, 0.27), (0.73, 0.73)]), fill=OFF)


def crescent(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.ellipse(_at(box, [(0.05, 0.05), (0.95, 0.95)]), fill=ON)
    d.ellipse(_at(box, [(0.3, 0.0), (1.1, 0.8)]), fill=OFF)


def diamond(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.polygon(_at(box, [(0.5, 0.0), (0.92, 0.5), (0.5, 1.0), (0.08, 0.5)]), fill=ON)


def triangle(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.polygon(_at(box, [(0.5, 0.05), (0.97, 0.92), (0.03, 0.92)]), fill=ON)


def cross(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.rectangle(_at(box, [(0.38, 0.05), (0.62, 0.95)]), fill=ON)
    d.rectangle(_at(box, [(0.05, 0.38), (0.95, 0.62)]), fill=ON)


def sun(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.ellipse(_at(box, [(0.28, 0.28), (0.72, 0.72)]), fill=ON)
    for i in range(8):
        a = i * math.pi / 4
        tip = (0.5 + 0.5 * math.cos(a), 0.5 + 0.5 * math.sin(a))
        left = (0.5 + 0.3 * math.cos(a - 0.25), 0.5 + 0.3 * math.sin(a - 0.25))
        right = (0.5 + 0.3 * math.cos(a + 0.25), 0.5 + 0.3 * math.sin(a + 0.25))
        d.polygon(_at(box, [left, tip, right]), fill=ON)


def square(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.rectangle(_at(box, [(0.15, 0.15), (0.85, 0.85)]), fill=ON)


def tower(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.rectangle(_at(box, [(0.25, 0.25), (0.75, 0.95)]), fill=ON)
    for u in (0.25, 0.44, 0.63):
        d.rectangle(_at(box, [(u, 0.1), (u + 0.12, 0.26)]), fill=ON)
    d.pieslice(_at(box, [(0.4, 0.62), (0.6, 0.82)]), 180, 360, fill=OFF)
    d.rectangle(_at(box, [(0.4, 0.72), (0.6, 0.95)]), fill=OFF)


def key(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.ellipse(_at(box, [(0.05, 0.3), (0.45, 0.7)]), fill=ON)
    d.ellipse(_at(box, [(0.16, 0.41), (0.34, 0.59)]), fill=OFF)
    d.rectangle(_at(box, [(0.42, 0.45), (0.95, 0.56)]), fill=ON)
    d.rectangle(_at(box, [(0.72, 0.56), (0.8, 0.72)]), fill=ON)
    d.rectangle(_at(box, [(0.86, 0.56), (0.94, 0.68)]), fill=ON)


def wheel(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.ellipse(_at(box, [(0.05, 0.05), (0.95, 0.95)]), fill=ON)
    d.ellipse(_at(box, [(0.17, 0.17), (0.83, 0.83)]), fill=OFF)
    width = max(1, int((box[2] - box[0]) * 0.07))
    for i in range(3):
        a = i * math.pi / 3
        dx, dy = 0.36 * math.cos(a), 0.36 * math.sin(a)
        d.line(_at(box, [(0.5 - dx, 0.5 - dy), (0.5 + dx, 0.5 + dy)]), fill=ON, width=width)
    d.ellipse(_at(box, [(0.38, 0.38), (0.62, 0.62)]), fill=ON)


def anchor(d: ImageDraw.ImageDraw, box: Box) -> None:
    width = max(1, int((box[2] - box[0]) * 0.09))
    d.ellipse(_at(box, [(0.38, 0.02), (0.62, 0.24)]), fill=ON)
    d.ellipse(_at(box, [(0.45, 0.09), (0.55, 0.17)]), fill=OFF)
    d.rectangle(_at(box, [(0.45, 0.2), (0.55, 0.92)]), fill=ON)
    d.rectangle(_at(box, [(0.25, 0.3), (0.75, 0.38)]), fill=ON)
    d.arc(_at(box, [(0.1, 0.4), (0.9, 0.95)]), 20, 160, fill=ON, width=width)
    d.polygon(_at(box, [(0.05, 0.6), (0.22, 0.55), (0.18, 0.75)]), fill=ON)
    d.polygon(_at(box, [(0.95, 0.6), (0.78, 0.55), (0.82, 0.75)]), fill=ON)


def tree(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.polygon(_at(box, [(0.5, 0.02), (0.85, 0.45), (0.15, 0.45)]), fill=ON)
    d.polygon(_at(box, [(0.5, 0.25), (0.95, 0.78), (0.05, 0.78)]), fill=ON)
    d.rectangle(_at(box, [(0.42, 0.75), (0.58, 0.98)]), fill=ON)


def crown(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.polygon(_at(box, [(0.05, 0.25), (0.28, 0.5), (0.5, 0.15), (0.72, 0.5), (0.95, 0.25),
                        (0.88, 0.72), (0.12, 0.72)]), fill=ON)
    d.rectangle(_at(box, [(0.12, 0.78), (0.88, 0.9)]), fill=ON)


def fish(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.ellipse(_at(box, [(0.05, 0.25), (0.72, 0.75)]), fill=ON)
    d.polygon(_at(box, [(0.62, 0.5), (0.97, 0.22), (0.97, 0.78)]), fill=ON)
    d.ellipse(_at(box, [(0.18, 0.38), (0.28, 0.48)]), fill=OFF)


def bell(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.polygon(_at(box, [(0.38, 0.1), (0.62, 0.1), (0.72, 0.35), (0.78, 0.7), (0.92, 0.82),
                        (0.08, 0.82), (0.22, 0.7), (0.28, 0.35)]), fill=ON)
    d.ellipse(_at(box, [(0.41, 0.8), (0.59, 0.98)]), fill=ON)


def mountain(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.polygon(_at(box, [(0.0, 0.9), (0.38, 0.15), (0.62, 0.6), (0.72, 0.4), (1.0, 0.9)]), fill=ON)
    d.polygon(_at(box, [(0.3, 0.31), (0.38, 0.15), (0.46, 0.31), (0.38, 0.26)]), fill=OFF)


def wave(d: ImageDraw.ImageDraw, box: Box) -> None:
    width = max(1, int((box[3] - box[1]) * 0.1))
    for row in (0.25, 0.5, 0.75):
        pts = [(t / 16, row + 0.1 * math.sin(t / 16 * 2 * math.pi * 2)) for t in range(17)]
        d.line(_at(box, pts), fill=ON, width=width, joint="curve")


def chevron(d: ImageDraw.ImageDraw, box: Box) -> None:
    d.polygon(_at(box, [(0.05, 0.45), (0.5, 0.1), (0.95, 0.45), (0.95, 0.7), (0.5, 0.35), (0.05, 0.7)]), fill=ON)
    d.polygon(_at(box, [(0.05, 0.8), (0.5, 0.45), (0.95, 0.8), (0.95, 1.0), (0.5, 0.65), (0.05, 1.0)]), fill=ON)


GLYPHS: dict[str, Callable[[ImageDraw.ImageDraw, Box], None]] = {
    f.__name__: f for f in (star, disc, ring, crescent, diamond, triangle, cross, sun, square, tower, key,
                            wheel, anchor, tree, crown, fish, bell, mountain, wave, chevron)
}


def paint_glyph(image: Image.Image, name: str, box: Box, colour: tuple[int, int, int]) -> None:
    # The mask covers only the glyph's box: painting through a full-image mask cost more than drawing.
    left, top = int(box[0]), int(box[1])
    mask = Image.new("L", (math.ceil(box[2]) - left + 1, math.ceil(box[3]) - top + 1), OFF)
    GLYPHS[name](ImageDraw.Draw(mask), (box[0] - left, box[1] - top, box[2] - left, box[3] - top))
    image.paste(colour, (left, top, left + mask.width, top + mask.height), mask)

