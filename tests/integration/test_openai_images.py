"""The official ``openai`` Python client against a live gateway and worker: generations, edits
(OpenAI's transparent-mask convention next to the native white-mask one), errors in OpenAI's
envelope, API keys and the 504 of a job that outwaits ``openai_wait_s``."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from tests.integration.conftest import COMMON, Service, start_gateway
from tests.integration.test_service_api import wait_done
from tests.serving_support import child_env, stop_process

pytestmark = pytest.mark.integration

FAST = {"steps": 4, "guidance_scale": 3.0}
KEY = "openai-test-key"


def client(svc: Service, key: str = "unused-when-keys-are-off", **kw) -> OpenAI:
    return OpenAI(base_url=f"{svc.url}/v1", api_key=key, timeout=120, **kw)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="module")
def keyed(integration_redis: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A gateway with API keys, no worker (jobs stay queued) and a 1 s OpenAI wait limit."""
    logs = tmp_path_factory.mktemp("openai-keyed-logs")
    env = child_env(redis_url=integration_redis, redis_prefix="itoai", default_model="ghost", api_keys=KEY,
                    openai_wait_s=1, **COMMON)
    url, gateway = start_gateway(logs, env, "openai-gateway")
    try:
        yield Service(url, "itoai", env, logs, [gateway])
    finally:
        stop_process(gateway)


def test_generate_b64_json_and_url_answer_the_same_images(service: Service) -> None:
    oa = client(service)
    res = oa.images.generate(prompt="openai b64", n=2, size="64x64", response_format="b64_json",
                             extra_body={**FAST, "seed": 11, "negative_prompt": "blur"})
    assert isinstance(res.created, int) and len(res.data) == 2
    assert all(d.revised_prompt is None and d.url is None for d in res.data)
    images = [decoded(d.b64_json) for d in res.data]
    assert [(im.format, im.size) for im in images] == [("PNG", (64, 64))] * 2
    assert images[0].tobytes() != images[1].tobytes()  # seeds 11 and 12

    again = oa.images.generate(prompt="openai b64", size="64x64", user="alice",
                               extra_body={**FAST, "seed": 11, "negative_prompt": "blur"})
    url = again.data[0].url
    assert again.data[0].b64_json is None and url.startswith(f"{service.url}/v1/jobs/")
    fetched = httpx.get(url, timeout=30)
    assert fetched.status_code == 200
    assert Image.open(io.BytesIO(fetched.content)).tobytes() == images[0].tobytes()  # same model, params, seed
    job = httpx.get(url.rsplit("/images/", 1)[0], timeout=30).json()  # the native job behind the answer
    assert job["kind"] == "txt2img" and job["metadata"] == {"user": "alice"}
    assert job["parameters"]["steps"] == 4 and job["parameters"]["negative_prompt"] == "blur"


@pytest.mark.parametrize(
    ("kwargs", "status", "param", "words"),
    [
        ({"size": "64"}, 400, "size", 'WIDTHxHEIGHT'),
        ({"size": "1024x1024"}, 400, "size", "256"),  # the server's max_width, named as size
        ({"size": "60x64"}, 400, "size", "multiple of 8"),
        ({"n": 9}, 400, "n", "4"),
        ({"response_format": "gif"}, 400, "response_format", "b64_json"),
        ({"model": "dall-e-3"}, 404, "model", "random-untrained"),
        ({"quality": "hd"}, 400, "quality", "not a field"),
    ],
)
def test_errors_raise_the_clients_own_exceptions(service: Service, kwargs, status, param, words) -> None:
    body = {"prompt": "bad", "size": "64x64", **kwargs}
    with pytest.raises(openai.APIStatusError) as caught:
        client(service, max_retries=0).images.generate(**body, extra_body=FAST)
    err = caught.value
    expected = openai.NotFoundError if status == 404 else openai.BadRequestError
    assert isinstance(err, expected) and err.status_code == status
    assert err.param == param and words in err.message
    assert err.type in {"invalid_request_error", "not_found_error"} and err.code in {"invalid_input", "unknown_model"}


def test_error_envelope_is_openais_and_native_routes_keep_theirs(service: Service) -> None:
    r = httpx.post(f"{service.url}/v1/images/generations", json={"prompt": "x", "n": 0}, timeout=30)
    assert r.status_code == 400  # OpenAI's code for a bad parameter; the native route says 422
    assert r.json()["error"].keys() == {"message", "type", "param", "code"}
    assert r.json()["error"]["param"] == "n"
    native = httpx.post(f"{service.url}/v1/txt2img", json={"prompt": "x", "n": 0}, timeout=30)
    assert native.status_code == 422 and native.json()["error"]["field"] == "n"
    bad_type = httpx.post(f"{service.url}/v1/images/generations", content=b"prompt=x", timeout=30,
                          headers={"content-type": "text/plain"})
    assert bad_type.status_code == 415 and bad_type.json()["error"]["param"] == "content-type"


