"""The import rules between the layers of ``ldm/`` (docs/architecture.md, "ldm/ layers").

Every module of ``ldm/`` belongs to one layer; a layer may import only the layers
listed for it in :data:`MAY_IMPORT` (and itself). Imports are read with :mod:`ast`
from every file, wherever they sit (module level, inside functions, under
``TYPE_CHECKING``), so a lazy import cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ldm"

# (layer, module prefixes), most specific first; every ldm module must match one.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("ldm.config", "ldm.noise_schedule", "ldm.tokenizers", "ldm.attention", "ldm.data")),
    ("networks", ("ldm.unet", "ldm.autoencoder", "ldm.encoders", "ldm.denoiser")),
    ("sampling", ("ldm.sampling",)),
    ("execution", ("ldm.execution",)),
    ("kernels", ("ldm.kernels",)),
    ("loading", ("ldm.loading",)),
    ("tiny", ("ldm.tiny", "ldm.random_model")),
    ("pipeline", ("ldm.pipeline",)),
    ("engine", ("ldm.engine",)),
    ("backends", ("ldm.backends",)),
    ("training", ("ldm.training",)),
    ("facade", ("ldm",)),  # ldm/__init__.py: the lazy load_pipeline
)

# What each layer may import besides itself (ldm layers only; see EXTERNAL for the rest).
MAY_IMPORT: dict[str, frozenset[str]] = {
    "base": frozenset(),
    "networks": frozenset({"base"}),
    # the maths of sampling: DDIM over rows, never who drives it (engine) or what feeds it
    "sampling": frozenset({"base", "networks"}),
    # how a call runs (core pool, padding), independent of what it computes
    "execution": frozenset({"base", "networks"}),
    # how an operator or an attention block computes (batch-invariant kernels): torch and
    # the base blocks it re-implements (ldm.attention's CrossAttention and GEGLU)
    "kernels": frozenset({"base"}),
    # files -> modules: never sampling, execution, the pipeline or the engine
    "loading": frozenset({"base", "networks"}),
    "tiny": frozenset({"base", "networks", "loading"}),
    "pipeline": frozenset({"base", "networks", "sampling", "execution", "kernels", "loading"}),
    # admission + the step loop; it drives any model with prepare_row, never imports the pipeline
    "engine": frozenset({"base", "networks", "sampling", "execution"}),
    "backends": frozenset({"base", "networks", "sampling", "execution", "kernels", "loading", "pipeline"}),
    "training": frozenset({"base", "networks", "sampling", "loading", "tiny", "pipeline"}),
    "facade": frozenset({"pipeline"}),
}

# Outside ldm/: the model code depends on no serving package, only on the shared errors.
FORBIDDEN_ROOTS = ("service", "worker", "bench", "tools", "tests")
ALLOWED_LDM_SERVE = ("ldm_serve.errors", "ldm_serve.limits")  # both import nothing of ours


def layer_of(module: str) -> str:
    for layer, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    raise KeyError(module)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import statement in ``source``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # "from ldm import pipeline" imports the submodule ldm.pipeline
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names if name == "ldm"]
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """The import-rule violations of ``module`` (whose text is ``source``)."""
    own = layer_of(module)
    out = []
    for line, name in imported_modules(source, module, is_package):
        root = name.split(".")[0]
        if root in FORBIDDEN_ROOTS:
            out.append(f"{module}:{line} imports {name} (ldm/ never imports {root}/)")
        elif root == "ldm_serve" and not name.startswith(ALLOWED_LDM_SERVE):
            out.append(f"{module}:{line} imports {name} (from ldm_serve only {', '.join(ALLOWED_LDM_SERVE)})")
        elif root == "ldm" and name != "ldm":
            target = layer_of(name)
            if target != own and target not in MAY_IMPORT[own]:
                out.append(f"{module}:{line} imports {name}: layer {own!r} may not import {target!r}")
    return out


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_ldm_module_has_a_layer() -> None:
    unplaced = []
    for path in package_files():
        try:
            layer_of(module_name(path))
        except KeyError:
            unplaced.append(module_name(path))
    assert not unplaced, f"place these modules in a layer of tests/unit/test_layering.py: {unplaced}"


def test_no_import_runs_against_the_layers() -> None:
    found = []
    for path in package_files():
        found += violations(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("ldm.sampling.sampler", "from ldm.engine.engine import ContinuousBatchEngine", "'sampling' may not import 'engine'"),
        ("ldm.sampling.ddim", "def f():\n    import ldm.pipeline\n", "'sampling' may not import 'pipeline'"),
        ("ldm.loading.loader", "from ldm.execution.core_pool import CorePool", "'loading' may not import 'execution'"),
        ("ldm.engine.engine", "from ldm import pipeline", "'engine' may not import 'pipeline'"),
        ("ldm.execution.padding", "from ..engine import admission", "'execution' may not import 'engine'"),
        ("ldm.unet", "from worker.runner import BatchRunner", "never imports worker/"),
        ("ldm.unet", "from ldm_serve.settings import Settings", "from ldm_serve only"),
    ],
)
def test_the_checker_reports_upward_imports(module: str, source: str, expected: str) -> None:
    found = violations(source, module)
    assert len(found) == 1 and expected in found[0]


def test_the_checker_accepts_downward_imports() -> None:
    source = "from ldm.sampling.ddim import ddim_iteration\nfrom ldm.engine.admission import AdmissionPolicy\n"
    assert violations(source, "ldm.engine.engine") == []
    assert violations("from ldm.loading.loader import load_model\n", "ldm.pipeline") == []
