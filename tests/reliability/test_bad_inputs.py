"""The bad-input catalogue as one table: every entry a request, the 4xx it must get and the field
the error must name; after every entry the gateway still answers ``/healthz``.

It gathers the inputs of issue 10 (ids holding ``:``, deep nesting, a 100 MB chunked body,
``text/plain``, loose types, NaN, ``Prefer: wait=abc``, a size far above the model's, priority
without the right) with what ``tests/integration/test_service_api.py`` and
``tests/unit/test_service_inputs.py`` cover. One gateway with API keys and one worker on the tiny
64-pixel model; a second gateway without a worker for the entries whose job must not run.
"""

from __future__ import annotations

import base64
import io
import json
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from ldm_serve.contract import new_job_id
from tests.integration.conftest import start_gateway
from tests.reliability.support import Stack, wait_terminal, write_results
from tests.serving_support import stop_process, wait_until

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

KEY = "key-a"  # a key without any special right
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
BASE = {"prompt": "bad input", "steps": 1, "width": 64, "height": 64}
MB = 1024 * 1024
PREFER_TIMEOUT_S = 20  # Prefer: wait=abc must not hold the request for max_wait_s (60 s)

# Limits of the gateway under test (COMMON of the integration tests, wider sizes: the 64-pixel model
# must refuse 1024x1024 itself, not through max_width).
LIMITS = {"max_width": 1024, "max_height": 1024}


