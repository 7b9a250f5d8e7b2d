"""Step-level (continuous) batching: rows join and leave a running DDIM batch between steps.

* :mod:`ldm.engine.ddim`: one DDIM iteration over independent rows, shared with
  :func:`ldm.sampling.sample_ddim` (so both give bit-identical rows).
* :mod:`ldm.engine.scheduler`: the admission / fairness policy, a torch-free state machine.
* :mod:`ldm.engine.engine`: the running batch of rows (tensors) driven by that policy.

Submodules are imported lazily, so ``import ldm.engine.scheduler`` never loads torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ldm.engine.engine import ContinuousBatchEngine, EngineStep
    from ldm.engine.rows import PreparedRow
    from ldm.engine.scheduler import Scheduler, SchedulerConfig

__all__ = ["ContinuousBatchEngine", "EngineStep", "PreparedRow", "Scheduler", "SchedulerConfig"]

_HOME = {
    "ContinuousBatchEngine": "ldm.engine.engine",
    "EngineStep": "ldm.engine.engine",
    "PreparedRow": "ldm.engine.rows",
    "Scheduler": "ldm.engine.scheduler",
    "SchedulerConfig": "ldm.engine.scheduler",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'ldm.engine' has no attribute {name!r}")
