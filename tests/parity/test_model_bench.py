"""The model benchmark runs and its parity pre-check holds (timings are not asserted)."""

from __future__ import annotations

import pytest

from tests.scripts import load_script

pytestmark = [pytest.mark.parity, pytest.mark.slow]



def test_model_bench_tiny_preset_runs_and_matches_diffusers() -> None:
    bench = load_script("bench/model_bench.py")
    result = bench.run("tiny", warmup=0, repeats=1, threads=None)
    assert result["max_rel_err"]["unet"] <= 1e-5
    assert result["max_rel_err"]["vae_decode"] <= 1e-5
    assert [t["part"].split(",")[0] for t in result["timings"]] == ["UNet forward", "VAE decode"]
    assert all(t["ours_ms"] > 0 and t["diffusers_ms"] > 0 for t in result["timings"])
    assert "| part |" in bench.markdown(result)
