"""The one mapping from :mod:`ldm_serve.errors` to gRPC statuses (the gRPC face's error boundary).

REST maps the same classes to HTTP codes in :func:`service.app.error_response`; this table is
its gRPC counterpart. Every status carries ``google.rpc.Status`` details (the
``grpc-status-details-bin`` trailer, read with ``grpc_status.rpc_status.from_call``):

* always an ``ErrorInfo`` whose ``reason`` is the REST ``error.type`` (``invalid_input``,
  ``queue_full``, ...) in the domain ``ldm-serve``;
* a ``BadRequest`` naming the field and the limit for an invalid input (and a refused one);
* a ``RetryInfo`` when retrying later can succeed (queue full, quota spent, Redis down), and a
  ``QuotaFailure`` naming the spent quota;
* a ``RequestInfo`` with the request id of an internal error (logged with its traceback).
"""

from __future__ import annotations

import logging
import uuid

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ldm_serve.errors import (
    CheckpointError,
    ConfigError,
    Forbidden,
    InternalError,
    InvalidInput,
    JobFailed,
    JobNotFound,
    LdmServeError,
    ModelError,
    PayloadTooLarge,
    QueueFull,
    QueueUnavailable,
    RateLimited,
    ResultNotReady,
    TokenizerFilesMissing,
    Unauthorized,
    UnknownModel,
    UnsupportedMediaType,
    WaitTimeout,
    WebhookVerificationError,
)

log = logging.getLogger("ldm_serve.gateway.grpc")

DOMAIN = "ldm-serve"
UNAVAILABLE_RETRY_S = 1  # as REST's Retry-After for a 503

STATUS_CODES: dict[type[LdmServeError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,  # 422
    UnknownModel: grpc.StatusCode.NOT_FOUND,  # 404
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,  # 413; what gRPC itself answers to an oversize message
    UnsupportedMediaType: grpc.StatusCode.INVALID_ARGUMENT,  # 415
    WebhookVerificationError: grpc.StatusCode.INVALID_ARGUMENT,  # 400
    JobNotFound: grpc.StatusCode.NOT_FOUND,  # 404
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,  # 429
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,  # 429
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,  # 403
    QueueUnavailable: grpc.StatusCode.UNAVAILABLE,  # 503
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,  # 401
    ResultNotReady: grpc.StatusCode.FAILED_PRECONDITION,  # 409
    ModelError: grpc.StatusCode.INTERNAL,  # 500
    ConfigError: grpc.StatusCode.INTERNAL,
    CheckpointError: grpc.StatusCode.INTERNAL,
    TokenizerFilesMissing: grpc.StatusCode.INTERNAL,
    InternalError: grpc.StatusCode.INTERNAL,  # 500
    WaitTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,  # 504 (synchronous OpenAI routes; no RPC waits)
    JobFailed: grpc.StatusCode.INTERNAL,  # 500 (a waited-on job ended failed/canceled/expired)
    LdmServeError: grpc.StatusCode.INTERNAL,
}
"""Every class of :mod:`ldm_serve.errors` (a unit test keeps it complete), with the REST code it matches."""


def status_code(exc: LdmServeError) -> grpc.StatusCode:
    """The gRPC code of an error: its own class's entry, else the nearest base class's."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _retry(seconds: int) -> error_details_pb2.RetryInfo:
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds))


def _details(exc: LdmServeError) -> list[Message]:
    info = error_details_pb2.ErrorInfo(reason=exc.code, domain=DOMAIN)
    details: list[Message] = [info]
    field = getattr(exc, "field", None)
    if isinstance(exc, InvalidInput | Forbidden) and field:
        info.metadata["field"] = field
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=str(exc))
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if isinstance(exc, QueueFull):
        details.append(_retry(exc.retry_after_s))
    elif isinstance(exc, RateLimited):
        info.metadata["limit"] = exc.limit_name
        details.append(_retry(exc.retry_after_s))
        violation = error_details_pb2.QuotaFailure.Violation(subject=exc.limit_name, description=str(exc))
        details.append(error_details_pb2.QuotaFailure(violations=[violation]))
    elif isinstance(exc, QueueUnavailable):
        details.append(_retry(UNAVAILABLE_RETRY_S))
    return details


def to_status(exc: BaseException, method: str) -> grpc.Status:
    """The status a failed RPC ends with. Anything but an expected :class:`LdmServeError` is an internal
    error: logged with its traceback under a request id that the client gets (never the exception's text,
    unless it is our own :class:`InternalError`)."""
    if isinstance(exc, LdmServeError) and not isinstance(exc, InternalError):
        error, extra = exc, []
    else:
        request_id = uuid.uuid4().hex
        log.error("internal error (request id %s) in %s", request_id, method, exc_info=exc)
        error = exc if isinstance(exc, InternalError) else InternalError(
            "the server failed to process the request; quote the request id when reporting it"
        )
        extra = [error_details_pb2.RequestInfo(request_id=request_id)]
    code = status_code(error)
    message = str(error)
    status = status_pb2.Status(
        code=code.value[0], message=message, details=[_pack(d) for d in [*_details(error), *extra]]
    )
    return rpc_status.to_status(status)
