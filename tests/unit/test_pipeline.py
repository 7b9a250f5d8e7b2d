"""The pipeline on tiny real models: batch invariance, inpainting, validation, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.pipeline import GenerationRow, LatentDiffusionPipeline, load_pipeline
from ldm.random_model import write_random_model
from ldm_serve.errors import InvalidInput, TokenizerFilesMissing
from tests.checkpoints import TINY_LDM_CLASS, TINY_SD1, TINY_SD1_INPAINT, write_original_checkpoint

SIZE = 32


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> LatentDiffusionPipeline:
    return load_pipeline(write_random_model(tmp_path_factory.mktemp("random")))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> LatentDiffusionPipeline:
    return load_pipeline(write_original_checkpoint(TINY_SD1, tmp_path_factory.mktemp("sd1") / "sd1.ckpt"))


def scene(size: int = SIZE, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.zeros((size, size, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(255, 0, size, dtype=np.uint8)[:, None]
    arr[..., 2] = rng.integers(0, 255, (size, size), dtype=np.uint8)
    return Image.fromarray(arr)


def box_mask(size: int = SIZE, lo: int = 8, hi: int = 24) -> Image.Image:
    arr = np.zeros((size, size), np.uint8)
    arr[lo:hi, lo:hi] = 255
    return Image.fromarray(arr)


def test_row_is_bit_identical_alone_and_in_a_mixed_batch(sd1: LatentDiffusionPipeline) -> None:
    target = GenerationRow("a red cat", seed=11, negative_prompt="dog", steps=10, guidance_scale=5.0)
    mates = [
        GenerationRow("the moon at night", seed=3, steps=20, guidance_scale=7.5, eta=0.5),
        GenerationRow("blue house", seed=99, steps=4, guidance_scale=1.0),
        GenerationRow("", seed=5, steps=25, guidance_scale=2.0, eta=1.0),
    ]
    alone, _ = sd1.generate_latents([target], SIZE, SIZE)
    batched, _ = sd1.generate_latents([mates[0], target, mates[1], mates[2]], SIZE, SIZE)
    assert torch.equal(alone[0], batched[1])
    # and the batch-mates are genuinely different computations
    assert not torch.equal(batched[0], batched[1])


def test_same_seed_same_image_different_seed_different_image(random_model: LatentDiffusionPipeline) -> None:
    a = random_model.txt2img("a red circle", seeds=[1], steps=4, width=SIZE, height=SIZE)
    b = random_model.txt2img("a red circle", seeds=[1], steps=4, width=SIZE, height=SIZE)
    c = random_model.txt2img("a red circle", seeds=[2], steps=4, width=SIZE, height=SIZE)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))
    assert a.images[0].size == (SIZE, SIZE) and a.seeds == [1]


def test_seeds_are_recorded_and_consecutive(random_model: LatentDiffusionPipeline) -> None:
    result = random_model.txt2img("a blue square", num_images=3, seeds=40, steps=2, width=SIZE, height=SIZE)
    assert result.seeds == [40, 41, 42] and len(result.images) == 3
    random_seeds = random_model.txt2img("x", num_images=2, steps=1, width=SIZE, height=SIZE).seeds
    assert len(random_seeds) == 2 and all(isinstance(s, int) for s in random_seeds)


def test_progress_images_as_rows_finish_and_cancellation(random_model: LatentDiffusionPipeline) -> None:
    rows = [GenerationRow("a", seed=1, steps=2), GenerationRow("b", seed=2, steps=5), GenerationRow("c", 3, steps=5)]
    seen_steps: list[list[tuple[int, int, int]]] = []
    finished_at: dict[int, int] = {}

    def on_step(progress):
        seen_steps.append([(p.row, p.step, p.total) for p in progress])
        if len(seen_steps) == 3:
            return [2]  # cancel row 2 after its third step
        return None

    def on_image(row, image):
        finished_at[row] = len(seen_steps)

    images = random_model.generate(rows, SIZE, SIZE, on_step=on_step, on_image=on_image)
    assert images[2] is None and images[0] is not None and images[1] is not None
    assert seen_steps[0] == [(0, 1, 2), (1, 1, 5), (2, 1, 5)]
    assert finished_at[0] < finished_at[1]  # the 2-step row was delivered first
    assert all(r != 2 for step in seen_steps[3:] for r, _, _ in step)
    # the survivor is unaffected by its canceled batch-mate
    alone = random_model.generate([rows[1]], SIZE, SIZE)[0]
    assert np.array_equal(np.asarray(alone), np.asarray(images[1]))


def test_mask_blending_inpaint_keeps_the_unmasked_region(random_model: LatentDiffusionPipeline) -> None:
    assert random_model.inpaint_mode == "blend"
    image, mask = scene(), box_mask()
    out = random_model.inpaint(image, mask, "a red circle", seeds=[5], steps=6, guidance_scale=3.0).images[0]
    src, got = np.asarray(image), np.asarray(out)
    keep = np.asarray(mask) < 128
    assert np.array_equal(got[keep], src[keep])
    assert not np.array_equal(got[~keep], src[~keep])

    # the blend is built in latent space with 1 = keep, the hole covering every latent
    # cell that touches a repaint pixel; x0 is the posterior sample of the source
    row = GenerationRow("a red circle", 5, steps=6, guidance_scale=3.0, image=image, mask=mask)
    gen = torch.Generator().manual_seed(5)
    torch.randn((random_model.latent_channels, 8, 8), generator=gen)  # x_T comes first
    blend = random_model._inpainting_inputs([row], [gen], (8, 8))["blend"]
    f = random_model.downsample_factor
    expected_keep = torch.ones((1, 1, 8, 8))
    expected_keep[..., 8 // f : 24 // f, 8 // f : 24 // f] = 0
    assert torch.equal(blend.mask, expected_keep)
    x0 = random_model._encode_latent(
        random_model._image_tensor(image) * 2 - 1,
        (lambda g: (torch.randn((random_model.latent_channels, 8, 8), generator=g), g)[1])(
            torch.Generator().manual_seed(5)
        ),
    )
    assert torch.equal(blend.x0, x0)


def test_concat_inpainting_model_takes_nine_channels(tmp_path: Path) -> None:
    pipe = load_pipeline(write_original_checkpoint(TINY_SD1_INPAINT, tmp_path / "inp.ckpt"))
    assert pipe.inpaint_mode == "concat" and pipe.config.unet.in_channels == 9
    image, mask = scene(), box_mask()
    out = pipe.inpaint(image, mask, "a cat", seeds=[1], steps=4).images[0]
    keep = np.asarray(mask) < 128
    assert np.array_equal(np.asarray(out)[keep], np.asarray(image)[keep])
    with pytest.raises(InvalidInput, match="image"):
        pipe.txt2img("a cat", steps=2, width=SIZE, height=SIZE)


def test_class_conditional_model_uses_class_ids(tmp_path: Path) -> None:
    pipe = load_pipeline(write_original_checkpoint(TINY_LDM_CLASS, tmp_path / "cin.ckpt"))
    f = 2 * pipe.size_multiple
    a = pipe.txt2img("3", seeds=[0], steps=2, guidance_scale=3.0, width=f, height=f).images[0]
    b = pipe.txt2img("4", seeds=[0], steps=2, guidance_scale=3.0, width=f, height=f).images[0]
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(InvalidInput, match="prompt"):
        pipe.txt2img("a cat", steps=2, width=f, height=f)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"width": 36}, "width"),
        ({"height": 20}, "height"),
        ({"width": 8192}, "width"),
        ({"steps": 0}, "steps"),
        ({"steps": 1001}, "steps"),
        ({"eta": 1.5}, "eta"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"prompt": "cat " * 200}, "prompt"),
        ({"negative_prompt": "dog " * 200}, "negative_prompt"),
    ],
)
def test_bad_inputs_name_the_field(sd1: LatentDiffusionPipeline, kwargs: dict, field: str) -> None:
    args = {"prompt": "a cat", "steps": 2, "width": SIZE, "height": SIZE} | kwargs
    prompt = args.pop("prompt")
    with pytest.raises(InvalidInput) as info:
        sd1.txt2img(prompt, **args)
    assert info.value.field == field
    assert field in str(info.value)


def test_size_error_names_the_multiple(sd1: LatentDiffusionPipeline) -> None:
    with pytest.raises(InvalidInput, match=f"multiple of {sd1.size_multiple}"):
        sd1.validate_size(SIZE + 4, SIZE)


def test_inpaint_size_mismatch(random_model: LatentDiffusionPipeline) -> None:
    with pytest.raises(InvalidInput, match="mask"):
        random_model.inpaint(scene(), box_mask(size=64), "x", steps=2)


def test_missing_tokenizer_files_are_named(tmp_path: Path) -> None:
    ckpt = write_random_model(tmp_path)
    (ckpt.parent / "tokenizer" / "vocab.txt").unlink()
    with pytest.raises(TokenizerFilesMissing, match="vocab.txt"):
        load_pipeline(ckpt)


def test_random_model_is_marked_untrained(random_model: LatentDiffusionPipeline) -> None:
    assert random_model.untrained and random_model.name == "random-untrained"


def test_cli_generate_writes_pngs(tmp_path: Path) -> None:
    ckpt = write_random_model(tmp_path / "m")
    out = tmp_path / "out.png"
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "generate", "--checkpoint", str(ckpt), "--prompt", "a red circle",
         "--steps", "2", "--n", "2", "--seed", "7", "--width", "32", "--height", "64", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    files = sorted(tmp_path.glob("out-*.png"))
    assert [f.name for f in files] == ["out-0.png", "out-1.png"]
    assert Image.open(files[0]).size == (32, 64)
    assert "seed=7" in proc.stdout and "seed=8" in proc.stdout


def test_cli_reports_bad_input_as_error(tmp_path: Path) -> None:
    ckpt = write_random_model(tmp_path / "m")
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "generate", "--checkpoint", str(ckpt), "--width", "33",
         "--out", str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "width" in proc.stderr


def test_cli_inpaint_keeps_unmasked_pixels(tmp_path: Path) -> None:
    ckpt = write_random_model(tmp_path / "m")
    scene().save(tmp_path / "in.png")
    box_mask().save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "inpaint", "--checkpoint", str(ckpt), "--image",
         str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--prompt", "a red circle",
         "--steps", "2", "--seed", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    keep = np.asarray(box_mask()) < 128
    assert np.array_equal(np.asarray(Image.open(out))[keep], np.asarray(scene())[keep])


def test_long_prompts_are_truncated_with_a_warning_when_asked(random_model: LatentDiffusionPipeline) -> None:
    """The service's rule: a prompt longer than the model reads runs on its first tokens, and says so."""
    limit = random_model.max_prompt_tokens
    words = " ".join(["cube"] * (limit + 10))  # well past the limit: the endings below are never read
    long_a, long_b = GenerationRow(words + " red", seed=3, steps=4), GenerationRow(words + " blue", seed=3, steps=4)
    n = random_model.count_prompt_tokens(long_a.prompt)
    assert n > limit
    with pytest.raises(InvalidInput, match=f"the model reads at most {limit}"):  # the library default
        random_model.validate_row(long_a, SIZE, SIZE)
    random_model.truncate_long_prompts = True
    try:
        random_model.validate_row(long_a, SIZE, SIZE)
        assert random_model.prompt_warnings(long_a) == [f"prompt: {n} tokens, truncated to the model's {limit}"]
        assert random_model.prompt_warnings(GenerationRow("short", seed=1)) == []
        a, b = (random_model.generate([row], SIZE, SIZE)[0] for row in (long_a, long_b))
        short = random_model.generate([GenerationRow("cube", seed=3, steps=4)], SIZE, SIZE)[0]
    finally:
        random_model.truncate_long_prompts = False
    assert np.array_equal(np.asarray(a), np.asarray(b))  # what differs after the limit is not read
    assert not np.array_equal(np.asarray(a), np.asarray(short))  # what comes before it is
