"""Which Redis: one function, one precedence (LDM_REDIS_URL > REDIS_URL > an embedded Valkey)."""

from __future__ import annotations

import pytest

from ldm_serve.embedded_redis import configured_redis_url, redis_or_embedded
from ldm_serve.settings import Settings


def test_precedence() -> None:
    assert configured_redis_url({}) is None
    assert configured_redis_url({"REDIS_URL": "redis://b"}) == "redis://b"
    assert configured_redis_url({"LDM_REDIS_URL": "redis://a", "REDIS_URL": "redis://b"}) == "redis://a"
    assert configured_redis_url({"LDM_REDIS_URL": "", "REDIS_URL": "redis://b"}) == "redis://b"  # empty = unset


@pytest.mark.parametrize(
    "env",
    [{"LDM_REDIS_URL": "redis://a:1/0", "REDIS_URL": "redis://b:2/0"}, {"REDIS_URL": "redis://b:2/0"}],
)
def test_settings_read_the_same_variables_in_the_same_order(monkeypatch: pytest.MonkeyPatch, env: dict) -> None:
    monkeypatch.delenv("LDM_REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings().redis_url == configured_redis_url()


def test_a_configured_redis_starts_no_embedded_server() -> None:
    with redis_or_embedded(env={"REDIS_URL": "redis://elsewhere:6379/3"}) as (url, server):
        assert url == "redis://elsewhere:6379/3" and server is None
