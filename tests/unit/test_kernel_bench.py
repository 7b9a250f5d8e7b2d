"""``bench/kernel_bench.py`` end to end on the tiny model: every table prints, with sane figures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.scripts import load_script


@pytest.mark.slow
def test_kernel_bench_smoke_run_prints_every_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ldm.random_model import write_random_model

    ckpt = write_random_model(tmp_path / "tiny")
    bench = load_script("bench/kernel_bench.py")
    bench.main(["--model", str(ckpt), "--unet-rows", "1", "2", "--repeats", "3", "--layers", "2",
                "--profile-rows", "0"])  # fmt: skip
    out = capsys.readouterr().out
    overhead = dict(re.findall(r"^\| ([^|]+?) \| ([0-9.]+) \|$", out, re.M))
    assert len(overhead) == 7 and all(float(v) > 0 for v in overhead.values()), out
    # the fixed cost of a oneDNN call is what the one-row UNet pays: it must exceed a bare add's
    assert float(overhead["conv: oneDNN (`onednn_conv2d`)"]) > float(overhead["element-wise add (dispatch floor)"])
    unet_rows = re.findall(r"^\| ([12]) \| ([0-9.]+) \| ([0-9.]+) \(.*\| ([0-9]+) \|$", out, re.M)
    assert [r[0] for r in unet_rows] == ["1", "2"], out
    assert all(float(r[1]) > 0 and float(r[2]) > 0 and int(r[3]) > 0 for r in unet_rows)
    assert "layers, 8 rows" in out and len(re.findall(r"^\| \w+ (?:Conv2d|Linear)\(", out, re.M)) == 2, out
