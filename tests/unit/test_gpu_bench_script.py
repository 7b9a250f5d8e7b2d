"""bench/gpu/gpu_bench.py end to end in its CPU mode (tiny SD 1.x config, 2 steps).

The real run needs an H100 / H200; here the same code path builds the models, converts
them to diffusers, prepares and checks the backends, measures and writes the table.
No timing is asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.scripts import load_script

pytestmark = pytest.mark.slow  # builds two pipelines and runs a few 2-step generations

pytest.importorskip("diffusers")
TINY = ["--tiny", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--step-iters", "1"]


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/gpu/gpu_bench.py")


def table_between_markers(text: str) -> str:
    start, end = "<!-- gpu-bench:start -->", "<!-- gpu-bench:end -->"
    assert text.count(start) == 1 and text.count(end) == 1
    return text.split(start, 1)[1].split(end, 1)[0]


def test_tiny_cpu_run_writes_a_well_formed_table(bench, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\nearlier section\n\n<!-- gpu-bench:start -->\nold\n<!-- gpu-bench:end -->\n\nafter\n"
    )
    rc = bench.main([*TINY, "--batches", "1", "2", "--out", str(doc), "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nearlier section\n") and text.rstrip().endswith("after")
    body = table_between_markers(text)
    assert "old" not in body

    header = "| implementation | batch | images/s | vs diffusers (same batch) | vs diffusers batch 1 | ms / UNet step"
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    assert all(len(r) == 8 for r in rows)
    got = {(r[0], int(r[1])) for r in rows}
    impls = ["diffusers / eager", "ours / eager", "ours / torchscript"]
    assert got == {(impl, b) for impl in impls for b in (1, 2)}
    for r in rows:
        assert float(r[2]) > 0 and float(r[5]) > 0 and float(r[6]) > 0
        assert r[3].endswith("x") and r[4].endswith("x")
        assert r[7] == ""  # MFU only for SD 1.5 shapes at 512x512
    assert "| torchscript | ok |" in body  # checked against eager and kept
    assert "goal: >= 2.0x diffusers eager at batch 1" in body and "FAILURE" not in body

    data = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    assert data["failures"] == [] and len(data["rows"]) == 6
    assert data["prepared"]["torchscript"]["max_rel_err"]["unet"] <= 1e-3
    assert (tmp_path / "out" / "gpu_bench.md").read_text().strip() == body.strip()

    # a table that came back from a GPU machine goes into another copy of the docs unchanged
    other = tmp_path / "other.md"
    other.write_text("# Benchmarks\n")
    assert bench.main(["--apply", str(tmp_path / "out" / "gpu_bench.md"), "--out", str(other)]) == 0
    assert table_between_markers(other.read_text()).strip() == body.strip()


def test_deadline_skips_remaining_configs_and_says_so(bench, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    rc = bench.main([*TINY, "--batches", "1", "--deadline-s", "0", "--out", str(doc)])
    assert rc == 0  # skipping is not a failure
    body = table_between_markers(doc.read_text())
    assert "- skipped: diffusers / eager at batch 1" in body
    assert "- skipped: torchscript: not prepared" in body
    assert "| ours / eager | 1 |" not in body


def test_mismatch_against_eager_fails_loudly(bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.setattr(
        bench, "check_against_eager", lambda eager, other, size: {"unet": 0.5, "decoder": 0.0}
    )
    doc = tmp_path / "benchmarks.md"
    rc = bench.main([*TINY, "--batches", "1", "--out", str(doc)])
    assert rc == 1
    body = table_between_markers(doc.read_text())
    assert "| torchscript | MISMATCH |" in body and "**FAILURE**: torchscript" in body
    assert "| ours / torchscript |" not in body  # a mismatching backend is not timed
    assert "MISMATCH" in capsys.readouterr().err
