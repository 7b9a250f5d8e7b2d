"""Internal invariant failures (issue 11, item 5): a 500 with a request id, logged with the traceback,
never a field error; the worker records them as ``internal_error``."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from ldm_serve.errors import InternalError, InvalidInput
from ldm_serve.settings import Settings
from service.app import create_app
from worker.jobs import error_of


def _app_with_bugs() -> TestClient:
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))  # no route below touches Redis

    async def unexpected() -> None:
        raise RuntimeError("secret detail of a bug")

    async def invariant() -> None:
        raise InternalError("the denoiser got parameterization 'x'")

    app.add_api_route("/v1/test-bug", unexpected)
    app.add_api_route("/v1/test-invariant", invariant)
    return TestClient(app, raise_server_exceptions=False)


def test_an_unexpected_exception_is_a_500_with_a_request_id_and_a_logged_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with _app_with_bugs() as client, caplog.at_level(logging.ERROR, logger="ldm_serve.gateway"):
        r = client.get("/v1/test-bug")
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "internal_error" and "field" not in err
    assert "secret detail" not in r.text  # the client gets the id, the log gets the details
    request_id = r.headers["X-Request-ID"]
    assert err["request_id"] == request_id and len(request_id) >= 16
    logged = [rec for rec in caplog.records if request_id in rec.getMessage()]
    assert logged and logged[0].exc_info is not None and "secret detail" in str(logged[0].exc_info[1])


def test_an_internal_error_keeps_its_message_and_the_clients_request_id(caplog: pytest.LogCaptureFixture) -> None:
    with _app_with_bugs() as client, caplog.at_level(logging.ERROR, logger="ldm_serve.gateway"):
        r = client.get("/v1/test-invariant", headers={"X-Request-ID": "trace-42"})
        bad_id = client.get("/v1/test-invariant", headers={"X-Request-ID": "no spaces\tor tabs"})
    assert r.status_code == 500 and r.headers["X-Request-ID"] == "trace-42"
    assert r.json()["error"] == {"type": "internal_error", "message": "the denoiser got parameterization 'x'",
                                 "request_id": "trace-42"}
    assert any("trace-42" in rec.getMessage() and rec.exc_info for rec in caplog.records)
    assert bad_id.headers["X-Request-ID"] != "no spaces\tor tabs"  # a new id instead of the client's odd one


def test_worker_records_foreign_exceptions_as_internal_errors() -> None:
    assert error_of(RuntimeError("CUDA error: device-side assert")) == {
        "type": "internal_error", "message": "CUDA error: device-side assert"}
    assert error_of(InvalidInput("steps", "too many"))["field"] == "steps"
    assert error_of(ValueError())["message"] == "ValueError"
