"""The OpenAI-compatible face: ``POST /v1/images/generations`` and ``POST /v1/images/edits``.

A thin layer over the job model: each request is translated into a native txt2img or
inpaint request, validated and queued by the one submission path
(:func:`service.submission.submit_job`: same queue, limits, idempotency, auth and
metrics), then answered synchronously in OpenAI's ``ImagesResponse`` shape once the
job is done. A job not done within ``openai_wait_s`` answers 504 with its id (it keeps
running; the client can poll ``GET /v1/jobs/{id}``). Errors use OpenAI's envelope,
rendered by the gateway's one error boundary (:func:`service.app.error_response`).

Translation:

* ``size`` ``"WxH"`` -> ``width`` / ``height`` (errors about either name ``size``);
  ``"auto"`` or absent: the model's default size (edits: the image's size).
* ``response_format``: ``url`` (default, as OpenAI's) -> the native image route, absolute
  (signed when ``public_base_url`` is set), valid as long as the job is kept
  (``result_ttl_s``); ``b64_json`` -> the image bytes inline.
* ``user`` -> ``metadata.user`` of the job (echoed by the native job view).
* ``model``, ``n``, ``prompt`` and the extensions ``negative_prompt``, ``steps``,
  ``guidance_scale``, ``seed``, ``eta``, ``output_format`` keep their native meaning and limits.
* edits' ``mask``: OpenAI's convention, the *transparent* (alpha = 0) pixels are repainted;
  without a mask, the image's own transparent pixels are (:func:`service.images.transparent_mask`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from PIL import Image

from ldm_serve.contract import GenerationPayload, JobKind, JobStatus
from ldm_serve.errors import InvalidInput, JobFailed, LdmServeError, ResultNotReady, WaitTimeout
from ldm_serve.jobview import image_url
from service.admission import admitted_headers
from service.bodies import read_json, require_media_type
from service.deps import CallerDep, Gateway, GatewayDep, quota_subject
from service.images import has_alpha, load_image, prepare_inpaint_inputs, transparent_mask
from service.routes.generate import read_multipart
from service.streams import wait_for_terminal
from service.submission import Submitted, Uploads, submit_job, validate

router = APIRouter(prefix="/v1/images", tags=["openai"])

RESPONSE_FORMATS = ("url", "b64_json")
OPENAI_FIELDS = frozenset({"size", "response_format", "user"})
# native fields the OpenAI face passes through unchanged (OpenAI's own and the extra_body extensions)
NATIVE_FIELDS = frozenset(
    {"prompt", "n", "model", "negative_prompt", "steps", "guidance_scale", "seed", "eta", "output_format"}
)
_SIZE = re.compile(r"([0-9]{1,6})x([0-9]{1,6})")
_SIZE_FIELDS = frozenset({"width", "height", "image.width", "image.height"})
EDIT_FILES = ("image", "image[]", "mask")


@dataclass(frozen=True)
class OpenAIOptions:
    """The OpenAI-only parts of a request."""

    size: tuple[int, int] | None  # (width, height); None: the default size
    response_format: str


def parse_size(value: Any, max_width: int, max_height: int) -> tuple[int, int] | None:
    """``"WxH"`` as ``(W, H)``; None for ``"auto"`` or absent. Ranges are checked by the native limits."""
    if value is None or value == "auto":
        return None
    m = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise InvalidInput(
            "size",
            f'must be "WIDTHxHEIGHT" (e.g. "256x256"), multiples of 8 up to {max_width}x{max_height}, got {value!r}',
        )
    return int(m.group(1)), int(m.group(2))


def split_request(body: Any, gw: Gateway) -> tuple[dict[str, Any], OpenAIOptions]:
    """An OpenAI request body as the native request's fields and the OpenAI-only options."""
    if not isinstance(body, dict):
        raise InvalidInput("body", "must be a JSON object")
    allowed = sorted(NATIVE_FIELDS | OPENAI_FIELDS)
    native: dict[str, Any] = {}
    for key, value in body.items():
        if key in NATIVE_FIELDS:
            native[key] = value
        elif key not in OPENAI_FIELDS:
            raise InvalidInput(str(key), f"is not a field this server supports on the OpenAI images API ({allowed})")
    fmt = body.get("response_format") or "url"
    if fmt not in RESPONSE_FORMATS:
        raise InvalidInput("response_format", f"must be one of {list(RESPONSE_FORMATS)}, got {fmt!r}")
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise InvalidInput("user", "must be a string")
        native["metadata"] = {"user": user}
    size = parse_size(body.get("size"), gw.settings.max_width, gw.settings.max_height)
    return native, OpenAIOptions(size, fmt)


@contextlib.contextmanager
def size_errors(gw: Gateway, size_given: bool) -> Iterator[None]:
    """Errors about the width or height of a request that gave ``size`` name ``size`` instead."""
    try:
        yield
    except InvalidInput as exc:
        if not size_given or exc.field not in _SIZE_FIELDS:
            raise
        s = gw.settings
        raise InvalidInput("size", f"{exc} (allowed: multiples of 8 up to {s.max_width}x{s.max_height})") from exc


