"""The job contract shared by the gateway and the worker.

This module is the only thing both sides of the queue agree on: the typed,
versioned payload that travels through RQ (JSON, never pickle), the public job
statuses, the event types written to a job's event stream, and every Redis key
name. It imports neither FastAPI nor torch, so either process can use it.

Redis layout (``P`` is ``Settings.redis_prefix``, default ``ldm``)::

    P:job:{id}                hash   the job record (status, progress, timestamps, payload JSON, ...)
    P:job:{id}:events         stream status / progress / image events, in order (SSE replays it)
    P:job:{id}:cancel         string set when a client asked to cancel a running job
    P:job:{id}:image:{i}      string encoded image bytes (result store)
    P:job:{id}:input:{name}   string uploaded image inputs: inpainting image + mask, img2img image (PNG bytes)
    P:job:{id}:webhooks       list   JSON records of webhook delivery attempts
    P:idem:{owner}:{key}      string job id created for an Idempotency-Key
    P:owner:{owner}:jobs      zset   the owner's job ids by created_at ("-" = anonymous; pruned on read)
    P:quota:{subject}:...     quotas of a key or anonymous address (ldm_serve.quotas)
    P:workers                 hash   worker name -> WorkerInfo JSON
    P:worker:{name}:hb        string heartbeat, expires after Settings.heartbeat_ttl_s
    P:worker:{name}:jobs      set    ids of the jobs the worker is running
    P:reap:{name}             string lock taken while a dead worker's jobs are recovered
    P:models                  set    every model a worker has served (to find the queues)
    rq:queue:P-{model}-{prio} list   RQ queues, one per model and priority
    rq:queue:P-webhooks       list   RQ queue of webhook deliveries
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Mapping
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from ldm_serve.limits import GUIDANCE_SCALE_MAX

CONTRACT_VERSION = 1

# The dotted path RQ records as the job's function. The worker never lets RQ call it
# (it batches jobs itself); it names the code that runs the payload.
GENERATE_FUNC = "worker.tasks.generate"


class JobStatus(str, Enum):
    """Public lifecycle of a job. The last four are terminal."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


TERMINAL_STATUSES = frozenset(s.value for s in JobStatus if s.terminal)


class Priority(str, Enum):
    """Queue priority; workers drain ``high`` before ``normal`` before ``low``."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


PRIORITY_ORDER: tuple[Priority, ...] = (Priority.HIGH, Priority.NORMAL, Priority.LOW)


class JobKind(str, Enum):
    TXT2IMG = "txt2img"
    INPAINT = "inpaint"
    IMG2IMG = "img2img"

    @property
    def inputs(self) -> tuple[str, ...]:
        """Names of the uploaded images the job reads from the result store (``Keys.input``)."""
        return {JobKind.INPAINT: ("image", "mask"), JobKind.IMG2IMG: ("image",)}.get(self, ())


class OutputFormat(str, Enum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def content_type(self) -> str:
        return f"image/{self.value}"


class WebhookEventType(str, Enum):
    """Event filter values accepted in ``webhook_events_filter``."""

    START = "start"
    PROGRESS = "progress"
    COMPLETED = "completed"


class EventType(str, Enum):
    """Entries of a job's event stream (and of its SSE stream)."""

    STATUS = "status"  # data: {"status": ...} (plus "error" when failed)
    PROGRESS = "progress"  # data: {"step": int, "total": int}
    IMAGE = "image"  # data: {"index": int}


class WebhookSpec(BaseModel):
    """Where to POST a job's events, already validated by the gateway."""

    model_config = ConfigDict(extra="forbid")

    url: str
    events: list[WebhookEventType] = Field(
        default_factory=lambda: [WebhookEventType.START, WebhookEventType.COMPLETED]
    )


