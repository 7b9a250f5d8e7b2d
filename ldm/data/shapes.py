"""Procedural captioned scenes: one or two coloured shapes on a plain background.

The training data of the bundled text-to-image model and the ground truth of
its evaluation. Everything is deterministic from a ``numpy.random.Generator``;
nothing is downloaded and only numpy + Pillow are used (no torch), so importing
this module is cheap.

A scene is described at two levels:

* :class:`SceneSpec`: what the caption says. Per object (:class:`ObjectSpec`):
  shape, colour, size and position cell; the background colour; for two
  objects, the relation of the first to the second.
* :class:`Placement`: where an object is actually drawn (centre, radius,
  rotation, RGB), with jitter, so that a spec has many different images.

Geometry (64x64 image, pixel units). Position cells have fixed centres
(:data:`CELL_CENTRES`); an object is drawn at its cell's centre plus jitter. A
single object uses any of the five cells; two objects use left + right
("on the left of" / "on the right of") or top + bottom ("above" / "below"),
the first-mentioned object sitting in the cell the relation names. Two objects
never overlap. Shapes are drawn at 4x resolution and reduced with a 4x4 box
filter, so edge pixels carry their exact area coverage (anti-aliasing).

Caption grammar (every word is in :data:`VOCAB_WORDS`)::

    one object:  a {size} {colour} {shape} {position}, on a {background} background
    two objects: a {size} {colour} {shape} {relation} a {size} {colour} {shape}, on a {background} background

    position: on the left | on the right | at the top | at the bottom | in the centre
    relation: on the left of | on the right of | above | below

``parse_caption(caption(spec)) == spec`` for every spec.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ldm_serve.errors import InvalidInput

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_RGB",
    "CELL_CENTRES",
    "COLOURS",
    "COLOUR_RGB",
    "IMAGE_SIZE",
    "LAYOUTS",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPECIAL_TOKENS",
    "VOCAB_PUNCTUATION",
    "VOCAB_WORDS",
    "ObjectSpec",
    "Placement",
    "Scene",
    "SceneSpec",
    "caption",
    "caption_words",
    "layout",
    "object_box",
    "parse_caption",
    "render",
    "render_placements",
    "sample_scene",
    "sample_spec",
    "scene_matches",
    "scene_rng",
    "vocab_tokens",
    "write_vocab",
]

IMAGE_SIZE = 64
"""Side of every scene image in pixels."""

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-reduced

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "big")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "brown")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (145, 60, 195),
    "orange": (250, 140, 30),
}
"""Nominal RGB of each object colour (each channel is jittered by up to ±10 when drawn)."""

BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (110, 72, 45),
}
"""Nominal RGB of each background (each channel is jittered by up to ±8); none is an object colour."""

CELL_CENTRES: dict[str, tuple[float, float]] = {
    "left": (18.0, 32.0),
    "right": (46.0, 32.0),
    "top": (32.0, 18.0),
    "bottom": (32.0, 46.0),
    "centre": (32.0, 32.0),
}
"""(x, y) pixel centre of each position cell; objects are drawn there plus jitter."""

_RADIUS_RANGE: dict[str, tuple[float, float]] = {"small": (6.0, 7.5), "big": (10.5, 12.5)}
_MAX_ROTATION_DEG: dict[str, float] = {"circle": 0.0, "square": 12.0, "triangle": 12.0, "star": 15.0}
_JITTER_SINGLE = 3.0  # ± px on both axes for a lone object
_JITTER_ALONG = 3.0  # ± px along the relation's axis, two objects
_JITTER_ACROSS = 6.0  # ± px across the relation's axis, two objects
_MIN_GAP = 1.5  # px between the bounding circles of two objects
_OBJECT_RGB_JITTER = 10
_BACKGROUND_RGB_JITTER = 8

_POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
_RELATION_PHRASES: dict[str, str] = {
    "left of": "on the left of",
    "right of": "on the right of",
    "above": "above",
    "below": "below",
}
# relation -> (cell of the first object, cell of the second)
_RELATION_CELLS: dict[str, tuple[str, str]] = {
    "left of": ("left", "right"),
    "right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}

LAYOUTS: tuple[tuple[str, ...], ...] = (
    ("centre",),
    ("left",),
    ("right",),
    ("top",),
    ("bottom",),
    ("left", "right"),
    ("top", "bottom"),
)
"""Every set of occupied cells a scene can have (sorted in :data:`POSITIONS` order)."""

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_PUNCTUATION: tuple[str, ...] = (",", ".")
VOCAB_WORDS: tuple[str, ...] = (
    "a", "on", "the", "of", "at", "in", "above", "below", "background",
    "left", "right", "top", "bottom", "centre",
    *SIZES, *COLOURS, *SHAPES, *BACKGROUNDS,
)  # fmt: skip
"""Every word a caption can contain (punctuation aside)."""

# Accepted in prompts, mapped to the caption word before parsing.
_SYNONYMS: dict[str, str] = {"center": "centre", "grey": "gray", "large": "big", "an": "a"}


@dataclass(frozen=True)
class ObjectSpec:
    """One object as a caption describes it."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise InvalidInput(name, f"{value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class SceneSpec:
    """What a caption says: the objects (in caption order), background and relation.

    ``relation`` is ``None`` for one object and one of :data:`RELATIONS` for two;
    the objects' positions must be the cells that relation implies.
    """

    objects: tuple[ObjectSpec, ...]
    background: str
    relation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if self.background not in BACKGROUNDS:
            raise InvalidInput("background", f"{self.background!r} is not one of {', '.join(BACKGROUNDS)}")
        if len(self.objects) == 1:
            if self.relation is not None:
                raise InvalidInput("relation", "a one-object scene has no relation")
        elif len(self.objects) == 2:
            if self.relation not in RELATIONS:
                raise InvalidInput("relation", f"{self.relation!r} is not one of {', '.join(RELATIONS)}")
            cells = _RELATION_CELLS[self.relation]
            if (self.objects[0].position, self.objects[1].position) != cells:
                raise InvalidInput(
                    "objects", f"relation {self.relation!r} puts the objects at {cells[0]} and {cells[1]}"
                )
        else:
            raise InvalidInput("objects", f"a scene has one or two objects, got {len(self.objects)}")

    def cells(self) -> dict[str, ObjectSpec]:
        """Position cell -> object in that cell (order-free view used to compare scenes)."""
        return {obj.position: obj for obj in self.objects}


@dataclass(frozen=True)
class Placement:
    """Where and how one object is drawn, in 64x64 pixel units.

    ``radius`` is the circumradius of the shape (half-side / 0.85 for a square),
    ``angle`` a rotation in degrees, ``rgb`` the jittered fill colour.
    """

    shape: str
    cx: float
    cy: float
    radius: float
    angle: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """A rendered scene with its caption and structured label."""

    image: Image.Image  # RGB, IMAGE_SIZE x IMAGE_SIZE
    caption: str
    objects: tuple[ObjectSpec, ...]
    background: str
    relation: str | None
    placements: tuple[Placement, ...] = field(default=())
    background_rgb: tuple[int, int, int] = (0, 0, 0)

    @property
    def spec(self) -> SceneSpec:
        """The structured label as a :class:`SceneSpec`."""
        return SceneSpec(self.objects, self.background, self.relation)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """Generator for scene ``index`` of the stream ``seed``.

    Different seeds give independent streams, so a held-out set is simply another seed.
    """
    return np.random.default_rng((int(seed), int(index)))


def sample_spec(rng: np.random.Generator, *, num_objects: int | None = None) -> SceneSpec:
    """Draw a spec uniformly: background, then 1 or 2 objects (``num_objects=None``: either, 50/50).

    Two objects never share both shape and colour, so that their relation is observable.
    """
    if num_objects is None:
        num_objects = int(rng.integers(1, 3))
    if num_objects not in (1, 2):
        raise InvalidInput("num_objects", f"must be 1 or 2, got {num_objects}")
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]

    def draw_object(position: str) -> ObjectSpec:
        return ObjectSpec(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=COLOURS[rng.integers(len(COLOURS))],
            size=SIZES[rng.integers(len(SIZES))],
            position=position,
        )

    if num_objects == 1:
        return SceneSpec((draw_object(POSITIONS[rng.integers(len(POSITIONS))]),), background)
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    first_cell, second_cell = _RELATION_CELLS[relation]
    first = draw_object(first_cell)
    second = draw_object(second_cell)
    while (second.shape, second.colour) == (first.shape, first.colour):
        second = draw_object(second_cell)
    return SceneSpec((first, second), background, relation)


