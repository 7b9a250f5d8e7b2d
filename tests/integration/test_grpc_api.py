"""The gRPC API with a real ``grpc`` client against a live ``ldm-serve up`` (gateway + worker, tiny model):
every RPC, WatchJob in the SSE order, cancel inside a running batch, bad inputs with the REST errors,
auth and per-key visibility, REST and gRPC seeing the same jobs, reflection, health and metrics.
A second gateway without a worker, on its own Valkey, shows queue positions, a full queue and Redis down.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status
from PIL import Image

from service.grpc_api.pb import generation_service_pb2 as pb
from service.grpc_api.pb import generation_service_pb2_grpc as pb_grpc
from tests.serving_support import (
    ROOT,
    child_env,
    free_port,
    start_process,
    stop_process,
    wait_http,
    wait_until,
)

pytestmark = pytest.mark.integration

SERVICE = "ldm_serve.v1.GenerationService"
KEY_A, KEY_B = "grpc-key-a", "grpc-key-b"
LIMITS = {
    "max_width": 256, "max_height": 256, "max_steps": 1000, "max_images": 4, "max_prompt_chars": 300,
    "max_upload_bytes": 200_000, "max_upload_pixels": 65_536, "heartbeat_interval_s": 0.5, "heartbeat_ttl_s": 5,
}
TIMEOUT = 60  # seconds for any one call; the 2-core CI box is busy


@dataclass
class Stack:
    rest: str
    stub: pb_grpc.GenerationServiceStub
    channel: grpc.Channel

    def rest_client(self, key: str | None = KEY_A) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.rest, timeout=TIMEOUT, headers=headers)


def auth(key: str = KEY_A) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


@pytest.fixture(scope="module")
def stack(integration_redis: str, model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``ldm-serve up --grpc-port`` on the integration Redis (its own prefix), API keys on."""
    logs = tmp_path_factory.mktemp("grpc-up")
    env = child_env(redis_url=integration_redis, redis_prefix="itgrpc", api_keys=f"{KEY_A},{KEY_B}",
                    batch_window_ms=300, **LIMITS)
    port, grpc_port = free_port(), free_port()
    log = logs / "up.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "up", "--port", str(port), "--grpc-port", str(grpc_port),
         "--model", str(model_path)],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
    )
    try:
        wait_until(lambda: "is up" in log.read_text() or proc.poll() is not None, 180, "ldm-serve up", 0.2)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert f"gRPC (ldm_serve.v1.GenerationService): 127.0.0.1:{grpc_port}" in log.read_text()
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            yield Stack(f"http://127.0.0.1:{port}", pb_grpc.GenerationServiceStub(channel), channel)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, timeout=TIMEOUT, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, Message):
            list(result)  # a stream fails when read
    return info.value


def details(err: grpc.RpcError) -> dict[str, Message]:
    """The google.rpc details of a failed call, by type name (ErrorInfo, BadRequest, RetryInfo, ...)."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no google.rpc.Status on {err.code()}: {err.details()}"
    found: dict[str, Message] = {}
    for any_ in status.details:
        name = any_.type_url.rsplit(".", 1)[-1]
        message = getattr(error_details_pb2, name)()
        any_.Unpack(message)
        found[name] = message
    return found


def bad_field(err: grpc.RpcError) -> str:
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    violations = details(err)["BadRequest"].field_violations
    assert len(violations) == 1 and violations[0].description == err.details()
    return violations[0].field


def watch(stub: pb_grpc.GenerationServiceStub, job_id: str, key: str = KEY_A, **kw: Any) -> list[pb.WatchJobResponse]:
    return list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id, **kw), metadata=auth(key), timeout=120))


def sse_events(c: httpx.Client, job_id: str) -> list[tuple[str, str]]:
    """``(id, event)`` of the job's SSE stream, read from the start to ``done`` (excluded)."""
    events, current = [], {}
    with c.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith(("id: ", "event: ")):
                name, _, value = line.partition(": ")
                current[name] = value
            elif not line and "event" in current:
                if current["event"] == "done":
                    return events
                events.append((current["id"], current["event"]))
                current = {}
    raise AssertionError(f"the SSE stream of {job_id} ended without done: {events}")


