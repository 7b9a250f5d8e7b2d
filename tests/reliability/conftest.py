"""The reliability suite (``make reliability``): opt-in, real processes, figures in ``tmp/results``.

Its tests run only when asked for: ``-m reliability``, or a path inside ``tests/reliability``
(so ``make test`` stays fast, and each test runs alone with
``pytest tests/reliability/test_chaos.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.support import REL_DB
from tests.serving_support import redis_for_tests, require_redis

HERE = Path(__file__).resolve().parent


def _asked_for(config: pytest.Config) -> bool:
    if "reliability" in (config.getoption("markexpr", "") or ""):
        return True
    for arg in config.args:
        path = Path(arg.split("::", 1)[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _asked_for(config):
        return
    mine = [item for item in items if HERE in Path(str(item.fspath)).resolve().parents]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [item for item in items if item not in mine]


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random model (written once per session)."""
    from ldm.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def rel_redis() -> str:
    """``REDIS_URL``'s server (else 6379, else an embedded Valkey) on database 13, flushed."""
    url = redis_for_tests(REL_DB)
    require_redis(url)
    return url
