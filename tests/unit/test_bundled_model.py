"""The shipped bundled model: loads through the public loader, is deterministic, draws what it is asked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from ldm.data.shapes import BACKGROUND_RGB, COLOUR_RGB
from ldm.loading.config_yaml import model_config_from_yaml
from ldm.pipeline import LatentDiffusionPipeline, load_pipeline
from ldm_serve.models import BUNDLED_DIR, bundled_model_path

ROOT = Path(__file__).resolve().parents[2]
MAX_SHIPPED_BYTES = 30 * 1024 * 1024


@pytest.fixture(scope="module")
def bundled() -> LatentDiffusionPipeline:
    path = bundled_model_path()
    assert path is not None, f"no bundled model under {BUNDLED_DIR}"
    return load_pipeline(path)


def test_shipped_files_are_the_original_layout_and_small() -> None:
    path = bundled_model_path()
    assert path is not None and path.suffix == ".safetensors"
    total = sum(f.stat().st_size for f in BUNDLED_DIR.rglob("*") if f.is_file())
    assert total <= MAX_SHIPPED_BYTES, f"models/bundled holds {total} bytes"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    prefixes = {k.split(".")[0] for k in keys}
    assert {"model", "first_stage_model", "cond_stage_model"} <= prefixes
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert "scale_factor" in keys and "alphas_cumprod" in keys
    assert (BUNDLED_DIR / "tokenizer" / "vocab.txt").is_file()
    assert (BUNDLED_DIR / "MODEL_CARD.md").is_file()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["untrained"] is False and meta["training"]["ldm_steps"] > 0


def test_loads_as_an_ldm_text_to_image_model(bundled: LatentDiffusionPipeline) -> None:
    path = bundled_model_path()
    assert path is not None
    yaml_config = model_config_from_yaml(path.with_suffix(".yaml"))
    assert bundled.config.family == "ldm-txt2img" == yaml_config.family
    assert bundled.config.unet == yaml_config.unet
    assert bundled.config.conditioning_key == "crossattn" and bundled.config.parameterization == "eps"
    assert bundled.config.first_stage.kind == "kl" and bundled.downsample_factor == 4
    assert bundled.default_size == 64
    assert not bundled.untrained
    # the BERT-style tokenizer reads each of the grammar's 11 words and the comma as one token, plus [CLS] [SEP]
    assert bundled.count_prompt_tokens("a small red circle on the left, on a white background") == 12 + 2


def test_generation_is_deterministic_per_seed(bundled: LatentDiffusionPipeline) -> None:
    prompt = "a big blue square on the right, on a gray background"
    a = bundled.txt2img(prompt, num_images=2, seeds=[5, 6], steps=10, guidance_scale=5.0).images
    b = bundled.txt2img(prompt, seeds=[5], steps=10, guidance_scale=5.0).images
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((rgb - np.asarray(palette[name])) ** 2)))


@pytest.mark.parametrize(
    ("prompt", "colour", "background"),
    [
        ("a big red square in the centre, on a white background", "red", "white"),
        ("a big blue circle in the centre, on a black background", "blue", "black"),
        ("a big yellow square in the centre, on a gray background", "yellow", "gray"),
    ],
)
def test_smoke_the_object_and_background_have_the_asked_colours(
    bundled: LatentDiffusionPipeline, prompt: str, colour: str, background: str
) -> None:
    (image,) = bundled.txt2img(prompt, seeds=[0], steps=25, guidance_scale=5.0).images
    arr = np.asarray(image, dtype=np.float64)  # [64, 64, 3]
    centre = np.median(arr[28:36, 28:36].reshape(-1, 3), axis=0)  # inside any big centred object
    corners = np.concatenate([arr[:6, :6].reshape(-1, 3), arr[-6:, -6:].reshape(-1, 3)])
    assert _nearest(centre, COLOUR_RGB) == colour, centre
    assert _nearest(np.median(corners, axis=0), BACKGROUND_RGB) == background


@pytest.mark.slow
def test_evaluation_script_runs_on_a_subset(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import eval_bundled_model
    finally:
        sys.path.pop(0)
    out = tmp_path / "report.json"
    code = eval_bundled_model.main(
        ["--prompts", "6", "--inpaint", "2", "--real", "300", "--guidance", "1", "5", "--json", str(out)]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["judge_on_real"]["all"] >= 0.98  # the judge is fair on real held-out scenes
    assert set(report["text2img"]) == {"1", "5"}
    for entry in report["text2img"].values():
        assert entry["prompts_single"] == 3 and entry["prompts_two"] == 3
        assert 0.0 <= entry["single_shape_colour"] <= 1.0 and entry["frechet_vs_real"] > 0
    assert report["inpaint"]["cases"] == 2
    assert report["inpaint"]["unmasked_psnr_returned_min_db"] == "inf"  # known pixels are pasted back


def test_generate_command_defaults_to_the_bundled_model(tmp_path: Path) -> None:
    import subprocess

    out = tmp_path / "star.png"
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "generate", "--prompt",
         "a big yellow star in the centre, on a black background", "--steps", "10", "--seed", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "UNTRAINED" not in proc.stderr
    with Image.open(out) as image:
        assert image.size == (64, 64)


def test_worker_and_up_default_to_the_bundled_model() -> None:
    from launcher.commands.serve import _default_model
    from ldm_serve.settings import Settings
    from worker.main import load_model

    assert _default_model() == bundled_model_path()
    pipeline = load_model(Settings(model_path=None))
    assert pipeline.name == "shapes-ldm-f4" and not pipeline.untrained


def test_evaluation_script_partial_runs_render_and_refuse_docs() -> None:
    """``--prompts 0 --real 0`` reports inpainting alone, and never overwrites the docs with a partial report."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import eval_bundled_model
    finally:
        sys.path.pop(0)
    args = eval_bundled_model.parse_args(["--prompts", "0", "--real", "0", "--inpaint", "3"])
    inp = {
        "cases": 3, "guidance": 5.0, "new_object": 0.5, "other_object_kept": 1.0,
        "unmasked_psnr_returned_min_db": "inf", "unmasked_psnr_raw_mean_db": 33.0,
        "unmasked_psnr_raw_min_db": 25.0, "seconds": 1.0,
    }  # fmt: skip
    text = eval_bundled_model._markdown({"inpaint": inp}, Path("m.safetensors"), args)
    assert text.startswith("Inpainting (3 held-out") and "| guidance |" not in text and "Judge on" not in text
    assert eval_bundled_model.main(["--prompts", "0", "--real", "0", "--write-docs"]) == 2
