"""What a caller may submit: the model's sizes, the key's rights, its per-job cap and quotas.

:func:`admit` runs after the request is validated and before the job is queued, so a
refused job costs nothing and is never stored:

* the model: the chosen model's live workers must all be able to run the job: its size,
  step count, guidance scale, kind (inpainting, img2img) and, for a class-conditional model, its
  prompt (422 naming the field and the model's limit; :mod:`ldm_serve.model_limits`);
* ``priority: "high"`` only for keys with ``priority_high`` (403 naming ``priority``);
* ``width * height * steps * n`` at most the key's ``max_job_pixel_steps`` (422);
* the key's quotas, atomically (:mod:`ldm_serve.quotas`; 429 with ``Retry-After`` and
  ``RateLimit-*`` headers).
"""

from __future__ import annotations

from ldm_serve.api_keys import Caller
from ldm_serve.contract import GenerationPayload, Priority
from ldm_serve.errors import Forbidden, InvalidInput, RateLimited
from ldm_serve.model_limits import check_request
from ldm_serve.quotas import WINDOW_S, QuotaDecision
from service.deps import Gateway

PIXEL_STEPS_FIELD = "width*height*steps*n"


def pixel_steps(payload: GenerationPayload) -> int:
    """The work of one job: ``width * height * steps * n``."""
    return payload.width * payload.height * payload.steps * payload.n


def slot_lifetime_s(gw: Gateway) -> int:
    """Longest a job can stay queued or running (its concurrency slot is dropped after that)."""
    s = gw.settings
    return s.queue_ttl_s + s.job_timeout_s * s.max_attempts + 60


async def admit(gw: Gateway, caller: Caller, subject: str, payload: GenerationPayload) -> QuotaDecision:
    """Refuse the job (InvalidInput, Forbidden, RateLimited) or charge the caller's quotas for it.

    The caller must :meth:`~ldm_serve.quotas.QuotaLimiter.release` the slot if the job is
    not queued after all (queue full, idempotent replay).
    """
    workers = await gw.call(gw.store.live_workers)
    constraints = [w.constraints for w in workers if w.model == payload.model and w.constraints is not None]
    check_request(payload.model, constraints, payload)
    policy = caller.policy
    if payload.priority is Priority.HIGH and not policy.priority_high:
        raise Forbidden("priority", '"high" is not allowed for this API key (priority_high is false); use normal or low')
    work = pixel_steps(payload)
    if policy.max_job_pixel_steps and work > policy.max_job_pixel_steps:
        raise InvalidInput(
            PIXEL_STEPS_FIELD,
            f"{payload.width}*{payload.height}*{payload.steps}*{payload.n} = {work} pixel-steps exceeds the"
            f" per-job limit max_job_pixel_steps={policy.max_job_pixel_steps}; lower width, height, steps or n",
        )
    decision = await gw.call(
        gw.limiter.admit, subject, policy, payload.job_id, work, slot_lifetime_s(gw),
        queue_ttl_s=gw.settings.queue_ttl_s,
    )
    if not decision.admitted:
        gw.metrics.jobs_rejected.labels(decision.which or "quota").inc()
        raise _refusal(gw, decision, work)
    return decision


def _refusal(gw: Gateway, d: QuotaDecision, work: int) -> RateLimited:
    if d.which == "concurrent_jobs":
        retry = gw.settings.queue_full_retry_after_s
        message = (
            f"concurrent_jobs: this key has {d.limit} jobs queued or running, its limit is concurrent_jobs={d.limit};"
            " wait for one to finish or cancel one"
        )
        return RateLimited(
            message, limit_name="concurrent_jobs", limit=d.limit, remaining=0, reset_s=None, retry_after_s=retry,
            window_s=0,
        )
    retry = d.retry_after_s or 1
    if d.which == "pixel_steps_per_minute":
        message = (
            f"pixel_steps_per_minute: this job needs {work} pixel-steps (width*height*steps*n), {d.remaining} of"
            f" this key's {d.limit} per minute are left; retry in {retry} s"
        )
    else:
        message = f"requests_per_minute: this key may submit {d.limit} jobs per minute; retry in {retry} s"
    return RateLimited(
        message, limit_name=d.which or "quota", limit=d.limit, remaining=d.remaining, reset_s=d.reset_s,
        retry_after_s=retry, window_s=WINDOW_S,
    )


def rate_limit_headers(exc: RateLimited) -> dict[str, str]:
    """``Retry-After`` and the IETF draft ``RateLimit-*`` fields of a refused request."""
    return {
        "Retry-After": str(exc.retry_after_s),
        **_fields(exc.limit_name, exc.limit, exc.remaining, exc.reset_s or exc.retry_after_s, exc.window_s),
    }


def admitted_headers(d: QuotaDecision) -> dict[str, str]:
    """``RateLimit-*`` fields of an accepted submission (the submissions bucket), if it is limited."""
    if d.limit <= 0:
        return {}
    return _fields("requests_per_minute", d.limit, d.remaining, d.reset_s or 0, WINDOW_S)


def _fields(name: str, limit: int, remaining: int, reset_s: int, window_s: int) -> dict[str, str]:
    policy = f'{limit};w={window_s};name="{name}"' if window_s else f'{limit};name="{name}"'
    return {
        "RateLimit-Limit": str(limit),
        "RateLimit-Remaining": str(remaining),
        "RateLimit-Reset": str(reset_s),
        "RateLimit-Policy": policy,
    }