def png(size: tuple[int, int], mode: str = "RGB", color: Any = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_reflection_lists_the_services_and_health_follows_readiness(stack: Stack) -> None:
    db = ProtoReflectionDescriptorDatabase(stack.channel)
    services = set(db.get_services())
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    from google.protobuf.descriptor_pool import DescriptorPool

    methods = {m.name for m in DescriptorPool(db).FindServiceByName(SERVICE).methods}
    assert methods == {"Txt2Img", "Inpaint", "Img2Img", "GetJob", "WatchJob", "CancelJob", "ListModels"}
    health = health_pb2_grpc.HealthStub(stack.channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT).status == serving
    wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=TIMEOUT).status
               == serving, 30, "the service to report SERVING", 0.2)


def test_txt2img_watch_follows_the_sse_order_and_rest_sees_the_job(stack: Stack) -> None:
    metadata = {"ticket": "g-1", "tags": ["a", "b"]}
    request = pb.Txt2ImgRequest(prompt="grpc watch", n=2, width=64, height=64, steps=6, seed=41,
                                output_format=pb.OUTPUT_FORMAT_PNG, idempotency_key="grpc-watch-1")
    request.metadata.update(metadata)
    first = stack.stub.Txt2Img(request, metadata=auth(), timeout=TIMEOUT)
    assert not first.replayed and list(first.job.seeds) == [41, 42]
    job_id = first.job.id
    again = stack.stub.Txt2Img(request, metadata=auth(), timeout=TIMEOUT)
    assert again.replayed and again.job.id == job_id

    stream = watch(stack.stub, job_id)
    kinds = [m.WhichOneof("event") for m in stream]
    assert kinds[-1] == "done" and kinds.count("done") == 1
    done = stream[-1].done
    assert done.status == pb.JOB_STATUS_SUCCEEDED and [im.index for im in done.images] == [0, 1]
    steps = [(m.progress.step, m.progress.total) for m in stream if m.WhichOneof("event") == "progress"]
    assert steps and steps == sorted(steps) and steps[-1] == (done.progress.total,) * 2  # the model's step count
    statuses = [m.status.status for m in stream if m.WhichOneof("event") == "status"]
    assert statuses == [pb.JOB_STATUS_QUEUED, pb.JOB_STATUS_RUNNING, pb.JOB_STATUS_SUCCEEDED]
    images = {m.image.index: m.image for m in stream if m.WhichOneof("event") == "image"}
    assert sorted(images) == [0, 1] and images[1].seed == 42

    resumed = watch(stack.stub, job_id, after_event_id=stream[2].event_id, omit_image_data=True)  # Last-Event-ID
    assert [m.event_id for m in resumed] == [m.event_id for m in stream[3:]]
    at_end = watch(stack.stub, job_id, after_event_id=stream[-2].event_id)  # nothing after the final status
    assert [m.WhichOneof("event") for m in at_end] == ["done"] and at_end[0].done.id == job_id

    with stack.rest_client() as c:
        # the same events, in the same order, with the same ids as the REST event stream
        assert [(m.event_id, k) for m, k in zip(stream, kinds, strict=True) if k != "done"] == sse_events(c, job_id)
        view = c.get(f"/v1/jobs/{job_id}").json()
        assert view["status"] == "succeeded" and view["seeds"] == [41, 42] and view["metadata"] == metadata
        assert json_format.MessageToDict(done.metadata) == metadata
        for index, image in images.items():
            assert image.url == view["images"][index]["url"]
            assert c.get(image.url).content == image.data  # each image's bytes, as REST serves them
        # and a REST job through gRPC, with one idempotency record for both faces
        body = {"prompt": "rest then grpc", "width": 64, "height": 64, "steps": 4, "seed": 7,
                "metadata": {"from": "rest"}}
        r = c.post("/v1/txt2img", json=body, headers={"Idempotency-Key": "both-faces"})
        assert r.status_code == 202, r.text
    rest_id = r.json()["id"]
    got = stack.stub.GetJob(pb.GetJobRequest(job_id=rest_id), metadata=auth(), timeout=TIMEOUT).job
    assert got.id == rest_id and list(got.seeds) == [7] and got.parameters.prompt == "rest then grpc"
    same = pb.Txt2ImgRequest(prompt="rest then grpc", width=64, height=64, steps=4, seed=7,
                             idempotency_key="both-faces")
    same.metadata.update({"from": "rest"})
    replay = stack.stub.Txt2Img(same, metadata=auth(), timeout=TIMEOUT)
    assert replay.replayed and replay.job.id == rest_id
    same.seed = 8
    assert bad_field(rpc_error(stack.stub.Txt2Img, same, metadata=auth())) == "idempotency_key"


