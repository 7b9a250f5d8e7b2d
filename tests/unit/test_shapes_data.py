"""Procedural captioned scenes: determinism, geometry vs label, captions, parsing, vocabulary."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldm.data.shapes import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    CELL_CENTRES,
    COLOUR_RGB,
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPECIAL_TOKENS,
    VOCAB_WORDS,
    ObjectSpec,
    SceneSpec,
    caption,
    caption_words,
    layout,
    object_box,
    parse_caption,
    render,
    render_placements,
    sample_scene,
    sample_spec,
    scene_matches,
    scene_rng,
    write_vocab,
)
from ldm.tokenizers import BertTokenizer
from ldm_serve.errors import InvalidInput

SEED = 7


@pytest.fixture(scope="module")
def scenes() -> list:
    return [sample_scene(scene_rng(SEED, i)) for i in range(300)]


def all_single_specs() -> list[SceneSpec]:
    return [
        SceneSpec((ObjectSpec(shape, colour, size, pos),), bg)
        for shape, colour, size, pos, bg in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS)
    ]


def test_same_seed_same_scene_other_index_other_scene() -> None:
    a, b = sample_scene(scene_rng(SEED, 3)), sample_scene(scene_rng(SEED, 3))
    assert a.caption == b.caption and a.placements == b.placements
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    others = [sample_scene(scene_rng(SEED, i)) for i in range(4, 8)] + [sample_scene(scene_rng(SEED + 1, 3))]
    assert all(not np.array_equal(np.asarray(a.image), np.asarray(o.image)) for o in others)


def test_module_does_not_import_torch() -> None:
    code = "import sys, ldm.data, ldm.data.shapes; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_images_are_64px_rgb(scenes: list) -> None:
    for scene in scenes[:20]:
        assert scene.image.mode == "RGB" and scene.image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_sampling_covers_every_attribute(scenes: list) -> None:
    objects = [o for s in scenes for o in s.objects]
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.size for o in objects} == set(SIZES)
    assert {o.position for o in objects} == set(POSITIONS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {s.relation for s in scenes} == {None, *RELATIONS}
    rng = np.random.default_rng(0)
    assert all(len(sample_spec(rng, num_objects=2).objects) == 2 for _ in range(20))
    with pytest.raises(InvalidInput):
        sample_spec(rng, num_objects=3)


def test_colours_are_well_separated() -> None:
    palette = list(COLOUR_RGB.values()) + list(BACKGROUND_RGB.values())
    distances = [math.dist(a, b) for a, b in itertools.combinations(palette, 2)]
    # each channel is jittered by at most ±10, i.e. at most ~17 in RGB distance per colour
    assert min(distances) > 70


def test_objects_are_drawn_where_the_label_says(scenes: list) -> None:
    for scene in scenes:
        pixels = np.asarray(scene.image).astype(int)
        for obj, place in zip(scene.objects, scene.placements, strict=True):
            assert obj.shape == place.shape
            cell_x, cell_y = CELL_CENTRES[obj.position]
            assert abs(place.cx - cell_x) <= 6 and abs(place.cy - cell_y) <= 6
            # the placement centre is inside every shape: it has the object's colour
            centre = pixels[round(place.cy), round(place.cx)]
            assert np.abs(centre - COLOUR_RGB[obj.colour]).max() <= 10
            x0, y0, x1, y1 = object_box(place)
            assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
        if len(scene.objects) == 2:
            a, b = scene.placements
            assert math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius
            relation_holds = {
                "left of": a.cx < b.cx,
                "right of": a.cx > b.cx,
                "above": a.cy < b.cy,
                "below": a.cy > b.cy,
            }
            assert relation_holds[scene.relation]


def test_object_pixels_stay_inside_the_object_box(scenes: list) -> None:
    for scene in [s for s in scenes if len(s.objects) == 1][:30]:
        pixels = np.asarray(scene.image).astype(int)
        differs = np.abs(pixels - np.array(scene.background_rgb)).max(axis=-1) > 0
        x0, y0, x1, y1 = object_box(scene.placements[0])
        outside = differs.copy()
        outside[y0:y1, x0:x1] = False
        assert differs.any() and not outside.any()


def test_big_objects_are_bigger_than_small_ones(scenes: list) -> None:
    radii = {
        size: [
            p.radius for s in scenes for o, p in zip(s.objects, s.placements, strict=True) if o.size == size
        ]
        for size in SIZES
    }
    assert max(radii["small"]) * 1.3 < min(radii["big"])


def test_edges_are_anti_aliased() -> None:
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        spec = SceneSpec((ObjectSpec(shape, "blue", "big", "centre"),), "white")
        placements = layout(spec, rng)  # jittered: edges fall between pixel boundaries
        background, fill = np.array(BACKGROUND_RGB["white"]), np.array(placements[0].rgb)
        pixels = np.asarray(render_placements(tuple(background), placements)).astype(int)
        is_bg = (pixels == background).all(-1)
        is_fill = (pixels == fill).all(-1)
        edge = pixels[~is_bg & ~is_fill]
        assert len(edge) > 20, shape  # partially covered pixels exist along the outline
        assert len({tuple(p) for p in edge}) > 2, shape
        # and they are blends: every channel between the two colours
        assert ((edge >= np.minimum(background, fill)) & (edge <= np.maximum(background, fill))).all()


def test_canonical_render_is_deterministic_and_jitter_varies_it() -> None:
    spec = SceneSpec(
        (ObjectSpec("star", "red", "small", "left"), ObjectSpec("circle", "green", "big", "right")),
        "gray",
        "left of",
    )
    assert np.array_equal(np.asarray(render(spec)), np.asarray(render(spec)))
    jittered = [np.asarray(render(spec, np.random.default_rng(i))) for i in range(3)]
    assert not np.array_equal(jittered[0], jittered[1]) and not np.array_equal(jittered[1], jittered[2])


def test_scene_caption_is_the_caption_of_its_label(scenes: list) -> None:
    for scene in scenes:
        assert scene.caption == caption(scene.spec)


def test_caption_examples() -> None:
    two = SceneSpec(
        (ObjectSpec("circle", "red", "small", "left"), ObjectSpec("square", "blue", "big", "right")),
        "white",
        "left of",
    )
    assert caption(two) == "a small red circle on the left of a big blue square, on a white background"
    one = SceneSpec((ObjectSpec("star", "yellow", "big", "top"),), "black")
    assert caption(one) == "a big yellow star at the top, on a black background"


def test_parse_inverts_caption_exhaustively_for_one_object() -> None:
    for spec in all_single_specs():
        assert parse_caption(caption(spec)) == spec


def test_parse_inverts_caption_for_sampled_two_object_scenes(scenes: list) -> None:
    for scene in scenes:
        assert parse_caption(scene.caption) == scene.spec


def test_parse_accepts_case_spacing_and_spelling_variants() -> None:
    spec = SceneSpec((ObjectSpec("square", "blue", "big", "centre"),), "gray")
    assert parse_caption("  A Big Blue Square in the  center ,  on a grey background. ") == spec
    assert parse_caption("a large blue square in the centre, on a gray background") == spec


@pytest.mark.parametrize(
    "text",
    [
        "a red circle on the left, on a white background",  # no size
        "a small red circle on the left",  # no background
        "a small red circle on the left of, on a white background",  # relation without a second object
        "a small red circle, on a white background",  # no position
        "a small red circle on the left, on a white background please",
        "a small pink circle on the left, on a white background",
        "a small red circle on the left, on a red background",  # object colour is not a background
        "",
    ],
)
def test_parse_rejects_text_outside_the_grammar(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_caption(text)
    assert info.value.field == "prompt"


def test_spec_rejects_positions_that_contradict_the_relation() -> None:
    with pytest.raises(InvalidInput):
        SceneSpec(
            (ObjectSpec("circle", "red", "small", "top"), ObjectSpec("star", "blue", "small", "bottom")),
            "white",
            "left of",
        )
    with pytest.raises(InvalidInput):
        SceneSpec((ObjectSpec("circle", "red", "small", "top"),), "white", "above")
    with pytest.raises(InvalidInput):
        ObjectSpec("hexagon", "red", "small", "top")


def test_every_caption_word_is_in_the_vocabulary(scenes: list) -> None:
    captions = [s.caption for s in scenes] + [caption(s) for s in all_single_specs()]
    words = {w for c in captions for w in caption_words(c)}
    assert words - {",", "."} <= set(VOCAB_WORDS)
    assert len(set(VOCAB_WORDS)) == len(VOCAB_WORDS)


def test_vocab_file_tokenizes_every_caption_without_unk(tmp_path: Path, scenes: list) -> None:
    path = write_vocab(tmp_path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[: len(SPECIAL_TOKENS)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = BertTokenizer.from_dir(tmp_path)
    unk = lines.index("[UNK]")
    captions = [s.caption for s in scenes] + [caption(s) for s in all_single_specs()]
    for text in captions:
        ids = tokenizer.encode(text)
        assert unk not in ids
        # one token per word / comma, plus [CLS] and [SEP]: no word is split into pieces
        assert len(ids) == len(caption_words(text)) + 2
        assert [lines[i] for i in ids[1:-1]] == caption_words(text)
    longest = max(len(tokenizer.encode(t)) for t in captions)
    assert longest <= 24


def test_scene_matches_compares_cell_by_cell() -> None:
    red_left = ObjectSpec("circle", "red", "small", "left")
    blue_right = ObjectSpec("square", "blue", "big", "right")
    prompt = SceneSpec((red_left, blue_right), "white", "left of")
    same_scene_other_order = SceneSpec(
        (ObjectSpec("square", "blue", "big", "left"), ObjectSpec("circle", "red", "small", "right")),
        "white",
        "left of",
    )
    mirrored = parse_caption("a big blue square on the right of a small red circle, on a white background")
    assert all(scene_matches(prompt, mirrored).values())
    swapped = scene_matches(prompt, same_scene_other_order)
    assert swapped["position"] and swapped["identity"] and swapped["background"]
    assert not swapped["shape"] and not swapped["colour"] and not swapped["objects"]

    wrong_shape = SceneSpec((ObjectSpec("star", "red", "small", "left"), blue_right), "black", "left of")
    result = scene_matches(prompt, wrong_shape)
    assert not result["shape"] and result["colour"] and not result["background"] and not result["all"]

    lone = SceneSpec((ObjectSpec("circle", "red", "small", "centre"),), "white")
    one = scene_matches(SceneSpec((ObjectSpec("circle", "red", "big", "centre"),), "white"), lone)
    assert one["objects"] and not one["size"] and not one["all"]
    missing = scene_matches(prompt, lone)
    assert not missing["count"] and not missing["position"] and not missing["objects"]
