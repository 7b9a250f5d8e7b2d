"""Bounded cost per key (issue 10, defect 6), job listing and deletion, and signed URLs, through real
gateways on a real Redis.

* ``keyed``: a gateway with a hashed keys file (per-key limits and rights), no worker (jobs stay
  queued), admin-only ``/metrics`` and signed URLs;
* ``anonymous``: a gateway without keys and with the default request limits (1024 pixels,
  150 steps), no worker;
* ``shared``: a gateway with a key and signed URLs in front of the ``service`` fixture's worker
  (tiny model, default size 64), for the model's size bound and for images and deletion end to end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from ldm_serve.api_keys import hash_key
from tests.integration.conftest import COMMON, Service, start_gateway
from tests.serving_support import child_env, stop_process, wait_until

pytestmark = pytest.mark.integration

PUBLIC = "https://images.example.com"
SIGNING_SECRET = "test-signing-secret-0123456789"
BODY = {"prompt": "queued forever", "width": 64, "height": 64, "steps": 4}
TERMINAL = {"succeeded", "failed", "canceled", "expired"}

KEYS = {
    "alice": {"concurrent_jobs": 2},
    "bob": {"concurrent_jobs": 10, "priority_high": True, "admin": True},
    "carol": {"requests_per_minute": 2},
    "dave": {"pixel_steps_per_minute": 64 * 64 * 10 * 2, "max_job_pixel_steps": 64 * 64 * 10},
}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {name}-secret-key"}


def keys_file(folder: Path) -> Path:
    entries = [{"name": n, "sha256": hash_key(f"{n}-secret-key"), **policy} for n, policy in KEYS.items()]
    path = folder / "keys.json"
    path.write_text(json.dumps({"keys": entries}))
    return path


def _gateway(tmp_path_factory: pytest.TempPathFactory, redis_url: str, name: str, **settings) -> Iterator[Service]:
    logs = tmp_path_factory.mktemp(f"{name}-logs")
    env = child_env(redis_url=redis_url, **settings)
    url, proc = start_gateway(logs, env, name)
    try:
        yield Service(url, settings["redis_prefix"], env, logs, [proc])
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def keyed(integration_redis: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    folder = tmp_path_factory.mktemp("keys")
    yield from _gateway(
        tmp_path_factory, integration_redis, "keyed-gateway", redis_prefix="itquota", default_model="ghost",
        max_queue_depth=50, api_keys_file=keys_file(folder), api_keys="plain-secret-key",
        metrics_require_admin="true", public_base_url=PUBLIC, url_signing_secret=SIGNING_SECRET,
        queue_full_retry_after_s=4, **COMMON,
    )


@pytest.fixture(scope="module")
def plain_keys(integration_redis: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Plain ``LDM_API_KEYS`` (the default policy) with a concurrency quota below the queue bound."""
    yield from _gateway(
        tmp_path_factory, integration_redis, "plain-keys-gateway", redis_prefix="itplain", default_model="ghost",
        api_keys="k1,k2", max_queue_depth=5, quota_concurrent_jobs=2, **COMMON,
    )


