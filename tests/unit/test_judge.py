"""The scene judge: shipped weights' held-out accuracy, label encoding, loading, Frechet distance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.data.judge import (
    DEFAULT_WEIGHTS,
    JudgeConfig,
    SceneJudge,
    accuracy_report,
    decode,
    encode_labels,
    frechet_distance,
    frechet_distance_from_stats,
    images_to_tensor,
    judge_features,
    judge_scene,
    judge_scenes,
    load_judge,
    save_judge,
    scene_batch,
    split_logits,
)
from ldm.data.shapes import LAYOUTS, POSITIONS, sample_spec
from ldm_serve.errors import CheckpointError, ConfigError, InvalidInput

TEST_SEED = 3  # never used for training (train: 0) nor for the README figures (1)
NUM_SCENES = 200


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, list]:
    return scene_batch(TEST_SEED, 0, NUM_SCENES)


@pytest.fixture(scope="module")
def judge() -> SceneJudge:
    torch.set_num_threads(1)
    return load_judge()


def test_shipped_judge_is_small_and_loads(judge: SceneJudge) -> None:
    assert DEFAULT_WEIGHTS.is_file()
    assert DEFAULT_WEIGHTS.stat().st_size < 4 * 2**20
    assert not judge.training
    assert load_judge() is judge  # cached


def test_shipped_judge_reads_held_out_scenes(judge: SceneJudge, held_out: tuple[np.ndarray, list]) -> None:
    images, specs = held_out
    report = accuracy_report(specs, judge_scenes(images, judge))
    assert {len(s.objects) for s in specs} == {1, 2}
    for key in ("background", "count", "position", "shape", "colour", "size"):
        assert report[key] >= 0.98, (key, report)


def test_judge_accepts_pil_arrays_tensors_and_other_sizes(
    judge: SceneJudge, held_out: tuple[np.ndarray, list]
) -> None:
    images, _ = held_out
    images = images[:16]
    from_arrays = judge_scenes(images, judge)
    pil = [Image.fromarray(im) for im in images]
    assert [judge_scene(im, judge) for im in pil] == from_arrays
    as_tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # pipeline output range
    assert judge_scenes(as_tensor, judge) == from_arrays
    upscaled = [im.resize((128, 128), Image.Resampling.BICUBIC) for im in pil]
    assert images_to_tensor(upscaled).shape == (16, 3, 64, 64)
    agree = np.mean([a == b for a, b in zip(judge_scenes(upscaled, judge), from_arrays, strict=True)])
    assert agree >= 0.9
    with pytest.raises(InvalidInput):
        images_to_tensor(images.astype(np.float32))


def test_labels_decode_back_to_the_same_cells() -> None:
    rng = np.random.default_rng(0)
    specs = [sample_spec(rng) for _ in range(64)]
    labels = encode_labels(specs)
    # logits that put all mass on the label classes
    logits = torch.zeros(len(specs), 4 + 7 + 5 * 12)
    parts = split_logits(logits)
    rows = torch.arange(len(specs))
    parts["background"][rows, labels["background"]] = 10.0
    parts["layout"][rows, labels["layout"]] = 10.0
    for name in ("shape", "colour", "size"):
        for cell in range(len(POSITIONS)):
            known = labels[name][:, cell] >= 0
            parts[name][rows[known], cell, labels[name][known, cell]] = 10.0
    for spec, decoded in zip(specs, decode(logits), strict=True):
        assert decoded.cells() == spec.cells() and decoded.background == spec.background
        assert decoded.relation in (None, "left of", "above")
    assert set(labels["layout"].tolist()) <= set(range(len(LAYOUTS)))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SceneJudge(JudgeConfig(widths=(4, 4, 8), reduce_channels=2, features=8)).eval()
    path = save_judge(model, tmp_path / "tiny.safetensors")
    loaded = load_judge(path)
    x = images_to_tensor(scene_batch(TEST_SEED, 0, 4)[0])
    torch.testing.assert_close(loaded(x), model(x), atol=2e-2, rtol=2e-2)  # stored as fp16
    assert judge_features(x, loaded).shape == (4, 8)


def test_load_rejects_missing_foreign_and_misfit_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        load_judge(tmp_path / "absent.safetensors")
    model = SceneJudge(JudgeConfig(widths=(4, 4, 8), reduce_channels=2, features=8))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = json.dumps({"widths": [4, 4, 8], "reduce_channels": 2, "features": 8})
    other_classes = json.dumps({"shape": ["circle"]})
    save_file(
        state, str(tmp_path / "foreign.safetensors"), metadata={"config": config, "classes": other_classes}
    )
    with pytest.raises(ConfigError):
        load_judge(tmp_path / "foreign.safetensors")
    good = save_judge(model, tmp_path / "good.safetensors")
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    state["heads.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "misfit.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError) as info:
        load_judge(tmp_path / "misfit.safetensors")
    assert any("heads.bias" in m for m in info.value.mismatched)


def test_frechet_distance_of_gaussians_with_commuting_covariances() -> None:
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    # closed form for diagonal covariances: |dmu|^2 + sum (sqrt(va) - sqrt(vb))^2 = 5 + 1 + 1 + 0
    assert frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(7.0)


def test_frechet_distance_of_gaussians_with_non_commuting_covariances() -> None:
    cov_a = np.array([[2.0, 1.0], [1.0, 2.0]])
    cov_b = np.array([[3.0, 0.0], [0.0, 1.0]])
    # 2x2 with positive eigenvalues: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)), M = cov_a @ cov_b
    m = cov_a @ cov_b
    trace_sqrt = np.sqrt(np.trace(m) + 2.0 * np.sqrt(np.linalg.det(m)))
    expected = 1.0 + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    got = frechet_distance_from_stats(np.zeros(2), cov_a, np.array([1.0, 0.0]), cov_b)
    assert got == pytest.approx(expected, rel=1e-10)
    assert frechet_distance_from_stats(np.zeros(2), cov_a, np.zeros(2), cov_a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_from_samples() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3)) * np.array([1.0, 2.0, 3.0])
    b = rng.normal(size=(20000, 3)) * np.array([2.0, 2.0, 1.0]) + np.array([0.0, 3.0, 0.0])
    # |dmu|^2 + sum (sa - sb)^2 = 9 + 1 + 0 + 4
    assert frechet_distance(a, b) == pytest.approx(14.0, rel=0.05)
    shifted = a + np.array([1.0, 0.0, 2.0])
    assert frechet_distance(a, shifted) == pytest.approx(5.0, rel=1e-6)  # same covariance exactly
    with pytest.raises(InvalidInput):
        frechet_distance(a, b[:, :2])


def test_judge_features_separate_real_from_corrupted_scenes(judge: SceneJudge) -> None:
    # FD's small-sample bias grows like F^2 / N: 500 scenes per set keep it below the signal
    real_a = judge_features(scene_batch(TEST_SEED, NUM_SCENES, 500)[0], judge)
    images_b = scene_batch(TEST_SEED + 1, 0, 500)[0]
    real_b = judge_features(images_b, judge)
    assert real_a.shape == (500, judge.config.features)
    blurred = [Image.fromarray(im).resize((16, 16), Image.Resampling.BOX).resize((64, 64)) for im in images_b]
    assert frechet_distance(real_a, real_b) < 0.6 * frechet_distance(real_a, judge_features(blurred, judge))
