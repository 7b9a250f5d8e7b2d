"""Step-level (continuous) batching: rows join and leave a running DDIM batch between steps.

* :mod:`ldm.engine.admission`: the admission / fairness policy, a torch-free state machine.
* :mod:`ldm.engine.engine`: the running batch of rows (tensors) driven by that policy; each
  step runs :func:`ldm.sampling.ddim.ddim_iteration`, the iteration
  :func:`ldm.sampling.sample_ddim` also runs (so both give bit-identical rows).

Submodules are imported lazily, so ``import ldm.engine.admission`` never loads torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ldm.engine.admission import AdmissionConfig, AdmissionPolicy
    from ldm.engine.engine import ContinuousBatchEngine, EngineStep

__all__ = ["AdmissionConfig", "AdmissionPolicy", "ContinuousBatchEngine", "EngineStep"]

_HOME = {
    "AdmissionConfig": "ldm.engine.admission",
    "AdmissionPolicy": "ldm.engine.admission",
    "ContinuousBatchEngine": "ldm.engine.engine",
    "EngineStep": "ldm.engine.engine",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'ldm.engine' has no attribute {name!r}")
