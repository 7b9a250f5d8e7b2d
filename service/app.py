"""The FastAPI gateway: REST + SSE in front of Redis/RQ. Never imports torch.

``create_app(settings)`` builds an app bound to one settings object; nothing is
read from the environment here. ``ldm_serve.errors`` are mapped to HTTP status
codes by exactly one exception handler (:func:`error_response`), which renders the
native error body, or OpenAI's error envelope under ``/v1/images/`` (same codes, but 400 for 422).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from ldm_serve.api_keys import load_keyring
from ldm_serve.errors import (
    InternalError,
    InvalidInput,
    JobFailed,
    LdmServeError,
    PayloadTooLarge,
    QueueFull,
    QueueUnavailable,
    RateLimited,
    Unauthorized,
    WaitTimeout,
)
from ldm_serve.jobstore import JobStore, connect
from ldm_serve.quotas import QuotaLimiter
from ldm_serve.results import RedisResultStore
from ldm_serve.settings import Settings
from ldm_serve.signed_urls import url_signer
from service import playground
from service.admission import rate_limit_headers
from service.bodies import BodyLimitMiddleware, body_limit
from service.deps import Gateway
from service.metrics import GatewayMetrics
from service.routes import generate, jobs, openai_images, system
from service.schemas import build_schemas
from service.streams import KEEPALIVE_MS

log = logging.getLogger("ldm_serve.gateway")

OPENAI_PATH_PREFIX = "/v1/images/"  # the OpenAI-compatible face (service/routes/openai_images.py)
CLIENT_CLOSED_REQUEST = 499  # nginx's code for a client that hung up before the answer
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


# OpenAI answers a bad parameter with 400 (the client's BadRequestError), where the native API says 422
OPENAI_STATUS = {422: 400}
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 429: "rate_limit_error"}


def openai_error(exc: LdmServeError, body: dict[str, object]) -> dict[str, object]:
    """OpenAI's error object for ``exc``: ``message``, ``type`` (OpenAI's class of error), ``param``
    (the field, when one is at fault) and ``code`` (ldm-serve's own error code), plus the native
    body's other keys (``job_id``, ``request_id``, ``limit``)."""
    status = exc.http_status
    kind = "server_error" if status >= 500 else _OPENAI_TYPES.get(status, "invalid_request_error")
    rest = {k: v for k, v in body.items() if k not in ("type", "field", "message")}
    return {"message": str(exc), "type": kind, "param": getattr(exc, "field", None), "code": exc.code, **rest}


def error_response(exc: LdmServeError, request_id: str | None = None, path: str = "") -> JSONResponse:
    """The one mapping from ``ldm_serve.errors`` to an HTTP response (``request_id``: an internal
    error's id, in the body and the ``X-Request-ID`` header, as logged with its traceback). Under
    ``/v1/images/`` (``path``) the body is OpenAI's error envelope (:func:`openai_error`)."""
    headers: dict[str, str] = {}
    body = exc.to_dict()
    if request_id is not None:
        body["request_id"] = request_id
        headers[REQUEST_ID_HEADER] = request_id
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, QueueUnavailable):
        headers["Retry-After"] = "1"
    elif isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(exc, PayloadTooLarge):
        headers["Connection"] = "close"  # stop reading the rest of the body: the server closes after answering
    elif isinstance(exc, RateLimited):
        headers.update(rate_limit_headers(exc))
    elif isinstance(exc, WaitTimeout | JobFailed):
        headers["Location"] = f"/v1/jobs/{exc.job_id}"
        headers["X-Should-Retry"] = "false"  # the job was queued: the OpenAI client must not queue another
    status = exc.http_status
    if path.startswith(OPENAI_PATH_PREFIX):
        body = openai_error(exc, body)
        status = OPENAI_STATUS.get(status, status)
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _reject(exc: LdmServeError) -> Any:
    """The body-limit middleware's answer (413) as an ASGI app, rendered for the request's path."""

    async def answer(scope: Any, receive: Any, send: Any) -> None:
        await error_response(exc, path=scope.get("path", ""))(scope, receive, send)

    return answer


