"""Submission routes: ``POST /v1/txt2img``, ``POST /v1/img2img`` and ``POST /v1/inpaint``.

Each validates the request, resolves the model and the seeds, stores the uploaded
images (img2img and inpainting, JSON with base64 or multipart, read by one helper),
enqueues one job and answers ``202`` with the job (or, with ``Prefer: wait=N``, the
finished job when it finishes within N seconds).
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
import types
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ldm_serve.api_keys import Caller
from ldm_serve.contract import (
    GenerationPayload,
    JobKind,
    JobStatus,
    WebhookEventType,
    WebhookSpec,
    new_job_id,
)
from ldm_serve.errors import InvalidInput, QueueFull, QueueUnavailable, UnknownModel
from ldm_serve.jobstore import check_idempotent_reuse
from ldm_serve.limits import SEED_MAX
from ldm_serve.settings import Settings
from service.admission import admit, admitted_headers
from service.bodies import fields_allowance, load_json, read_json, require_media_type
from service.deps import CallerDep, Gateway, GatewayDep, quota_subject
from service.images import decode_base64_field, load_image, prepare_img2img_input, prepare_inpaint_inputs
from service.routes.jobs import public_job
from service.streams import wait_for_terminal

router = APIRouter(prefix="/v1", tags=["generate"])

_SECONDS = re.compile(r"[0-9]{1,9}")
IDEMPOTENCY_KEY_MAX = 255
DEFAULT_SIZE = 512


def parse_prefer_wait(prefer: str | None, max_wait_s: int) -> int | None:
    """Seconds requested by ``Prefer: wait[=N]`` (capped at ``max_wait_s``), or None.

    A bare ``wait`` asks for ``max_wait_s``. A ``wait`` whose value is not a number of
    seconds (``wait=abc``) is ignored, as RFC 7240 has servers ignore preferences they
    cannot apply: the answer is the immediate 202, without ``Preference-Applied``.
    """
    for pref in (prefer or "").split(","):
        name, eq, value = pref.split(";", 1)[0].partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip().strip('"')
        if not eq:
            return max_wait_s
        return min(int(value), max_wait_s) if _SECONDS.fullmatch(value) else None
    return None


def _seeds(seed: int | None, n: int) -> list[int]:
    if seed is None:
        return [secrets.randbelow(SEED_MAX + 1) for _ in range(n)]
    return [(seed + i) % (SEED_MAX + 1) for i in range(n)]


async def _resolve_model(gw: Gateway, requested: str | None) -> tuple[str, int]:
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


@dataclass(frozen=True)
class Uploads:
    """A job's checked uploads: PNG bytes by name (``JobKind.inputs``) and the output size they fix."""

    files: dict[str, bytes]
    width: int
    height: int


def request_fingerprint(kind: JobKind, req: BaseModel, inputs: Uploads | None) -> str:
    """A digest of everything the client sent, for Idempotency-Key reuse checks."""
    h = hashlib.sha256(kind.value.encode())
    h.update(req.model_dump_json().encode())
    if inputs is not None:
        h.update(b"".join(hashlib.sha256(data).digest() for data in inputs.files.values()))
    return h.hexdigest()[:32]


async def _submit(
    gw: Gateway,
    req: BaseModel,
    kind: JobKind,
    caller: Caller,
    subject: str,
    idempotency_key: str | None,
    prefer: str | None,
    inputs: Uploads | None = None,
) -> JSONResponse:
    s = gw.settings
    owner = caller.owner
    wait_s = parse_prefer_wait(prefer, s.max_wait_s)
    fingerprint = request_fingerprint(kind, req, inputs)
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= IDEMPOTENCY_KEY_MAX:
            raise InvalidInput("Idempotency-Key", f"must be 1..{IDEMPOTENCY_KEY_MAX} characters")
        existing = await gw.call(gw.store.find_idempotent, owner, idempotency_key)
        if existing is not None:
            check_idempotent_reuse(existing, fingerprint)
            return await _respond(gw, existing[0], wait_s, replayed=True)
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
    model, default_size = await _resolve_model(gw, data["model"])
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
        seeds=_seeds(data["seed"], data["n"]),
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
    return await _respond(gw, job_id, wait_s, replayed=not created, extra_headers=admitted_headers(quota))


async def _respond(
    gw: Gateway, job_id: str, wait_s: int | None, *, replayed: bool, extra_headers: dict[str, str] | None = None
) -> JSONResponse:
    headers = {"Location": f"/v1/jobs/{job_id}", **(extra_headers or {})}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if wait_s:
        headers["Preference-Applied"] = f"wait={wait_s}"
        await wait_for_terminal(gw, job_id, wait_s)
    rec = await gw.call(gw.store.get, job_id)
    view = await public_job(gw, job_id, rec)
    code = 200 if JobStatus(rec["status"]).terminal else 202
    return JSONResponse(view, status_code=code, headers=headers)


def _idem_header() -> Any:
    return Header(alias="Idempotency-Key", description="Retrying with the same key returns the same job.")


@router.post("/txt2img", status_code=202, summary="Queue a text-to-image job")
async def txt2img(
    request: Request,
    gw: GatewayDep,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, _idem_header()] = None,
    prefer: Annotated[str | None, Header(description="`wait=N` (N <= 60): answer when done")] = None,
) -> JSONResponse:
    body = await read_json(request, gw.settings)
    try:
        req = gw.schemas.Txt2ImgRequest.model_validate(body)
    except ValidationError as exc:
        raise _first_error(exc) from None
    return await _submit(gw, req, JobKind.TXT2IMG, caller, quota_subject(caller, request), idempotency_key, prefer)


