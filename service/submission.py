"""Submitting a generation job: the one path shared by the REST routes and the gRPC service.

Both faces turn their request into a dict of the fields the client set, validate it with
the same request schema (:func:`validate`, errors naming the field and the limit), check
uploads with :func:`load_uploads` and :func:`inpaint_inputs` / :func:`img2img_inputs`, and queue the job with :func:`submit_job`:
Idempotency-Key replay, webhook checks, model resolution, seeds, the model's and the key's
limits and quotas (:func:`service.admission.admit`), the uploads, then one store submit.
What each face answers (HTTP headers, ``Prefer: wait``; a gRPC message) stays in the face.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import BaseModel, ValidationError

from ldm_serve.api_keys import Caller
from ldm_serve.contract import GenerationPayload, JobKind, WebhookEventType, WebhookSpec, new_job_id
from ldm_serve.errors import InvalidInput, QueueFull, QueueUnavailable, UnknownModel
from ldm_serve.jobstore import check_idempotent_reuse
from ldm_serve.limits import SEED_MAX
from ldm_serve.quotas import QuotaDecision
from service.admission import admit
from service.deps import Gateway
from service.images import load_image, prepare_img2img_input, prepare_inpaint_inputs

IDEMPOTENCY_KEY_MAX = 255
DEFAULT_SIZE = 512


@dataclass(frozen=True)
class Uploads:
    """A job's checked uploads: PNG bytes by name (``JobKind.inputs``) and the output size they fix."""

    files: dict[str, bytes]
    width: int
    height: int


@dataclass(frozen=True)
class Submitted:
    """The job a submission names: ``created`` False when an Idempotency-Key replayed an earlier one;
    ``quota``: the admission decision (None when replayed before admission)."""

    job_id: str
    created: bool
    quota: QuotaDecision | None = None


def validate(schema: type[BaseModel], body: Any) -> BaseModel:
    """``body`` validated by a request schema of :mod:`service.schemas`; InvalidInput on the first error."""
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise first_error(exc) from None


def seeds_for(seed: int | None, n: int) -> list[int]:
    """The seeds of a job's ``n`` images: ``seed + i`` (wrapped), or random when ``seed`` is None."""
    if seed is None:
        return [secrets.randbelow(SEED_MAX + 1) for _ in range(n)]
    return [(seed + i) % (SEED_MAX + 1) for i in range(n)]


async def resolve_model(gw: Gateway, requested: str | None) -> tuple[str, int]:
    """The model a job runs on and that model's default pixel size."""
    workers = await gw.call(gw.store.live_workers)
    live = {w.model: w for w in workers}
    known = set(await gw.call(gw.store.known_models)) | set(live)
    if requested is not None:
        if requested not in known:
            raise UnknownModel("model", f"{requested!r} is not served; available: {sorted(known)}")
        model = requested
    else:
        model = gw.settings.default_model or (min(live) if live else (min(known) if known else None))
        if model is None:
            raise QueueUnavailable("no worker has registered a model yet; start `ldm-serve worker`")
    info = live.get(model)
    return model, (info.default_size if info and info.default_size else DEFAULT_SIZE)


def request_fingerprint(kind: JobKind, req: BaseModel, inputs: Uploads | None) -> str:
    """A digest of everything the client sent, for Idempotency-Key reuse checks."""
    h = hashlib.sha256(kind.value.encode())
    h.update(req.model_dump_json().encode())
    if inputs is not None:
        h.update(b"".join(hashlib.sha256(data).digest() for data in inputs.files.values()))
    return h.hexdigest()[:32]


async def load_uploads(gw: Gateway, raw: dict[str, bytes]) -> dict[str, Image.Image]:
    """Each uploaded file decoded within the upload limits (``InvalidInput`` naming the file otherwise)."""
    s = gw.settings
    limits = {"max_bytes": s.max_upload_bytes, "max_pixels": s.max_upload_pixels}
    return {name: await gw.call(load_image, name, data, **limits) for name, data in raw.items()}


async def inpaint_inputs(gw: Gateway, req: BaseModel, images: dict[str, Image.Image]) -> Uploads:
    """An inpainting request's image and mask checked against each other and the request's width/height."""
    s, data = gw.settings, req.model_dump()
    image_png, mask_png, width, height = await gw.call(
        prepare_inpaint_inputs,
        images["image"],
        images["mask"],
        width=data["width"],
        height=data["height"],
        resize_mask=data["mask_resize"],
        max_width=s.max_width,
        max_height=s.max_height,
    )
    return Uploads({"image": image_png, "mask": mask_png}, width, height)


