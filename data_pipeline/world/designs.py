"""What each entity's picture looks like: a design drawn from a combinatorial space, and its caption.

A design is a tuple of components (layout, colours, symbol, ...). Any two designs of a family differ
in at least two components, so no two pictures are near-copies (one colour swapped) and the pictures
stay distinct at 20k+ images. Rendering is a pure function of the design (see render.py).
"""

from __future__ import annotations

import random
from typing import NamedTuple

from data_pipeline.world.grammar import fix_articles
from data_pipeline.world.graph import Entity, World
from data_pipeline.world.seeding import derive_rng

PALETTE = {
    "red": (200, 30, 45), "orange": (235, 120, 25), "gold": (238, 190, 30), "lime": (150, 200, 40),
    "green": (30, 125, 60), "teal": (0, 140, 140), "sky blue": (95, 170, 225), "navy": (25, 40, 110),
    "purple": (120, 50, 150), "pink": (235, 130, 175), "white": (246, 246, 246), "black": (22, 22, 22),
    "brown": (115, 70, 35), "grey": (135, 135, 135),
}
COLOURS = tuple(PALETTE)


class FlagDesign(NamedTuple):
    layout: str
    c1: str
    c2: str
    c3: str  # "" when the layout uses two colours
    symbol: str  # "" for none
    symbol_colour: str
    symbol_place: str  # centre | canton


class SealDesign(NamedTuple):
    ring: str
    ring_style: str
    field: str
    division: str
    field2: str  # "" when the field is undivided
    charge: str
    charge_colour: str


class EmblemDesign(NamedTuple):
    shape: str
    fill: str
    border_style: str
    border: str  # "" without a border
    motif: str
    motif_colour: str
    count: int


class PortraitDesign(NamedTuple):
    background: str
    backdrop: str  # the pattern on the background
    skin: str
    hair_colour: str
    hair_style: str
    clothing: str
    accessory: str
    frame: str


class PaintingDesign(NamedTuple):
    style: str
    ground: str
    c1: str
    c2: str
    c3: str
    variant: int  # seeds the arrangement of shapes


Design = FlagDesign | SealDesign | EmblemDesign | PortraitDesign | PaintingDesign

# layout -> (colours used, caption with {c1} {c2} {c3})
FLAG_LAYOUTS = {
    "bands2": (2, "two horizontal bands of {c1} and {c2}"),
    "bands3": (3, "three horizontal stripes of {c1}, {c2} and {c3}"),
    "pales2": (2, "two vertical halves of {c1} and {c2}"),
    "pales3": (3, "three vertical stripes of {c1}, {c2} and {c3}"),
    "stripes5": (2, "five horizontal stripes alternating {c1} and {c2}"),
    "canton": (2, "a {c1} field with a {c2} canton"),
    "striped_canton": (3, "horizontal stripes of {c1} and {c2} with a {c3} canton"),
    "nordic": (3, "a {c2} Nordic cross edged in {c3} on a {c1} field"),
    "greek": (2, "a {c2} centred cross on a {c1} field"),
    "saltire": (2, "a {c2} diagonal cross on a {c1} field"),
    "diagonal": (2, "a diagonal division into {c1} at the top and {c2} at the bottom"),
    "bend": (3, "a {c2} diagonal band between {c1} and {c3}"),
    "hoist_triangle": (3, "bands of {c1} and {c2} with a {c3} triangle at the hoist"),
    "border": (2, "a {c1} field with a broad {c2} border"),
    "quartered": (2, "quarters of {c1} and {c2}"),
    "wide_pale": (2, "a broad {c2} vertical band between {c1} edges"),
}
FLAG_SYMBOLS = ("star", "disc", "ring", "crescent", "diamond", "triangle", "cross", "sun", "square")
SYMBOL_PLACES = {"centre": "in the centre", "canton": "in the upper hoist"}

RING_STYLES = {"plain": "a {c} ring", "double": "a double {c} ring", "beaded": "a beaded {c} ring",
               "toothed": "a toothed {c} ring"}
DIVISIONS = {"plain": "a {f} field", "per_pale": "a field divided vertically into {f} and {g}",
             "per_fess": "a field divided horizontally into {f} and {g}",
             "quartered": "a field quartered {f} and {g}", "chief": "a {f} field with a {g} upper band"}
SEAL_CHARGES = ("tower", "key", "wheel", "anchor", "tree", "crown", "fish", "bell", "mountain", "wave",
                "star", "sun")

EMBLEM_SHAPES = ("shield", "roundel", "hexagon", "lozenge", "square", "octagon")
EMBLEM_MOTIFS = ("star", "chevron", "wave", "mountain", "wheel", "key", "tree", "crown", "ring", "cross",
                 "sun", "anchor")
