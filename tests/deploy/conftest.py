"""Tests marked ``deploy`` (the podman compose stack, minutes) run only when selected: ``make deploy-test``."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    expr = config.getoption("markexpr") or ""
    if "deploy" in expr and "not deploy" not in expr:
        return
    skip = pytest.mark.skip(reason="container deploy test: run `make deploy-test` (pytest -m deploy)")
    for item in items:
        if item.get_closest_marker("deploy"):
            item.add_marker(skip)
