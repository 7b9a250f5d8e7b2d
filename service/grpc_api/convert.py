"""Between protobuf messages and the dicts the REST face uses: requests in, job views and models out.

Requests are turned into the dict of the fields the client set (:func:`request_body`) and then
validated by the REST request schema itself, so limits and error messages are one. Enum values
are matched by name: ``PRIORITY_HIGH`` is ``"high"``; an ``*_UNSPECIFIED`` singular value means
"unset" (the REST default); an unknown number is handed on as is, for the schema to refuse.
Outputs are built from the REST job view (:func:`ldm_serve.jobview.job_view`) and model entries.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message

from service.grpc_api.pb import generation_service_pb2 as pb

ENVELOPE_FIELDS = frozenset({"idempotency_key", "image", "mask"})
"""Request fields that are not REST body fields: the Idempotency-Key header and the uploads."""


def enum_prefix(enum: EnumDescriptor) -> str:
    """``JobStatus`` -> ``JOB_STATUS_`` (the style guide's value prefix)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def enum_number(enum: EnumDescriptor, value: str) -> int:
    """The proto number of a REST enum value (``"high"`` -> ``PRIORITY_HIGH``)."""
    return enum.values_by_name[enum_prefix(enum) + value.upper()].number


def enum_text(enum: EnumDescriptor, number: int) -> str | int | None:
    """The REST value of a proto enum number: None for ``*_UNSPECIFIED``, the number itself if unknown."""
    value = enum.values_by_number.get(number)
    if value is None:
        return number
    text = value.name.removeprefix(enum_prefix(enum)).lower()
    return None if text == "unspecified" else text


def request_body(message: Message) -> dict[str, Any]:
    """The REST body equivalent of a request message: only the fields the client set."""
    body: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        name = field.name
        if name in ENVELOPE_FIELDS:
            continue
        value = getattr(message, name)
        if field.is_repeated:
            if len(value):
                enum = field.enum_type
                body[name] = [enum_text(enum, v) or "unspecified" for v in value] if enum else list(value)
        elif field.message_type is not None:
            if message.HasField(name):
                body[name] = json_format.MessageToDict(value)
        elif field.enum_type is not None:
            text = enum_text(field.enum_type, value)
            if text is not None:
                body[name] = text
        elif not field.has_presence or message.HasField(name):
            body[name] = value
    return body


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def _timestamp(iso: str | None) -> timestamp_pb2.Timestamp | None:
    if iso is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromJsonString(iso)
    return ts


def job_message(view: dict[str, Any]) -> pb.Job:
    """The ``Job`` message of a REST job view (:func:`service.routes.jobs.public_job`)."""
    params = dict(view["parameters"])
    params["output_format"] = enum_number(pb.OutputFormat.DESCRIPTOR, params["output_format"])
    params["priority"] = enum_number(pb.Priority.DESCRIPTOR, params["priority"])
    links = view["links"]
    job = pb.Job(
        id=view["id"],
        kind=enum_number(pb.JobKind.DESCRIPTOR, view["kind"]),
        status=enum_number(pb.JobStatus.DESCRIPTOR, view["status"]),
        model=view["model"],
        created_at=_timestamp(view["created_at"]),
        started_at=_timestamp(view["started_at"]),
        finished_at=_timestamp(view["finished_at"]),
        progress=pb.JobProgress(**view["progress"]),
        queue_position=view["queue_position"],
        attempts=view["attempts"],
        cancel_requested=view["cancel_requested"],
        error=job_error(view["error"]),
        warnings=view["warnings"],
        seeds=view["seeds"],
        parameters=pb.JobParameters(**params),
        metadata=_struct(view["metadata"]),
        images=[pb.JobImage(**image) for image in view["images"]],
        batch=_struct(view["batch"]) if view["batch"] is not None else None,
        links=pb.JobLinks(self_url=links["self"], events_url=links["events"], cancel_url=links["cancel"]),
    )
    hook = view.get("webhook")
    if hook is not None:
        job.webhook.CopyFrom(pb.JobWebhook(
            url=hook["url"],
            events=[enum_number(pb.WebhookEventType.DESCRIPTOR, e) for e in hook["events"]],
            deliveries=[_struct(d) for d in hook["deliveries"]],
        ))
    return job


def job_error(error: dict[str, Any] | None) -> pb.JobError | None:
    """A job's (or a status event's) ``error`` object as a message."""
    if not error:
        return None
    return pb.JobError(type=str(error.get("type", "")), message=str(error.get("message", "")),
                       field=str(error.get("field") or ""))


def model_message(entry: dict[str, Any]) -> pb.Model:
    """A ``Model`` message of a REST ``/v1/models`` entry (:func:`service.routes.system.model_entries`)."""
    constraints = entry.get("constraints")
    if constraints is not None:
        constraints = dict(constraints)
        constraints["kinds"] = [enum_number(pb.JobKind.DESCRIPTOR, k) for k in constraints["kinds"]]
        constraints = pb.ModelConstraints(**{k: v for k, v in constraints.items() if v is not None})
    scalars = ("id", "untrained", "workers", "inpaint_mode", "default_size", "downsample_factor",
               "max_prompt_tokens", "max_batch_rows", "warning")
    return pb.Model(**{k: entry[k] for k in scalars if entry.get(k) is not None}, constraints=constraints)