def _jitter_rgb(
    rgb: tuple[int, int, int], amount: int, rng: np.random.Generator | None
) -> tuple[int, int, int]:
    if rng is None:
        return rgb
    offsets = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(np.clip(c + o, 0, 255)) for c, o in zip(rgb, offsets, strict=True))  # type: ignore[return-value]


def layout(spec: SceneSpec, rng: np.random.Generator | None = None) -> tuple[Placement, ...]:
    """Placements of the spec's objects; ``rng=None`` gives the canonical, jitter-free layout.

    Two objects are re-jittered until their bounding circles are at least
    ``_MIN_GAP`` apart (the jitter-free layout always is).
    """

    def place(obj: ObjectSpec, jitter_xy: tuple[float, float]) -> Placement:
        lo, hi = _RADIUS_RANGE[obj.size]
        base_x, base_y = CELL_CENTRES[obj.position]
        if rng is None:
            return Placement(obj.shape, base_x, base_y, (lo + hi) / 2, 0.0, COLOUR_RGB[obj.colour])
        max_angle = _MAX_ROTATION_DEG[obj.shape]
        return Placement(
            shape=obj.shape,
            cx=base_x + float(rng.uniform(-jitter_xy[0], jitter_xy[0])),
            cy=base_y + float(rng.uniform(-jitter_xy[1], jitter_xy[1])),
            radius=float(rng.uniform(lo, hi)),
            angle=float(rng.uniform(-max_angle, max_angle)),
            rgb=_jitter_rgb(COLOUR_RGB[obj.colour], _OBJECT_RGB_JITTER, rng),
        )

    if len(spec.objects) == 1:
        return (place(spec.objects[0], (_JITTER_SINGLE, _JITTER_SINGLE)),)
    horizontal = spec.relation in ("left of", "right of")
    jitter = (_JITTER_ALONG, _JITTER_ACROSS) if horizontal else (_JITTER_ACROSS, _JITTER_ALONG)
    for _ in range(100):
        a, b = (place(obj, jitter) for obj in spec.objects)
        if math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius + _MIN_GAP:
            return (a, b)
    # Practically unreachable: fall back to the cell centres (28 px apart > 2 * 12.5 + gap).
    return tuple(
        Placement(p.shape, *CELL_CENTRES[o.position], p.radius, p.angle, p.rgb)
        for p, o in zip((a, b), spec.objects, strict=True)
    )


