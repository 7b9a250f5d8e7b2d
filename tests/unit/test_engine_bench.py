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
         "--core-workers", "1", "2", "--json-out", str(tmp_path / "r.json"), "--markdown"]
    )  # fmt: skip
    (model,) = result["models"]
    assert model["parity_max_pixel_diff"] <= 2  # same x_T -> same image as diffusers
    impls = {r["impl"] for r in model["rows"]}
    assert impls == {
        "diffusers / eager", "ours / eager", "ours / torchscript",
        "ours / eager, 2 core workers", "ours / torchscript, 2 core workers",
    }  # fmt: skip
    for r in model["rows"]:
        assert r["images_per_s"] > 0
        assert (r["vs_diffusers"] is None) == r["impl"].startswith("diffusers")
    assert {r["batch"] for r in model["rows"]} == {1, 2}
    assert "| tiny random |" in bench.markdown(result) and (tmp_path / "r.json").is_file()
