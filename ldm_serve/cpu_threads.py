"""OpenMP's wait policy for CPU workers with core-sharded execution (torch-free).

With core workers (``ldm/execution/core_pool.py``) the heavy work runs on one-core
threads, while the thread that drives sampling runs only small operators between
UNet calls. Under OpenMP's default wait policy, the driving thread's idle OpenMP
threads keep spinning after each of its parallel regions and take CPU time from the
core workers; ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep instead
(``docs/benchmarks.md`` has the figures). OpenMP reads the variable once, when the
runtime loads with torch, so this must run before the first ``import torch``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping

__all__ = ["quiet_openmp_for_core_workers", "reexec_with_env", "reexec_with_wait_policy"]


def quiet_openmp_for_core_workers(device: str, core_workers: int | None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for a CPU process that will use core workers.

    Leaves an explicit ``OMP_WAIT_POLICY`` alone, and does nothing on GPUs, with
    ``core_workers == 1`` (one call uses every thread, spinning helps there) or once
    torch is loaded (too late to matter). Returns True when it set the variable.
    """
    if device != "cpu" or core_workers == 1 or "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def reexec_with_wait_policy(policy: str) -> None:
    """Restart this process (same argv) with ``OMP_WAIT_POLICY=policy`` unless it already has it.

    For benchmark scripts that import torch at the top and want to measure under the
    policy a worker would run with. Returns only when the policy is already in place.
    """
    if os.environ.get("OMP_WAIT_POLICY") == policy:
        return
    reexec_with_env({**os.environ, "OMP_WAIT_POLICY": policy})


def reexec_with_env(
    env: Mapping[str, str], execve: Callable[[str, list[str], Mapping[str, str]], object] = os.execve
) -> None:
    """Replace this process by the same command line (same PID and open descriptors) under ``env``.

    The command line is ``sys.orig_argv``, so ``python -m launcher ...`` and ``python -c``
    restart as they started. Settings that a library reads once, when it loads (OpenMP's
    wait policy, ``LD_PRELOAD``), take effect only this way. ``execve`` is ``os.execve``;
    unit tests pass a recorder. Returns only when ``execve`` does.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