def _png(size: tuple[int, int], color: Any = (200, 30, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _mask(size: tuple[int, int]) -> bytes:
    m = Image.new("L", size, 0)
    m.paste(255, (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    m.save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _nested(depth: int, inner: str = "") -> str:
    return "[" * depth + inner + "]" * depth


def _body(**fields: Any) -> bytes:
    return json.dumps({**BASE, **fields}).encode()


def _chunks(total: int, head: bytes, filler: bytes) -> Callable[[], Iterator[bytes]]:
    """A generator factory of ``total`` bytes: ``head`` then ``filler`` repeated, in 1 MB chunks."""

    def gen() -> Iterator[bytes]:
        yield head
        block = (filler * (MB // len(filler) + 1))[:MB]
        for _ in range((total - len(head)) // MB):
            yield block

    return gen


MULTIPART_HEAD = (
    b"--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n"
    b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"i.png\"\r\n"
    b"Content-Type: image/png\r\n\r\n"
)


@dataclass(frozen=True)
class Entry:
    """One bad request. ``body``: a dict (JSON), raw bytes, or a generator factory (sent chunked).
    ``path`` may hold ``{job}``: the id of a real finished job. ``fields``: names the error may give
    (the first is the expected one). ``on``: ``svc`` (worker) or ``idle`` (no worker: jobs stay queued)."""

    id: str
    method: str
    path: str
    body: Any = None
    status: tuple[int, ...] = (422,)
    fields: tuple[str, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    on: str = "svc"
    check: Callable[[dict], None] | None = None


def _finite(err: dict) -> None:
    assert "finite" in err["message"], err


def _not_found(err: dict) -> None:
    assert err["type"] == "job_not_found", err


T2I, INP, I2I = "/v1/txt2img", "/v1/inpaint", "/v1/img2img"
CATALOGUE = [
    # --- request limits (tests/integration/test_service_api.py BAD_INPUTS, unit schema bounds) --------
    Entry("width-not-multiple-of-8", "POST", T2I, {"width": 100}, fields=("width",)),
    Entry("height-over-max", "POST", T2I, {"height": 2048}, fields=("height",)),
    Entry("steps-over-max", "POST", T2I, {"steps": 61}, fields=("steps",)),
    Entry("n-over-max", "POST", T2I, {"n": 5}, fields=("n",)),
    Entry("n-zero", "POST", T2I, {"n": 0}, fields=("n",)),
    Entry("eta-over-1", "POST", T2I, {"eta": 2}, fields=("eta",)),
    Entry("guidance-over-max", "POST", T2I, {"guidance_scale": 31}, fields=("guidance_scale",)),
    Entry("prompt-too-long", "POST", T2I, {"prompt": "x" * 301}, fields=("prompt",)),
    Entry("unknown-field", "POST", T2I, {"bogus": 1}, fields=("bogus",)),
    Entry("unknown-model", "POST", T2I, {"model": "no-such-model"}, status=(404,), fields=("model",)),
    Entry("output-format-gif", "POST", T2I, {"output_format": "gif"}, fields=("output_format",)),
    Entry("metadata-too-big", "POST", T2I, {"metadata": {"k": "v" * 5000}}, fields=("metadata",)),
    Entry("webhook-ftp", "POST", T2I, {"webhook": "ftp://example.com/hook"}, fields=("webhook.url",)),
    Entry("webhook-loopback", "POST", T2I, {"webhook": "http://127.0.0.1:9/hook"}, fields=("webhook.url",)),
    Entry("filter-without-webhook", "POST", T2I, {"webhook_events_filter": ["start"]},
          fields=("webhook_events_filter",)),
    Entry("seed-negative", "POST", T2I, {"seed": -1}, fields=("seed",)),
    Entry("inpaint-bad-base64", "POST", INP, {"image": "not base64!!", "mask": "AAAA"}, fields=("image",)),
    Entry("inpaint-not-an-image", "POST", INP, {"image": _b64(b"hello, not an image"), "mask": _b64(_mask((64, 64)))},
          fields=("image",)),
    Entry("inpaint-gif-mask", "POST", INP, {"image": _b64(_png((64, 64))), "mask": _b64(b"GIF89a nonsense")},
          fields=("mask",)),
    Entry("inpaint-mask-size", "POST", INP, {"image": _b64(_png((64, 64))), "mask": _b64(_mask((32, 32)))},
          fields=("mask",)),
    Entry("inpaint-image-not-multiple-of-8", "POST", INP,
          {"image": _b64(_png((60, 60))), "mask": _b64(_mask((60, 60)))}, fields=("image.width",)),
    Entry("inpaint-width-differs", "POST", INP,
          {"image": _b64(_png((64, 64))), "mask": _b64(_mask((64, 64))), "width": 128}, fields=("width",)),
    Entry("inpaint-decompression-bomb", "POST", INP,
          {"image": _b64(_png((5000, 5000), 0, "1")), "mask": _b64(_mask((64, 64)))}, fields=("image",)),
    Entry("inpaint-over-upload-bytes", "POST", INP, {"image": _b64(bytes(250_000)), "mask": _b64(_mask((64, 64)))},
          fields=("image",)),
    Entry("inpaint-missing-image", "POST", INP, {"mask": _b64(_mask((64, 64)))}, fields=("image",)),
    Entry("img2img-strength-zero", "POST", I2I, {"image": _b64(_png((64, 64))), "strength": 0}, fields=("strength",)),
    Entry("img2img-strength-over-1", "POST", I2I, {"image": _b64(_png((64, 64))), "strength": 1.5},
          fields=("strength",)),
    Entry("img2img-strength-runs-no-step", "POST", I2I, {"image": _b64(_png((64, 64))), "strength": 0.1, "steps": 4},
          fields=("strength",)),
    # no width / height: the output takes the image's size, which must be a multiple of 8
    Entry("img2img-image-not-multiple-of-8", "POST", I2I,
          {"image": _b64(_png((60, 60))), "width": None, "height": None}, fields=("image.width",)),
    Entry("img2img-missing-image", "POST", I2I, {"strength": 0.5, "steps": 4}, fields=("image",)),
    Entry("img2img-with-a-mask", "POST", I2I, {"image": _b64(_png((64, 64))), "mask": "AAAA"}, fields=("mask",)),
    Entry("inpaint-multipart-missing-mask", "POST", INP,
          MULTIPART_HEAD + _png((64, 64)) + b"\r\n--XyZ--\r\n", fields=("mask",),
          headers={"Content-Type": "multipart/form-data; boundary=XyZ"}),
    # found by the fuzzer: Starlette's own 400 for a broken multipart body is not in the error shape
    Entry("multipart-malformed", "POST", INP, b"--XyZ\r\nNone--XyZ--\r\n", status=(400, 422),
          fields=("body", "image", "mask"), headers={"Content-Type": "multipart/form-data; boundary=XyZ"}),
    Entry("malformed-json", "POST", T2I, b"{not json", fields=("body",)),
    Entry("json-not-an-object", "POST", T2I, b"[1, 2, 3]", fields=("body",)),
    Entry("body-over-limit-with-length", "POST", T2I, b" " * 1_000_000, status=(413, 422), fields=("body",)),
    Entry("idempotency-key-too-long", "POST", T2I, {}, fields=("Idempotency-Key",),
          headers={"Idempotency-Key": "k" * 256}),
    Entry("unknown-job", "GET", f"/v1/jobs/{new_job_id()}", status=(404,), check=_not_found),
    Entry("job-id-malformed", "GET", "/v1/jobs/doesnotexist", status=(404, 422), fields=("job_id",)),
    Entry("image-index-out-of-range", "GET", "/v1/jobs/{job}/images/2", fields=("index",)),
    Entry("image-index-not-int", "GET", "/v1/jobs/{job}/images/x", fields=("index",)),
    Entry("no-api-key", "GET", "/v1/models", status=(401,), fields=("authorization",),
          headers={"Authorization": ""}),
    Entry("wrong-api-key", "POST", T2I, {}, status=(401,), fields=("authorization",),
          headers={"Authorization": "Bearer nope"}),
    # --- issue 10, defect 1: ids holding ':' reach Redis unchecked --------------------------------
    Entry("id-colon-events", "GET", "/v1/jobs/{job}:events", status=(404, 422), fields=("job_id",)),
    Entry("id-colon-image", "GET", "/v1/jobs/{job}:image:0", status=(404, 422), fields=("job_id",)),
    Entry("id-colon-events-stream", "GET", "/v1/jobs/{job}:events/events", status=(404, 422), fields=("job_id",)),
    Entry("id-colon-image-cancel", "POST", "/v1/jobs/{job}:image:0/cancel", status=(404, 422), fields=("job_id",)),
    Entry("id-colon-events-image", "GET", "/v1/jobs/{job}:events/images/0", status=(404, 422), fields=("job_id",)),
    # --- defect 2: deep nesting ------------------------------------------------------------------
    Entry("nested-100k-brackets", "POST", T2I, _nested(100_000).encode(), status=(400, 413, 422), fields=("body",)),
    Entry("nested-100k-in-metadata", "POST", T2I,
          b'{"prompt": "x", "metadata": {"a": ' + _nested(100_000).encode() + b"}}",
          status=(400, 413, 422), fields=("metadata", "body")),
    Entry("nested-200-in-metadata", "POST", T2I, _body(metadata={"a": json.loads(_nested(200))}),
          status=(400, 422), fields=("metadata", "body")),
    # --- defect 3: the body limit must hold while streaming (chunked, no Content-Length) ------------
    Entry("chunked-100mb-json", "POST", T2I, _chunks(100 * MB, b'{"prompt": "', b"x"), status=(413,),
          fields=("body",), headers={"Content-Type": "application/json"}),
    Entry("chunked-100mb-multipart", "POST", INP, _chunks(100 * MB, MULTIPART_HEAD, b"\0"), status=(413,),
          fields=("body", "image"), headers={"Content-Type": "multipart/form-data; boundary=XyZ"}),
    # --- defect 6: cost bounded by the model and by the key's rights -------------------------------
    Entry("1024x1024-on-64px-model", "POST", T2I, {"width": 1024, "height": 1024}, status=(422,),
          fields=("width", "height")),
    Entry("priority-high-without-right", "POST", T2I, {"priority": "high"}, status=(403, 422),
          fields=("priority",)),
    # --- defect 7: Content-Type ----------------------------------------------------------------------
    Entry("text-plain-body", "POST", T2I, _body(), status=(415,), fields=("Content-Type",),
          headers={"Content-Type": "text/plain"}),
    Entry("no-content-type", "POST", T2I, _body(), status=(415,), fields=("Content-Type",),
          headers={"Content-Type": ""}),
    # --- defect 8: strict types, NaN, Prefer ------------------------------------------------------
    Entry("n-true", "POST", T2I, {"n": True}, fields=("n",)),
    Entry("width-string", "POST", T2I, {"width": "64"}, fields=("width",)),
    Entry("steps-float", "POST", T2I, {"steps": 2.5}, fields=("steps",)),
    Entry("guidance-nan", "POST", T2I, _body().replace(b'"steps": 1', b'"steps": 1, "guidance_scale": NaN'),
          fields=("guidance_scale",), check=_finite),
    Entry("eta-infinity", "POST", T2I, _body().replace(b'"steps": 1', b'"steps": 1, "eta": Infinity'),
          fields=("eta",), check=_finite),
    Entry("prefer-wait-abc", "POST", T2I, {}, status=(202, 400, 422), fields=("Prefer",),
          headers={"Prefer": "wait=abc"}, on="idle"),
]


# -------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def gateways(rel_redis: str, model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("bad-input-logs")
    svc = Stack.start(logs, model_path, workers=1, redis_url=rel_redis, redis_prefix="bad",
                      api_keys="key-a,key-b", **LIMITS)
    idle_env = {**svc.env, "LDM_REDIS_PREFIX": "badidle", "LDM_DEFAULT_MODEL": "ghost"}
    idle_url, idle_proc = start_gateway(logs, idle_env, "idle-gateway")
    try:
        with svc.client(headers=AUTH) as c:
            job_id = c.post(T2I, json={**BASE, "steps": 2}).json()["id"]
            job = wait_terminal(c, [job_id], 120)[job_id]
        assert job["status"] == "succeeded", job
        yield {"svc": svc.url, "idle": idle_url, "job": job_id, "log": logs / "gateway.log"}
    finally:
        stop_process(idle_proc)
        svc.stop()


# -------------------------------------------------------------------------------------------------- sending
def _send_streaming(url: str, method: str, path: str, headers: dict[str, str],
                    chunks: Iterator[bytes]) -> tuple[int, dict[str, str], bytes, int]:
    """Send a chunked body over a raw socket, stopping as soon as the server answers (a server that
    stops reading would otherwise leave the client blocked). Returns status, headers, body, bytes sent."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    head = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}", "Transfer-Encoding: chunked",
            *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    sent = 0
    try:
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered (or closed) early
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
        else:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # the server stopped reading: its answer is what counts
    sock.settimeout(120)
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    raw_head, _, rest = data.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0] else 0
    resp_headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(resp_headers.get("content-length", "0") or 0)
    while len(rest) < length:
        more = sock.recv(65536)
        if not more:
            break
        rest += more
    sock.close()
    return status, resp_headers, rest[:length], sent


def _error_of(status: int, body: bytes) -> dict:
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"{status}: not an error JSON: {body[:300]!r}") from None


# -------------------------------------------------------------------------------------------------- the table
@pytest.mark.parametrize("entry", CATALOGUE, ids=[e.id for e in CATALOGUE])
def test_bad_input_gets_4xx_naming_the_field(gateways: dict, entry: Entry) -> None:
    url = gateways[entry.on]
    path = entry.path.replace("{job}", gateways["job"])
    headers = {**AUTH, **(JSON if isinstance(entry.body, (dict, bytes)) or entry.body is None else {}),
               **entry.headers}
    headers = {k: v for k, v in headers.items() if v}  # "" removes a default header
    t0 = time.monotonic()
    if callable(entry.body):
        status, _headers, body, sent = _send_streaming(url, entry.method, path, headers, entry.body())
    else:
        content = json.dumps({**BASE, **entry.body}).encode() if isinstance(entry.body, dict) else entry.body
        timeout = PREFER_TIMEOUT_S if entry.on == "idle" else 120
        with httpx.Client(base_url=url, timeout=timeout) as c:
            try:
                r = c.request(entry.method, path, content=content, headers=headers)
            except httpx.TimeoutException:
                _record(entry.id, 0, len(content or b""), time.monotonic() - t0)
                pytest.fail(f"{entry.id}: no answer within {timeout} s")
        status, body, sent = r.status_code, r.content, len(content or b"")
    elapsed = time.monotonic() - t0
    _record(entry.id, status, sent, elapsed)
    try:
        assert status in entry.status, f"{entry.id}: expected {entry.status}, got {status}: {body[:400]!r}"
        if 200 <= status < 300:
            return  # only Prefer: wait=abc may be accepted (ignored), and it answered in time
        err = _error_of(status, body)
        assert "object at 0x" not in err["message"], err  # no Python object reprs in error texts
        if entry.fields:
            named = [f.lower() for f in entry.fields]
            got = str(err.get("field", "")).lower()
            assert got in named or any(f in err["message"].lower() for f in named), (
                f"{entry.id}: error does not name {entry.fields}: {err}")
        if entry.check is not None:
            entry.check(err)
    finally:
        if 200 <= status < 300 and entry.method == "POST" and path in (T2I, INP):
            job = json.loads(body)  # a bad input that was accepted: free the worker
            httpx.post(f"{url}/v1/jobs/{job['id']}/cancel", headers=AUTH, timeout=30)
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200


_FIGURES: dict[str, dict[str, Any]] = {}
_T0 = time.monotonic()


def _record(entry_id: str, status: int, sent: int, elapsed_s: float) -> None:
    """Each entry's answer (status 0: none in time), rewritten to the results file after every entry."""
    _FIGURES[entry_id] = {"status": status, "bytes_sent": sent, "seconds": round(elapsed_s, 2)}
    wrong = sorted(k for k, v in _FIGURES.items() if not 400 <= v["status"] < 500)
    write_results("bad_inputs", {"entries": len(CATALOGUE), "answered": len(_FIGURES),
                                 "responses_5xx": sum(v["status"] >= 500 for v in _FIGURES.values()),
                                 "not_4xx": wrong, "answers": _FIGURES,
                                 "wall_s": round(time.monotonic() - _T0, 1)})


def test_client_disconnecting_mid_body_logs_no_traceback(gateways: dict) -> None:
    """A client that goes away in the middle of its body is not an error of the server."""
    parts = urlsplit(gateways["svc"])
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        head = (f"POST {T2I} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {KEY}\r\nContent-Length: 100000\r\n\r\n")
        sock.sendall(head.encode() + b'{"prompt": "gone')
    for _ in range(3):  # the server has seen the disconnect once it has answered later requests
        assert httpx.get(f"{gateways['svc']}/healthz", timeout=30).status_code == 200
    wait_until(lambda: gateways["log"].exists(), 10, "the gateway log")
    log = gateways["log"].read_text(errors="replace")
    errors = [ln for ln in log.splitlines() if "Traceback" in ln or ln.startswith("ERROR") or " ERROR " in ln]
    assert not errors, log[-3000:]