def request_id_of(request: Request) -> str:
    """The client's ``X-Request-ID`` when it is a short token, else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def internal_error_response(request: Request, exc: BaseException) -> JSONResponse:
    """A 500 for a bug (an :class:`InternalError` or any exception nobody translated): the traceback is
    logged under a request id that the client gets back; the client never sees the exception's text
    unless it is our own :class:`InternalError` message."""
    request_id = request_id_of(request)
    log.error(
        "internal error (request id %s) on %s %s", request_id, request.method, request.url.path, exc_info=exc
    )
    error = exc if isinstance(exc, InternalError) else InternalError(
        "the server failed to process the request; quote the request id when reporting it"
    )
    return error_response(error, request_id, request.url.path)


async def _handle_ldm_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, InternalError) or not isinstance(exc, LdmServeError):
        return internal_error_response(request, exc)
    return error_response(exc, path=request.url.path)


async def _handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own parameter validation (path/query/header) in the same error shape."""
    assert isinstance(exc, RequestValidationError)
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query", "header")]
    error = InvalidInput(".".join(loc) or "request", err.get("msg", "invalid"))
    return error_response(error, path=request.url.path)


async def _handle_client_disconnect(request: Request, _exc: Exception) -> JSONResponse:
    """A client that hangs up mid-body is routine: one info line, no traceback (nobody reads the answer)."""
    log.info("client disconnected before sending the whole body: %s %s", request.method, request.url.path)
    error = InvalidInput("body", "the client disconnected before sending the whole body")
    response = error_response(error, path=request.url.path)
    response.status_code = CLIENT_CLOSED_REQUEST  # counted apart from bad input in ldm_http_requests_total
    return response


async def _reap_forever(gw: Gateway) -> None:
    """Recover jobs of dead workers even when no other worker is idle to do it."""
    while True:
        await asyncio.sleep(gw.settings.reap_interval_s)
        with contextlib.suppress(LdmServeError):
            recovered = await run_in_threadpool(gw.store.recover_dead_workers)
            if recovered:
                log.warning("recovered %d job(s) of dead workers", len(recovered))


