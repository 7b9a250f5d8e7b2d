"""The webhook event envelope ``{"type", "timestamp", "data"}``: the one builder, its bytes, filters.

The worker builds every event with :class:`WebhookEvent` (``timestamp``: UTC ISO 8601 with
milliseconds and ``Z``); :func:`encode_event` gives the exact bytes that are signed and POSTed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ldm_serve.errors import InvalidInput

EVENT_TYPES = ("job.started", "job.progress", "job.succeeded", "job.failed", "job.canceled", "job.expired")
TERMINAL_EVENT_TYPES = frozenset({"job.succeeded", "job.failed", "job.canceled", "job.expired"})


def utc_now_iso() -> str:
    """Current UTC time as ISO 8601 with milliseconds and a ``Z`` suffix."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class WebhookEvent:
    """The JSON body of a webhook: ``{"type": "job.succeeded", "timestamp": ISO8601, "data": job view}``."""

    type: str
    data: Mapping[str, Any]
    timestamp: str = field(default_factory=utc_now_iso)

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise InvalidInput(
                "webhook.event", f"unknown event type {self.type!r}; one of {', '.join(EVENT_TYPES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able envelope (this is what RQ carries and what is POSTed)."""
        return {"type": self.type, "timestamp": self.timestamp, "data": dict(self.data)}


def encode_event(event: WebhookEvent | Mapping[str, Any]) -> bytes:
    """The exact bytes that are signed and POSTed (compact UTF-8 JSON)."""
    payload = event.to_dict() if isinstance(event, WebhookEvent) else dict(event)
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def event_selected(event_type: str, events_filter: Iterable[str] | None) -> bool:
    """Whether a job's events filter asks for ``event_type``.

    ``None`` or empty selects everything. Items are full types (``job.progress``) or short names
    (``started``, ``progress``, ``succeeded``, ...); ``completed`` selects every terminal event.
    """
    wanted = set(events_filter or ())
    if not wanted:
        return True
    short = event_type.removeprefix("job.")
    return (
        event_type in wanted
        or short in wanted
        or ("completed" in wanted and event_type in TERMINAL_EVENT_TYPES)
    )