def test_inpaint_with_image_and_mask_bytes(stack: Stack) -> None:
    mask = png((64, 64), "L", 0)
    request = pb.InpaintRequest(prompt="grpc inpaint", steps=4, seed=3, image=png((64, 64)), mask=mask,
                                output_format=pb.OUTPUT_FORMAT_WEBP)
    job = stack.stub.Inpaint(request, metadata=auth(), timeout=TIMEOUT).job
    assert job.kind == pb.JOB_KIND_INPAINT and job.parameters.width == 64
    done = watch(stack.stub, job.id, omit_image_data=True)
    assert done[-1].done.status == pb.JOB_STATUS_SUCCEEDED
    image = next(m.image for m in done if m.WhichOneof("event") == "image")
    assert image.content_type == "image/webp" and image.data == b""
    with stack.rest_client() as c:
        assert Image.open(io.BytesIO(c.get(image.url).content)).format == "WEBP"

    def field_of(**kw: Any) -> str:
        fields = {"prompt": "bad inpaint", "image": png((64, 64)), "mask": mask, **kw}
        return bad_field(rpc_error(stack.stub.Inpaint, pb.InpaintRequest(**fields), metadata=auth()))

    assert field_of(mask=png((32, 32), "L", 0)) == "mask"  # other size, no mask_resize
    assert field_of(image=b"not an image") == "image"
    assert field_of(image=b"") == "image"
    assert field_of(width=128) == "width"
    assert field_of(image=png((64, 60))) == "image.height"
    assert field_of(image=b"\0" * 250_000) == "image"  # over max_upload_bytes, under the message limit
    err = rpc_error(stack.stub.Inpaint, pb.InpaintRequest(prompt="x", image=b"\0" * 900_000, mask=mask),
                    metadata=auth())
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own message size limit (the REST body limit)
    ok = stack.stub.Inpaint(pb.InpaintRequest(prompt="resized", steps=4, image=png((64, 64)),
                                              mask=png((32, 32), "L", 255), mask_resize=True),
                            metadata=auth(), timeout=TIMEOUT)
    assert ok.job.status in (pb.JOB_STATUS_QUEUED, pb.JOB_STATUS_RUNNING, pb.JOB_STATUS_SUCCEEDED)


def test_img2img_from_image_bytes(stack: Stack) -> None:
    request = pb.Img2ImgRequest(prompt="grpc img2img", steps=8, strength=0.5, seed=9, image=png((48, 40)),
                                width=64, height=64)
    job = stack.stub.Img2Img(request, metadata=auth(), timeout=TIMEOUT).job
    assert job.kind == pb.JOB_KIND_IMG2IMG and job.parameters.strength == 0.5
    assert (job.parameters.width, job.parameters.height) == (64, 64)  # the image scaled to cover, centre-cropped
    done = watch(stack.stub, job.id)[-1].done
    assert done.status == pb.JOB_STATUS_SUCCEEDED and len(done.images) == 1
    with stack.rest_client() as c:
        view = c.get(f"/v1/jobs/{job.id}").json()
        assert view["kind"] == "img2img" and view["parameters"]["strength"] == 0.5
        r = c.post("/v1/img2img", json={"prompt": "x", "steps": 8, "strength": 0.0, "image": "AA=="})
    err = rpc_error(stack.stub.Img2Img, pb.Img2ImgRequest(prompt="x", steps=8, strength=0.0, image=png((64, 64))),
                    metadata=auth())
    assert bad_field(err) == "strength" and r.json()["error"] == {"type": "invalid_input", "field": "strength",
                                                                    "message": err.details()}
    assert bad_field(rpc_error(stack.stub.Img2Img, pb.Img2ImgRequest(prompt="x"), metadata=auth())) == "image"
    odd = pb.Img2ImgRequest(prompt="x", image=png((60, 64)))  # no width given: the image's side must fit
    assert bad_field(rpc_error(stack.stub.Img2Img, odd, metadata=auth())) == "image.width"


