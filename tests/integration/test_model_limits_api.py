"""The model's own limits are checked at submit time (issue 11): a gateway in front of two real workers,
the bundled model and a tiny SD-shaped model whose sizes are multiples of 64, on a real Redis.

A request one of them cannot run gets its 4xx at ``POST`` time, naming the field and the model's limit,
and nothing is queued; a request it can run is accepted and runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from ldm_serve.models import bundled_model_path
from tests.integration.conftest import COMMON, Service, start_gateway, start_worker, wait_workers
from tests.serving_support import child_env, stop_process, wait_until

pytestmark = pytest.mark.integration

PREFIX = "itlimits"


@pytest.fixture(scope="module")
def sd64_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.checkpoints import TINY_SD1, write_original_checkpoint

    config = dataclasses.replace(
        TINY_SD1, image_size=16, unet=dataclasses.replace(TINY_SD1.unet, channel_mult=(1, 1, 1, 1))
    )
    return write_original_checkpoint(config, tmp_path_factory.mktemp("sd64") / "sd64.safetensors", fmt="safetensors")


@pytest.fixture(scope="module")
def two_models(integration_redis: str, sd64_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    bundled = bundled_model_path()
    if bundled is None:
        pytest.skip("the bundled model is not installed")
    logs = tmp_path_factory.mktemp("limits-logs")
    env = child_env(redis_url=integration_redis, redis_prefix=PREFIX, backend="eager", warmup="false",
                    batching="continuous", **COMMON)
    procs = [start_worker(logs, env, bundled, "limits-bundled"), start_worker(logs, env, sd64_path, "limits-sd64")]
    try:
        url, gateway = start_gateway(logs, env, "limits-gateway")
        procs.append(gateway)
        wait_workers(url, 2, procs=procs[:2])
        yield Service(url, PREFIX, env, logs, procs)
    finally:
        for p in procs:
            stop_process(p)


def _refused(svc: Service, path: str, body: dict, field: str, *fragments: str) -> None:
    with svc.client() as c:
        before = c.get("/v1/jobs").json()["data"]
        r = c.post(path, json=body)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_input" and err["field"] == field, err
        for fragment in fragments:
            assert fragment in err["message"], err["message"]
        assert c.get("/v1/jobs").json()["data"] == before  # nothing was queued


def bundled_id(svc: Service) -> str:
    with svc.client() as c:
        return next(m["id"] for m in c.get("/v1/models").json()["data"] if m["id"] != "sd64")


def test_models_advertise_their_limits(two_models: Service) -> None:
    with two_models.client() as c:
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    sd = models["sd64"]["constraints"]
    assert (sd["size_multiple"], sd["min_side"], sd["max_width"]) == (64, 128, 256)
    assert 3 in sd["refused_steps"] and sd["timestep_spacing"] == "uniform" and sd["prediction_type"] == "eps"
    assert sd["kinds"] == ["txt2img", "inpaint", "img2img"]
    bundled = models[bundled_id(two_models)]["constraints"]
    assert bundled["refused_steps"] == [3, 9, 27, 36, 37]  # up to the gateway's max_steps=60


def test_sd_shaped_model_refuses_a_size_off_its_multiple_at_submit(two_models: Service) -> None:
    body = {"prompt": "a red cube", "model": "sd64", "steps": 2}
    _refused(two_models, "/v1/txt2img", {**body, "width": 200, "height": 128}, "width", "multiple of 64", "'sd64'")
    _refused(two_models, "/v1/txt2img", {**body, "width": 128, "height": 64}, "height", "between 128 and 256")
    _refused(two_models, "/v1/txt2img", {**body, "width": 128, "height": 128, "steps": 3}, "steps",
             "cannot run 3 steps", "'uniform'")
    with two_models.client() as c:  # what it can run is accepted and runs
        r = c.post("/v1/txt2img", json={**body, "width": 128, "height": 192}, headers={"Prefer": "wait=60"})
        assert r.status_code in (200, 202), r.text
        job = r.json()["id"]
        wait_until(lambda: c.get(f"/v1/jobs/{job}").json()["status"] == "succeeded", 180, "the sd64 job")


def test_bundled_model_refuses_steps_its_spacing_cannot_make_at_submit(two_models: Service) -> None:
    model = bundled_id(two_models)
    body = {"prompt": "a red cube", "model": model, "width": 64, "height": 64}
    _refused(two_models, "/v1/txt2img", {**body, "steps": 9}, "steps", "cannot run 9 steps", repr(model))
    _refused(two_models, "/v1/txt2img", {**body, "steps": 4, "width": 256}, "width", "between 16 and 128")
    with two_models.client() as c:
        r = c.post("/v1/txt2img", json={**body, "steps": 4})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        wait_until(lambda: c.get(f"/v1/jobs/{job}").json()["status"] == "succeeded", 180, "the bundled job")
