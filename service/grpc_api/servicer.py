"""``ldm_serve.v1.GenerationService``: the gRPC face of the gateway, over the REST face's own code.

Each RPC does what its REST route does, through the same functions: the caller from the
``authorization`` metadata (:func:`service.deps.current_caller`), the request validated by the
REST schema (:mod:`service.grpc_api.convert`), the job queued by :func:`service.submission.submit_job`,
jobs read through :meth:`service.deps.Gateway.visible_job` (per-key visibility) and shown as
:func:`service.routes.jobs.public_job` shows them, events read by :func:`service.streams.event_batches`.
Every failure ends the RPC at one place, :func:`service.grpc_api.errors.to_status`.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from ldm_serve.api_keys import Caller
from ldm_serve.contract import GenerationPayload, JobKind, JobStatus
from ldm_serve.errors import InvalidInput
from ldm_serve.jobview import image_url
from service.deps import Gateway, current_caller, subject_of
from service.grpc_api import convert
from service.grpc_api.errors import to_status
from service.grpc_api.pb import generation_service_pb2 as pb
from service.grpc_api.pb import generation_service_pb2_grpc as pb_grpc
from service.routes.jobs import public_job
from service.routes.system import model_entries
from service.streams import event_batches, is_terminal_event
from service.submission import Uploads, img2img_inputs, inpaint_inputs, load_uploads, submit_job, validate

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
WATCH_POLL_MS = 2000  # how often WatchJob re-reads a queued job's position while nothing happens


def _observed(method: Callable[..., Any]) -> Callable[..., Any]:
    """Count the RPC by method and status code, and turn any exception into its gRPC status."""
    name = method.__name__

    async def fail(context: grpc.aio.ServicerContext, exc: Exception) -> None:
        status = to_status(exc, name)
        context.set_code(status.code)  # read back by GenerationServicer.count
        await context.abort(status.code, status.details, status.trailing_metadata)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: GenerationServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - the one error boundary of the gRPC face
                await fail(context, exc)
            finally:
                self.count(name, context, t0)

        return stream

    @functools.wraps(method)
    async def unary(self: GenerationServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        t0 = time.perf_counter()
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the one error boundary of the gRPC face
            await fail(context, exc)
        finally:
            self.count(name, context, t0)

    return unary


def _peer_host(peer: str) -> str | None:
    """``ipv4:127.0.0.1:5000`` -> ``127.0.0.1``; ``ipv6:[::1]:5000`` -> ``::1``."""
    _, _, address = peer.partition(":")
    host = address.rsplit(":", 1)[0] if ":" in address else address  # without the port
    return host.strip("[]") or None


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """The RPCs of ``ldm_serve.v1.GenerationService`` on one :class:`~service.deps.Gateway`."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def count(self, method: str, context: grpc.aio.ServicerContext, t0: float) -> None:
        code = context.code()
        if code is None:  # not set: OK, unless the task was cancelled (the client went away)
            code = grpc.StatusCode.CANCELLED if context.cancelled() else grpc.StatusCode.OK
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        self.gw.metrics.grpc_requests.labels(method, name).inc()
        self.gw.metrics.grpc_request_seconds.labels(method).observe(time.perf_counter() - t0)

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        metadata = dict(context.invocation_metadata() or ())
        return current_caller(self.gw, metadata.get("authorization"))

    async def _submit(self, request: Any, kind: JobKind, schema: Any, context: grpc.aio.ServicerContext,
                      check: Callable[..., Awaitable[Uploads]] | None = None) -> tuple[pb.Job, bool]:
        caller = self.caller(context)
        req = validate(schema, convert.request_body(request))
        inputs = None
        if check is not None:
            for name in kind.inputs:
                if not getattr(request, name):
                    raise InvalidInput(name, "is empty: send the PNG / JPEG / WebP bytes")
            images = await load_uploads(self.gw, {name: getattr(request, name) for name in kind.inputs})
            inputs = await check(self.gw, req, images)
        key = request.idempotency_key if request.HasField("idempotency_key") else None
        subject = subject_of(caller, _peer_host(context.peer()))
        sub = await submit_job(self.gw, req, kind, caller, subject, key, inputs, key_field="idempotency_key")
        return await self._job(sub.job_id), not sub.created

    async def _job(self, job_id: str, rec: dict[str, str] | None = None) -> pb.Job:
        rec = rec if rec is not None else await self.gw.call(self.gw.store.get, job_id)
        return convert.job_message(await public_job(self.gw, job_id, rec))

    @_observed
    async def Txt2Img(self, request: pb.Txt2ImgRequest, context: grpc.aio.ServicerContext) -> pb.Txt2ImgResponse:
        job, replayed = await self._submit(request, JobKind.TXT2IMG, self.gw.schemas.Txt2ImgRequest, context)
        return pb.Txt2ImgResponse(job=job, replayed=replayed)

    @_observed
    async def Inpaint(self, request: pb.InpaintRequest, context: grpc.aio.ServicerContext) -> pb.InpaintResponse:
        job, replayed = await self._submit(request, JobKind.INPAINT, self.gw.schemas.InpaintForm, context,
                                           inpaint_inputs)
        return pb.InpaintResponse(job=job, replayed=replayed)

    @_observed
    async def Img2Img(self, request: pb.Img2ImgRequest, context: grpc.aio.ServicerContext) -> pb.Img2ImgResponse:
        job, replayed = await self._submit(request, JobKind.IMG2IMG, self.gw.schemas.Img2ImgForm, context,
                                           img2img_inputs)
        return pb.Img2ImgResponse(job=job, replayed=replayed)

    @_observed
    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.GetJobResponse:
        rec = await self.gw.visible_job(request.job_id, self.caller(context).owner)
        return pb.GetJobResponse(job=await self._job(request.job_id, rec))

    @_observed
    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.CancelJobResponse:
        await self.gw.visible_job(request.job_id, self.caller(context).owner)
        await self.gw.call(self.gw.store.cancel, request.job_id)
        return pb.CancelJobResponse(job=await self._job(request.job_id))

    @_observed
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        self.caller(context)
        workers = await self.gw.call(self.gw.store.live_workers)
        return pb.ListModelsResponse(models=[convert.model_message(m) for m in model_entries(workers)])

    @_observed
    async def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchJobResponse]:
        gw, job_id = self.gw, request.job_id
        rec = await gw.visible_job(job_id, self.caller(context).owner)
        payload = GenerationPayload.model_validate_json(rec["payload"])
        position, idle_and_ended = None, 0
        async for batch in event_batches(gw, job_id, request.after_event_id or None, WATCH_POLL_MS):
            if not batch:
                rec = await gw.call(gw.store.get, job_id)
                if JobStatus(rec["status"]).terminal:
                    # ended with nothing left to read twice in a row (its end lies before after_event_id)
                    idle_and_ended += 1
                    if idle_and_ended == 2:
                        yield pb.WatchJobResponse(done=await self._job(job_id, rec))
                        return
                now = await self._position(job_id, rec)
                if now is not None and now != position:
                    position = now
                    yield pb.WatchJobResponse(progress=pb.ProgressEvent(queue_position=now))
            for entry_id, type_, data in batch:
                if type_ == "status":
                    status = data["status"]
                    event = pb.StatusEvent(
                        status=convert.enum_number(pb.JobStatus.DESCRIPTOR, status),
                        error=convert.job_error(data.get("error")),
                    )
                    if status == JobStatus.QUEUED.value:
                        position = await self._position(job_id, await gw.call(gw.store.get, job_id))
                        if position is not None:
                            event.queue_position = position
                    yield pb.WatchJobResponse(event_id=entry_id, status=event)
                elif type_ == "progress":
                    progress = pb.ProgressEvent(step=data["step"], total=data["total"])
                    yield pb.WatchJobResponse(event_id=entry_id, progress=progress)
                elif type_ == "image":
                    yield pb.WatchJobResponse(event_id=entry_id, image=await self._image(payload, data["index"],
                                                                                          request.omit_image_data))
                if is_terminal_event(type_, data):
                    yield pb.WatchJobResponse(done=await self._job(job_id))
                    return

    async def _position(self, job_id: str, rec: dict[str, str]) -> int | None:
        """The queue position of a job while it is queued."""
        if rec["status"] != JobStatus.QUEUED.value:
            return None
        return await self.gw.call(self.gw.store.queue_position, job_id, rec["model"], rec["priority"])

    async def _image(self, payload: GenerationPayload, index: int, omit_data: bool) -> pb.ImageEvent:
        gw = self.gw
        data = b"" if omit_data else (await gw.call(gw.results.get_image, payload.job_id, index) or b"")
        return pb.ImageEvent(
            index=index,
            seed=payload.seeds[index],
            content_type=payload.output_format.content_type,
            url=image_url(payload.job_id, index, gw.signer),
            data=data,
        )