# (gRPC request fields, the REST body): the same refusal, naming the same field with the same message
BAD_INPUTS = [
    ({"width": 12}, {"width": 12}),
    ({"n": 0}, {"n": 0}),
    ({"n": 5}, {"n": 5}),
    ({"steps": 5000}, {"steps": 5000}),
    ({"guidance_scale": -1.0}, {"guidance_scale": -1.0}),
    ({"eta": 2.0}, {"eta": 2.0}),
    ({"seed": -1}, {"seed": -1}),
    ({"quality": 0}, {"quality": 0}),
    ({"prompt": "x" * 301}, {"prompt": "x" * 301}),
    ({"output_format": 9}, {"output_format": "tiff"}),
    ({"webhook_events_filter": [pb.WEBHOOK_EVENT_TYPE_UNSPECIFIED]}, {"webhook_events_filter": ["nope"]}),
    ({"webhook_events_filter": [pb.WEBHOOK_EVENT_TYPE_START]}, {"webhook_events_filter": ["start"]}),
    ({"webhook": "http://127.0.0.1/hook"}, {"webhook": "http://127.0.0.1/hook"}),
    ({"idempotency_key": "k" * 256}, None),
]


@pytest.mark.parametrize(("fields", "body"), BAD_INPUTS, ids=lambda v: str(v)[:40] if isinstance(v, dict) else "")
def test_bad_inputs_are_refused_as_rest_refuses_them(stack: Stack, fields: dict, body: dict | None) -> None:
    err = rpc_error(stack.stub.Txt2Img, pb.Txt2ImgRequest(**{"prompt": "bad", **fields}), metadata=auth())
    field = bad_field(err)
    assert field.split(".")[0] in fields
    info = details(err)["ErrorInfo"]
    assert info.reason == "invalid_input" and info.domain == "ldm-serve" and info.metadata["field"] == field
    if body is not None:
        with stack.rest_client() as c:
            r = c.post("/v1/txt2img", json={"prompt": "bad", **body})
        assert r.status_code == 422 and r.json()["error"] == {"type": "invalid_input", "field": field,
                                                               "message": err.details()}, r.text


def test_deep_metadata_unknown_model_and_jobs(stack: Stack) -> None:
    deep = pb.Txt2ImgRequest(prompt="deep")
    json_format.ParseDict({"metadata": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {}}}}}}}}}}, deep)
    assert bad_field(rpc_error(stack.stub.Txt2Img, deep, metadata=auth())) == "metadata"
    err = rpc_error(stack.stub.Txt2Img, pb.Txt2ImgRequest(prompt="x", model="nope"), metadata=auth())
    assert err.code() is grpc.StatusCode.NOT_FOUND and details(err)["ErrorInfo"].reason == "unknown_model"
    assert details(err)["BadRequest"].field_violations[0].field == "model"
    for job_id in ("a" * 26, "../x", ""):
        for call, request in ((stack.stub.GetJob, pb.GetJobRequest), (stack.stub.CancelJob, pb.CancelJobRequest),
                              (stack.stub.WatchJob, pb.WatchJobRequest)):
            err = rpc_error(call, request(job_id=job_id), metadata=auth())
            assert err.code() is grpc.StatusCode.NOT_FOUND, (call, job_id, err.details())
            assert details(err)["ErrorInfo"].reason == "job_not_found"


