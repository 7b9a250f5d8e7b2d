"""The OpenAPI document describes the responses the gateway really gives (the fuzzer checks them)."""

from __future__ import annotations

from ldm_serve.settings import Settings
from service.app import create_app


def _doc() -> dict:
    return create_app(Settings()).openapi()


def test_every_api_operation_documents_its_errors_in_the_error_shape() -> None:
    doc = _doc()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert set(error["properties"]["error"]["required"]) == {"type", "message"}
    for path, ops in doc["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for op in ops.values():
            bad_input = "400" if path.startswith("/v1/images/") else "422"  # OpenAI's code on its face
            for code in ("401", "404", bad_input, "429", "503"):
                schema = op["responses"][code]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (path, code)
            assert op["responses"]["429"]["headers"]["Retry-After"]["required"] is True


def test_success_answers_and_media_types_are_documented() -> None:
    paths = _doc()["paths"]
    for submit in ("/v1/txt2img", "/v1/inpaint"):
        assert {"200", "202"} <= set(paths[submit]["post"]["responses"])  # 200: finished within Prefer: wait
    assert "202" in paths["/v1/jobs/{job_id}/cancel"]["post"]["responses"]
    events = paths["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert list(events) == ["text/event-stream"]
    assert "503" in paths["/readyz"]["get"]["responses"]
    form = paths["/v1/inpaint"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "mask", "prompt"} <= set(form["properties"])  # one object: the files are allowed
    assert {"image", "mask", "prompt"} <= set(form["required"])