async def read_uploads(
    request: Request, gw: Gateway, json_model: type[BaseModel], form_model: type[BaseModel], names: tuple[str, ...]
) -> tuple[BaseModel, dict[str, Image.Image]]:
    """The validated request and its decoded images ``names``, from JSON (base64 fields) or
    multipart/form-data (file parts plus form fields), within the upload limits."""
    s = gw.settings
    raw: dict[str, bytes] = {}
    if require_media_type(request, "application/json", "multipart/form-data") == "multipart/form-data":
        try:
            form = await request.form(max_part_size=s.max_upload_bytes + 1024)
        except HTTPException as exc:  # Starlette's answer to a malformed multipart body
            raise InvalidInput("body", f"is not valid multipart/form-data ({exc.detail})") from None
        files: dict[str, bytes] = {}
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files[key] = await value.read(s.max_upload_bytes + 1)
            else:
                fields[key] = _form_value(form_model, key, value, s)
        for name in names:
            if name not in files:
                parts = " and ".join(f"{'an' if n[0] in 'aeiou' else 'a'} `{n}`" for n in names)
                raise InvalidInput(name, f"multipart requests need {parts} file part")
        try:
            req = form_model.model_validate(fields)
        except ValidationError as exc:
            raise _first_error(exc) from None
        raw = {name: files[name] for name in names}
    else:
        body = await read_json(request, s)
        try:
            req = json_model.model_validate(body)
        except ValidationError as exc:
            raise _first_error(exc) from None
        raw = {name: decode_base64_field(name, getattr(req, name), s.max_upload_bytes) for name in names}
    limits = {"max_bytes": s.max_upload_bytes, "max_pixels": s.max_upload_pixels}
    images = {name: await gw.call(load_image, name, raw[name], **limits) for name in names}
    return req, images


@router.post(
    "/inpaint",
    status_code=202,
    summary="Queue an inpainting job (JSON with base64 images, or multipart uploads)",
)
async def inpaint(
    request: Request,
    gw: GatewayDep,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, _idem_header()] = None,
    prefer: Annotated[str | None, Header(description="`wait=N` (N <= 60): answer when done")] = None,
) -> JSONResponse:
    s = gw.settings
    req, images = await read_uploads(
        request, gw, gw.schemas.InpaintRequest, gw.schemas.InpaintForm, JobKind.INPAINT.inputs
    )
    data = req.model_dump()
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
    inputs = Uploads({"image": image_png, "mask": mask_png}, width, height)
    subject = quota_subject(caller, request)
    return await _submit(gw, req, JobKind.INPAINT, caller, subject, idempotency_key, prefer, inputs)


@router.post(
    "/img2img",
    status_code=202,
    summary="Queue an image-to-image job (JSON with a base64 init image, or a multipart upload)",
)
async def img2img(
    request: Request,
    gw: GatewayDep,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, _idem_header()] = None,
    prefer: Annotated[str | None, Header(description="`wait=N` (N <= 60): answer when done")] = None,
) -> JSONResponse:
    """SDEdit from ``image``: ``int(steps * strength)`` DDIM steps from the image's latent noised to that
    level. The output is ``width`` x ``height`` (default: the image's size; another size scales the image
    to cover it and centre-crops)."""
    s = gw.settings
    req, images = await read_uploads(
        request, gw, gw.schemas.Img2ImgRequest, gw.schemas.Img2ImgForm, JobKind.IMG2IMG.inputs
    )
    data = req.model_dump()
    image_png, width, height = await gw.call(
        prepare_img2img_input,
        images["image"],
        width=data["width"],
        height=data["height"],
        max_width=s.max_width,
        max_height=s.max_height,
    )
    inputs = Uploads({"image": image_png}, width, height)
    subject = quota_subject(caller, request)
    return await _submit(gw, req, JobKind.IMG2IMG, caller, subject, idempotency_key, prefer, inputs)


_LIST_FIELDS = {"webhook_events_filter"}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _scalar_type(annotation: Any) -> Any:
    """``int`` for ``int | None`` and the like; the annotation itself otherwise."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _form_value(model: type[BaseModel], key: str, value: str, settings: Settings) -> Any:
    """A multipart text field converted to its schema type, with a clear error when it does not parse.

    Form values are always strings; the schema itself is strict, so the conversion
    happens here: integers (``"4"``), finite numbers (``"7.5"``), booleans
    (true/false, 1/0, yes/no, on/off), comma-separated lists and JSON ``metadata``.
    """
    if key in _LIST_FIELDS:
        return [v.strip() for v in value.split(",") if v.strip()]
    if key == "metadata":
        return load_json(value, settings.max_json_depth, "metadata", fields_allowance(settings))
    field = model.model_fields.get(key)
    kind = _scalar_type(field.annotation) if field is not None else str
    text = value.strip()
    if kind is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise InvalidInput(key, f"must be true or false, got {value[:32]!r}")
    if kind is int:
        if re.fullmatch(r"[+-]?[0-9]{1,20}", text):
            return int(text)
        raise InvalidInput(key, f"must be an integer, got {value[:32]!r}")
    if kind is float:
        try:
            number = float(text)
        except ValueError:
            raise InvalidInput(key, f"must be a number, got {value[:32]!r}") from None
        if not math.isfinite(number):
            raise InvalidInput(key, f"must be a finite number, got {value[:32]!r}")
        return number
    return value


_JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
               dict: "an object", type(None): "null"}
_TYPE_MESSAGES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "finite_number": "must be a finite number",
}


def _first_error(exc: ValidationError) -> InvalidInput:
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
