"""Import a repository script (``bench/*.py``, ``tools/*.py``) as a module, for tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str, name: str | None = None) -> ModuleType:
    """Execute ``ROOT / relative`` as module ``name`` (default: the file stem).

    The module is registered in ``sys.modules`` first, because dataclasses look
    their module up there while the file executes.
    """
    path = ROOT / relative
    module_name = name or path.stem
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
