"""The web playground's files as the gateway serves them: same-origin only, strict headers, and
form fields that are the API's own field names (so a 4xx ``error.field`` finds its control)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from ldm_serve.settings import Settings
from service.app import create_app
from service.playground import STATIC_FILES, static_file
from service.schemas import build_schemas
from tests.serving_support import ROOT


def _client(**settings: object) -> TestClient:
    return TestClient(create_app(Settings(redis_url="redis://127.0.0.1:1/0", **settings)))  # no Redis needed


def test_the_page_and_its_files_are_served_with_a_same_origin_policy() -> None:
    with _client() as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for r in [page] + [client.get(f"/static/{name}") for name in STATIC_FILES]:
            assert r.status_code == 200
            csp = r.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "script-src 'self';" in csp and "frame-ancestors 'none'" in csp
            assert r.headers["x-content-type-options"] == "nosniff"
        assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        referenced = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert {"/static/app.js", "/static/app.css"} <= set(referenced)
        for ref in referenced:
            assert ref.startswith("/"), f"{ref} is not served by the gateway itself"
            assert client.get(ref).status_code == 200, ref


@pytest.mark.parametrize("name", ["nope.js", "..%2Fapp.py", "index.htm"])
def test_only_the_listed_files_are_served(name: str) -> None:
    with _client() as client:
        assert client.get(f"/static/{name}").status_code == 404


def test_the_playground_can_be_switched_off() -> None:
    with _client(playground=False) as client:
        assert client.get("/").status_code == 404
        assert client.get("/static/app.js").status_code == 404


def test_nothing_is_loaded_from_another_origin() -> None:
    for name in STATIC_FILES:
        text = static_file(name).decode()
        assert not re.search(r"(?:src|href|url)\s*[=(]\s*[\"']?(?:https?:)?//", text), name
        assert "import(" not in text and "@import" not in text, name


def test_form_fields_are_named_as_the_api_names_them() -> None:
    schemas = build_schemas(Settings())
    api_fields = (set(schemas.Txt2ImgRequest.model_fields) | set(schemas.InpaintForm.model_fields)
                  | set(schemas.Img2ImgForm.model_fields))
    fields = set(re.findall(r'data-field="([^"]+)"', static_file("index.html").decode()))
    assert {"prompt", "negative_prompt", "model", "width", "height", "steps", "guidance_scale", "seed", "n",
            "strength"} <= fields
    assert fields - api_fields == {"authorization", "image", "mask"}  # the 401's field and the two uploads


def test_the_static_files_are_package_data() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'\[tool\.setuptools\.package-data\]\s*\nservice = \["static/\*"\]', pyproject)
    for name in STATIC_FILES:
        assert (ROOT / "service" / "static" / name).is_file()
