"""The gRPC face's two mappings: errors to statuses (one table, every error class) and messages to REST
bodies and back (only the fields the client set; enums by name)."""

from __future__ import annotations

import inspect

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2

import ldm_serve.errors as errors
from ldm_serve.jobview import job_view
from service.grpc_api import convert
from service.grpc_api.errors import STATUS_CODES, status_code, to_status
from service.grpc_api.pb import generation_service_pb2 as pb
from service.grpc_api.servicer import _peer_host

HTTP_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED, 500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _error_classes() -> list[type[errors.LdmServeError]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.LdmServeError)]


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_every_error_class_has_its_status_matching_its_http_code(cls: type[errors.LdmServeError]) -> None:
    assert cls in STATUS_CODES, f"{cls.__name__}: decide its gRPC code in service/grpc_api/errors.py"
    assert STATUS_CODES[cls] is HTTP_TO_GRPC[cls.http_status]


def _details(status: grpc.Status) -> dict[str, object]:
    (key, value), = [(k, v) for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    found = {}
    for any_ in status_pb2.Status.FromString(value).details:
        name = any_.type_url.rsplit(".", 1)[-1]
        found[name] = getattr(error_details_pb2, name)()
        any_.Unpack(found[name])
    return found


def test_invalid_input_names_the_field_in_a_bad_request() -> None:
    status = to_status(errors.InvalidInput("width", "must be a multiple of 8, got 12"), "Txt2Img")
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT and status.details == "width: must be a multiple of 8, got 12"
    found = _details(status)
    assert found["ErrorInfo"].reason == "invalid_input" and found["ErrorInfo"].metadata["field"] == "width"
    (violation,) = found["BadRequest"].field_violations
    assert (violation.field, violation.description) == ("width", status.details)


def test_retryable_errors_carry_retry_info() -> None:
    full = _details(to_status(errors.QueueFull("the queue is full", retry_after_s=7), "Txt2Img"))
    assert full["RetryInfo"].retry_delay.seconds == 7 and full["ErrorInfo"].reason == "queue_full"
    limited = errors.RateLimited("requests_per_minute: ...", limit_name="requests_per_minute", limit=5, remaining=0,
                                 reset_s=30, retry_after_s=12, window_s=60)
    found = _details(to_status(limited, "Txt2Img"))
    assert found["RetryInfo"].retry_delay.seconds == 12
    assert found["QuotaFailure"].violations[0].subject == "requests_per_minute"
    down = to_status(errors.QueueUnavailable("Redis is unreachable"), "GetJob")
    assert down.code is grpc.StatusCode.UNAVAILABLE and _details(down)["RetryInfo"].retry_delay.seconds == 1
    assert status_code(errors.UnknownModel("model", "x")) is grpc.StatusCode.NOT_FOUND


def test_a_bug_is_internal_with_a_request_id_and_no_exception_text(caplog: pytest.LogCaptureFixture) -> None:
    status = to_status(KeyError("secret detail"), "GetJob")
    assert status.code is grpc.StatusCode.INTERNAL and "secret" not in status.details
    request_id = _details(status)["RequestInfo"].request_id
    assert request_id and request_id in caplog.text and "secret detail" in caplog.text


def test_request_body_holds_only_what_the_client_set() -> None:
    assert convert.request_body(pb.Txt2ImgRequest(prompt="p")) == {"prompt": "p", "negative_prompt": ""}
    message = pb.Txt2ImgRequest(
        prompt="p", n=0, seed=5, guidance_scale=0.0, priority=pb.PRIORITY_LOW, output_format=pb.OUTPUT_FORMAT_UNSPECIFIED,
        webhook_events_filter=[pb.WEBHOOK_EVENT_TYPE_START, pb.WEBHOOK_EVENT_TYPE_UNSPECIFIED], idempotency_key="k",
    )
    message.metadata.update({"a": "b"})
    body = convert.request_body(message)
    assert body == {"prompt": "p", "negative_prompt": "", "n": 0, "seed": 5, "guidance_scale": 0.0, "priority": "low",
                    "webhook_events_filter": ["start", "unspecified"], "metadata": {"a": "b"}}
    assert convert.request_body(pb.Txt2ImgRequest(output_format=7))["output_format"] == 7  # for the schema to refuse
    inpaint = convert.request_body(pb.InpaintRequest(prompt="p", image=b"x", mask=b"y", mask_resize=True))
    assert "image" not in inpaint and inpaint["mask_resize"] is True


def test_job_message_mirrors_the_rest_view() -> None:
    payload = (
        '{"v":1,"job_id":"aaaaaaaaaaaaaaaaaaaaaaaaaa","kind":"inpaint","model":"m","prompt":"p","n":2,"width":64,'
        '"height":64,"steps":4,"guidance_scale":3.0,"seeds":[1,2],"output_format":"webp","priority":"high",'
        '"metadata":{"k":[1,"x"]},"webhook":{"url":"https://h/x","events":["completed"]},"created_at":1.5}'
    )
    rec = {"payload": payload, "status": "failed", "created_at": "1.5", "finished_at": "3.25", "step": "2",
           "total": "4", "image:1": "1", "error": '{"type": "worker_lost", "message": "gone"}',
           "batch": '{"id": "b", "rows": 2}', "warnings": '["truncated"]'}
    view = job_view(rec, webhook_attempts=[{"attempt": 1, "status": 500}])
    job = convert.job_message(view)
    assert (job.id, job.kind, job.status) == ("a" * 26, pb.JOB_KIND_INPAINT, pb.JOB_STATUS_FAILED)
    assert (job.created_at.seconds, job.created_at.nanos) == (1, 500_000_000) and not job.HasField("started_at")
    assert (job.progress.step, job.progress.total, job.progress.fraction) == (2, 4, 0.5)
    assert not job.HasField("queue_position") and list(job.seeds) == [1, 2] and list(job.warnings) == ["truncated"]
    assert (job.error.type, job.error.message) == ("worker_lost", "gone")
    assert job.parameters.output_format == pb.OUTPUT_FORMAT_WEBP and job.parameters.priority == pb.PRIORITY_HIGH
    assert [(i.index, i.seed, i.content_type) for i in job.images] == [(1, 2, "image/webp")]
    assert job.images[0].url == view["images"][0]["url"] and job.links.events_url == view["links"]["events"]
    assert dict(job.batch) == {"id": "b", "rows": 2.0}
    assert job.metadata["k"] == struct_pb2.ListValue(values=[struct_pb2.Value(number_value=1),
                                                              struct_pb2.Value(string_value="x")])
    assert job.webhook.url == "https://h/x" and list(job.webhook.events) == [pb.WEBHOOK_EVENT_TYPE_COMPLETED]
    assert job.webhook.deliveries[0]["status"] == 500


@pytest.mark.parametrize(
    ("peer", "host"),
    [("ipv4:127.0.0.1:5000", "127.0.0.1"), ("ipv6:[::1]:5000", "::1"), ("unix:/tmp/s", "/tmp/s"), ("", None)],
)
def test_the_quota_subject_of_an_anonymous_caller_is_its_address(peer: str, host: str | None) -> None:
    assert _peer_host(peer) == host
