"""Reading a job's event stream: server-sent events and ``Prefer: wait``.

The worker appends ``status`` / ``progress`` / ``image`` entries to the job's Redis
stream; stream ids give a total order, and ``Last-Event-ID`` resumes a stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ldm_serve.contract import TERMINAL_STATUSES, EventType
from service.deps import Gateway, translate_async_redis

KEEPALIVE_MS = 15_000


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
    gw: Gateway, job_id: str, after: str | None, block_ms: int
) -> AsyncIterator[list[tuple[str, str, dict[str, Any]]]]:
    """The job's stream entries after ``after`` (a stream id; None: from the start), as
    ``(id, type, data)`` batches; an empty batch after each ``block_ms`` without news.

    Never ends by itself: the reader stops after the terminal status event
    (:func:`is_terminal_event`). A Redis connectivity error raises QueueUnavailable.
    Shared by the SSE stream and the gRPC ``WatchJob``.
    """
    key = gw.store.keys.events(job_id)
    last = after or "0"
    while True:
        try:
            res = await gw.aredis.xread({key: last}, block=block_ms, count=200)
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
) -> AsyncIterator[str]:
    """SSE frames for every stream entry after ``last_event_id``; ends with a ``done`` event."""
    yield "retry: 2000\n\n"
    if await is_disconnected():
        return
    try:
        async for batch in event_batches(gw, job_id, last_event_id, KEEPALIVE_MS):
            if not batch:
                yield ": keep-alive\n\n"
            for entry_id, type_, data in batch:
                yield f"id: {entry_id}\nevent: {type_}\ndata: {json.dumps(data)}\n\n"
                if is_terminal_event(type_, data):
                    yield f"event: done\ndata: {json.dumps(await final_view())}\n\n"
                    return
            if await is_disconnected():
                return
    except Exception as exc:  # noqa: BLE001 - the stream ends; the client may reconnect with Last-Event-ID
        err = translate_async_redis(exc)
        yield f"event: error\ndata: {json.dumps({'type': 'queue_unavailable', 'message': str(err)})}\n\n"