BORDER_STYLES = ("none", "thin", "thick")

SKIN_TONES = {"pale": (242, 210, 180), "light": (226, 178, 136), "medium": (192, 136, 96),
              "tan": (150, 100, 64), "deep": (98, 64, 42)}
HAIR_COLOURS = {"black": (28, 22, 22), "brown": (100, 62, 30), "fair": (225, 192, 105),
                "auburn": (150, 62, 28), "grey": (150, 150, 150), "white": (236, 236, 236)}
# Backgrounds a hair colour would vanish into.
HAIR_CLASHES = {"black": {"black", "navy"}, "brown": {"brown"}, "fair": {"gold"}, "auburn": {"brown", "orange"},
                "grey": {"grey"}, "white": {"white"}}
BACKDROPS = {"plain": "a plain {c} background", "stripes": "a striped {c} background",
             "split": "a two-tone {c} background", "dots": "a dotted {c} background",
             "rays": "a {c} background with rays"}
HAIR_STYLES = {"short": "short {h} hair", "long": "long {h} hair", "bun": "{h} hair in a bun",
               "bald": "a bald head with a {h} fringe", "curly": "curly {h} hair",
               "parted": "{h} hair parted in the middle"}
ACCESSORIES = {"none": "", "glasses": "round glasses", "hat": "a black hat", "bow_tie": "a gold bow tie",
               "beard": "a beard", "earrings": "gold earrings"}
FRAMES = ("oval", "rectangular", "arched")

PAINTING_STYLES = {
    "grid": "a grid of {c1}, {c2} and {c3} rectangles between black lines on a {g} ground",
    "stripes": "slanting stripes of {c1}, {c2} and {c3} on a {g} ground",
    "rings": "concentric rings of {c1}, {c2} and {c3} on a {g} ground",
    "scatter": "scattered {c1}, {c2} and {c3} discs on a {g} ground",
    "fields": "soft stacked fields of {c1}, {c2} and {c3} on a {g} ground",
    "shards": "angular shards of {c1}, {c2} and {c3} on a {g} ground",
    "waves": "rolling waves of {c1}, {c2} and {c3} on a {g} ground",
}
PAINTING_VARIANTS = 8


def _flag(rng: random.Random) -> FlagDesign:
    layout = rng.choice(sorted(FLAG_LAYOUTS))
    used = rng.sample(COLOURS, FLAG_LAYOUTS[layout][0])
    c1, c2, c3 = (used + [""])[:3]
    if rng.random() < 0.25:
        return FlagDesign(layout, c1, c2, c3, "", "", "")
    # A symbol colour absent from the field keeps it visible wherever it lands.
    colour = rng.choice([c for c in COLOURS if c not in used])
    return FlagDesign(layout, c1, c2, c3, rng.choice(FLAG_SYMBOLS), colour, rng.choice(sorted(SYMBOL_PLACES)))


def _seal(rng: random.Random) -> SealDesign:
    division = rng.choice(sorted(DIVISIONS))
    fields = rng.sample(COLOURS, 1 if division == "plain" else 2)
    ring = rng.choice([c for c in COLOURS if c not in fields])
    charge_colour = rng.choice([c for c in COLOURS if c not in fields])
    return SealDesign(ring, rng.choice(sorted(RING_STYLES)), fields[0], division, (fields + [""])[1],
                      rng.choice(SEAL_CHARGES), charge_colour)


def _emblem(rng: random.Random) -> EmblemDesign:
    fill = rng.choice(COLOURS)
    others = [c for c in COLOURS if c != fill]
    border_style = rng.choice(BORDER_STYLES)
    border = "" if border_style == "none" else rng.choice(others)
    return EmblemDesign(rng.choice(EMBLEM_SHAPES), fill, border_style, border, rng.choice(EMBLEM_MOTIFS),
                        rng.choice(others), rng.randint(1, 3))


def _portrait(rng: random.Random) -> PortraitDesign:
    hair = rng.choice(sorted(HAIR_COLOURS))
    background = rng.choice([c for c in COLOURS if c not in HAIR_CLASHES[hair]])
    return PortraitDesign(background, rng.choice(sorted(BACKDROPS)), rng.choice(sorted(SKIN_TONES)), hair,
                          rng.choice(sorted(HAIR_STYLES)), rng.choice([c for c in COLOURS if c != background]),
                          rng.choice(sorted(ACCESSORIES)), rng.choice(FRAMES))


def _painting(rng: random.Random) -> PaintingDesign:
    ground, c1, c2, c3 = rng.sample(COLOURS, 4)
    return PaintingDesign(rng.choice(sorted(PAINTING_STYLES)), ground, c1, c2, c3, rng.randrange(PAINTING_VARIANTS))