def _scene() -> tuple[Image.Image, np.ndarray]:
    """A 64x64 RGBA picture whose centre square is fully transparent, and that square as a boolean mask."""
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 3] = 200, np.arange(64, dtype=np.uint8)[None, :] * 3, 255
    hole = np.zeros((64, 64), bool)
    hole[16:48, 20:44] = True
    rgba[hole] = 0  # transparent (and black) where OpenAI's convention repaints
    return Image.fromarray(rgba, "RGBA"), hole


def test_edit_repaints_the_transparent_pixels_like_native_inpaint_repaints_white(service: Service) -> None:
    scene, hole = _scene()
    oa = client(service)
    params = {**FAST, "seed": 21}
    res = oa.images.edit(image=("scene.png", png(scene), "image/png"), mask=("mask.png", png(scene), "image/png"),
                         prompt="fill the hole", response_format="b64_json", extra_body=params)
    out = np.asarray(decoded(res.data[0].b64_json).convert("RGB"))
    source = np.asarray(scene.convert("RGB"))
    assert np.array_equal(out[~hole], source[~hole])  # opaque pixels are kept exactly
    assert not np.array_equal(out[hole], source[hole])  # transparent ones are repainted

    # the native route, with ldm-serve's convention (white = repaint), gives the very same image
    white = Image.fromarray(np.where(hole, 255, 0).astype(np.uint8), "L")
    with service.client() as c:
        submitted = c.post(
            "/v1/inpaint", files={"image": ("i.png", png(scene.convert("RGB"))), "mask": ("m.png", png(white))},
            data={"prompt": "fill the hole", "steps": "4", "guidance_scale": "3.0", "seed": "21"},
        )
        assert submitted.status_code == 202, submitted.text
        job = wait_done(c, submitted.json()["id"])
        assert job["status"] == "succeeded", job
        image = c.get(job["images"][0]["url"]).content
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image)).convert("RGB")), out)

    # no mask: the image's own transparent pixels are the mask (as OpenAI does)
    alone = oa.images.edit(image=("scene.png", png(scene), "image/png"), prompt="fill the hole",
                           response_format="b64_json", extra_body=params)
    assert np.array_equal(np.asarray(decoded(alone.data[0].b64_json).convert("RGB")), out)

    # an opaque mask cannot follow OpenAI's convention: refused, naming the mask
    with pytest.raises(openai.BadRequestError) as caught:
        oa.images.edit(image=("scene.png", png(scene), "image/png"), prompt="x", extra_body=params,
                       mask=("mask.png", png(white), "image/png"))
    assert caught.value.param == "mask" and "transparent" in caught.value.message


def test_edit_size_resizes_and_names_size_in_errors(service: Service) -> None:
    scene, _ = _scene()
    oa = client(service, max_retries=0)
    res = oa.images.edit(image=("scene.png", png(scene), "image/png"), prompt="bigger", size="128x128", n=2,
                         response_format="b64_json", extra_body={**FAST, "seed": 3})
    assert [decoded(d.b64_json).size for d in res.data] == [(128, 128)] * 2
    with pytest.raises(openai.BadRequestError) as caught:
        oa.images.edit(image=("scene.png", png(scene), "image/png"), prompt="x", size="1000x1000", extra_body=FAST)
    assert caught.value.param == "size"


def test_keys_apply_and_a_long_wait_answers_504_with_the_job_id(keyed: Service) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(keyed, "not-the-key").images.generate(prompt="who", size="64x64")
    assert caught.value.status_code == 401 and caught.value.code == "unauthorized"

    oa = client(keyed, KEY)  # default retries: the 504 says not to retry (the job is queued)
    with pytest.raises(openai.InternalServerError) as caught:
        oa.images.generate(prompt="never runs", size="64x64", extra_body=FAST)
    err = caught.value
    assert err.status_code == 504 and err.code == "wait_timeout"
    job_id = err.body["job_id"]
    assert job_id in err.message and err.response.headers["location"] == f"/v1/jobs/{job_id}"
    native = httpx.Client(base_url=keyed.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    with native:
        jobs = native.get("/v1/jobs").json()["data"]
        assert [j["id"] for j in jobs] == [job_id]  # one job: the client did not retry it
        assert native.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # the native API polls it
        assert native.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "canceled"
