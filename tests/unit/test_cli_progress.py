"""Progress bars of the in-process ``ldm-serve generate`` (steps per image, ``--n``), silent with
``--quiet`` or off a terminal; and ``ldm-serve client`` stays torch-free (it starts fast)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launcher.main import main
from launcher.progress import progress_enabled
from ldm.random_model import write_random_model
from tests.serving_support import ROOT


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("model"))


def _generate(checkpoint: Path, out: Path, *extra: str) -> None:
    argv = ["generate", "--checkpoint", str(checkpoint), "--prompt", "bars", "--steps", "2", "--n", "2",
            "--seed", "7", "--width", "32", "--height", "32", "--out", str(out), *extra]
    assert main(argv) == 0


def test_generate_draws_a_bar_of_steps_per_image_when_asked(checkpoint: Path, tmp_path: Path, capsys) -> None:
    _generate(checkpoint, tmp_path / "a.png", "--progress", "always")
    err = capsys.readouterr().err
    assert "image 0 (seed 7)" in err and "image 1 (seed 8)" in err
    assert "1/2" in err and "2/2" in err


@pytest.mark.parametrize("extra", [(), ("--progress", "always", "--quiet")], ids=["not-a-tty", "quiet"])
def test_generate_is_silent_off_a_terminal_or_with_quiet(checkpoint: Path, tmp_path: Path, capsys, extra) -> None:
    _generate(checkpoint, tmp_path / "b.png", *extra)
    captured = capsys.readouterr()
    assert "image 0" not in captured.err and "step" not in captured.err
    assert "seed=7" in captured.out and "seed=8" in captured.out  # the files are still listed


def test_progress_modes() -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

    assert progress_enabled("auto", False, Tty()) and not progress_enabled("auto", True, Tty())
    assert not progress_enabled("never", False, Tty()) and progress_enabled("always", False, None)


def test_the_client_command_does_not_import_torch() -> None:
    code = ("import sys; from launcher.main import build_parser; "
            "from launcher.commands import client; import launcher.remote; "
            "build_parser().parse_args(['client', 'models']); "
            "assert 'torch' not in sys.modules and 'fastapi' not in sys.modules, 'heavy import'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