async def img2img_inputs(gw: Gateway, req: BaseModel, images: dict[str, Image.Image]) -> Uploads:
    """An img2img request's init image, fitted to the output size (:func:`service.images.prepare_img2img_input`)."""
    s, data = gw.settings, req.model_dump()
    image_png, width, height = await gw.call(
        prepare_img2img_input,
        images["image"],
        width=data["width"],
        height=data["height"],
        max_width=s.max_width,
        max_height=s.max_height,
    )
    return Uploads({"image": image_png}, width, height)


async def submit_job(
    gw: Gateway,
    req: BaseModel,
    kind: JobKind,
    caller: Caller,
    subject: str,
    idempotency_key: str | None,
    inputs: Uploads | None = None,
    *,
    key_field: str = "Idempotency-Key",
) -> Submitted:
    """Queue the job of a validated request, or find the one an Idempotency-Key already made.

    Args:
        req: the request, validated by :func:`validate`.
        subject: whose quotas the job spends (:func:`service.deps.quota_subject`).
        inputs: the checked uploads (:func:`inpaint_inputs`, :func:`img2img_inputs`).
        key_field: how errors name the idempotency key (the REST header, a gRPC field).
    """
    s = gw.settings
    owner = caller.owner
    fingerprint = request_fingerprint(kind, req, inputs)
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= IDEMPOTENCY_KEY_MAX:
            raise InvalidInput(key_field, f"must be 1..{IDEMPOTENCY_KEY_MAX} characters")
        existing = await gw.call(gw.store.find_idempotent, owner, idempotency_key)
        if existing is not None:
            try:
                check_idempotent_reuse(existing, fingerprint)
            except InvalidInput as exc:
                raise InvalidInput(key_field, str(exc).split(": ", 1)[1]) from None
            return Submitted(existing[0], created=False)
    data: dict[str, Any] = req.model_dump()
    webhook = None
    if data["webhook"]:
        if not s.webhook_secret:
            raise InvalidInput("webhook", "webhooks are disabled on this server (no webhook_secret configured)")
        from ldm_serve.webhooks import validate_webhook_url

        url = await gw.call(validate_webhook_url, data["webhook"], allow_private=s.allow_private_webhooks)
        events = data["webhook_events_filter"] or [WebhookEventType.START, WebhookEventType.COMPLETED]
        webhook = WebhookSpec(url=url, events=list(dict.fromkeys(events)))
    elif data["webhook_events_filter"]:
        raise InvalidInput("webhook_events_filter", "needs a webhook URL")
    model, default_size = await resolve_model(gw, data["model"])
    if inputs is not None:
        width, height = inputs.width, inputs.height
    else:
        width, height = data["width"] or default_size, data["height"] or default_size
    payload = GenerationPayload.from_request(
        data,
        job_id=new_job_id(),
        kind=kind,
        model=model,
        width=width,
        height=height,
        seeds=seeds_for(data["seed"], data["n"]),
        webhook=webhook,
        owner=owner,
        created_at=time.time(),
    )
    # 422 (the settings' or the model's limits) / 403 / 429 before anything is stored
    quota = await admit(gw, caller, subject, payload)
    quota_key = gw.limiter.active_key(subject) if caller.policy.concurrent_jobs else ""
    try:
        if inputs is not None:
            lifetime = s.queue_ttl_s + s.job_timeout_s + s.result_ttl_s
            for name, data in inputs.files.items():
                await gw.call(gw.results.put_input, payload.job_id, name, data, lifetime)
        job_id, created = await gw.call(gw.store.submit, payload, idempotency_key, fingerprint, quota_key)
    except QueueFull:
        await gw.call(gw.limiter.release, subject, payload.job_id)
        gw.metrics.jobs_rejected.labels("queue_full").inc()
        raise
    except Exception:
        await gw.call(gw.limiter.release, subject, payload.job_id)
        raise
    if created:
        gw.metrics.jobs_submitted.labels(model, kind.value).inc()
    else:
        await gw.call(gw.limiter.release, subject, payload.job_id)
    return Submitted(job_id, created, quota)


_JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object", type(None): "null"}
_TYPE_MESSAGES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "finite_number": "must be a finite number",
}


def first_error(exc: ValidationError) -> InvalidInput:
    """Turn pydantic's first error into InvalidInput naming the field and the limit."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "body"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "is not a known field"
    elif err["type"] in _TYPE_MESSAGES:
        got = err.get("input")
        shown = repr(got) if isinstance(got, float) else _JSON_TYPES.get(type(got), type(got).__name__)
        message = f"{_TYPE_MESSAGES[err['type']]}, got {shown}"
    return InvalidInput(field, message)
