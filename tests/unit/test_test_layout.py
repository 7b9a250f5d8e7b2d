"""Test folders match their markers: nothing in ``tests/unit`` is marked ``integration`` (unit tests need
no server), and every module in ``tests/integration`` is, as a whole (``pytestmark``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def _files(folder: str) -> list[Path]:
    return sorted((TESTS / folder).glob("test_*.py"))


def _integration_marks(node: ast.AST) -> list[ast.Attribute]:
    """Every ``<x>.mark.integration`` inside ``node``."""
    return [
        n for n in ast.walk(node)
        if isinstance(n, ast.Attribute) and n.attr == "integration"
        and isinstance(n.value, ast.Attribute) and n.value.attr == "mark"
    ]  # fmt: skip


def _module_mark(tree: ast.Module) -> bool:
    return any(
        isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in stmt.targets)
        and _integration_marks(stmt.value)
        for stmt in tree.body
    )  # fmt: skip


@pytest.mark.parametrize("path", _files("unit"), ids=lambda p: p.name)
def test_unit_tests_are_not_marked_integration(path: Path) -> None:
    marks = _integration_marks(ast.parse(path.read_text()))
    assert not marks, f"{path.name}:{marks[0].lineno} needs a server: move the test to tests/integration/"


@pytest.mark.parametrize("path", _files("integration"), ids=lambda p: p.name)
def test_integration_modules_carry_the_marker(path: Path) -> None:
    assert _module_mark(ast.parse(path.read_text())), f"{path.name}: no `pytestmark = pytest.mark.integration`"


def test_the_checks_see_the_marks() -> None:
    assert _module_mark(ast.parse("import pytest\npytestmark = [pytest.mark.integration, pytest.mark.slow]\n"))
    assert not _module_mark(ast.parse("import pytest\npytestmark = pytest.mark.slow\n"))
    marked = ast.parse("import pytest\n@pytest.mark.integration\ndef test_x():\n    pass\n")
    assert [m.lineno for m in _integration_marks(marked)] == [2]