def _openapi_with_bodies(app: FastAPI, gw_schemas: Any) -> dict[str, Any]:
    """OpenAPI document including the request bodies (validated by hand for uniform errors)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema(
        [(gw_schemas.Txt2ImgRequest, "validation"), (gw_schemas.InpaintRequest, "validation"),
         (gw_schemas.InpaintForm, "validation"), (gw_schemas.Img2ImgRequest, "validation"),
         (gw_schemas.Img2ImgForm, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    ref = "#/components/schemas/{}".format
    doc["paths"]["/v1/txt2img"]["post"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": ref("Txt2ImgRequest")}}},
    }
    for path, name, files in (("/v1/inpaint", "Inpaint", ("image", "mask")), ("/v1/img2img", "Img2Img", ("image",))):
        # the form's own fields plus the files (an allOf with the form's additionalProperties: false
        # would forbid the files and make the schema unsatisfiable)
        fields = defs["$defs"][f"{name}Form"]
        binary = {f: {"type": "string", "format": "binary"} for f in files}
        form = {**fields, "properties": {**fields["properties"], **binary},
                "required": [*fields.get("required", []), *files]}
        doc["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": ref(f"{name}Request")}},
                "multipart/form-data": {"schema": form},
            },
        }
    _document_responses(doc)
    app.openapi_schema = doc
    return doc


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {
                "type": {"type": "string", "description": "machine-readable code (invalid_input, queue_full, ...)"},
                "message": {"type": "string", "description": "what is wrong, naming the field and the limit"},
                "field": {"type": "string", "description": "the offending field (invalid_input only)"},
                "request_id": {"type": "string", "description": "internal_error only: the id it is logged under"},
                "param": {"type": ["string", "null"], "description": "/v1/images/ (OpenAI's envelope): the field"},
                "code": {"type": "string", "description": "/v1/images/ (OpenAI's envelope): the error code"},
                "job_id": {"type": "string", "description": "wait_timeout, job_failed: the job, to poll"},
            },
        }
    },
}
_ERRORS = {
    "400": "Malformed request",
    "401": "API keys are on and the request has no valid key",
    "403": "The key may not do this",
    "404": "No such job (or not yours), or no worker serves the model",
    "409": "The image is not (yet) stored",
    "413": "The body exceeds the request limit",
    "415": "Unsupported Content-Type",
    "422": "A field is out of range; `error.field` names it",
    "429": "Queue full or over a limit; retry after `Retry-After` seconds",
    "500": "Internal error, logged under `error.request_id` (also in `X-Request-ID`)",
    "503": "Redis is unreachable or no worker has registered",
}


def _document_responses(doc: dict[str, Any]) -> None:
    """Document every response the gateway gives, in the error shape of :func:`error_response`
    (FastAPI's default 422 schema is not what the gateway answers)."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Error"] = _ERROR_SCHEMA
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    retry_after = {"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1}}}
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            if path.startswith("/v1/"):
                for code, text in _ERRORS.items():
                    # keep a route's own description and headers; the body is always the error shape
                    responses.setdefault(code, {"description": text})["content"] = error
                for code in ("429", "503"):
                    responses[code].setdefault("headers", {}).update(retry_after)
            if method == "post" and path in ("/v1/txt2img", "/v1/inpaint", "/v1/img2img"):
                responses["200"] = {"description": "Finished within `Prefer: wait`",
                                    "content": {"application/json": {"schema": {}}}}
            if path.startswith(OPENAI_PATH_PREFIX):
                for native, openai_code in OPENAI_STATUS.items():
                    responses[str(openai_code)] = {"description": "A field is out of range; `error.param` names it",
                                                   "content": error}
                    responses.pop(str(native), None)
                responses["504"] = {"description": "Not done within openai_wait_s; `error.job_id` names the job",
                                    "content": error}
                responses["200"] = {"description": "OpenAI's ImagesResponse: `created`, `data[].b64_json` or `.url`",
                                    "content": {"application/json": {"schema": {}}}}
            if path.endswith("/cancel"):
                responses["202"] = {"description": "The worker was asked to drop the running job",
                                    "content": {"application/json": {"schema": {}}}}
            if path.endswith("/events"):
                responses["200"]["content"] = {"text/event-stream": {"itemSchema": {
                    "type": "object", "required": ["data"], "properties": {
                        "event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}}}}}
            if path == "/readyz":
                responses["503"] = {"description": "Not ready (`reason` says why)",
                                    "content": {"application/json": {"schema": {}}}}
            if path == "/metrics":
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}


def create_app(settings: Settings) -> FastAPI:
    """Build the gateway for ``settings``."""
    schemas = build_schemas(settings)
    metrics = GatewayMetrics()
    keyring = load_keyring(settings)  # a bad keys file stops the gateway at start-up

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        conn = connect(settings)
        store = JobStore(conn, settings)
        # Blocking XREADs (SSE keep-alive, Prefer: wait) must end before the socket times out;
        # redis-py's default async read timeout (5 s) would cut every longer wait.
        aredis = aioredis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=2.0,
            socket_timeout=max(settings.max_wait_s, KEEPALIVE_MS / 1000) + settings.redis_socket_timeout_s,
            health_check_interval=10,
        )
        gw = Gateway(
            settings, store, aredis, RedisResultStore(conn, store.keys), schemas, metrics,
            keyring=keyring, limiter=QuotaLimiter(conn, store.keys), signer=url_signer(settings),
        )
        app.state.gateway = gw
        reaper = asyncio.create_task(_reap_forever(gw))
        grpc_server = None
        if settings.grpc_port is not None:  # the gRPC face, on this event loop (service/grpc_api/server.py)
            from service.grpc_api.server import start_grpc_server

            grpc_server = await start_grpc_server(gw, settings.host, settings.grpc_port)
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop()
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            await aredis.aclose()
            conn.close()

    app = FastAPI(
        title="ldm-serve",
        version="0.1.0",
        description="Latent Diffusion inference: queue jobs, poll or stream them, fetch images.",
        lifespan=lifespan,
    )
    app.add_exception_handler(LdmServeError, _handle_ldm_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(ClientDisconnect, _handle_client_disconnect)
    # Innermost middleware: an oversize body raises PayloadTooLarge inside the route (-> 413).
    app.add_middleware(BodyLimitMiddleware, limit_for=lambda path: body_limit(settings, path), reject=_reject)

    @app.middleware("http")
    async def internal_errors(request: Request, call_next: Any) -> Any:
        """Any exception that escaped the routes and handlers: a logged 500 with a request id."""
        try:
            return await call_next(request)
        except Exception as exc:  # noqa: BLE001 - the last resort; everything expected is an LdmServeError
            return internal_error_response(request, exc)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Any:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        metrics.requests.labels(template, request.method, str(response.status_code)).inc()
        metrics.request_seconds.labels(template, request.method).observe(time.perf_counter() - t0)
        return response

    if settings.cors_origin_list:  # outermost, so that error answers carry CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Prefer", "Last-Event-ID"],
            expose_headers=["Location", "Retry-After", "Idempotent-Replayed", "Preference-Applied"],
            max_age=600,
        )
    app.include_router(generate.router)
    app.include_router(jobs.router)
    app.include_router(system.router)
    app.include_router(openai_images.router)
    if settings.playground:
        app.include_router(playground.router)
    app.openapi = lambda: _openapi_with_bodies(app, schemas)  # type: ignore[method-assign]
    return app
