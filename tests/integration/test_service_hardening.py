"""Gateway input hardening through a real gateway process (issue 10: 1, 2, 3, 7, 8).

The gateway here has no worker (jobs stay queued), CORS on for one origin, and the
integration limits; every bad request must get a 4xx naming the field or the limit,
and the server must stay healthy after each.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.integration.conftest import COMMON, Service, start_gateway
from tests.serving_support import child_env, stop_process, wait_until

pytestmark = pytest.mark.integration

ORIGIN = "https://app.example"
MB = 1024 * 1024


@pytest.fixture(scope="module")
def gateway(integration_redis: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    logs = tmp_path_factory.mktemp("hardening-logs")
    env = child_env(
        redis_url=integration_redis, redis_prefix="ithard", default_model="ghost", cors_origins=ORIGIN, **COMMON
    )
    url, proc = start_gateway(logs, env, "hard-gateway")
    try:
        yield Service(url, "ithard", env, logs, [proc])
    finally:
        stop_process(proc)


def healthy(svc: Service) -> None:
    assert httpx.get(f"{svc.url}/healthz", timeout=10).json() == {"status": "ok"}


def error_of(r: httpx.Response, code: int, field: str) -> str:
    assert r.status_code == code, r.text
    err = r.json()["error"]
    assert err["field"] == field, err
    assert err["message"].startswith(field), err
    return err["message"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 255 if mode == "L" else (9, 9, 9)).save(buf, format="PNG")
    return buf.getvalue()


def test_job_ids_that_cannot_exist_are_404_before_redis(gateway: Service) -> None:
    with gateway.client() as c:
        r = c.post("/v1/txt2img", json={"prompt": "job id format", "width": 64, "height": 64})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert c.get(f"/v1/jobs/{job_id}").status_code == 200
        # Each of these once reached Redis as part of a key of another type: 500 WRONGTYPE.
        for bad in (f"{job_id}:events", f"{job_id}:image:0", f"{job_id}:cancel", f"{job_id}:webhooks",
                    job_id.upper(), job_id[:-1], "x" * 300):
            for method, path in (("GET", f"/v1/jobs/{bad}"), ("GET", f"/v1/jobs/{bad}/events"),
                                 ("GET", f"/v1/jobs/{bad}/images/0"), ("POST", f"/v1/jobs/{bad}/cancel")):
                r = c.request(method, path)
                assert r.status_code == 404, (method, path, r.text)
                assert r.json()["error"]["type"] == "job_not_found"
        healthy(gateway)


def test_deeply_nested_json_is_refused_before_parsing(gateway: Service) -> None:
    with gateway.client() as c:
        headers = {"content-type": "application/json"}
        # (under the 80 kB body limit of these settings; json.loads recursed into each bracket)
        for body in (b"[" * 70_000, b"[" * 30_000 + b"]" * 30_000, b'{"prompt": "p", "metadata": ' + b"[" * 60_000):
            message = error_of(c.post("/v1/txt2img", content=body, headers=headers), 422, "body")
            assert "max_json_depth" in message or "not valid JSON" in message
        nested: object = 1
        for _ in range(40):
            nested = {"k": nested}
        message = error_of(c.post("/v1/txt2img", json={"prompt": "p", "metadata": nested}), 422, "body")
        assert "max_json_depth=32" in message
        nested = 1
        for _ in range(9):
            nested = [nested]
        message = error_of(c.post("/v1/txt2img", json={"prompt": "p", "metadata": {"a": nested}}), 422, "metadata")
        assert "max_metadata_depth=8" in message
        ok = c.post("/v1/txt2img", json={"prompt": "nested ok", "width": 64, "height": 64,
                                         "metadata": {"a": [[{"b": [1]}]]}})
        assert ok.status_code == 202, ok.text
        assert ok.json()["metadata"] == {"a": [[{"b": [1]}]]}
        form = c.post("/v1/inpaint", data={"prompt": "p", "metadata": "[" * 100_000},
                      files={"image": ("i.png", png((64, 64))), "mask": ("m.png", png((64, 64), "L"))})
        error_of(form, 422, "metadata")
    healthy(gateway)


class Chunks:
    """A 100 MB chunked body that counts what the client managed to send."""

    def __init__(self, head: bytes = b"", total: int = 100 * MB, chunk: int = 64 * 1024) -> None:
        self.head, self.total, self.chunk, self.sent = head, total, chunk, 0

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        block = b"x" * self.chunk
        while self.sent < self.total:
            self.sent += self.chunk
            yield block


def test_chunked_100mb_bodies_are_cut_off_with_413(gateway: Service) -> None:
    pid = gateway.procs[0].pid
    multipart_head = (b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="i.png"\r\n'
                      b"Content-Type: image/png\r\n\r\n")
    cases = [
        ("/v1/txt2img", "application/json", b'{"prompt": "', "routes without uploads"),
        ("/v1/inpaint", "application/json", b'{"prompt": "p", "image": "', "max_body_bytes="),
        ("/v1/inpaint", "multipart/form-data; boundary=b0undary", multipart_head, "max_body_bytes="),
    ]
    for path, ctype, head, limit_name in cases:
        before = rss_kib(pid)
        body = Chunks(head)
        with httpx.Client(base_url=gateway.url, timeout=60) as c:
            r = c.post(path, content=body, headers={"content-type": ctype})
        err = r.json()["error"]
        assert r.status_code == 413 and err["type"] == "payload_too_large" and err["field"] == "body", r.text
        assert limit_name in err["message"], err
        assert body.sent < body.total, "the server read the whole 100 MB body"
        # A body read in full would cost at least its 100 MB; allow for allocator noise only.
        assert rss_kib(pid) - before < 40 * 1024, (path, ctype, before, rss_kib(pid))
        healthy(gateway)


def test_declared_oversize_body_is_refused_before_it_is_sent(gateway: Service) -> None:
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000000\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = s.recv(65536)
            if not data:
                break
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply
    assert json.loads(body)["error"]["message"].startswith("body: Content-Length 1000000000 exceeds the limit")
    healthy(gateway)


def test_content_type_must_match_the_route(gateway: Service) -> None:
    body = json.dumps({"prompt": "cross-site", "width": 64, "height": 64})
    with gateway.client() as c:
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"content-type": ctype} if ctype else {}
            message = error_of(c.post("/v1/txt2img", content=body, headers=headers), 415, "content-type")
            assert "must be application/json" in message
        message = error_of(c.post("/v1/inpaint", content=body, headers={"content-type": "text/plain"}), 415,
                           "content-type")
        assert "application/json or multipart/form-data" in message
        ok = c.post("/v1/txt2img", content=body, headers={"content-type": "Application/JSON; charset=utf-8"})
        assert ok.status_code == 202, ok.text


def test_cors_allows_the_configured_origin_only(gateway: Service) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    with gateway.client() as c:
        r = c.options("/v1/txt2img", headers={"Origin": ORIGIN, **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        r = c.post("/v1/txt2img", json={"prompt": "cors", "width": 64, "height": 64}, headers={"Origin": ORIGIN})
        assert r.status_code == 202 and r.headers["access-control-allow-origin"] == ORIGIN
        assert "location" in r.headers["access-control-expose-headers"].lower()
        r = c.options("/v1/txt2img", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in r.headers


def test_strict_types_and_finite_numbers(gateway: Service) -> None:
    with gateway.client() as c:
        for body, field, message in [
            ({"n": True}, "n", "n: must be an integer, got a boolean"),
            ({"width": "64"}, "width", "width: must be an integer, got a string"),
            ({"steps": 4.0}, "steps", "steps: must be an integer, got 4.0"),
            ({"seed": "1"}, "seed", "seed: must be an integer, got a string"),
        ]:
            assert error_of(c.post("/v1/txt2img", json={"prompt": "p", **body}), 422, field) == message
        for literal in ("NaN", "Infinity", "-Infinity"):
            for field in ("guidance_scale", "eta"):
                raw = f'{{"prompt": "p", "{field}": {literal}}}'.encode()
                r = c.post("/v1/txt2img", content=raw, headers={"content-type": "application/json"})
                assert error_of(r, 422, field).startswith(f"{field}: must be a finite number"), r.text
        files = {"image": ("i.png", png((64, 64))), "mask": ("m.png", png((64, 64), "L"))}
        ok = c.post("/v1/inpaint", data={"prompt": "form", "steps": "4", "guidance_scale": "3.5",
                                         "mask_resize": "false", "seed": "5"}, files=files)
        assert ok.status_code == 202, ok.text
        assert ok.json()["seeds"] == [5]
        for field, value, message in [("steps", "four", "steps: must be an integer, got 'four'"),
                                      ("guidance_scale", "nan", "guidance_scale: must be a finite number"),
                                      ("mask_resize", "maybe", "mask_resize: must be true or false")]:
            r = c.post("/v1/inpaint", data={"prompt": "form", field: value}, files=files)
            assert error_of(r, 422, field).startswith(message)


def test_prefer_wait_with_a_malformed_value_is_ignored(gateway: Service) -> None:
    with gateway.client() as c:
        # The job stays queued (no worker): had the preference been applied, the answer would carry
        # Preference-Applied after waiting max_wait_s.
        r = c.post("/v1/txt2img", json={"prompt": "prefer abc", "width": 64, "height": 64},
                   headers={"Prefer": "wait=abc"})
        assert r.status_code == 202 and "preference-applied" not in r.headers
        r = c.post("/v1/txt2img", json={"prompt": "prefer 1", "width": 64, "height": 64},
                   headers={"Prefer": "wait=1"})
        assert r.status_code == 202 and r.headers["preference-applied"] == "wait=1"


def test_image_errors_name_the_field_without_object_reprs(gateway: Service) -> None:
    with gateway.client() as c:
        for data in (b"GIF89a not really", b"\x89PNG\r\n\x1a\n" + bytes(100), bytes(300)):
            r = c.post("/v1/inpaint", json={"prompt": "p", "image": base64.b64encode(data).decode(),
                                            "mask": base64.b64encode(png((64, 64), "L")).decode()})
            message = error_of(r, 422, "image")
            assert not re.search(r"0x[0-9a-f]{6,}|BytesIO|object at", message), message


def _requests_total(svc: Service, code: str) -> float:
    text = httpx.get(f"{svc.url}/metrics", timeout=10).text
    m = re.search(rf'ldm_http_requests_total{{code="{code}",method="POST",route="/v1/txt2img"}} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def test_client_disconnect_mid_body_is_not_an_error(gateway: Service) -> None:
    log = gateway.logs / "hard-gateway.log"
    start = len(log.read_bytes())
    before = _requests_total(gateway, "499")
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b'Content-Length: 50000\r\n\r\n{"prompt": "gone')
    wait_until(lambda: _requests_total(gateway, "499") > before, 60, "the disconnect to be answered", 0.1)
    healthy(gateway)
    tail = log.read_bytes()[start:].decode(errors="replace")
    assert "Traceback" not in tail and "Exception in ASGI application" not in tail, tail