def _polygon(placement: Placement, scale: float) -> list[tuple[float, float]]:
    """Vertices of a square / triangle / star, scaled to the supersampled canvas."""
    p = placement
    if p.shape == "square":
        # 4 corners at 45° + k*90°; circumradius 0.85*sqrt(2)*r puts the half-side at 0.85 r
        radii, angles = [0.85 * math.sqrt(2) * p.radius] * 4, [45.0 + 90.0 * k for k in range(4)]
    elif p.shape == "triangle":
        # equilateral, one vertex up (image y grows downwards), centroid at (cx, cy)
        radii, angles = [p.radius] * 3, [-90.0 + 120.0 * k for k in range(3)]
    elif p.shape == "star":
        # 5 points, inner radius 0.45 r, one point up
        radii = [p.radius if k % 2 == 0 else 0.45 * p.radius for k in range(10)]
        angles = [-90.0 + 36.0 * k for k in range(10)]
    else:
        raise InvalidInput("shape", f"{p.shape!r} is not a polygon shape")
    return [
        (
            (p.cx + r * math.cos(math.radians(a + p.angle))) * scale,
            (p.cy + r * math.sin(math.radians(a + p.angle))) * scale,
        )
        for r, a in zip(radii, angles, strict=True)
    ]


def render_placements(background_rgb: tuple[int, int, int], placements: Sequence[Placement]) -> Image.Image:
    """Draw the placements on a plain background: 4x supersampled, box-reduced to 64x64 RGB."""
    scale = float(_SUPERSAMPLE)
    side = IMAGE_SIZE * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), background_rgb)
    draw = ImageDraw.Draw(canvas)
    for p in placements:
        if p.shape == "circle":
            box = (
                (p.cx - p.radius) * scale,
                (p.cy - p.radius) * scale,
                (p.cx + p.radius) * scale,
                (p.cy + p.radius) * scale,
            )
            draw.ellipse(box, fill=p.rgb)
        else:
            draw.polygon(_polygon(p, scale), fill=p.rgb)
    # Image.reduce averages each 4x4 block: edge pixels get their exact area coverage.
    return canvas.reduce(_SUPERSAMPLE)