@pytest.fixture(scope="module")
def anonymous(integration_redis: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _gateway(
        tmp_path_factory, integration_redis, "anonymous-gateway", redis_prefix="itanon", default_model="ghost",
    )


@pytest.fixture(scope="module")
def shared(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = {k[4:].lower(): v for k, v in service.env.items() if k.startswith("LDM_")}
    env.update(api_keys="e2e-secret-key", public_base_url=PUBLIC, url_signing_secret=SIGNING_SECRET)
    redis_url = env.pop("redis_url")
    yield from _gateway(tmp_path_factory, redis_url, "shared-gateway", **env)


@pytest.fixture
def client(keyed: Service) -> Iterator[httpx.Client]:
    """A client of ``keyed`` that deletes every job it created (freeing the keys' slots)."""
    created: list[tuple[str, dict]] = []
    with keyed.client() as c:
        original = c.post

        def post(url: str, **kw) -> httpx.Response:
            r = original(url, **kw)
            if url == "/v1/txt2img" and r.status_code in (200, 202):
                created.append((r.json()["id"], kw.get("headers", {})))
            return r

        c.post = post  # type: ignore[method-assign]
        yield c
        for job_id, headers in created:
            c.delete(f"/v1/jobs/{job_id}", headers=headers)


def relative(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


# ------------------------------------------------------------------------------------------ defect 6


def test_one_key_cannot_fill_the_queue(client: httpx.Client) -> None:
    codes = [client.post("/v1/txt2img", json=BODY, headers=auth("alice")).status_code for _ in range(6)]
    assert codes == [202, 202, 429, 429, 429, 429]
    r = client.post("/v1/txt2img", json=BODY, headers=auth("alice"))
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["type"] == "rate_limited" and err["limit"] == "concurrent_jobs"
    assert "concurrent_jobs=2" in err["message"]
    assert r.headers["retry-after"] == "4"
    assert r.headers["ratelimit-limit"] == "2" and r.headers["ratelimit-remaining"] == "0"
    assert int(r.headers["ratelimit-reset"]) > 0 and "concurrent_jobs" in r.headers["ratelimit-policy"]
    # other keys are not starved
    assert client.post("/v1/txt2img", json=BODY, headers=auth("bob")).status_code == 202
    assert client.post("/v1/txt2img", json=BODY, headers={"Authorization": "Bearer plain-secret-key"}).status_code \
        == 202
    # a job that ends gives its slot back
    mine = client.get("/v1/jobs", params={"status": "queued"}, headers=auth("alice")).json()["data"]
    assert len(mine) == 2
    assert client.post(f"/v1/jobs/{mine[0]['id']}/cancel", headers=auth("alice")).json()["status"] == "canceled"
    assert client.post("/v1/txt2img", json=BODY, headers=auth("alice")).status_code == 202


def test_plain_keys_cannot_fill_the_queue_either(plain_keys: Service) -> None:
    with plain_keys.client() as c:
        k1, k2 = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
        first = [c.post("/v1/txt2img", json=BODY, headers=k1) for _ in range(5)]
        assert [r.status_code for r in first] == [202, 202, 429, 429, 429]
        assert first[2].json()["error"]["limit"] == "concurrent_jobs" and "retry-after" in first[2].headers
        second = c.post("/v1/txt2img", json=BODY, headers=k2)
        assert second.status_code == 202, second.text
        for r, key in [*((r, k1) for r in first[:2]), (second, k2)]:
            c.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=key)


def test_priority_high_needs_the_right(client: httpx.Client, anonymous: Service) -> None:
    with anonymous.client() as anon:
        r = anon.post("/v1/txt2img", json={**BODY, "priority": "high"})
        assert r.status_code == 403 and r.json()["error"]["field"] == "priority"
    r = client.post("/v1/txt2img", json={**BODY, "priority": "high"}, headers=auth("alice"))
    assert r.status_code == 403, r.text
    assert r.json()["error"]["field"] == "priority"
    ok = client.post("/v1/txt2img", json={**BODY, "priority": "high"}, headers=auth("bob"))
    assert ok.status_code == 202 and ok.json()["parameters"]["priority"] == "high"
    assert client.post("/v1/txt2img", json={**BODY, "priority": "low"}, headers=auth("alice")).status_code == 202


def test_one_anonymous_request_cannot_ask_for_unbounded_work(anonymous: Service) -> None:
    with anonymous.client() as anon:
        r = anon.post("/v1/txt2img", json={"prompt": "huge", "n": 4, "width": 1024, "height": 1024, "steps": 150})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["field"] == "width*height*steps*n"
        assert "1024*1024*150*4 = 629145600" in err["message"] and "max_job_pixel_steps=52428800" in err["message"]
        ok = anon.post("/v1/txt2img", json={"prompt": "fits", "n": 1, "width": 512, "height": 512, "steps": 50})
        assert ok.status_code == 202, ok.text
        assert anon.delete(f"/v1/jobs/{ok.json()['id']}").status_code == 204


def test_model_size_bound_comes_from_its_workers(shared: Service) -> None:
    """The tiny model's default size is 64: a worker accepts up to 128 (2x) in multiples of its factor."""
    with shared.client(headers={"Authorization": "Bearer e2e-secret-key"}) as c:
        r = c.post("/v1/txt2img", json={**BODY, "width": 256, "height": 64})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["field"] == "width" and "between 16 and 128 pixels for model 'random-untrained'" in err["message"]
        assert c.get("/v1/models").json()["data"][0]["constraints"]["max_width"] == 128
        r = c.post("/v1/txt2img", json={**BODY, "width": 64, "height": 192})
        assert r.status_code == 422 and r.json()["error"]["field"] == "height"


# ------------------------------------------------------------------------------------------ quotas


def test_requests_per_minute(client: httpx.Client) -> None:
    first = client.post("/v1/txt2img", json=BODY, headers=auth("carol"))
    assert first.status_code == 202
    assert first.headers["ratelimit-limit"] == "2" and first.headers["ratelimit-remaining"] == "1"
    assert client.post("/v1/txt2img", json=BODY, headers=auth("carol")).status_code == 202
    r = client.post("/v1/txt2img", json=BODY, headers=auth("carol"))
    assert r.status_code == 429
    assert r.json()["error"]["limit"] == "requests_per_minute"
    assert 1 <= int(r.headers["retry-after"]) <= 30
    assert r.headers["ratelimit-limit"] == "2" and r.headers["ratelimit-remaining"] == "0"
    assert 0 < int(r.headers["ratelimit-reset"]) <= 60
    assert r.headers["ratelimit-policy"] == '2;w=60;name="requests_per_minute"'


def test_work_budget_and_per_job_cap(client: httpx.Client) -> None:
    job = {**BODY, "steps": 10}  # 64*64*10 = 40960 pixel-steps, the key's per-job cap
    r = client.post("/v1/txt2img", json={**job, "steps": 11}, headers=auth("dave"))
    assert r.status_code == 422 and r.json()["error"]["field"] == "width*height*steps*n"
    assert "max_job_pixel_steps=40960" in r.json()["error"]["message"]
    assert [client.post("/v1/txt2img", json=job, headers=auth("dave")).status_code for _ in range(2)] == [202, 202]
    r = client.post("/v1/txt2img", json=job, headers=auth("dave"))
    assert r.status_code == 429 and r.json()["error"]["limit"] == "pixel_steps_per_minute"
    assert r.headers["ratelimit-limit"] == str(64 * 64 * 10 * 2) and int(r.headers["retry-after"]) >= 1


def test_metrics_can_be_admin_only(keyed: Service) -> None:
    assert httpx.get(f"{keyed.url}/metrics").status_code == 401
    r = httpx.get(f"{keyed.url}/metrics", headers=auth("alice"))
    assert r.status_code == 403 and r.json()["error"]["field"] == "authorization"
    ok = httpx.get(f"{keyed.url}/metrics", headers=auth("bob"))
    assert ok.status_code == 200 and "ldm_http_requests_total" in ok.text


# ------------------------------------------------------------------------------------------ listing, deletion


def test_list_own_jobs_paginated_and_filtered(client: httpx.Client) -> None:
    ids = [client.post("/v1/txt2img", json=BODY, headers=auth("bob")).json()["id"] for _ in range(3)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth("bob"))
    seen: list[str] = []
    params: dict = {"limit": 2}
    for _ in range(10):
        page = client.get("/v1/jobs", params=params, headers=auth("bob")).json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        params["cursor"] = page["next_cursor"]
    assert seen[:3] == ids[::-1]  # newest first
    canceled = client.get("/v1/jobs", params={"status": "canceled"}, headers=auth("bob")).json()["data"]
    assert ids[0] in [j["id"] for j in canceled] and all(j["status"] == "canceled" for j in canceled)
    assert not set(ids) & {j["id"] for j in client.get("/v1/jobs", headers=auth("alice")).json()["data"]}
    assert client.get("/v1/jobs").status_code == 401
    bad = client.get("/v1/jobs", params={"cursor": "not-a-cursor"}, headers=auth("bob"))
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "cursor"
    assert client.get("/v1/jobs", params={"limit": 0}, headers=auth("bob")).json()["error"]["field"] == "limit"
    assert client.get("/v1/jobs", params={"status": "nope"}, headers=auth("bob")).status_code == 422


def test_delete_job(client: httpx.Client) -> None:
    job_id = client.post("/v1/txt2img", json=BODY, headers=auth("bob")).json()["id"]
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth("alice")).status_code == 404  # not hers
    assert client.get(f"/v1/jobs/{job_id}", headers=auth("bob")).status_code == 200
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth("bob")).status_code == 204  # queued: canceled, removed
    assert client.get(f"/v1/jobs/{job_id}", headers=auth("bob")).status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth("bob")).status_code == 404
    assert job_id not in [j["id"] for j in client.get("/v1/jobs", headers=auth("bob")).json()["data"]]


