"""Submission routes: ``POST /v1/txt2img``, ``POST /v1/img2img`` and ``POST /v1/inpaint``.

Each validates the request, resolves the model and the seeds, stores the uploaded
images (img2img and inpainting, JSON with base64 or multipart, read by one helper),
enqueues one job and answers ``202`` with the job (or, with ``Prefer: wait=N``, the
finished job when it finishes within N seconds).
"""

from __future__ import annotations

import math
import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ldm_serve.api_keys import Caller
from ldm_serve.contract import JobKind, JobStatus
from ldm_serve.errors import InvalidInput
from ldm_serve.settings import Settings
from service.admission import admitted_headers
from service.bodies import fields_allowance, load_json, read_json, require_media_type
from service.deps import CallerDep, Gateway, GatewayDep, quota_subject
from service.images import decode_base64_field
from service.routes.jobs import public_job
from service.streams import wait_for_terminal
from service.submission import Uploads, img2img_inputs, inpaint_inputs, load_uploads, submit_job, validate

router = APIRouter(prefix="/v1", tags=["generate"])

_SECONDS = re.compile(r"[0-9]{1,9}")


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
    wait_s = parse_prefer_wait(prefer, gw.settings.max_wait_s)
    sub = await submit_job(gw, req, kind, caller, subject, idempotency_key, inputs)
    headers = admitted_headers(sub.quota) if sub.quota is not None else None
    return await _respond(gw, sub.job_id, wait_s, replayed=not sub.created, extra_headers=headers)


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
    req = validate(gw.schemas.Txt2ImgRequest, body)
    return await _submit(gw, req, JobKind.TXT2IMG, caller, quota_subject(caller, request), idempotency_key, prefer)


async def read_uploads(
    request: Request, gw: Gateway, json_model: type[BaseModel], form_model: type[BaseModel], names: tuple[str, ...]
) -> tuple[BaseModel, dict[str, Image.Image]]:
    """The validated request and its decoded images ``names``, from JSON (base64 fields) or
    multipart/form-data (file parts plus form fields), within the upload limits."""
    s = gw.settings
    raw: dict[str, bytes] = {}
    if require_media_type(request, "application/json", "multipart/form-data") == "multipart/form-data":
        files, fields = await read_multipart(request, form_model, s)
        for name in names:
            if name not in files:
                parts = " and ".join(f"{'an' if n[0] in 'aeiou' else 'a'} `{n}`" for n in names)
                raise InvalidInput(name, f"multipart requests need {parts} file part")
        req = validate(form_model, fields)
        raw = {name: files[name] for name in names}
    else:
        body = await read_json(request, s)
        req = validate(json_model, body)
        raw = {name: decode_base64_field(name, getattr(req, name), s.max_upload_bytes) for name in names}
    return req, await load_uploads(gw, raw)


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
    req, images = await read_uploads(
        request, gw, gw.schemas.InpaintRequest, gw.schemas.InpaintForm, JobKind.INPAINT.inputs
    )
    inputs = await inpaint_inputs(gw, req, images)
    subject = quota_subject(caller, request)
    return await _submit(gw, req, JobKind.INPAINT, caller, subject, idempotency_key, prefer, inputs)


async def read_multipart(
    request: Request, form_model: type[BaseModel], settings: Settings
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """A multipart body's file parts (bytes, read within ``max_upload_bytes`` + 1) and its text fields
    converted to ``form_model``'s types (:func:`_form_value`); a later part of the same name wins."""
    try:
        form = await request.form(max_part_size=settings.max_upload_bytes + 1024)
    except HTTPException as exc:  # Starlette's answer to a malformed multipart body
        raise InvalidInput("body", f"is not valid multipart/form-data ({exc.detail})") from None
    files: dict[str, bytes] = {}
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files[key] = await value.read(settings.max_upload_bytes + 1)
        else:
            fields[key] = _form_value(form_model, key, value, settings)
    return files, fields


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
    req, images = await read_uploads(
        request, gw, gw.schemas.Img2ImgRequest, gw.schemas.Img2ImgForm, JobKind.IMG2IMG.inputs
    )
    inputs = await img2img_inputs(gw, req, images)
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
