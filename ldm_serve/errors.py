"""The one exception hierarchy of ldm-serve.

Every error that crosses a module boundary is one of these. They are mapped to
HTTP / gRPC status codes at exactly one place (the gateway's exception handler);
the model code raises them and never thinks about transport codes.

::

    LdmServeError
    ├── InvalidInput (ValueError)             -> 422  a request or call argument is out of range
    │   ├── UnknownModel                      -> 404  no worker serves the named model
    │   ├── PayloadTooLarge                   -> 413  the request body exceeds its size limit
    │   └── UnsupportedMediaType              -> 415  the Content-Type is not one the route accepts
    ├── ModelError                            -> 500  the model files themselves are wrong
    │   ├── ConfigError (ValueError)          -> 500  unknown family, malformed YAML, unsupported option
    │   ├── CheckpointError                   -> 500  missing / unexpected / mis-shaped tensors, other architecture
    │   └── TokenizerFilesMissing (FileNotFoundError) -> 500  vocab / merges files absent
    ├── JobNotFound                           -> 404
    ├── QueueFull                             -> 429  (with Retry-After)
    ├── RateLimited                           -> 429  a key's quota is spent (Retry-After, RateLimit-*)
    ├── Forbidden                             -> 403  a valid key without the right (priority high, admin)
    ├── QueueUnavailable                      -> 503  Redis unreachable
    ├── Unauthorized                          -> 401  API keys are on and the request has no valid key
    ├── ResultNotReady                        -> 409  the image of a job is not (yet) stored
    ├── WebhookVerificationError (ValueError) -> 400  a received webhook's signature or timestamp is wrong
    ├── WaitTimeout                           -> 504  a synchronous request (OpenAI images) outwaited its limit
    ├── JobFailed                             -> 500  a job a synchronous request waited on did not succeed
    └── InternalError                         -> 500  an internal invariant failed (a bug; logged with a request id)
"""

from __future__ import annotations


class LdmServeError(Exception):
    """Base class of every ldm-serve error."""

    http_status: int = 500
    code: str = "internal_error"

    def to_dict(self) -> dict[str, object]:
        """JSON-able description used in API error bodies and job records."""
        return {"type": self.code, "message": str(self)}


class InvalidInput(LdmServeError, ValueError):
    """A caller-supplied value is out of range.

    Args:
        field: the name of the offending field (``width``, ``prompt``, ``mask`` ...).
        message: what is wrong, including the limit that was violated.
    """

    http_status = 422
    code = "invalid_input"

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")

    def to_dict(self) -> dict[str, object]:
        return {"type": self.code, "field": self.field, "message": str(self)}


class UnknownModel(InvalidInput):
    """The request names a model that no worker serves."""

    http_status = 404
    code = "unknown_model"


class PayloadTooLarge(InvalidInput):
    """The request body is larger than its limit (checked while it streams in)."""

    http_status = 413
    code = "payload_too_large"


class UnsupportedMediaType(InvalidInput):
    """The request's ``Content-Type`` is not one the route accepts (field ``content-type``)."""

    http_status = 415
    code = "unsupported_media_type"


class ModelError(LdmServeError):
    """The model files (config, checkpoint, tokenizer) are unusable."""

    code = "model_error"


class ConfigError(ModelError, ValueError):
    """A model config is malformed, of an unknown family or uses an unsupported option."""

    code = "config_error"


class CheckpointError(ModelError):
    """A checkpoint does not match the architecture it is loaded into.

    ``missing``, ``unexpected`` and ``mismatched`` list the offending keys (for
    mismatches: ``"key: checkpoint shape vs model shape"``).
    """

    code = "checkpoint_error"

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[str] | None = None,
    ) -> None:
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = list(mismatched or [])
        parts = [message]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mis-shaped", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
                parts.append(f"{len(keys)} {label} tensor(s): {shown}")
        super().__init__("; ".join(parts))


class TokenizerFilesMissing(ModelError, FileNotFoundError):
    """A tokenizer's vocabulary files are not where the model says they are."""

    code = "tokenizer_files_missing"


class JobNotFound(LdmServeError):
    """No job with that id exists (or it is not visible to the caller)."""

    http_status = 404
    code = "job_not_found"


