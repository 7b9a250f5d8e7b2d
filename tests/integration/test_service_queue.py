"""Queue-side behaviour on a gateway without workers: API keys, queue bound, queued cancel."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import Service

pytestmark = pytest.mark.integration

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
BODY = {"prompt": "queued forever", "width": 64, "height": 64, "steps": 4}


@pytest.fixture
def client(aux: Service) -> Iterator[httpx.Client]:
    """A client that cancels every job it created (the aux queue holds only 3)."""
    created: list[tuple[str, dict]] = []
    with aux.client() as c:
        original = c.post

        def post(url: str, **kw) -> httpx.Response:
            r = original(url, **kw)
            if url in ("/v1/txt2img", "/v1/inpaint") and r.status_code in (200, 202):
                created.append((r.json()["id"], kw.get("headers", {})))
            return r

        c.post = post  # type: ignore[method-assign]
        yield c
        for job_id, headers in created:
            original(f"/v1/jobs/{job_id}/cancel", headers=headers)


def test_api_keys_are_required_and_jobs_are_private(client: httpx.Client) -> None:
    r = client.post("/v1/txt2img", json=BODY)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.post("/v1/txt2img", json=BODY, headers={"Authorization": "Bearer nope"}).status_code == 401
    job = client.post("/v1/txt2img", json=BODY, headers=A).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=A).status_code == 200
    for other in (B, {}):
        assert client.get(f"/v1/jobs/{job['id']}", headers=other).status_code in (401, 404)
    assert client.get(f"/v1/jobs/{job['id']}", headers=B).json()["error"]["type"] == "job_not_found"
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=B).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}/events", headers=B).status_code == 404
    # the same Idempotency-Key used by two keys makes two jobs
    ka = client.post("/v1/txt2img", json=BODY, headers={**A, "Idempotency-Key": "shared"}).json()["id"]
    kb = client.post("/v1/txt2img", json=BODY, headers={**B, "Idempotency-Key": "shared"}).json()["id"]
    assert ka != kb
    assert client.get("/healthz").status_code == 200  # probes need no key


def test_cancel_while_queued(client: httpx.Client) -> None:
    job = client.post("/v1/txt2img", json=BODY, headers=A).json()
    queued = client.get(f"/v1/jobs/{job['id']}", headers=A).json()
    assert queued["status"] == "queued" and queued["queue_position"] is not None
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=A)
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert client.get(f"/v1/jobs/{job['id']}/images/0", headers=A).status_code == 409
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=A)
    assert again.status_code == 200 and again.json()["status"] == "canceled"


def test_full_queue_gives_429_with_retry_after(client: httpx.Client) -> None:
    codes = [client.post("/v1/txt2img", json=BODY, headers=A).status_code for _ in range(4)]
    assert codes[:3] == [202, 202, 202]
    r = client.post("/v1/txt2img", json=BODY, headers=A)
    assert r.status_code == 429 and codes[3] == 429
    assert r.headers["retry-after"] == "7"
    assert "max_queue_depth=3" in r.json()["error"]["message"]


def test_private_webhook_targets_are_refused(client: httpx.Client) -> None:
    for url in ("http://127.0.0.1:9/hook", "http://169.254.169.254/latest", "http://10.1.2.3/x"):
        r = client.post("/v1/txt2img", json={**BODY, "webhook": url}, headers=A)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == "webhook.url"


def test_readyz_without_workers_is_503(aux: Service) -> None:
    r = httpx.get(f"{aux.url}/readyz")
    assert r.status_code == 503 and r.json()["workers"] == 0


@pytest.mark.slow
def test_prefer_wait_times_out_with_the_unfinished_job(client: httpx.Client) -> None:
    """Longer than redis-py's default 5 s read timeout: the wait must end at N seconds, not in a 503."""
    t0 = time.monotonic()
    r = client.post("/v1/txt2img", json=BODY, headers={**A, "Prefer": "wait=7"})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    assert 7 <= time.monotonic() - t0 < 15
