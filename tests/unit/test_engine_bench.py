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
