"""The OpenAI face's pure parts: one error boundary rendering OpenAI's envelope under /v1/images/,
the request translation (``size``, ``response_format``, ``user``), the transparent-mask
convention and a failed job's error."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ldm_serve.errors import InvalidInput, QueueFull, Unauthorized, WaitTimeout
from ldm_serve.settings import Settings
from service.app import error_response
from service.images import transparent_mask
from service.routes.openai_images import _failure, parse_size, split_request

GW = SimpleNamespace(settings=Settings(max_width=256, max_height=128))


def _body(response) -> dict:
    return json.loads(response.body)["error"]


def test_one_boundary_two_envelopes() -> None:
    exc = InvalidInput("n", "must be <= 4, got 9")
    native = error_response(exc, path="/v1/txt2img")
    openai = error_response(exc, path="/v1/images/generations")
    assert (native.status_code, openai.status_code) == (422, 400)  # 400: OpenAI's code for a bad parameter
    assert _body(native) == {"type": "invalid_input", "field": "n", "message": "n: must be <= 4, got 9"}
    assert _body(openai) == {"message": "n: must be <= 4, got 9", "type": "invalid_request_error", "param": "n",
                             "code": "invalid_input"}
    full = error_response(QueueFull("the queue is full", retry_after_s=7), path="/v1/images/edits")
    assert full.status_code == 429 and full.headers["retry-after"] == "7"
    assert _body(full)["type"] == "rate_limit_error" and _body(full)["param"] is None
    denied = error_response(Unauthorized("authorization: no key"), path="/v1/images/generations")
    assert denied.status_code == 401 and _body(denied)["type"] == "authentication_error"


def test_wait_timeout_is_a_504_naming_the_job_that_must_not_be_retried() -> None:
    r = error_response(WaitTimeout("a" * 26, 300), path="/v1/images/generations")
    assert r.status_code == 504
    assert r.headers["location"] == f"/v1/jobs/{'a' * 26}" and r.headers["x-should-retry"] == "false"
    body = _body(r)
    assert body["code"] == "wait_timeout" and body["job_id"] == "a" * 26 and "a" * 26 in body["message"]


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("auto", None), ("64x128", (64, 128))])
def test_size_parses(value, expected) -> None:
    assert parse_size(value, 256, 128) == expected


@pytest.mark.parametrize("value", ["64", "64X64", "x64", "64x64x64", 64, "-8x8", " 64x64"])
def test_a_malformed_size_names_size_and_the_limits(value) -> None:
    with pytest.raises(InvalidInput, match="256x128") as caught:
        parse_size(value, 256, 128)
    assert caught.value.field == "size"


def test_split_request_translates_the_openai_fields() -> None:
    native, options = split_request(
        {"prompt": "p", "n": 2, "size": "64x64", "response_format": "b64_json", "user": "u", "seed": 3,
         "steps": 4, "guidance_scale": 2.0, "negative_prompt": "q", "model": "m"}, GW,
    )
    assert native == {"prompt": "p", "n": 2, "seed": 3, "steps": 4, "guidance_scale": 2.0, "negative_prompt": "q",
                      "model": "m", "metadata": {"user": "u"}}
    assert options.size == (64, 64) and options.response_format == "b64_json"
    assert split_request({"prompt": "p"}, GW)[1].response_format == "url"  # OpenAI's default


@pytest.mark.parametrize(
    ("body", "field"),
    [({"prompt": "p", "style": "vivid"}, "style"), ({"prompt": "p", "response_format": "png"}, "response_format"),
     ({"prompt": "p", "user": 5}, "user"), ({"prompt": "p", "webhook": "http://x"}, "webhook"), ([1], "body")],
)
def test_split_request_refuses_what_it_does_not_support(body, field) -> None:
    with pytest.raises(InvalidInput) as caught:
        split_request(body, GW)
    assert caught.value.field == field


def test_transparent_pixels_become_the_white_repaint_mask() -> None:
    rgba = np.full((8, 16, 4), 255, np.uint8)
    rgba[2:5, 3:9, 3] = 0  # fully transparent: repaint
    rgba[6, 1, 3] = 1  # barely opaque: keep
    mask = np.asarray(transparent_mask("mask", Image.fromarray(rgba, "RGBA")))
    expected = np.zeros((8, 16), np.uint8)
    expected[2:5, 3:9] = 255
    assert mask.dtype == np.uint8 and np.array_equal(mask, expected)
    with pytest.raises(InvalidInput, match="alpha") as caught:
        transparent_mask("mask", Image.new("L", (8, 8), 255))  # a white-is-repaint mask
    assert caught.value.field == "mask"


def test_a_failed_job_keeps_a_late_field_error_else_is_job_failed() -> None:
    late = _failure("j" * 26, {"status": "failed", "error": json.dumps(
        {"type": "invalid_input", "field": "prompt", "message": "prompt: too long for the model"})})
    assert isinstance(late, InvalidInput) and late.field == "prompt" and str(late) == "prompt: too long for the model"
    lost = _failure("j" * 26, {"status": "failed", "error": json.dumps({"type": "worker_lost", "message": "gone"})})
    assert lost.http_status == 500 and lost.code == "job_failed" and "gone" in str(lost)
    canceled = _failure("j" * 26, {"status": "canceled"})
    assert "ended canceled" in str(canceled)