class QueueFull(LdmServeError):
    """The queue is at its configured depth; retry later."""

    http_status = 429
    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class QueueUnavailable(LdmServeError):
    """Redis cannot be reached."""

    http_status = 503
    code = "queue_unavailable"


class WebhookVerificationError(LdmServeError, ValueError):
    """A received webhook has a missing, stale or wrong Standard Webhooks signature."""

    http_status = 400
    code = "webhook_verification_failed"


class Unauthorized(LdmServeError):
    """API keys are configured and the request carries no valid ``Authorization: Bearer`` key."""

    http_status = 401
    code = "unauthorized"


class ResultNotReady(LdmServeError):
    """The job exists but the requested image has not been produced (yet, or ever)."""

    http_status = 409
    code = "result_not_ready"


class RateLimited(LdmServeError):
    """A per-key quota refuses the job (ldm_serve.quotas); nothing was charged.

    Args:
        message: what limit, its value and when to retry.
        limit_name: ``requests_per_minute``, ``pixel_steps_per_minute`` or ``concurrent_jobs``.
        limit: the limit's value; ``remaining``: what is left of it now.
        reset_s: seconds until the limit is whole again (None: unknown, e.g. concurrency).
        retry_after_s: seconds until this request could be admitted.
        window_s: the limit's time window (0 for concurrency).
    """

    http_status = 429
    code = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        limit_name: str,
        limit: int,
        remaining: int,
        reset_s: int | None,
        retry_after_s: int,
        window_s: int,
    ) -> None:
        self.limit_name = limit_name
        self.limit = limit
        self.remaining = remaining
        self.reset_s = reset_s
        self.retry_after_s = retry_after_s
        self.window_s = window_s
        super().__init__(message)

    def to_dict(self) -> dict[str, object]:
        return {"type": self.code, "limit": self.limit_name, "message": str(self)}


class Forbidden(LdmServeError):
    """The caller is known but lacks the right for this request (``field`` names what was refused)."""

    http_status = 403
    code = "forbidden"

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")

    def to_dict(self) -> dict[str, object]:
        return {"type": self.code, "field": self.field, "message": str(self)}


class WaitTimeout(LdmServeError):
    """A synchronous request (the OpenAI images routes) waited its limit and the job is not done.

    The job keeps running: ``job_id`` names it so the client can poll ``GET /v1/jobs/{job_id}``.
    """

    http_status = 504
    code = "wait_timeout"

    def __init__(self, job_id: str, waited_s: int) -> None:
        self.job_id = job_id
        super().__init__(
            f"job {job_id} did not finish within {waited_s} s (openai_wait_s); it keeps running:"
            f" poll GET /v1/jobs/{job_id} for it"
        )

    def to_dict(self) -> dict[str, object]:
        return {"type": self.code, "job_id": self.job_id, "message": str(self)}


class JobFailed(LdmServeError):
    """A job a synchronous request waited on ended failed, canceled or expired.

    Args:
        job_id: the job.
        status: its terminal status.
        reason: the job's error message (empty when it has none, as for a canceled job).
    """

    http_status = 500
    code = "job_failed"

    def __init__(self, job_id: str, status: str, reason: str = "") -> None:
        self.job_id = job_id
        self.status = status
        super().__init__(f"job {job_id} ended {status}" + (f": {reason}" if reason else ""))

    def to_dict(self) -> dict[str, object]:
        return {"type": self.code, "job_id": self.job_id, "status": self.status, "message": str(self)}


class InternalError(LdmServeError):
    """An internal invariant failed: values built by our own code (a denoiser's rows, a
    UNet's tensors, a sampler's timesteps, a worker's bookkeeping) are inconsistent. A bug,
    never the caller's fault, so its API body names no request field (request values are
    checked before, at the door: :class:`InvalidInput`); the gateway answers 500 with a
    request id and logs the traceback.

    Args:
        subject: the internal value that is wrong (``parameterization``, ``x``, ...), or the
            whole message when ``message`` is omitted.
        message: what is wrong with ``subject``.
    """

    http_status = 500
    code = "internal_error"

    def __init__(self, subject: str, message: str | None = None) -> None:
        self.subject = subject if message is not None else None
        super().__init__(subject if message is None else f"internal error: {subject}: {message}")
