"""``bench/engine_bench.py`` end to end on the tiny model: every implementation runs and matches diffusers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scripts import load_script


def _bench():
    return load_script("bench/engine_bench.py")


@pytest.mark.slow
def test_engine_bench_smoke_run_reports_every_implementation(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    bench = _bench()
    result = bench.main(
        ["--no-model", "--steps", "2", "--repeats", "1", "--warmup", "0", "--batches", "1", "2",
         "--backends", "eager", "torchscript", "--no-diffusers-compile", "--compare", "previous", "batched",
         "--core-workers", "2", "--json-out", str(tmp_path / "r.json"), "--markdown"]
    )  # fmt: skip
    (model,) = result["models"]
    assert model["parity_max_pixel_diff"] <= 2  # same x_T -> same image as diffusers
    impls = {r["impl"] for r in model["rows"]}
    assert impls == {
        "diffusers / eager", "ours / eager, 2 core workers", "ours / torchscript, 2 core workers",
        "ours / torchscript, one call per row (previous default)", "ours / torchscript, not batch-invariant",
    }  # fmt: skip
    for r in model["rows"]:
        assert r["images_per_s"] > 0
        assert (r["vs_diffusers"] is None) == r["impl"].startswith("diffusers")
    assert {r["batch"] for r in model["rows"]} == {1, 2}
    text = bench.markdown(result)
    assert "| tiny random |" in text and (tmp_path / "r.json").is_file()
    summary = bench.summary_markdown(result).splitlines()
    assert summary[0].startswith(
        "| model | batch | diffusers eager | diffusers inductor | ours (serving default) |"
    )
    assert len(summary) == 2 + 2  # header, rule, one line per batch


def test_every_backend_gets_a_model_of_its_own(tmp_path: Path) -> None:
    """A backend that reverts the invariant kernels (inductor) must not reach another backend's model."""
    import argparse

    from ldm.kernels import is_batch_invariant, revert_batch_invariant
    from ldm.random_model import write_random_model

    bench = _bench()
    ckpt = write_random_model(tmp_path / "tiny")
    args = argparse.Namespace(core_workers=[2], backends=["eager", "torchscript"], batch_invariant=None)
    pipes, compile_s = bench.ours_pipelines(ckpt, args, tmp_path / "cache", 64)
    assert set(pipes) == set(compile_s) == {"ours / eager, 2 core workers", "ours / torchscript, 2 core workers"}
    eager, scripted = pipes["ours / eager, 2 core workers"], pipes["ours / torchscript, 2 core workers"]
    assert is_batch_invariant(eager.model.unet) and is_batch_invariant(scripted.model.unet)
    revert_batch_invariant(eager.model.unet)  # what apply_backend(..., "inductor") does to its model
    assert is_batch_invariant(scripted.model.unet)  # the TorchScript run keeps one call per shard
