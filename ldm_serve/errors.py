"""The one exception hierarchy of ldm-serve.

Every error that crosses a module boundary is one of these. They are mapped to
HTTP / gRPC status codes at exactly one place (the gateway's exception handler);
the model code raises them and never thinks about transport codes.

::

    LdmServeError
    ├── InvalidInput (ValueError)             -> 422  a request or call argument is out of range
    │   └── UnknownModel                      -> 404  no worker serves the named model
    ├── ModelError                            -> 500  the model files themselves are wrong
    │   ├── ConfigError (ValueError)          -> 500  unknown family, malformed YAML, unsupported option
    │   ├── CheckpointError                   -> 500  missing / unexpected / mis-shaped tensors, other architecture
    │   └── TokenizerFilesMissing (FileNotFoundError) -> 500  vocab / merges files absent
    ├── JobNotFound                           -> 404
    ├── QueueFull                             -> 429  (with Retry-After)
    ├── QueueUnavailable                      -> 503  Redis unreachable
    ├── Unauthorized                          -> 401  API keys are on and the request has no valid key
    ├── ResultNotReady                        -> 409  the image of a job is not (yet) stored
    ├── WebhookVerificationError (ValueError) -> 400  a received webhook's signature or timestamp is wrong
    └── InternalError                         -> 500  an internal invariant failed (a bug, not the caller's input)
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


class InternalError(LdmServeError):
    """An internal invariant failed: values built by our own code (a denoiser's rows, a
    UNet's tensors, a sampler's timesteps) are inconsistent. A bug, never the caller's fault,
    so its API body names no request field; request values are checked before, at the
    door (:class:`InvalidInput`).

    Args:
        subject: the internal value that is wrong (``parameterization``, ``x``, ...), for the log.
        message: what is wrong with it.
    """

    http_status = 500
    code = "internal_error"

    def __init__(self, subject: str, message: str) -> None:
        self.subject = subject
        super().__init__(f"internal error: {subject}: {message}")
