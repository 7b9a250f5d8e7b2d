"""The layering of the top-level packages (docs/architecture.md, "Packages and their boundaries").

Read from the source with ``ast``, so lazy imports inside functions count too:

    launcher   -> service, worker, ldm, ldm_serve    (the top: nothing imports it)
    service    -> ldm_serve                          (never torch, ldm, worker)
    worker     -> ldm, ldm_serve
    ldm        -> ldm_serve.errors                   (the model; nothing of the service)
    ldm_serve  -> itself only                        (the torch-free, FastAPI-free shared base)

The rules inside ``ldm/`` are checked by ``test_layering.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("launcher", "service", "worker", "ldm", "ldm_serve")

# package -> the modules of other packages of ours it may import (a package name allows all of it)
ALLOWED: dict[str, tuple[str, ...]] = {
    "launcher": ("service", "worker", "ldm", "ldm_serve"),
    "service": ("ldm_serve",),
    "worker": ("ldm", "ldm_serve"),
    "ldm": ("ldm_serve.errors", "ldm_serve.limits"),
    "ldm_serve": (),
}
# third-party packages a layer must never import, not even lazily
FORBIDDEN_THIRD_PARTY: dict[str, tuple[str, ...]] = {
    "ldm_serve": ("torch", "fastapi", "starlette", "uvicorn"),
    "service": ("torch",),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every absolute import in a file (``from a import b`` gives ``a.b`` too)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _allowed(module: str, rules: tuple[str, ...]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in rules)


def violations(package: str) -> list[str]:
    """Every import in ``package`` that the layering forbids, as ``file:line: module``."""
    bad: list[str] = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line}: {module}"
            if top in OURS and top != package:
                # "from ldm_serve import errors" yields "ldm_serve" and "ldm_serve.errors": judge the longer one
                if module == top and any(m.startswith(top + ".") for ln, m in imported_modules(path) if ln == line):
                    continue
                if not _allowed(module, ALLOWED[package]):
                    bad.append(where)
            elif top in FORBIDDEN_THIRD_PARTY.get(package, ()):
                bad.append(where)
    return bad


@pytest.mark.parametrize("package", OURS)
def test_imports_follow_the_layers(package: str) -> None:
    assert (ROOT / package / "__init__.py").is_file()
    assert violations(package) == []


def test_the_checker_sees_lazy_and_from_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from ldm.pipeline import load_pipeline\n    import torch.nn\n")
    assert imported_modules(probe) == [(1, "os"), (4, "ldm.pipeline"), (4, "ldm.pipeline.load_pipeline"),
                                       (5, "torch.nn")]
    assert _allowed("ldm_serve.errors.InvalidInput", ALLOWED["ldm"])
    assert not _allowed("ldm_serve.contract", ALLOWED["ldm"]) and not _allowed("ldm_servex", ("ldm_serve",))