class GenerationPayload(BaseModel):
    """The versioned payload of one generation job, as serialised into RQ.

    One job produces ``n`` images, one batch row each; row ``i`` uses ``seeds[i]``.
    Uploaded images are not inlined: they live in the result store under
    ``Keys.input(job_id, name)`` for each name of ``kind.inputs`` (inpainting: ``image``
    and ``mask``; img2img: ``image``) as PNG bytes, already size-checked.

    The two mappings around it live here and nowhere else: :meth:`from_request` (the
    gateway's validated request -> payload; fields in :data:`REQUEST_FIELDS` are copied by
    name) and :meth:`row_kwargs` (payload -> the keyword arguments of one engine row,
    ``ldm.pipeline.GenerationRow``; the fields in :data:`ROW_FIELDS`). Every payload field
    is either a row field or a job field (:data:`JOB_FIELDS`); a test keeps it that way.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = CONTRACT_VERSION
    job_id: str
    kind: JobKind
    model: str
    prompt: str
    negative_prompt: str = ""
    n: int = Field(ge=1)
    width: int = Field(ge=8)
    height: int = Field(ge=8)
    steps: int = Field(ge=1)
    guidance_scale: float
    eta: float = 0.0
    strength: float = Field(default=1.0, gt=0.0, le=1.0)  # img2img: the share of the schedule that runs
    seeds: list[int]
    output_format: OutputFormat = OutputFormat.PNG
    quality: int = Field(default=90, ge=1, le=100)
    priority: Priority = Priority.NORMAL
    webhook: WebhookSpec | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    owner: str | None = None  # hash of the API key that made the job, None when auth is off
    created_at: float  # unix seconds

    @model_serializer(mode="wrap")
    def _omit_full_strength(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """``strength`` is written only when it is not 1 (img2img), so the payload of any other
        job reads exactly as before img2img and a worker of the previous version still runs it."""
        data = handler(self)
        if self.strength == 1.0:
            data.pop("strength", None)
        return data

    @property
    def batch_key(self) -> str:
        """Jobs with equal keys can share one batched DDIM run (same model and latent size)."""
        return batch_key(self.model, self.width, self.height)

    @classmethod
    def from_request(
        cls,
        request: Mapping[str, Any],
        *,
        job_id: str,
        kind: JobKind,
        model: str,
        width: int,
        height: int,
        seeds: list[int],
        webhook: WebhookSpec | None,
        owner: str | None,
        created_at: float,
    ) -> GenerationPayload:
        """The payload of a validated request (``request``: the request model's ``model_dump()``).

        The fields of :data:`REQUEST_FIELDS` are copied by name; the rest are what the
        gateway resolved (model, size, seeds, webhook, owner, time).
        """
        copied = {name: request[name] for name in REQUEST_FIELDS if name in request}
        return cls(
            **copied,
            job_id=job_id,
            kind=kind,
            model=model,
            width=width,
            height=height,
            seeds=seeds,
            webhook=webhook,
            owner=owner,
            created_at=created_at,
        )

    def row_kwargs(self) -> dict[str, Any]:
        """The per-row parameters shared by all of the job's rows (each row adds its ``seed``
        and, for img2img and inpainting, ``image`` and ``mask``)."""
        return {name: getattr(self, name) for name in ROW_FIELDS}


ROW_FIELDS: tuple[str, ...] = ("prompt", "negative_prompt", "steps", "guidance_scale", "eta", "strength")
"""Payload fields passed to every engine row under the same name (``GenerationRow`` fields)."""

JOB_FIELDS: tuple[str, ...] = (
    "v", "job_id", "kind", "model", "n", "width", "height", "seeds", "output_format", "quality", "priority",
    "webhook", "metadata", "owner", "created_at",
)
"""Payload fields used by the worker for the job as a whole (batch key, seeds, encoding, webhooks, ...)."""

REQUEST_FIELDS: tuple[str, ...] = (*ROW_FIELDS, "n", "output_format", "quality", "priority", "metadata")
"""Fields copied from the request to the payload under the same name by :meth:`GenerationPayload.from_request`."""


def batch_key(model: str, width: int, height: int) -> str:
    """The compatibility key: model and pixel size (hence latent size)."""
    return f"{model}|{width}x{height}"


class ModelConstraints(BaseModel):
    """What a worker's model can run, advertised with its heartbeat; the gateway refuses any
    other request at submit time (:mod:`ldm_serve.model_limits`), naming the field and the limit.

    Fields added after the first version have defaults that check nothing, so the
    heartbeat of an older worker still parses.
    """

    size_multiple: int = Field(ge=1)
    min_side: int = Field(ge=1)
    max_width: int = Field(ge=1)
    max_height: int = Field(ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="the model's training timesteps")
    refused_steps: list[int] = Field(
        default_factory=list,
        description="step counts the spacing refuses, up to the worker's max_steps (LDM_MAX_STEPS, as the gateway's)",
    )
    timestep_spacing: str | None = None
    min_guidance_scale: float = 0.0
    max_guidance_scale: float = GUIDANCE_SCALE_MAX
    kinds: list[JobKind] = Field(
        default_factory=lambda: [JobKind.TXT2IMG, JobKind.INPAINT], description="job kinds the model runs"
    )
    prediction_type: str | None = Field(default=None, description="'eps' or 'v'")
    max_prompt_tokens: int | None = Field(default=None, description="longer prompts run truncated, with a warning")
    n_classes: int | None = Field(default=None, description="class-conditional: the prompt is a class id below this")


class WorkerInfo(BaseModel):
    """What a worker advertises in the registry (``/v1/models`` is built from these)."""

    name: str
    model: str
    untrained: bool = False
    inpaint_mode: str | None = None
    default_size: int | None = None
    downsample_factor: int | None = None
    max_prompt_tokens: int | None = None
    max_batch_rows: int
    constraints: ModelConstraints | None = None  # None: a worker of an older version (settings bounds only)
    pid: int
    host: str
    started_at: float


def new_job_id() -> str:
    """A 26-character, URL-safe, lower-case id (base32 of a uuid4, as cog does)."""
    return base64.b32encode(uuid.uuid4().bytes).decode("ascii").rstrip("=").lower()


JOB_ID_LENGTH = 26
_JOB_ID = re.compile(r"[a-z2-7]{26}")  # JOB_ID_LENGTH characters


def is_job_id(value: object) -> bool:
    """Whether ``value`` has the format of :func:`new_job_id` (26 lower-case base32 characters).

    Checked before any Redis key is built from a client-supplied id, so that an id
    such as ``<id>:events`` can never address another key of the job.
    """
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


def queue_name(prefix: str, model: str, priority: Priority | str) -> str:
    """RQ queue name of a model and priority (``ldm-bundled-high`` ...).

    Queues are per model so that a worker only ever pops jobs it can run.
    """
    return f"{prefix}-{model}-{Priority(priority).value}"


def webhook_queue_name(prefix: str) -> str:
    return f"{prefix}-webhooks"


class Keys:
    """Every Redis key name, built from one prefix."""

    def __init__(self, prefix: str = "ldm") -> None:
        self.prefix = prefix

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:cancel"

    def image(self, job_id: str, index: int) -> str:
        return f"{self.prefix}:job:{job_id}:image:{index}"

    def input(self, job_id: str, name: str) -> str:
        return f"{self.prefix}:job:{job_id}:input:{name}"

    def webhook_attempts(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:webhooks"

    def idempotency(self, owner: str | None, key: str) -> str:
        return f"{self.prefix}:idem:{owner or '-'}:{key}"

    def owner_jobs(self, owner: str | None) -> str:
        return f"{self.prefix}:owner:{owner or '-'}:jobs"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def heartbeat(self, worker: str) -> str:
        return f"{self.prefix}:worker:{worker}:hb"

    def worker_jobs(self, worker: str) -> str:
        return f"{self.prefix}:worker:{worker}:jobs"

    def reap_lock(self, worker: str) -> str:
        return f"{self.prefix}:reap:{worker}"

    @property
    def supervisor(self) -> str:
        """Hash: child name -> why ``ldm-serve up`` is restarting it (read by ``/readyz``)."""
        return f"{self.prefix}:supervisor"

    def all_job_keys(self, job_id: str) -> list[str]:
        """Keys deleted or expired with a job (images are listed by the result store)."""
        return [
            self.job(job_id),
            self.events(job_id),
            self.cancel(job_id),
            self.webhook_attempts(job_id),
        ]
