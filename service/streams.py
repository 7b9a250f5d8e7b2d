"""Reading a job's event stream: server-sent events and ``Prefer: wait``.

The worker appends ``status`` / ``progress`` / ``image`` entries to the job's Redis
stream; stream ids give a total order, and ``Last-Event-ID`` resumes a stream. While the
job is queued the SSE stream also sends ``queue`` events (``{"position": n}``, 0-based, jobs
ahead of this one) whenever the position changes; they carry no id (they are not stream entries).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ldm_serve.contract import TERMINAL_STATUSES, EventType
from ldm_serve.errors import QueueUnavailable
from service.deps import Gateway, translate_async_redis

KEEPALIVE_MS = 15_000
QUEUE_POLL_MS = 1_000  # how often a queued job's SSE stream re-reads its queue position
QUEUE_POLL_MS = 1_000  # how often a queued job's SSE stream re-reads its queue position


def _decode(fields: dict[bytes, bytes]) -> tuple[str, dict[str, Any]]:
    return fields[b"type"].decode(), json.loads(fields[b"data"])


def is_terminal_event(type_: str, data: dict[str, Any]) -> bool:
    return type_ == EventType.STATUS.value and data.get("status") in TERMINAL_STATUSES


async def wait_for_terminal(gw: Gateway, job_id: str, timeout_s: float) -> bool:
    """Block up to ``timeout_s`` until the job reaches a terminal status; True if it did."""
    key = gw.store.keys.events(job_id)
    last = "0"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return False
            # in slices no longer than an SSE keep-alive: the async client's socket timeout is sized for those
            res = await gw.aredis.xread({key: last}, block=min(left_ms, KEEPALIVE_MS), count=200)
            for _stream, entries in res or []:
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    if is_terminal_event(*_decode(fields)):
                        return True
    except Exception as exc:  # noqa: BLE001 - translated, then re-raised
        raise translate_async_redis(exc) from exc


async def event_batches(
    gw: Gateway, job_id: str, after: str | None, block_ms: int | Callable[[], int]
) -> AsyncIterator[list[tuple[str, str, dict[str, Any]]]]:
    """The job's stream entries after ``after`` (a stream id; None: from the start), as
    ``(id, type, data)`` batches; an empty batch after each ``block_ms`` without news
    (a callable ``block_ms`` is asked before every read: the SSE stream polls faster while queued).

    Never ends by itself: the reader stops after the terminal status event
    (:func:`is_terminal_event`). A Redis connectivity error raises QueueUnavailable.
    Shared by the SSE stream and the gRPC ``WatchJob``.
    """
    key = gw.store.keys.events(job_id)
    last = after or "0"
    while True:
        try:
            block = block_ms() if callable(block_ms) else block_ms
            res = await gw.aredis.xread({key: last}, block=block, count=200)
        except Exception as exc:  # noqa: BLE001 - translated, then re-raised
            raise translate_async_redis(exc) from exc
        batch = []
        for _stream, entries in res or []:
            for entry_id, fields in entries:
                last = entry_id.decode()
                batch.append((last, *_decode(fields)))
        yield batch


async def sse_stream(
    gw: Gateway,
    job_id: str,
    last_event_id: str | None,
    is_disconnected: Callable[[], Awaitable[bool]],
    final_view: Callable[[], Awaitable[dict[str, Any]]],
    queue_position: Callable[[], Awaitable[int | None]] | None = None,
) -> AsyncIterator[str]:
    """SSE frames for every stream entry after ``last_event_id``; ends with a ``done`` event.

    ``queue_position``: the job's position while it is queued (None once it is not); polled
    every :data:`QUEUE_POLL_MS` until the job leaves the queue, and sent as ``queue`` events.
    """
    queued = queue_position is not None
    position: int | None = None
    sent = time.monotonic()
    yield "retry: 2000\n\n"
    if await is_disconnected():
        return
    try:
        def block() -> int:  # asked before every read: poll the position while queued
            return QUEUE_POLL_MS if queued else KEEPALIVE_MS

        async for batch in event_batches(gw, job_id, last_event_id, block):
            for entry_id, type_, data in batch:
                sent = time.monotonic()
                yield f"id: {entry_id}\nevent: {type_}\ndata: {json.dumps(data)}\n\n"
                if type_ == EventType.STATUS.value and data.get("status") != "queued":
                    queued = False
                if is_terminal_event(type_, data):
                    yield f"event: done\ndata: {json.dumps(await final_view())}\n\n"
                    return
            if queued and queue_position is not None:
                with contextlib.suppress(QueueUnavailable):  # a Redis blip: try again next round
                    now = await queue_position()
                    queued = now is not None
                    if now is not None and now != position:
                        position, sent = now, time.monotonic()
                        yield f"event: queue\ndata: {json.dumps({'position': now})}\n\n"
            if time.monotonic() - sent >= KEEPALIVE_MS / 1000 - 0.5:
                sent = time.monotonic()
                yield ": keep-alive\n\n"
            if await is_disconnected():
                return
    except Exception as exc:  # noqa: BLE001 - the stream ends; the client may reconnect with Last-Event-ID
        err = translate_async_redis(exc)
        yield f"event: error\ndata: {json.dumps({'type': 'queue_unavailable', 'message': str(err)})}\n\n"
