"""The real-Triton tests (``make triton-test``): run in the Triton venv, skipped elsewhere.

They need ``tritonserver`` (the ``nvidia-pytriton`` wheel) and ``tritonclient`` in the Python
that runs pytest, which the main venv does not have (the server's python-backend stub needs
``numpy<2``); ``make triton-test`` builds ``.venv-triton`` and runs them there.
"""

from __future__ import annotations

import importlib.util

import pytest

from tools.tritonserver_local import find_tritonserver

REASON = "needs the Triton venv (tritonserver + tritonclient): run `make triton-test`"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if importlib.util.find_spec("tritonclient") is not None and find_tritonserver() is not None:
        return
    skip = pytest.mark.skip(reason=REASON)
    for item in items:
        if item.get_closest_marker("triton"):
            item.add_marker(skip)
