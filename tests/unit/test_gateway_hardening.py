"""Gateway input hardening without a server: job-id format, JSON nesting, strict types, form values,
Prefer parsing, body limits, clean image errors (issue 10: 1, 2, 3, 8)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from ldm_serve.contract import is_job_id, new_job_id
from ldm_serve.errors import InvalidInput, JobNotFound, PayloadTooLarge, UnsupportedMediaType
from ldm_serve.jobstore import check_job_id
from ldm_serve.settings import Settings
from service.app import error_response
from service.bodies import body_limit, check_json_depth, json_depth, load_json
from service.images import clean_error, load_image
from service.routes.generate import _form_value, parse_prefer_wait
from service.schemas import build_schemas
from service.submission import first_error as _first_error


def test_job_id_format() -> None:
    ids = {new_job_id() for _ in range(200)}
    assert all(is_job_id(i) for i in ids)
    job_id = next(iter(ids))
    for bad in (f"{job_id}:events", f"{job_id}:image:0", job_id.upper(), job_id[:-1], job_id + "a", "", "../x",
                "a" * 25 + "1", None, 7):
        assert not is_job_id(bad), bad
        with pytest.raises(JobNotFound):
            check_job_id(bad)  # type: ignore[arg-type]


def test_json_depth_is_checked_before_parsing() -> None:
    check_json_depth(b"[" * 32 + b"]" * 32, 32)
    with pytest.raises(InvalidInput, match="max_json_depth=32"):
        check_json_depth(b"[" * 33 + b"]" * 33, 32)
    with pytest.raises(InvalidInput, match="body: is not valid JSON"):
        check_json_depth(b"[" * 100_000, 32)  # json.loads would raise RecursionError here
    with pytest.raises(InvalidInput, match="metadata: nests arrays/objects deeper than max_json_depth=4"):
        check_json_depth(json.dumps({"a": {"b": {"c": {"d": {"e": 1}}}}}).encode(), 4, "metadata")
    # brackets inside strings (escaped quotes included) do not count
    check_json_depth(json.dumps({"p": "[[[[{{{{ \\\" [[[[", "q": ["]]]]"]}).encode(), 3)
    # hostile strings are scanned in linear time: an unterminated run of escaped quotes
    with pytest.raises(InvalidInput):
        check_json_depth(b'["' + b'\\"' * 500_000 + b"\\", 8)
    # a text with more quotes and brackets than any request can hold is refused before it is scanned further
    with pytest.raises(InvalidInput, match=r"body: holds 2000002 quotes and brackets, more than a request can \(1000\)"):
        check_json_depth(b"[" + b'"a",' * 1_000_000 + b"1]", 8, max_structure=1000)
    check_json_depth(b'["a\\\\", "b\\"[", "c]"]', 1, max_structure=10)  # an escaped quote is not structure
    assert load_json(b'{"a": [1, {"b": null}]}', 3) == {"a": [1, {"b": None}]}
    with pytest.raises(InvalidInput, match="body: is not valid JSON"):
        load_json(b"{not json", 32)
    with pytest.raises(InvalidInput, match="body: is not valid JSON"):
        load_json(b"\xff\xfe", 32)


def test_json_depth_of_values_without_recursion() -> None:
    assert json_depth(1) == 0 and json_depth({}) == 1 and json_depth({"a": [1, {"b": []}]}) == 4
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert json_depth(deep) == 5001


def _error(model: type, body: dict) -> InvalidInput:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return _first_error(info.value)


def test_numbers_and_booleans_are_strict_and_finite() -> None:
    schemas = build_schemas(Settings())
    t2i = schemas.Txt2ImgRequest
    assert str(_error(t2i, {"prompt": "p", "n": True})) == "n: must be an integer, got a boolean"
    assert str(_error(t2i, {"prompt": "p", "width": "64"})) == "width: must be an integer, got a string"
    assert str(_error(t2i, {"prompt": "p", "steps": 4.0})) == "steps: must be an integer, got 4.0"
    for field in ("guidance_scale", "eta"):
        for value in (float("nan"), float("inf"), float("-inf")):
            assert str(_error(t2i, {"prompt": "p", field: value})).startswith(f"{field}: must be a finite number")
    assert str(_error(t2i, {"prompt": "p", "guidance_scale": "7"})) == "guidance_scale: must be a number, got a string"
    form = schemas.InpaintForm
    assert str(_error(form, {"prompt": "p", "mask_resize": "true"})).startswith("mask_resize: must be true or false")
    ok = t2i.model_validate({"prompt": "p", "n": 2, "width": 64, "guidance_scale": 3, "output_format": "jpeg"})
    assert ok.guidance_scale == 3.0 and ok.n == 2  # an integer is a fine number


def test_metadata_depth_is_bounded() -> None:
    t2i = build_schemas(Settings(max_metadata_depth=3)).Txt2ImgRequest
    t2i.model_validate({"prompt": "p", "metadata": {"a": {"b": [1]}}})
    err = _error(t2i, {"prompt": "p", "metadata": {"a": {"b": [[1]]}}})
    assert err.field == "metadata" and "max_metadata_depth=3" in str(err)


def test_form_values_are_converted_explicitly() -> None:
    form = build_schemas(Settings()).InpaintForm

    def conv(key: str, value: str) -> object:
        return _form_value(form, key, value, Settings())

    assert conv("steps", "4") == 4 and conv("seed", " 5 ") == 5 and conv("width", "64") == 64
    assert conv("guidance_scale", "7.5") == 7.5 and conv("mask_resize", "true") is True
    assert conv("mask_resize", "0") is False and conv("prompt", "a cat") == "a cat"
    assert conv("webhook_events_filter", "start, completed") == ["start", "completed"]
    assert conv("metadata", '{"k": [1]}') == {"k": [1]}
    for key, value, message in [
        ("steps", "4.5", "steps: must be an integer, got '4.5'"),
        ("n", "two", "n: must be an integer, got 'two'"),
        ("guidance_scale", "nan", "guidance_scale: must be a finite number, got 'nan'"),
        ("eta", "x", "eta: must be a number, got 'x'"),
        ("mask_resize", "maybe", "mask_resize: must be true or false, got 'maybe'"),
        ("metadata", "{", "metadata: is not valid JSON"),
        ("metadata", "[" * 100_000, "metadata: is not valid JSON"),
    ]:
        with pytest.raises(InvalidInput) as info:
            conv(key, value)
        assert str(info.value).startswith(message), (key, str(info.value))


@pytest.mark.parametrize(
    ("header", "expected"),
    [("wait=abc", None), ("wait=-1", None), ("wait=5s", None), ("wait=", None), ('wait="7"', 7),
     ("respond-async, wait=10", 10), ("WAIT=2", 2), ("handling=lenient", None), ("nowait=3", None)],
)
def test_prefer_wait_ignores_malformed_values(header: str, expected: int | None) -> None:
    assert parse_prefer_wait(header, 60) == expected


def test_body_limits_per_route() -> None:
    s = Settings(max_upload_bytes=200_000, max_prompt_chars=300, max_metadata_bytes=4096)
    upload, name = body_limit(s, "/v1/inpaint")
    assert upload > 2 * 200_000 * 4 // 3 and name == f"max_body_bytes={upload}"
    small, name = body_limit(s, "/v1/txt2img")
    assert small < upload and str(small) in name
    assert body_limit(Settings(max_body_bytes=5000), "/v1/inpaint")[0] == 5000
    assert body_limit(Settings(max_body_bytes=5000), "/v1/txt2img")[0] == 5000


def test_new_errors_map_to_413_and_415_naming_the_limit() -> None:
    r = error_response(PayloadTooLarge("body", "exceeds the limit of max_body_bytes=5000"))
    assert r.status_code == 413
    assert json.loads(r.body)["error"] == {
        "type": "payload_too_large", "field": "body", "message": "body: exceeds the limit of max_body_bytes=5000"}
    r = error_response(UnsupportedMediaType("content-type", "must be application/json, got 'text/plain'"))
    assert r.status_code == 415 and json.loads(r.body)["error"]["field"] == "content-type"


def test_image_errors_do_not_leak_object_reprs() -> None:
    for data in (b"GIF89a nonsense", b"\x89PNG\r\n\x1a\n" + bytes(64), b"RIFF\x00\x00\x00\x00WEBPVP8 "):
        with pytest.raises(InvalidInput) as info:
            load_image("image", data, max_bytes=10_000, max_pixels=10_000)
        assert " at 0x" not in str(info.value) and "BytesIO" not in str(info.value), str(info.value)
        assert str(info.value).startswith("image: is not a decodable image")
    assert clean_error(OSError("cannot identify image file <_io.BytesIO object at 0x7f3a2c1b>")) == (
        "cannot identify image file")


def test_cors_is_off_by_default() -> None:
    from starlette.middleware.cors import CORSMiddleware

    from service.app import create_app

    def cors(settings: Settings) -> list:
        return [m for m in create_app(settings).user_middleware if m.cls is CORSMiddleware]

    assert cors(Settings()) == []
    (mw,) = cors(Settings(cors_origins="https://a.example, https://b.example"))
    assert mw.kwargs["allow_origins"] == ["https://a.example", "https://b.example"]