def test_auth_and_per_key_visibility(stack: Stack) -> None:
    for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", f"Basic {KEY_A}")]):
        for call, request in ((stack.stub.Txt2Img, pb.Txt2ImgRequest(prompt="x")),
                              (stack.stub.ListModels, pb.ListModelsRequest())):
            err = rpc_error(call, request, metadata=metadata)
            assert err.code() is grpc.StatusCode.UNAUTHENTICATED and details(err)["ErrorInfo"].reason == "unauthorized"
    err = rpc_error(stack.stub.Txt2Img, pb.Txt2ImgRequest(prompt="x", priority=pb.PRIORITY_HIGH), metadata=auth())
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert details(err)["BadRequest"].field_violations[0].field == "priority"
    job = stack.stub.Txt2Img(pb.Txt2ImgRequest(prompt="mine", width=64, height=64, steps=4,
                                               priority=pb.PRIORITY_LOW), metadata=auth(), timeout=TIMEOUT).job
    assert job.parameters.priority == pb.PRIORITY_LOW
    for call, request in ((stack.stub.GetJob, pb.GetJobRequest), (stack.stub.CancelJob, pb.CancelJobRequest),
                          (stack.stub.WatchJob, pb.WatchJobRequest)):
        assert rpc_error(call, request(job_id=job.id), metadata=auth(KEY_B)).code() is grpc.StatusCode.NOT_FOUND
    with stack.rest_client(KEY_B) as c:
        assert c.get(f"/v1/jobs/{job.id}").status_code == 404
    assert watch(stack.stub, job.id)[-1].done.status == pb.JOB_STATUS_SUCCEEDED


def test_list_models_matches_rest(stack: Stack) -> None:
    models = stack.stub.ListModels(pb.ListModelsRequest(), metadata=auth(), timeout=TIMEOUT).models
    with stack.rest_client() as c:
        rest = c.get("/v1/models").json()["data"]
    assert [m.id for m in models] == [m["id"] for m in rest] == ["random-untrained"]
    got, want = models[0], rest[0]
    assert (got.untrained, got.workers, got.default_size, got.max_batch_rows) == (
        want["untrained"], want["workers"], want["default_size"], want["max_batch_rows"])
    assert list(got.constraints.refused_steps) == want["constraints"]["refused_steps"]
    assert [pb.JobKind.Name(k) for k in got.constraints.kinds] == [
        f"JOB_KIND_{k.upper()}" for k in want["constraints"]["kinds"]]


def test_cancel_inside_a_running_batch(stack: Stack) -> None:
    refused = set(stack.stub.ListModels(pb.ListModelsRequest(), metadata=auth(), timeout=TIMEOUT)
                  .models[0].constraints.refused_steps)
    steps = next(s for s in range(400, 1000) if s not in refused)  # long enough to cancel mid-run
    ids = [stack.stub.Txt2Img(pb.Txt2ImgRequest(prompt=f"long {i}", width=64, height=64, steps=steps, seed=i),
                              metadata=auth(), timeout=TIMEOUT).job.id for i in range(2)]
    get = stack.stub.GetJob

    def both_running() -> bool:
        jobs = [get(pb.GetJobRequest(job_id=i), metadata=auth(), timeout=TIMEOUT).job for i in ids]
        assert all(j.status in (pb.JOB_STATUS_QUEUED, pb.JOB_STATUS_RUNNING) for j in jobs), jobs
        running = all(j.status == pb.JOB_STATUS_RUNNING and j.progress.step > 0 for j in jobs)
        return running and jobs[0].batch["id"] == jobs[1].batch["id"]  # in one batch of the worker

    wait_until(both_running, 120, "both long jobs to run in one batch", 0.1)
    canceled = stack.stub.CancelJob(pb.CancelJobRequest(job_id=ids[0]), metadata=auth(), timeout=TIMEOUT).job
    assert canceled.cancel_requested or canceled.status == pb.JOB_STATUS_CANCELED
    final = watch(stack.stub, ids[0])[-1].done
    assert final.status == pb.JOB_STATUS_CANCELED and final.progress.step < steps
    other = get(pb.GetJobRequest(job_id=ids[1]), metadata=auth(), timeout=TIMEOUT).job
    at_cancel = other.progress.step
    assert other.status in (pb.JOB_STATUS_RUNNING, pb.JOB_STATUS_SUCCEEDED)  # the rest of the batch runs on

    def advanced() -> bool:
        job = get(pb.GetJobRequest(job_id=ids[1]), metadata=auth(), timeout=TIMEOUT).job
        return job.status == pb.JOB_STATUS_SUCCEEDED or job.progress.step > at_cancel + 5

    wait_until(advanced, 120, "the other job of the batch to go on", 0.1)
    stack.stub.CancelJob(pb.CancelJobRequest(job_id=ids[1]), metadata=auth(), timeout=TIMEOUT)
    assert watch(stack.stub, ids[1])[-1].done.status in (pb.JOB_STATUS_CANCELED, pb.JOB_STATUS_SUCCEEDED)


