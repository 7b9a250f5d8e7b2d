"""The worker's memory allocator: jemalloc when the machine has it (torch-free, Linux).

A CPU worker serves small convolutions and matmuls at a few rows per call, where
oneDNN allocates and frees its reordered weights, blocked outputs and scratchpads
on every call. Under glibc's allocator that costs about half of a small oneDNN
call (38 us per convolution, 17 us per linear, of which malloc, free and
``malloc_consolidate`` are 40% in ``perf``); under jemalloc about half as much, and
the bundled model serves about 5% more jobs per second (``docs/benchmarks.md``,
"Allocator"). Images do not change: the kernels are the same and torch's CPU
allocator asks for the same alignment from either.

The allocator of a process is fixed when it starts, so the worker command re-executes
itself (same PID, arguments and file descriptors) with ``LD_PRELOAD`` naming the
library, before torch loads. :func:`use_cpu_allocator` does that; the setting is
``LDM_CPU_ALLOCATOR``:

* ``auto`` (default): jemalloc on CPU workers when a ``libjemalloc.so.2`` is found,
  else the system allocator;
* ``jemalloc``: required on any device; a worker that cannot load it does not start;
* ``system``: never preload anything.

An ``LD_PRELOAD`` the user set is kept (jemalloc goes first). Triton's Python backend
starts its own stub processes and is not covered.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from ldm_serve.cpu_threads import reexec_with_env
from ldm_serve.errors import ConfigError

__all__ = ["CpuAllocator", "allocator_in_use", "find_jemalloc", "use_cpu_allocator"]

CpuAllocator = Literal["auto", "jemalloc", "system"]

LIBRARY_NAMES = ("libjemalloc.so.2", "libjemalloc.so")
SEARCH_DIRS = (  # Debian / Ubuntu multiarch, Fedora / RHEL, source installs
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
_REEXEC_MARK = "LDM_CPU_ALLOCATOR_REEXEC"  # set on the re-executed process: never loop


def find_jemalloc(dirs: Sequence[str | Path] | None = None) -> Path | None:
    """The first jemalloc shared library in ``dirs`` (default :data:`SEARCH_DIRS`; ``None`` when none)."""
    for d in SEARCH_DIRS if dirs is None else dirs:
        for name in LIBRARY_NAMES:
            path = Path(d) / name
            if path.is_file():
                return path
    return None


def allocator_in_use(maps: Path = Path("/proc/self/maps")) -> str:
    """``"jemalloc"`` when the library is mapped into this process, else ``"system"``."""
    try:
        text = maps.read_text()
    except OSError:  # not Linux
        return "system"
    return "jemalloc" if "libjemalloc" in text else "system"


def use_cpu_allocator(
    choice: CpuAllocator,
    device: str,
    *,
    environ: Mapping[str, str] | None = None,
    library: Path | None = None,
    maps: Path = Path("/proc/self/maps"),
    execve: Callable[[str, list[str], Mapping[str, str]], object] = os.execve,
) -> str:
    """Make this process run on the allocator ``choice`` asks for; call it before torch loads.

    Re-executes the process (``execve``: same PID, arguments and open descriptors) with
    ``LD_PRELOAD`` when jemalloc is wanted, found and not yet loaded; returns, without
    re-executing, the allocator in use: ``"jemalloc"`` or ``"system"``.

    Args:
        choice: ``LDM_CPU_ALLOCATOR`` (see the module docstring).
        device: the worker's torch device; ``auto`` picks jemalloc only for ``cpu``.
        environ: the environment to pass on (default: ``os.environ``).
        library: the jemalloc to preload (default: :func:`find_jemalloc`).
        maps, execve: this process's memory map and ``os.execve`` (unit tests pass others).

    Raises:
        ConfigError: ``choice == "jemalloc"`` and the library is missing, or did not load
            after the re-execution.
    """
    env = dict(os.environ if environ is None else environ)
    in_use = allocator_in_use(maps)
    wanted = choice == "jemalloc" or (choice == "auto" and device == "cpu")
    if not wanted or in_use == "jemalloc" or not sys.platform.startswith("linux"):
        if choice == "jemalloc" and in_use != "jemalloc":
            raise ConfigError(f"LDM_CPU_ALLOCATOR=jemalloc: jemalloc is not loaded (platform {sys.platform})")
        return in_use
    if env.get(_REEXEC_MARK):  # re-executed with the library, yet it is not mapped
        if choice == "jemalloc":
            raise ConfigError(f"LDM_CPU_ALLOCATOR=jemalloc: LD_PRELOAD={env.get('LD_PRELOAD')!r} did not load it")
        return in_use
    lib = library or find_jemalloc()
    if lib is None:
        if choice == "jemalloc":
            raise ConfigError(
                "LDM_CPU_ALLOCATOR=jemalloc: no libjemalloc.so.2 in " + ", ".join(SEARCH_DIRS)
                + " (Debian / Ubuntu: apt-get install libjemalloc2; or set LDM_CPU_ALLOCATOR=system)"
            )
        return in_use
    preload = env.get("LD_PRELOAD", "").strip()
    env["LD_PRELOAD"] = f"{lib} {preload}".strip()
    env[_REEXEC_MARK] = "1"
    reexec_with_env(env, execve)
    return "jemalloc"  # only reached when execve is a recorder