def render(spec: SceneSpec, rng: np.random.Generator | None = None) -> Image.Image:
    """Render ``spec``; with ``rng`` the placement and colours are jittered, without it canonical."""
    background_rgb = _jitter_rgb(BACKGROUND_RGB[spec.background], _BACKGROUND_RGB_JITTER, rng)
    return render_placements(background_rgb, layout(spec, rng))


def object_box(placement: Placement, margin: float = 1.0) -> tuple[int, int, int, int]:
    """Integer pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) covering the object plus ``margin``.

    Useful to mask one object, e.g. for inpainting evaluations.
    """
    reach = placement.radius + margin
    x0 = max(0, math.floor(placement.cx - reach))
    y0 = max(0, math.floor(placement.cy - reach))
    x1 = min(IMAGE_SIZE, math.ceil(placement.cx + reach))
    y1 = min(IMAGE_SIZE, math.ceil(placement.cy + reach))
    return x0, y0, x1, y1


def sample_scene(rng: np.random.Generator, *, num_objects: int | None = None) -> Scene:
    """Draw a spec, jitter its layout and colours, render it and caption it."""
    spec = sample_spec(rng, num_objects=num_objects)
    background_rgb = _jitter_rgb(BACKGROUND_RGB[spec.background], _BACKGROUND_RGB_JITTER, rng)
    placements = layout(spec, rng)
    return Scene(
        image=render_placements(background_rgb, placements),
        caption=caption(spec),
        objects=spec.objects,
        background=spec.background,
        relation=spec.relation,
        placements=placements,
        background_rgb=background_rgb,
    )


def _object_phrase(obj: ObjectSpec) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape}"


def caption(spec: SceneSpec) -> str:
    """The caption of ``spec`` in the module's grammar."""
    if spec.relation is None:
        (obj,) = spec.objects
        body = f"{_object_phrase(obj)} {_POSITION_PHRASES[obj.position]}"
    else:
        first, second = spec.objects
        body = f"{_object_phrase(first)} {_RELATION_PHRASES[spec.relation]} {_object_phrase(second)}"
    return f"{body}, on a {spec.background} background"


class _Tokens:
    """Cursor over the words of a prompt, for the small recursive-descent parser."""

    def __init__(self, words: list[str], text: str) -> None:
        self.words = words
        self.pos = 0
        self.text = text

    def fail(self, expected: str) -> InvalidInput:
        got = self.words[self.pos] if self.pos < len(self.words) else "end of text"
        return InvalidInput("prompt", f"cannot parse {self.text!r}: expected {expected}, got {got!r}")

    def take(self, allowed: Sequence[str], what: str) -> str:
        if self.pos < len(self.words) and self.words[self.pos] in allowed:
            self.pos += 1
            return self.words[self.pos - 1]
        raise self.fail(what)

    def take_phrase(self, phrases: dict[str, str], what: str) -> str | None:
        """Longest phrase (value) matching at the cursor; returns its key, or None."""
        best: tuple[int, str] | None = None
        for key, phrase in phrases.items():
            words = phrase.split()
            if self.words[self.pos : self.pos + len(words)] == words and (
                best is None or len(words) > best[0]
            ):
                best = (len(words), key)
        if best is None:
            return None
        self.pos += best[0]
        return best[1]