def test_grpc_calls_are_counted_in_the_gateway_metrics(stack: Stack) -> None:
    rpc_error(stack.stub.Txt2Img, pb.Txt2ImgRequest(prompt="x", width=12), metadata=auth())
    stack.stub.ListModels(pb.ListModelsRequest(), metadata=auth(), timeout=TIMEOUT)
    with stack.rest_client() as c:
        text = c.get("/metrics").text
    assert 'ldm_grpc_requests_total{code="INVALID_ARGUMENT",method="Txt2Img"}' in text
    assert 'ldm_grpc_requests_total{code="OK",method="ListModels"}' in text
    assert 'ldm_grpc_request_duration_seconds_count{method="WatchJob"}' in text


@pytest.fixture(scope="module")
def lonely(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[pb_grpc.GenerationServiceStub, Any, Any]]:
    """A gateway with no worker (jobs stay queued) and a queue bound of 1, on its own Valkey."""
    from ldm_serve.embedded_redis import EmbeddedRedisError, EmbeddedValkey

    logs = tmp_path_factory.mktemp("grpc-lonely")
    valkey = EmbeddedValkey(port=free_port())
    try:
        url = valkey.start()
    except EmbeddedRedisError as exc:
        pytest.skip(f"no embedded Valkey ({exc})")
    env = child_env(redis_url=url, redis_prefix="itgrpc2", default_model="ghost", max_queue_depth=1,
                    queue_full_retry_after_s=7, redis_socket_timeout_s=2, **LIMITS)
    port, grpc_port = free_port(), free_port()
    proc = start_process(["gateway", "--port", str(port), "--grpc-port", str(grpc_port)], env, logs / "gw.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60, proc, logs / "gw.log")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            yield pb_grpc.GenerationServiceStub(channel), channel, valkey
    finally:
        stop_process(proc)
        valkey.stop()


def test_queue_position_full_queue_and_redis_down(lonely: tuple) -> None:
    stub, channel, valkey = lonely
    job = stub.Txt2Img(pb.Txt2ImgRequest(prompt="waits", width=64, height=64, steps=4), timeout=TIMEOUT).job
    assert job.status == pb.JOB_STATUS_QUEUED and job.HasField("queue_position") and job.queue_position == 0
    err = rpc_error(stub.Txt2Img, pb.Txt2ImgRequest(prompt="one too many"))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    found = details(err)
    assert found["ErrorInfo"].reason == "queue_full" and found["RetryInfo"].retry_delay.seconds == 7

    events = stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=120)
    first = next(events)
    assert first.status.status == pb.JOB_STATUS_QUEUED and first.status.queue_position == 0
    stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=TIMEOUT)
    rest = list(events)
    assert [m.WhichOneof("event") for m in rest] == ["status", "done"]
    assert rest[0].status.status == rest[1].done.status == pb.JOB_STATUS_CANCELED

    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest(service=SERVICE)
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING  # no worker: /readyz says not ready too
    wait_until(lambda: health.Check(check, timeout=TIMEOUT).status == not_serving, 30, "NOT_SERVING", 0.2)
    valkey.stop()
    err = rpc_error(stub.GetJob, pb.GetJobRequest(job_id=job.id))
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    found = details(err)
    assert found["ErrorInfo"].reason == "queue_unavailable" and found["RetryInfo"].retry_delay.seconds == 1
    assert rpc_error(stub.Txt2Img, pb.Txt2ImgRequest(prompt="down")).code() is grpc.StatusCode.UNAVAILABLE