# ------------------------------------------------------------------------------------------ signed URLs


def test_signed_events_url_works_without_a_key(client: httpx.Client) -> None:
    job = client.post("/v1/txt2img", json=BODY, headers=auth("bob")).json()
    events = job["links"]["events"]
    assert events.startswith(f"{PUBLIC}/v1/jobs/{job['id']}/events?expires=") and "&signature=" in events
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth("bob"))  # so that the stream ends
    r = client.get(relative(events))
    assert r.status_code == 200 and "event: done" in r.text and '"canceled"' in r.text
    assert client.get(f"/v1/jobs/{job['id']}/events").status_code == 401
    tampered = relative(events).replace("signature=", "signature=0")
    r = client.get(tampered)
    assert r.status_code == 403 and r.json()["error"]["field"] == "signature"
    # a signature is bound to its path
    other = relative(events).replace("/events?", "/images/0?")
    assert client.get(other).json()["error"]["message"] == "signature: does not match this URL"


def test_signed_image_urls_end_to_end_then_delete(shared: Service) -> None:
    with shared.client() as c:
        key = {"Authorization": "Bearer e2e-secret-key"}
        r = c.post("/v1/txt2img", json={**BODY, "prompt": "signed", "steps": 2}, headers={**key, "Prefer": "wait=60"})
        job = r.json() if r.json()["status"] in TERMINAL else wait_done(c, r.json()["id"], key)
        assert job["status"] == "succeeded", job
        url = job["images"][0]["url"]
        assert url.startswith(f"{PUBLIC}/v1/jobs/{job['id']}/images/0?expires=")
        img = c.get(relative(url))  # no Authorization header
        assert img.status_code == 200 and img.content.startswith(b"\x89PNG")
        assert c.get(f"/v1/jobs/{job['id']}/images/0").status_code == 401
        listed = c.get("/v1/jobs", params={"status": "succeeded"}, headers=key).json()["data"]
        assert job["id"] in [j["id"] for j in listed]
        assert c.delete(f"/v1/jobs/{job['id']}", headers=key).status_code == 204
        assert c.get(relative(url)).status_code == 404  # the image went with the job