def _failure(job_id: str, rec: dict[str, str]) -> LdmServeError:
    """The error of a job that did not succeed: a late InvalidInput keeps its field (422), else 500."""
    error = json.loads(rec["error"]) if rec.get("error") else {}
    field = error.get("field")
    if error.get("type") == "invalid_input" and isinstance(field, str):
        return InvalidInput(field, str(error.get("message", "")).removeprefix(f"{field}: "))
    return JobFailed(job_id, rec["status"], str(error.get("message", "")))


async def images_response(gw: Gateway, request: Request, job: Submitted, response_format: str) -> JSONResponse:
    """Wait (up to ``openai_wait_s``) for the job and answer OpenAI's ``ImagesResponse``."""
    limit = gw.settings.openai_wait_s
    await wait_for_terminal(gw, job.job_id, limit)
    rec = await gw.call(gw.store.get, job.job_id)
    status = JobStatus(rec["status"])
    if not status.terminal:
        raise WaitTimeout(job.job_id, limit)
    if status is not JobStatus.SUCCEEDED:
        raise _failure(job.job_id, rec)
    payload = GenerationPayload.model_validate_json(rec["payload"])
    data: list[dict[str, str]] = []
    for i in range(payload.n):
        if response_format == "b64_json":
            raw = await gw.call(gw.results.get_image, job.job_id, i)
            if raw is None:
                raise ResultNotReady(f"image {i} of job {job.job_id} is no longer stored")
            data.append({"b64_json": base64.b64encode(raw).decode()})
        else:
            url = image_url(job.job_id, i, gw.signer)
            data.append({"url": url if gw.signer else str(request.base_url).rstrip("/") + url})
    quota_headers = admitted_headers(job.quota) if job.quota is not None else {}
    headers = {"Location": f"/v1/jobs/{job.job_id}", **quota_headers}
    return JSONResponse({"created": int(float(rec["created_at"])), "data": data}, headers=headers)


def _idem_header() -> Any:
    return Header(alias="Idempotency-Key", description="Retrying with the same key waits for the same job.")


@router.post("/generations", summary="OpenAI-compatible text-to-image (synchronous)")
async def generations(
    request: Request,
    gw: GatewayDep,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, _idem_header()] = None,
) -> JSONResponse:
    body = await read_json(request, gw.settings)
    native, options = split_request(body, gw)
    if options.size is not None:
        native["width"], native["height"] = options.size
    with size_errors(gw, options.size is not None):
        req = validate(gw.schemas.Txt2ImgRequest, native)
        job = await submit_job(gw, req, JobKind.TXT2IMG, caller, quota_subject(caller, request), idempotency_key)
    return await images_response(gw, request, job, options.response_format)


@router.post("/edits", summary="OpenAI-compatible inpainting (multipart; transparent mask pixels are repainted)")
async def edits(
    request: Request,
    gw: GatewayDep,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, _idem_header()] = None,
) -> JSONResponse:
    s = gw.settings
    require_media_type(request, "multipart/form-data")
    files, fields = await read_multipart(request, gw.schemas.InpaintForm, s)
    for name in files:
        if name not in EDIT_FILES:
            raise InvalidInput(name, "is not a file part of /v1/images/edits (image, mask)")
    image_bytes = files.get("image", files.get("image[]"))
    if image_bytes is None:
        raise InvalidInput("image", "is required: a PNG, JPEG or WebP file part")
    native, options = split_request(fields, gw)
    req = validate(gw.schemas.InpaintForm, native)
    limits = {"max_bytes": s.max_upload_bytes, "max_pixels": s.max_upload_pixels}
    image = await gw.call(load_image, "image", image_bytes, **limits)
    if "mask" in files:
        mask = transparent_mask("mask", await gw.call(load_image, "mask", files["mask"], **limits))
        if mask.size != image.size:
            raise InvalidInput(
                "mask", f"must have the image's dimensions {image.size[0]}x{image.size[1]}, got {mask.size[0]}x{mask.size[1]}"
            )
    else:
        if not has_alpha(image):
            raise InvalidInput("mask", "is required unless the image has an alpha channel (transparent = repaint)")
        mask = transparent_mask("image", image)
    if options.size is not None and options.size != image.size:
        image = image.resize(options.size, Image.Resampling.BICUBIC)
        mask = mask.resize(options.size, Image.Resampling.NEAREST)
    with size_errors(gw, options.size is not None):
        image_png, mask_png, width, height = await gw.call(
            prepare_inpaint_inputs, image, mask, width=None, height=None, resize_mask=False,
            max_width=s.max_width, max_height=s.max_height,
        )
        inputs = Uploads({"image": image_png, "mask": mask_png}, width, height)
        job = await submit_job(
            gw, req, JobKind.INPAINT, caller, quota_subject(caller, request), idempotency_key, inputs
        )
    return await images_response(gw, request, job, options.response_format)
