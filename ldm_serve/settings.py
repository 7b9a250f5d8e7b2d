"""Service settings: one validated object per process, built at start-up and passed in.

Nothing here reads the environment at import time. ``Settings()`` reads ``LDM_*``
variables (and ``REDIS_URL``) when it is constructed, in ``main()`` or a test,
and refuses inconsistent values before any socket is opened.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ldm_serve.limits import GUIDANCE_SCALE_MAX


class Settings(BaseSettings):
    """Every knob of the gateway and the worker (env prefix ``LDM_``)."""

    model_config = SettingsConfigDict(env_prefix="LDM_", extra="ignore", frozen=True)

    # --- Redis / queue ---------------------------------------------------------------
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("LDM_REDIS_URL", "REDIS_URL", "redis_url"),
    )
    redis_prefix: str = Field(default="ldm", pattern=r"^[A-Za-z0-9_.-]+$")
    redis_socket_timeout_s: float = Field(default=15.0, gt=0, description="read timeout; connect timeout is 2 s")
    max_queue_depth: int = Field(default=256, ge=1, description="queued jobs over all priorities")
    queue_full_retry_after_s: int = Field(default=5, ge=1)
    job_timeout_s: int = Field(default=600, ge=1, description="longest a job may run")
    queue_ttl_s: int = Field(default=1800, ge=1, description="longest a job may wait queued before it expires")
    result_ttl_s: int = Field(default=3600, ge=1, description="how long finished jobs and images are kept")
    max_attempts: int = Field(default=2, ge=1, description="runs of a job whose worker died, before it fails")

    # --- request limits ----------------------------------------------------------------
    max_width: int = Field(default=1024, ge=8)
    max_height: int = Field(default=1024, ge=8)
    max_steps: int = Field(default=150, ge=1)
    max_images: int = Field(default=4, ge=1, description="images per job (n)")
    max_prompt_chars: int = Field(default=2000, ge=1)
    max_guidance_scale: float = Field(
        default=30.0, gt=0, le=GUIDANCE_SCALE_MAX, description="at most the models' own limit (ldm_serve.limits)"
    )
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_upload_pixels: int = Field(default=4096 * 4096, ge=64 * 64)
    max_wait_s: int = Field(default=60, ge=0, le=60, description="longest Prefer: wait")
    openai_wait_s: int = Field(
        default=300, ge=1, le=3600,
        description="longest wait of the synchronous OpenAI images routes; a job not done by then answers 504"
        " with its id (it keeps running: poll /v1/jobs/{id})",
    )
    max_metadata_bytes: int = Field(default=4096, ge=0)
    max_metadata_depth: int = Field(default=8, ge=1, description="nesting of `metadata` (its own object = 1)")
    max_json_depth: int = Field(
        default=32, ge=2, le=256, description="nesting of a JSON body; deeper bodies are refused before parsing"
    )
    max_body_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="largest request body, checked while it streams in (413); default: two max_upload_bytes"
        " images as base64 plus the other fields. Routes without uploads allow at most 64 KiB"
        " + 24 x max_prompt_chars + 2 x max_metadata_bytes (or this, if smaller)",
    )
    default_model: str | None = None

    # --- auth ----------------------------------------------------------------------------
    api_keys: str = Field(default="", description="comma-separated bearer keys; empty = no auth")
    api_keys_file: Path | None = Field(
        default=None, description="JSON or TOML file of sha256-hashed keys with per-key policies (ldm_serve/api_keys.py)"
    )
    metrics_require_admin: bool = Field(default=False, description="/metrics only for keys with admin = true")

    # --- quotas: the default policy (anonymous callers and keys without their own limits); 0 = unlimited -----
    quota_requests_per_minute: int = Field(default=600, ge=0, description="job submissions per key per minute")
    quota_concurrent_jobs: int = Field(default=64, ge=0, description="queued + running jobs per key")
    quota_pixel_steps_per_minute: int = Field(
        default=1_000_000_000, ge=0, description="work budget per key per minute: width*height*steps*n summed"
    )
    max_job_pixel_steps: int = Field(
        default=512 * 512 * 50 * 4, ge=0, description="largest width*height*steps*n of one job"
    )
    default_priority_high: bool = Field(
        default=False, description="may anonymous callers and keys without a policy send priority: high"
    )

    # --- model size bound (worker; advertised in its heartbeat) ---------------------------------
    max_size_factor: float = Field(
        default=2.0, gt=0, description="largest side a worker accepts: this x its model's default size"
    )
    model_max_side: int | None = Field(default=None, ge=8, description="worker: explicit largest side (pixels)")

    # --- signed, absolute result URLs (off unless public_base_url is set) ---------------------------
    public_base_url: str | None = Field(
        default=None, pattern=r"^https?://[^\s?#]+$", description="e.g. https://api.example.com; enables signed URLs"
    )
    url_signing_secret: str | None = Field(default=None, min_length=16, description="HMAC key of signed URLs")
    signed_url_ttl_s: int = Field(default=3600, ge=1, description="lifetime of a signed image / events URL")

    # --- webhooks ------------------------------------------------------------------------
    webhook_secret: str | None = Field(default=None, description="whsec_<base64>")
    allow_private_webhooks: bool = False
    webhook_progress_interval_s: float = Field(default=1.0, ge=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(
        default=9, ge=1, description="with the 5 s doubling schedule the last attempt comes 19-23 min after the first"
    )
    webhook_retry_base_s: float = Field(default=5.0, ge=0, description="first retry delay; doubles per attempt")

    # --- gateway ---------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int | None = Field(
        default=None, ge=0, le=65535, description="also serve the gRPC API (ldm_serve.v1) on this port; unset = off"
    )
    cors_origins: str = Field(
        default="", description="comma-separated origins allowed by CORS (`*` = any); empty = CORS off"
    )
    playground: bool = Field(default=True, description="serve the web playground at / (service/static/)")

    # --- worker ----------------------------------------------------------------------------
    model_path: Path | None = None
    worker_name: str | None = None
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_invariant: bool | None = Field(
        default=None, description="UNet one row at a time (bit-identical batched images); default: on for CPU"
    )
    core_workers: int | None = Field(
        default=None,
        ge=1,
        description="CPU: run UNet rows / batch shards on this many one-core threads (default: torch's thread count;"
        " 1 = one call at a time with every thread)",
    )
    cpu_allocator: Literal["auto", "jemalloc", "system"] = Field(
        default="auto",
        description="worker memory allocator (ldm_serve/cpu_allocator.py): auto = jemalloc on CPU workers when"
        " libjemalloc.so.2 is installed; jemalloc = required; system = glibc's",
    )
    backend: Literal["auto", "eager", "torchscript", "inductor", "cudagraphs", "tensorrt"] = Field(
        default="auto",
        description="how the worker runs the UNet and decoder (ldm/backends); compiled before the worker is ready."
        " auto: torchscript on CPU (eager if tracing fails), eager on GPUs",
    )
    compile_cache_dir: Path | None = Field(
        default=None, description="compiled artifacts kept between restarts (default: ~/.cache/ldm-serve/compiled)"
    )
    batch_buckets: tuple[int, ...] = Field(
        default=(1, 2, 4, 8, 16), description="cudagraphs/tensorrt: UNet batch sizes to capture (rows; padded to)"
    )
    max_batch_rows: int = Field(default=8, ge=1)
    batch_window_ms: int = Field(
        default=50, ge=0, description="request batching: how long to gather compatible jobs"
    )
    batching: Literal["continuous", "request"] = Field(
        default="continuous",
        description="continuous: jobs join and leave the running batch between DDIM steps; "
        "request: one batch of jobs runs start to finish",
    )
    engine_waiting_served_ratio: float = Field(
        default=0.0, ge=0, description="continuous: admit while rows run only if waiting rows >= ratio x running"
    )
    engine_max_waiting_steps: int = Field(
        default=20, ge=1, description="continuous: steps after which a waiting job forces admission, un-overtaken"
    )
    engine_memory_budget_mb: float | None = Field(
        default=None, gt=0, description="continuous: activation memory of the running batch (estimated); none = rows only"
    )
    engine_buckets: tuple[int, ...] = Field(
        default=(), description="continuous: UNet batch sizes to pad each step to (JSON list); ignored when batch_invariant"
    )
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    heartbeat_ttl_s: float = Field(default=10.0, gt=0)
    reap_interval_s: float = Field(default=5.0, gt=0)
    warmup: bool = True
    worker_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    run_webhook_worker: bool = Field(default=True, description="deliver webhooks from a thread of the worker")
    data_dir: Path | None = Field(
        default=None,
        description="ldm-serve up: where the embedded Valkey keeps its append-only file (default "
        "$XDG_DATA_HOME/ldm-serve, else ~/.local/share/ldm-serve)",
    )

    @field_validator("webhook_secret")
    @classmethod
    def _secret_format(cls, value: str | None) -> str | None:
        if value == "":  # an unset variable passed through (docker compose ${LDM_WEBHOOK_SECRET:-})
            return None
        if value is not None and not value.startswith("whsec_"):
            raise ValueError("webhook_secret must look like whsec_<base64 key>")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_width % 8 or self.max_height % 8:
            raise ValueError("max_width and max_height must be multiples of 8")
        if self.max_images > self.max_batch_rows:
            raise ValueError(
                f"max_images ({self.max_images}) must not exceed max_batch_rows ({self.max_batch_rows}):"
                " one job's images always run in one batch"
            )
        if any(b < 1 for b in self.engine_buckets) or list(self.engine_buckets) != sorted(set(self.engine_buckets)):
            raise ValueError(f"engine_buckets must be strictly ascending positive sizes, got {self.engine_buckets}")
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_ttl_s must be longer than heartbeat_interval_s")
        if self.metrics_require_admin and self.api_keys_file is None:
            raise ValueError("metrics_require_admin needs api_keys_file (admin keys are declared there)")
        if self.public_base_url and not self.url_signing_secret:
            raise ValueError("public_base_url needs url_signing_secret (at least 16 characters) to sign URLs")
        if 0 < self.quota_pixel_steps_per_minute < self.max_job_pixel_steps:
            raise ValueError(
                f"max_job_pixel_steps ({self.max_job_pixel_steps}) must not exceed quota_pixel_steps_per_minute"
                f" ({self.quota_pixel_steps_per_minute}): such a job could never be admitted"
            )
        return self

    @property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key_set) or self.api_keys_file is not None

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


def owner_of(api_key: str) -> str:
    """The id a job records for the key that made it (never the key itself)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]
