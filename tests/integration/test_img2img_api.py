"""``POST /v1/img2img`` end to end: a real gateway, Redis and worker on the tiny random model."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import Service
from tests.integration.test_service_api import _b64, image_of, wait_done

pytestmark = pytest.mark.integration


def _scene(size: tuple[int, int]) -> bytes:
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(255, 0, h, dtype=np.uint8)[:, None]
    arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, 2] = 220
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_img2img_json_and_multipart_give_the_same_image(service: Service) -> None:
    body = {"prompt": "img2img a blue square", "steps": 8, "strength": 0.5, "seed": 42, "guidance_scale": 3.0}
    with service.client() as c:
        j = c.post("/v1/img2img", json={**body, "image": _b64(_scene((64, 64)), data_url=True)})
        assert j.status_code == 202, j.text
        m = c.post(
            "/v1/img2img",
            data={k: str(v) for k, v in body.items()},
            files={"image": ("i.png", _scene((64, 64)), "image/png")},
        )
        assert m.status_code == 202, m.text
        stronger = c.post("/v1/img2img", json={**body, "strength": 1.0, "image": _b64(_scene((64, 64)))})
        jobs = [wait_done(c, r.json()["id"]) for r in (j, m, stronger)]
        for job in jobs:
            assert job["status"] == "succeeded", job
            assert job["kind"] == "img2img" and job["parameters"]["strength"] in (0.5, 1.0)
        # progress counts the steps that ran: int(8 * 0.5) and int(8 * 1.0)
        assert [job["progress"]["total"] for job in jobs] == [4, 4, 8]
        images = [np.asarray(image_of(c, job)) for job in jobs]
        assert images[0].shape == (64, 64, 3)
        assert np.array_equal(images[0], images[1])  # same inputs, same seed: same image, either encoding
        assert not np.array_equal(images[0], images[2])  # strength matters


def test_img2img_output_size_defaults_to_the_image_and_resizes_to_width_height(service: Service) -> None:
    with service.client() as c:
        own = c.post("/v1/img2img", json={"prompt": "img2img own size", "steps": 4, "image": _b64(_scene((128, 64)))})
        fit = c.post("/v1/img2img", json={"prompt": "img2img fitted", "steps": 4, "width": 64, "height": 64,
                                          "image": _b64(_scene((100, 70)))})
        assert own.status_code == 202 and fit.status_code == 202, (own.text, fit.text)
        for r, size in ((own, (128, 64)), (fit, (64, 64))):
            job = wait_done(c, r.json()["id"])
            assert job["status"] == "succeeded", job
            assert (job["parameters"]["width"], job["parameters"]["height"]) == size
            assert image_of(c, job).size == size


BAD = [
    ({"strength": 0}, "strength"),
    ({"strength": 1.5}, "strength"),
    ({"strength": 0.1, "steps": 4}, "strength"),  # int(4 * 0.1) = 0 steps would run
    ({"strength": "0.5"}, "strength"),
    ({"image": None}, "image"),
    ({"image": "not base64!!"}, "image"),
    ({"image": _b64(_scene((60, 60)))}, "image.width"),
    ({"mask": "AAAA"}, "mask"),  # not a field of img2img
]


@pytest.mark.parametrize(("extra", "field"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_img2img_inputs_get_422_naming_the_field(service: Service, extra: dict, field: str) -> None:
    body = {"prompt": "bad img2img", "steps": 4, "image": _b64(_scene((64, 64))), **extra}
    body = {k: v for k, v in body.items() if v is not None}
    with service.client() as c:
        r = c.post("/v1/img2img", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["message"].startswith(field)


def test_img2img_multipart_without_the_image_part(service: Service) -> None:
    with service.client() as c:
        r = c.post("/v1/img2img", data={"prompt": "no file"}, files={"other": ("x.png", _scene((64, 64)), "image/png")})
    assert r.status_code == 422 and r.json()["error"]["field"] == "image", r.text
    assert "`image` file part" in r.json()["error"]["message"]
