"""The function RQ records for generation jobs (``ldm_serve.contract.GENERATE_FUNC``).

Generation jobs are not executed by RQ's ``perform_job``: the batching worker
(:mod:`worker.main`) pops them from their queues and runs several at once. This
function exists so that the RQ job's ``func_name`` resolves to documented code
and so that a plain ``rq worker`` pointed at a generation queue by mistake
fails loudly instead of silently running jobs one by one.
"""

from __future__ import annotations

from typing import Any


def generate(payload: dict[str, Any]) -> None:
    """Refuse to run: generation jobs are batched by ``ldm-serve worker``."""
    raise RuntimeError(
        f"job {payload.get('job_id')!r} was taken by a plain RQ worker; run `ldm-serve worker` for generation queues"
    )
