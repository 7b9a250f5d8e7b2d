"""The model benchmark runs and its parity pre-check holds (timings are not asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.parity, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "model_bench.py"


def test_model_bench_tiny_preset_runs_and_matches_diffusers() -> None:
    spec = importlib.util.spec_from_file_location("model_bench", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["model_bench"] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    result = bench.run("tiny", warmup=0, repeats=1, threads=None)
    assert result["max_rel_err"]["unet"] <= 1e-5
    assert result["max_rel_err"]["vae_decode"] <= 1e-5
    assert [t["part"].split(",")[0] for t in result["timings"]] == ["UNet forward", "VAE decode"]
    assert all(t["ours_ms"] > 0 and t["diffusers_ms"] > 0 for t in result["timings"])
    assert "| part |" in bench.markdown(result)
