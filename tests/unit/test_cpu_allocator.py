"""``LDM_CPU_ALLOCATOR``: the worker re-executes itself onto jemalloc, and images do not change."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_serve.cpu_allocator import allocator_in_use, find_jemalloc, use_cpu_allocator
from ldm_serve.errors import ConfigError

JEMALLOC = find_jemalloc()
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc.so.2 not installed (apt-get install libjemalloc2)")


class Exec:
    """Records the re-execution instead of replacing the test process."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], dict[str, str]]] = []

    def __call__(self, path: str, argv: list[str], env: dict[str, str]) -> None:
        self.calls.append((path, argv, env))


@pytest.fixture
def glibc_maps(tmp_path: Path) -> Path:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    return maps


@pytest.fixture
def fake_lib(tmp_path: Path) -> Path:
    lib = tmp_path / "lib" / "libjemalloc.so.2"
    lib.parent.mkdir()
    lib.write_bytes(b"\x7fELF")
    return lib


def test_find_jemalloc_searches_the_given_folders(tmp_path: Path, fake_lib: Path) -> None:
    assert find_jemalloc([tmp_path / "none", fake_lib.parent]) == fake_lib
    assert find_jemalloc([tmp_path / "none"]) is None


def test_maps_tell_which_allocator_is_loaded(tmp_path: Path, glibc_maps: Path) -> None:
    assert allocator_in_use(glibc_maps) == "system"
    jemalloc_maps = tmp_path / "maps-je"
    jemalloc_maps.write_text("7f00-7f01 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert allocator_in_use(jemalloc_maps) == "jemalloc"
    assert allocator_in_use(tmp_path / "missing") == "system"  # not Linux


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD re-execution is Linux-only")
def test_auto_on_cpu_re_executes_with_the_library_first_in_ld_preload(glibc_maps: Path, fake_lib: Path) -> None:
    rec = Exec()
    env = {"LD_PRELOAD": "/opt/other.so", "KEEP": "1"}
    assert use_cpu_allocator("auto", "cpu", environ=env, library=fake_lib, maps=glibc_maps, execve=rec) == "jemalloc"
    [(path, argv, new_env)] = rec.calls
    assert path == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert new_env["LD_PRELOAD"] == f"{fake_lib} /opt/other.so" and new_env["KEEP"] == "1"
    assert env == {"LD_PRELOAD": "/opt/other.so", "KEEP": "1"}  # the caller's mapping is not modified


@pytest.mark.parametrize(("choice", "device"), [("system", "cpu"), ("auto", "cuda"), ("auto", "cuda:1")])
def test_no_re_execution_unless_asked(choice: str, device: str, glibc_maps: Path, fake_lib: Path) -> None:
    rec = Exec()
    assert use_cpu_allocator(choice, device, environ={}, library=fake_lib, maps=glibc_maps, execve=rec) == "system"
    assert rec.calls == []


def test_already_loaded_is_kept(tmp_path: Path, fake_lib: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 2 /usr/lib/libjemalloc.so.2\n")
    rec = Exec()
    assert use_cpu_allocator("jemalloc", "cuda", environ={}, library=fake_lib, maps=maps, execve=rec) == "jemalloc"
    assert rec.calls == []


def test_required_but_missing_names_the_setting_and_the_package(glibc_maps: Path, monkeypatch) -> None:
    monkeypatch.setattr("ldm_serve.cpu_allocator.SEARCH_DIRS", ())
    with pytest.raises(ConfigError, match=r"LDM_CPU_ALLOCATOR=jemalloc: no libjemalloc\.so\.2.*libjemalloc2"):
        use_cpu_allocator("jemalloc", "cpu", environ={}, maps=glibc_maps, execve=Exec())
    # auto quietly stays on the system allocator
    assert use_cpu_allocator("auto", "cpu", environ={}, maps=glibc_maps, execve=Exec()) == "system"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD re-execution is Linux-only")
def test_a_re_executed_process_never_loops(glibc_maps: Path, fake_lib: Path) -> None:
    """The library was preloaded yet is not mapped (a broken file): auto gives up, jemalloc fails."""
    env = {"LDM_CPU_ALLOCATOR_REEXEC": "1", "LD_PRELOAD": str(fake_lib)}
    rec = Exec()
    assert use_cpu_allocator("auto", "cpu", environ=env, library=fake_lib, maps=glibc_maps, execve=rec) == "system"
    with pytest.raises(ConfigError, match="did not load it"):
        use_cpu_allocator("jemalloc", "cpu", environ=env, library=fake_lib, maps=glibc_maps, execve=rec)
    assert rec.calls == []


GENERATE = """
import hashlib, sys
from pathlib import Path
from ldm_serve.cpu_allocator import allocator_in_use, use_cpu_allocator
choice, ckpt = sys.argv[1], sys.argv[2]
use_cpu_allocator(choice, "cpu")  # may re-execute this very script
from ldm.pipeline import GenerationRow, load_pipeline
pipe = load_pipeline(Path(ckpt), core_workers=2)
rows = [GenerationRow("a red circle", seed=s, negative_prompt="blue", steps=4, guidance_scale=5.0) for s in (1, 2)]
digest = hashlib.sha256(b"".join(im.tobytes() for im in pipe.generate(rows, 64, 64))).hexdigest()
print(allocator_in_use(), digest)
"""


@needs_jemalloc
def test_jemalloc_loads_for_real_and_images_are_unchanged(tmp_path: Path) -> None:
    """A real re-execution (``python -c``) ends on jemalloc; the same rows give the same bytes on both."""
    from ldm.random_model import write_random_model

    ckpt = write_random_model(tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LDM_CPU_ALLOCATOR_REEXEC")}
    out = {}
    for choice in ("jemalloc", "system"):
        run = subprocess.run([sys.executable, "-c", GENERATE, choice, str(ckpt)], env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr
        out[choice] = run.stdout.split()
    assert out["jemalloc"][0] == "jemalloc" and out["system"][0] == "system"
    assert out["jemalloc"][1] == out["system"][1]
    assert out["system"][1] != hashlib.sha256(b"").hexdigest()