def test_delete_a_running_job_cancels_it_first(shared: Service) -> None:
    with shared.client() as c:
        key = {"Authorization": "Bearer e2e-secret-key"}
        job_id = c.post("/v1/txt2img", json={**BODY, "prompt": "delete me", "steps": 60, "width": 128,
                                             "height": 128, "n": 4}, headers=key).json()["id"]
        wait_until(lambda: c.get(f"/v1/jobs/{job_id}", headers=key).json()["status"] != "queued", 120,
                   "the job to start")
        r = c.delete(f"/v1/jobs/{job_id}", headers=key)  # usually while it runs (204 after the cancel)
        assert r.status_code in (202, 204), r.text
        wait_until(lambda: c.get(f"/v1/jobs/{job_id}", headers=key).status_code == 404, 120, "the job to be deleted")
        # the worker is still healthy
        r = c.post("/v1/txt2img", json={**BODY, "prompt": "after delete", "steps": 2}, headers=key)
        assert wait_done(c, r.json()["id"], key)["status"] == "succeeded"


def wait_done(c: httpx.Client, job_id: str, headers: dict, timeout_s: float = 120) -> dict:
    def done() -> dict | None:
        job = c.get(f"/v1/jobs/{job_id}", headers=headers).json()
        return job if job["status"] in TERMINAL else None

    return wait_until(done, timeout_s, f"job {job_id} to finish", interval_s=0.1)