# entity kind -> (family, sampler); rivers have no picture.
FAMILIES = {"nation": ("flag", _flag), "city": ("seal", _seal), "organisation": ("emblem", _emblem),
            "person": ("portrait", _portrait), "artwork": ("painting", _painting)}
MAX_DRAWS = 2000


# Components drawn small (earrings, a border's width): a difference there alone is easy to miss.
MINOR_COMPONENTS = {SealDesign: ("ring_style",), EmblemDesign: ("border_style",), PortraitDesign: ("accessory",)}


class DesignRegistry:
    """Accepts a design only if it differs from every accepted one in at least two components, at
    least one of them not minor.

    Two tuples differ in at most one component exactly when they agree after deleting the same
    position, so each design is filed under its len(design) one-deleted keys and a clash is a set
    lookup, not a scan. The second condition is a unique projection onto the major components.
    """

    def __init__(self) -> None:
        self._keys: set[tuple] = set()

    def claim(self, design: Design) -> bool:
        family = type(design)
        minor = MINOR_COMPONENTS.get(family, ())
        major = tuple(v for name, v in zip(design._fields, design) if name not in minor)
        keys = [(family.__name__, i, design[:i] + design[i + 1:]) for i in range(len(design))]
        keys.append((family.__name__, "major", major))
        if any(k in self._keys for k in keys):
            return False
        self._keys.update(keys)
        return True


def assign_designs(world: World, seed: int) -> dict[str, Design]:
    """One design per pictured entity, in entity order (sequential: acceptance depends on earlier ones)."""
    registry, designs = DesignRegistry(), {}
    for entity in world.entities:
        if entity.kind not in FAMILIES:
            continue
        family, sample = FAMILIES[entity.kind]
        rng = derive_rng(seed, "design", entity.id)
        for _ in range(MAX_DRAWS):
            design = sample(rng)
            if registry.claim(design):
                designs[entity.id] = design
                break
        else:
            raise ValueError(f"the {family} design space is exhausted at {entity.id}; use fewer entities")
    return designs


def describe(design: Design) -> str:
    """A noun phrase for what the picture shows, e.g. "three horizontal stripes of red, ..."."""
    return fix_articles(_describe(design))


def _describe(design: Design) -> str:
    if isinstance(design, FlagDesign):
        text = FLAG_LAYOUTS[design.layout][1].format(c1=design.c1, c2=design.c2, c3=design.c3)
        if design.symbol:
            text += f", with {counted(1, design.symbol_colour, design.symbol)} {SYMBOL_PLACES[design.symbol_place]}"
        return text
    if isinstance(design, SealDesign):
        return (f"{counted(1, design.charge_colour, design.charge)} on "
                f"{DIVISIONS[design.division].format(f=design.field, g=design.field2)} within "
                f"{RING_STYLES[design.ring_style].format(c=design.ring)}")
    if isinstance(design, EmblemDesign):
        border = "" if design.border_style == "none" else f" with a {design.border_style} {design.border} border"
        return (f"{counted(1, design.fill, design.shape)}{border}, bearing "
                f"{counted(design.count, design.motif_colour, design.motif)}")
    if isinstance(design, PortraitDesign):
        wearing = f"a {design.clothing} coat"
        if ACCESSORIES[design.accessory]:
            wearing += f" and {ACCESSORIES[design.accessory]}"
        return (f"a figure with {HAIR_STYLES[design.hair_style].format(h=design.hair_colour)}, wearing {wearing}, "
                f"on {BACKDROPS[design.backdrop].format(c=design.background)} in a {design.frame} frame")
    return PAINTING_STYLES[design.style].format(g=design.ground, c1=design.c1, c2=design.c2, c3=design.c3)


def counted(count: int, colour: str, noun: str) -> str:
    """ "a gold star", "three gold stars"."""
    if count == 1:
        return f"a {colour} {noun}"
    if noun != "fish":
        noun += "es" if noun.endswith(("s", "sh", "x")) else "s"
    return f"{('two', 'three')[count - 2]} {colour} {noun}"


def image_title(entity: Entity) -> str:
    family = FAMILIES[entity.kind][0]
    if family == "painting":
        return entity.name
    prefix = {"flag": "Flag of", "seal": "Seal of", "emblem": "Emblem of the", "portrait": "Portrait of"}[family]
    return f"{prefix} {entity.name}"


def image_text(design: Design) -> str:
    """The caption stored with the image: what it shows, without naming whose it is."""
    lead = {FlagDesign: "A flag with", SealDesign: "A round seal showing", EmblemDesign: "An emblem:",
            PortraitDesign: "A stylised portrait of", PaintingDesign: "An abstract painting:"}[type(design)]
    return f"{lead} {describe(design)}."
