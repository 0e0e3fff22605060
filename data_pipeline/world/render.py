"""Pixels for a design: a pure function of (design, size), so any process renders the same image.

Everything is drawn at twice the size and box-filtered down, which anti-aliases edges cheaply.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw, ImageFilter

from data_pipeline.world.designs import (
    HAIR_COLOURS,
    PALETTE,
    SKIN_TONES,
    Design,
    EmblemDesign,
    FlagDesign,
    PaintingDesign,
    PortraitDesign,
    SealDesign,
)
from data_pipeline.world.glyphs import paint_glyph

SUPERSAMPLE = 2
PARCHMENT = (244, 238, 222)
EMBLEM_GROUND = (236, 232, 224)
OUTLINE = (55, 55, 55)
FRAME_WOOD, FRAME_GILT = (70, 50, 34), (200, 165, 70)
INK = (35, 28, 28)


def render(design: Design, size: tuple[int, int]) -> Image.Image:
    big = (size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE)
    draw_fn = {FlagDesign: _flag, SealDesign: _seal, EmblemDesign: _emblem, PortraitDesign: _portrait,
               PaintingDesign: _painting}[type(design)]
    return draw_fn(design, big).reduce(SUPERSAMPLE)


def _rgb(name: str) -> tuple[int, int, int]:
    return PALETTE[name]


def _flag(design: FlagDesign, size: tuple[int, int]) -> Image.Image:
    w, h = size
    c1, c2 = _rgb(design.c1), _rgb(design.c2)
    c3 = _rgb(design.c3) if design.c3 else None
    img = Image.new("RGB", size, c1)
    d = ImageDraw.Draw(img)
    layout = design.layout
    if layout == "bands2":
        d.rectangle((0, h // 2, w, h), fill=c2)
    elif layout == "bands3":
        d.rectangle((0, h // 3, w, 2 * h // 3), fill=c2)
        d.rectangle((0, 2 * h // 3, w, h), fill=c3)
    elif layout == "pales2":
        d.rectangle((w // 2, 0, w, h), fill=c2)
    elif layout == "pales3":
        d.rectangle((w // 3, 0, 2 * w // 3, h), fill=c2)
        d.rectangle((2 * w // 3, 0, w, h), fill=c3)
    elif layout in ("stripes5", "striped_canton"):
        for i in (1, 3):
            d.rectangle((0, i * h // 5, w, (i + 1) * h // 5), fill=c2)
        if layout == "striped_canton":
            d.rectangle((0, 0, int(w * 0.42), 3 * h // 5), fill=c3)
    elif layout == "canton":
        d.rectangle((0, 0, int(w * 0.45), h // 2), fill=c2)
    elif layout == "nordic":
        x, t = int(w * 0.36), int(h * 0.24)
        d.rectangle((x - t // 2, 0, x + t // 2, h), fill=c3)
        d.rectangle((0, h // 2 - t // 2, w, h // 2 + t // 2), fill=c3)
        d.rectangle((x - t // 4, 0, x + t // 4, h), fill=c2)
        d.rectangle((0, h // 2 - t // 4, w, h // 2 + t // 4), fill=c2)
    elif layout == "greek":
        t = int(h * 0.2)
        d.rectangle((w // 2 - t // 2, 0, w // 2 + t // 2, h), fill=c2)
        d.rectangle((0, h // 2 - t // 2, w, h // 2 + t // 2), fill=c2)
    elif layout == "saltire":
        t = int(h * 0.18)
        d.line((0, 0, w, h), fill=c2, width=t)
        d.line((0, h, w, 0), fill=c2, width=t)
    elif layout == "diagonal":
        d.polygon([(w, 0), (w, h), (0, h)], fill=c2)
    elif layout == "bend":
        d.polygon([(w, 0), (w, h), (0, h)], fill=c3)
        d.line((0, h, w, 0), fill=c2, width=int(h * 0.3))
    elif layout == "hoist_triangle":
        d.rectangle((0, h // 2, w, h), fill=c2)
        d.polygon([(0, 0), (int(w * 0.4), h // 2), (0, h)], fill=c3)
    elif layout == "border":
        d.rectangle((0, 0, w, h), fill=c2)
        m = int(h * 0.14)
        d.rectangle((m, m, w - m, h - m), fill=c1)
    elif layout == "quartered":
        d.rectangle((w // 2, 0, w, h // 2), fill=c2)
        d.rectangle((0, h // 2, w // 2, h), fill=c2)
    elif layout == "wide_pale":
        d.rectangle((w // 4, 0, 3 * w // 4, h), fill=c2)
    else:
        raise ValueError(f"unknown flag layout {layout!r}")
    if design.symbol:
        if design.symbol_place == "centre":
            cx, cy, s = w / 2, h / 2, h * 0.42
        else:
            cx, cy, s = w * 0.21, h * 0.26, h * 0.36
        paint_glyph(img, design.symbol, (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2), _rgb(design.symbol_colour))
    return img


def _circle(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, **kw) -> None:
    d.ellipse((cx - r, cy - r, cx + r, cy + r), **kw)


def _seal(design: SealDesign, size: tuple[int, int]) -> Image.Image:
    s = size[0]
    c = s / 2
    img = Image.new("RGB", size, PARCHMENT)
    d = ImageDraw.Draw(img)
    ring = _rgb(design.ring)
    if design.ring_style == "toothed":
        teeth = 24
        pts = [(c + s * (0.49 if i % 2 == 0 else 0.44) * math.cos(i * math.pi / teeth),
                c + s * (0.49 if i % 2 == 0 else 0.44) * math.sin(i * math.pi / teeth)) for i in range(2 * teeth)]
        d.polygon(pts, fill=ring)
    _circle(d, c, c, s * 0.45, fill=ring)
    if design.ring_style == "double":
        _circle(d, c, c, s * 0.41, outline=PARCHMENT, width=max(2, int(s * 0.015)))
    elif design.ring_style == "beaded":
        for i in range(16):
            a = i * math.pi / 8
            _circle(d, c + s * 0.405 * math.cos(a), c + s * 0.405 * math.sin(a), s * 0.022, fill=PARCHMENT)

    field = Image.new("RGB", size, _rgb(design.field))
    if design.field2:
        fd, second = ImageDraw.Draw(field), _rgb(design.field2)
        if design.division == "per_pale":
            fd.rectangle((c, 0, s, s), fill=second)
        elif design.division == "per_fess":
            fd.rectangle((0, c, s, s), fill=second)
        elif design.division == "quartered":
            fd.rectangle((c, 0, s, c), fill=second)
            fd.rectangle((0, c, c, s), fill=second)
        elif design.division == "chief":
            fd.rectangle((0, 0, s, s * 0.38), fill=second)
    mask = Image.new("L", size, 0)
    _circle(ImageDraw.Draw(mask), c, c, s * 0.36, fill=255)
    img.paste(field, (0, 0), mask)
    r = s * 0.22
    paint_glyph(img, design.charge, (c - r, c - r, c + r, c + r), _rgb(design.charge_colour))
    return img


# Emblem outlines in the unit square; "roundel" is an ellipse and handled apart.
SHAPES = {
    "shield": [(0.1, 0.04), (0.9, 0.04), (0.9, 0.5), (0.82, 0.72), (0.5, 0.97), (0.18, 0.72), (0.1, 0.5)],
    "hexagon": [(0.5, 0.02), (0.93, 0.26), (0.93, 0.74), (0.5, 0.98), (0.07, 0.74), (0.07, 0.26)],
    "lozenge": [(0.5, 0.0), (0.97, 0.5), (0.5, 1.0), (0.03, 0.5)],
    "square": [(0.06, 0.06), (0.94, 0.06), (0.94, 0.94), (0.06, 0.94)],
    "octagon": [(0.32, 0.03), (0.68, 0.03), (0.97, 0.32), (0.97, 0.68), (0.68, 0.97), (0.32, 0.97),
                (0.03, 0.68), (0.03, 0.32)],
}
# Where one, two or three motifs sit, as (centre x, centre y, size) in the unit square.
MOTIF_SLOTS = {1: [(0.5, 0.47, 0.42)], 2: [(0.33, 0.47, 0.27), (0.67, 0.47, 0.27)],
               3: [(0.5, 0.32, 0.24), (0.35, 0.6, 0.24), (0.65, 0.6, 0.24)]}


def _shape(img: Image.Image, shape: str, inset: float, colour: tuple[int, int, int]) -> None:
    s = img.size[0]
    lo, hi = s * inset, s * (1 - inset)
    d = ImageDraw.Draw(img)
    if shape == "roundel":
        d.ellipse((lo, lo, hi, hi), fill=colour)
    else:
        d.polygon([(lo + u * (hi - lo), lo + v * (hi - lo)) for u, v in SHAPES[shape]], fill=colour)


def _emblem(design: EmblemDesign, size: tuple[int, int]) -> Image.Image:
    s = size[0]
    img = Image.new("RGB", size, EMBLEM_GROUND)
    _shape(img, design.shape, 0.02, OUTLINE)
    inset = {"none": 0.035, "thin": 0.07, "thick": 0.11}[design.border_style]
    if design.border:
        _shape(img, design.shape, 0.035, _rgb(design.border))
    _shape(img, design.shape, inset, _rgb(design.fill))
    for ux, uy, us in MOTIF_SLOTS[design.count]:
        half = us * s / 2
        paint_glyph(img, design.motif, (ux * s - half, uy * s - half, ux * s + half, uy * s + half),
                    _rgb(design.motif_colour))
    return img


def _portrait(design: PortraitDesign, size: tuple[int, int]) -> Image.Image:
    s = size[0]
    img = Image.new("RGB", size, _rgb(design.background))
    d = ImageDraw.Draw(img)
    _backdrop(d, design.backdrop, _rgb(design.background), s)
    skin, hair = SKIN_TONES[design.skin], HAIR_COLOURS[design.hair_colour]

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (x0 * s, y0 * s, x1 * s, y1 * s)

    d.ellipse(box(0.12, 0.72, 0.88, 1.3), fill=_rgb(design.clothing))
    if design.hair_style == "long":
        d.rounded_rectangle(box(0.28, 0.2, 0.72, 0.82), radius=s * 0.12, fill=hair)
    d.rectangle(box(0.44, 0.55, 0.56, 0.76), fill=skin)
    d.ellipse(box(0.33, 0.22, 0.67, 0.62), fill=skin)
    if design.hair_style in ("short", "long", "bun"):
        d.chord(box(0.31, 0.18, 0.69, 0.52), 180, 360, fill=hair)
    if design.hair_style == "bun":
        d.ellipse(box(0.42, 0.07, 0.58, 0.23), fill=hair)
    elif design.hair_style == "bald":
        d.ellipse(box(0.31, 0.33, 0.37, 0.5), fill=hair)
        d.ellipse(box(0.63, 0.33, 0.69, 0.5), fill=hair)
    elif design.hair_style == "curly":
        for i in range(9):
            a = math.pi + i * math.pi / 8
            _circle(d, s * (0.5 + 0.18 * math.cos(a)), s * (0.4 + 0.2 * math.sin(a)), s * 0.06, fill=hair)
    elif design.hair_style == "parted":
        d.chord(box(0.31, 0.18, 0.52, 0.5), 180, 360, fill=hair)
        d.chord(box(0.48, 0.18, 0.69, 0.5), 180, 360, fill=hair)
        d.rectangle(box(0.31, 0.33, 0.36, 0.48), fill=hair)
        d.rectangle(box(0.64, 0.33, 0.69, 0.48), fill=hair)
    for ex in (0.43, 0.57):
        _circle(d, s * ex, s * 0.43, s * 0.018, fill=INK)
    d.line((s * 0.45, s * 0.54, s * 0.55, s * 0.54), fill=INK, width=max(1, int(s * 0.01)))

    gold, black = PALETTE["gold"], (30, 30, 30)
    if design.accessory == "glasses":
        for ex in (0.43, 0.57):
            _circle(d, s * ex, s * 0.43, s * 0.05, outline=black, width=max(2, int(s * 0.012)))
        d.line((s * 0.48, s * 0.43, s * 0.52, s * 0.43), fill=black, width=max(2, int(s * 0.012)))
    elif design.accessory == "hat":
        d.rectangle(box(0.24, 0.2, 0.76, 0.25), fill=black)
        d.rectangle(box(0.35, 0.04, 0.65, 0.22), fill=black)
    elif design.accessory == "bow_tie":
        d.polygon([(s * 0.5, s * 0.78), (s * 0.4, s * 0.73), (s * 0.4, s * 0.83)], fill=gold)
        d.polygon([(s * 0.5, s * 0.78), (s * 0.6, s * 0.73), (s * 0.6, s * 0.83)], fill=gold)
    elif design.accessory == "beard":
        d.polygon([(s * 0.34, s * 0.47), (s * 0.66, s * 0.47), (s * 0.61, s * 0.62), (s * 0.5, s * 0.68),
                   (s * 0.39, s * 0.62)], fill=hair)
        d.line((s * 0.45, s * 0.54, s * 0.55, s * 0.54), fill=INK, width=max(1, int(s * 0.01)))
    elif design.accessory == "earrings":
        for ex in (0.33, 0.67):
            _circle(d, s * ex, s * 0.5, s * 0.022, fill=gold)

    # The frame covers everything outside its opening, with a gilt edge just around it.
    framed = Image.new("RGB", size, FRAME_WOOD)
    framed.paste(FRAME_GILT, (0, 0), _frame_opening(design.frame, size, grow=s * 0.012))
    framed.paste(img, (0, 0), _frame_opening(design.frame, size, grow=0))
    return framed


def _backdrop(d: ImageDraw.ImageDraw, pattern: str, colour: tuple[int, int, int], s: int) -> None:
    # A shade of the background: darker on light colours, lighter on dark ones.
    light = sum(colour) > 3 * 110
    shade = tuple(int(c * 0.72) if light else int(c + (255 - c) * 0.3) for c in colour)
    if pattern == "stripes":
        for x in range(0, s, s // 8):
            d.rectangle((x, 0, x + s // 16, s), fill=shade)
    elif pattern == "split":
        d.rectangle((s // 2, 0, s, s), fill=shade)
    elif pattern == "dots":
        step = s // 7
        for x in range(step // 2, s, step):
            for y in range(step // 2, s, step):
                _circle(d, x, y, step * 0.22, fill=shade)
    elif pattern == "rays":
        for i in range(0, 16, 2):
            a0, a1 = i * math.pi / 8, (i + 1) * math.pi / 8
            d.polygon([(s / 2, s * 0.45), (s / 2 + 2 * s * math.cos(a0), s * 0.45 + 2 * s * math.sin(a0)),
                       (s / 2 + 2 * s * math.cos(a1), s * 0.45 + 2 * s * math.sin(a1))], fill=shade)


def _frame_opening(frame: str, size: tuple[int, int], grow: float) -> Image.Image:
    s = size[0]
    mask = Image.new("L", size, 0)
    d = ImageDraw.Draw(mask)

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (x0 * s - grow, y0 * s - grow, x1 * s + grow, y1 * s + grow)

    if frame == "oval":
        d.ellipse(box(0.08, 0.04, 0.92, 0.96), fill=255)
    elif frame == "rectangular":
        d.rectangle(box(0.08, 0.08, 0.92, 0.92), fill=255)
    else:
        d.rectangle(box(0.1, 0.4, 0.9, 0.94), fill=255)
        d.ellipse(box(0.1, 0.04, 0.9, 0.76), fill=255)
    return mask


def _painting(design: PaintingDesign, size: tuple[int, int]) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, _rgb(design.ground))
    d = ImageDraw.Draw(img)
    colours = [_rgb(design.c1), _rgb(design.c2), _rgb(design.c3)]
    # The arrangement is seeded by the design itself, so equal designs paint equal pictures.
    rng = random.Random(f"painting:{tuple(design)}")
    style = design.style
    if style == "grid":
        rects = [(0, 0, w, h)]
        for _ in range(rng.randint(5, 8)):
            x0, y0, x1, y1 = rects.pop(max(range(len(rects)), key=lambda i: _area(rects[i]) * rng.random()))
            if x1 - x0 > y1 - y0:
                cut = int(x0 + (x1 - x0) * rng.uniform(0.3, 0.7))
                rects += [(x0, y0, cut, y1), (cut, y0, x1, y1)]
            else:
                cut = int(y0 + (y1 - y0) * rng.uniform(0.3, 0.7))
                rects += [(x0, y0, x1, cut), (x0, cut, x1, y1)]
        for i, rect in enumerate(rng.sample(rects, 4)):
            d.rectangle(rect, fill=colours[i % 3])
        for rect in rects:
            d.rectangle(rect, outline=(20, 20, 20), width=max(2, w // 40))
    elif style == "stripes":
        band, slope = rng.randint(w // 10, w // 5), rng.choice((-1, 1)) * rng.uniform(0.3, 1.2)
        for i, x in enumerate(range(-2 * w, 2 * w, band)):
            if i % 4 != 3:
                d.polygon([(x, 0), (x + band, 0), (x + band + slope * h, h), (x + slope * h, h)],
                          fill=colours[i % 4 % 3])
    elif style == "rings":
        cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
        step = rng.uniform(0.06, 0.12) * w
        r, i = 1.5 * max(w, h), 0
        while r > step:
            _circle(d, cx, cy, r, fill=colours[i % 3] if i % 4 != 3 else _rgb(design.ground))
            r, i = r - step, i + 1
    elif style == "scatter":
        for i in range(rng.randint(10, 20)):
            _circle(d, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.04, 0.16) * w, fill=colours[i % 3])
    elif style == "fields":
        layer = Image.new("RGB", size, _rgb(design.ground))
        ld = ImageDraw.Draw(layer)
        edges = [0.08, rng.uniform(0.3, 0.45), rng.uniform(0.55, 0.7), 0.92]
        margin = rng.uniform(0.06, 0.14) * w
        for i in range(3):
            ld.rectangle((margin, edges[i] * h + 4, w - margin, edges[i + 1] * h - 4), fill=colours[i])
        img = layer.filter(ImageFilter.GaussianBlur(w / 80))
    elif style == "shards":
        for i in range(rng.randint(8, 13)):
            d.polygon([(rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h) for _ in range(3)],
                      fill=colours[i % 3])
    elif style == "waves":
        bands = rng.randint(4, 7)
        amp, freq, phase = rng.uniform(0.02, 0.08) * h, rng.uniform(1, 3), rng.uniform(0, 2 * math.pi)
        # Top band first: each later band is drawn over the lower part of the earlier ones.
        for i in range(1, bands + 1):
            top = h * i / (bands + 1)
            pts = [(x, top + amp * math.sin(2 * math.pi * freq * x / w + phase + i)) for x in range(0, w + 8, 8)]
            d.polygon(pts + [(w, h), (0, h)], fill=colours[i % 3])
    else:
        raise ValueError(f"unknown painting style {style!r}")
    return img


def _area(rect: tuple[int, int, int, int]) -> int:
    return (rect[2] - rect[0]) * (rect[3] - rect[1])