def parse_caption(text: str) -> SceneSpec:
    """Parse a caption of the grammar back to its :class:`SceneSpec`.

    Case, extra whitespace, a final full stop and the spellings ``center``,
    ``grey``, ``large`` and ``an`` are accepted.

    Raises:
        InvalidInput: ``text`` is not a caption of the grammar (field ``prompt``).
    """
    normalised = text.strip().lower().rstrip(".").replace(",", " , ")
    words = [_SYNONYMS.get(w, w) for w in normalised.split()]
    tokens = _Tokens(words, text)

    def object_head() -> tuple[str, str, str]:
        tokens.take(("a",), "'a'")
        size = tokens.take(SIZES, "a size")
        colour = tokens.take(COLOURS, "a colour")
        shape = tokens.take(SHAPES, "a shape")
        return size, colour, shape

    size, colour, shape = object_head()
    # "on the left of" must win over "on the left": try relations (longer) first.
    relation = tokens.take_phrase(_RELATION_PHRASES, "a relation")
    if relation is not None:
        first_cell, second_cell = _RELATION_CELLS[relation]
        size2, colour2, shape2 = object_head()
        objects = (
            ObjectSpec(shape, colour, size, first_cell),
            ObjectSpec(shape2, colour2, size2, second_cell),
        )
    else:
        position = tokens.take_phrase(_POSITION_PHRASES, "a position or relation")
        if position is None:
            raise tokens.fail("a position or relation")
        objects = (ObjectSpec(shape, colour, size, position),)
    tokens.take((",",), "','")
    tokens.take(("on",), "'on'")
    tokens.take(("a",), "'a'")
    background = tokens.take(BACKGROUNDS, "a background colour")
    tokens.take(("background",), "'background'")
    if tokens.pos != len(words):
        raise tokens.fail("end of text")
    return SceneSpec(objects, background, relation)


def scene_matches(prompt: SceneSpec, judged: SceneSpec) -> dict[str, bool]:
    """Compare what a prompt asks for with what was seen in an image, per criterion.

    Scenes are compared cell by cell (:meth:`SceneSpec.cells`), so "A on the left
    of B" and "B on the right of A" are the same scene. Keys:

    * ``background``: background colour right;
    * ``count``: number of objects right;
    * ``position``: exactly the prompt's cells are occupied (for two objects: the relation);
    * ``shape`` / ``colour`` / ``size``: every prompt object's cell holds an object
      with that attribute;
    * ``identity``: the (shape, colour) pairs agree, wherever the objects are;
    * ``objects``: ``position`` and ``shape`` and ``colour`` (every object right);
    * ``all``: ``objects`` and ``size`` and ``background``.
    """
    want, got = prompt.cells(), judged.cells()

    def attribute_right(name: str) -> bool:
        return all(
            cell in got and getattr(got[cell], name) == getattr(obj, name) for cell, obj in want.items()
        )

    position = set(want) == set(got)
    shape, colour, size = (attribute_right(name) for name in ("shape", "colour", "size"))
    objects = position and shape and colour
    background = prompt.background == judged.background
    return {
        "background": background,
        "count": len(prompt.objects) == len(judged.objects),
        "position": position,
        "shape": shape,
        "colour": colour,
        "size": size,
        "identity": sorted((o.shape, o.colour) for o in prompt.objects)
        == sorted((o.shape, o.colour) for o in judged.objects),
        "objects": objects,
        "all": objects and size and background,
    }


def vocab_tokens() -> list[str]:
    """Lines of the BERT-style ``vocab.txt``: specials, punctuation, then :data:`VOCAB_WORDS`."""
    return [*SPECIAL_TOKENS, *VOCAB_PUNCTUATION, *VOCAB_WORDS]


def write_vocab(directory: str | Path) -> Path:
    """Write ``vocab.txt`` (one token per line, id = line number) into ``directory``; return the file."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "vocab.txt"
    path.write_text("\n".join(vocab_tokens()) + "\n", encoding="utf-8")
    return path


_WORD_RE = re.compile(r"[a-z]+|[^\sa-z]")


def caption_words(text: str) -> list[str]:
    """Words and punctuation marks of a caption, as a BERT pre-tokenizer would split them."""
    return _WORD_RE.findall(text.lower())
