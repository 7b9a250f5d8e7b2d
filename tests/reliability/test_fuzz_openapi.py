"""Property-based fuzzing of every operation in ``/openapi.json`` with schemathesis.

A real gateway and one worker (tiny random model) on Redis. Each operation is driven by
schemathesis's Hypothesis strategy, positive (valid by the schema) and negative (invalid) data,
with a fixed budget of examples and ``derandomize=True`` (the same cases on every run). The job
operations run twice: with generated ids and with the id of a real finished job. Every response is
checked for: no 5xx, a documented status code, content type, headers and body schema. Failures are
collected, not shrunk, so one run reports all of them; the test fails if any was found.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from tests.reliability.support import Stack, wait_terminal, write_results

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.slow]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
MIN_CASES = 1000
# examples per (operation, mode): the submission bodies are the large input space
BUDGET = {"/v1/txt2img": 220, "/v1/inpaint": 160, "/v1/img2img": 160}
DEFAULT_BUDGET = 45
JOB_PATHS = ("/v1/jobs/{job_id}", "/v1/jobs/{job_id}/images/{index}", "/v1/jobs/{job_id}/events",
             "/v1/jobs/{job_id}/cancel")
REQUEST_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def stack(rel_redis: str, model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    # Cheap jobs (64x64, <= 4 steps, <= 2 images) and a short Prefer: wait keep the worker and the
    # fuzzer bounded; a small queue bound makes the 429 path part of the run.
    s = Stack.start(
        tmp_path_factory.mktemp("fuzz-logs"), model_path, workers=1, redis_url=rel_redis, redis_prefix="fuzz",
        max_width=64, max_height=64, max_steps=4, max_images=2, max_wait_s=2, max_queue_depth=16,
        max_upload_pixels=4096, max_upload_bytes=20_000,
    )
    try:
        yield s
    finally:
        s.stop()


def _real_job(stack: Stack) -> str:
    with stack.client() as c:
        job_id = c.post("/v1/txt2img", json={"prompt": "fuzz seed job", "steps": 2, "n": 2}).json()["id"]
        job = wait_terminal(c, [job_id], 120)[job_id]
    assert job["status"] == "succeeded", job
    return job_id


def test_openapi_fuzzing_finds_no_5xx_and_no_schema_violation(stack: Stack) -> None:
    t0 = time.monotonic()
    real_id = _real_job(stack)
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    session = requests.Session()
    cases: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: dict[str, list[str]] = {}
    transport_errors: list[str] = []

    def run(op: Any, label: str, mode: Any, budget: int, **fixed: Any) -> None:
        strategy = op.as_strategy(generation_mode=mode, **fixed)

        @settings(max_examples=budget, derandomize=True, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def one(case: Any) -> None:
            cases[label] += 1
            try:
                response = case.call(base_url=stack.url, session=session, timeout=REQUEST_TIMEOUT_S)
            except requests.RequestException as exc:
                transport_errors.append(f"{label}: {type(exc).__name__}: {exc}"[:500])
                return
            statuses[response.status_code] += 1
            try:
                case.validate_response(response, checks=CHECKS)
            except (Exception, FailureGroup) as exc:  # noqa: BLE001 - collected, reported below
                for failure in getattr(exc, "exceptions", [exc]):
                    title = getattr(failure, "title", type(failure).__name__)
                    message = str(getattr(failure, "message", failure)).strip()[:300]
                    failures.setdefault(f"{label}: {title}", []).append(
                        f"{case.method} {case.formatted_path} -> {response.status_code} {response.text[:200]!r}"
                        f" | {message}"
                    )

        try:
            one()
        except Unsatisfiable as exc:
            if mode.is_positive:  # valid requests must be possible: the schema itself is wrong
                failures.setdefault(f"{label}: unsatisfiable schema", []).append(str(exc)[:500])
            # negative: nothing invalid to generate (e.g. an operation without inputs)

    for result in schema.get_all_operations():
        op = result.ok()
        budget = BUDGET.get(op.path, DEFAULT_BUDGET)
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            label = f"{op.method.upper()} {op.path} [{mode.value}]"
            run(op, label, mode, budget)
            if op.path in JOB_PATHS and mode.is_positive:
                # the same operation on a real finished job (its SSE stream ends at once from event 0)
                fixed: dict[str, Any] = {"path_parameters": {"job_id": real_id}}
                if op.path.endswith("/events"):
                    fixed["headers"] = {"last-event-id": "0"}
                run(op, f"{op.method.upper()} {op.path} [real job]", mode, budget, **fixed)

    total = sum(cases.values())
    server_errors = sum(n for code, n in statuses.items() if code >= 500)
    violations = sum(len(v) for k, v in failures.items())
    write_results("fuzz_openapi", {
        "cases": total,
        "cases_by_operation": dict(sorted(cases.items())),
        "status_codes": {str(k): v for k, v in sorted(statuses.items())},
        "responses_5xx": server_errors,
        "check_failures": violations,
        "check_failures_by_kind": {k: len(v) for k, v in sorted(failures.items())},
        "examples": {k: v[:3] for k, v in sorted(failures.items())},
        "transport_errors": transport_errors[:20],
        "wall_s": round(time.monotonic() - t0, 1),
    })
    with stack.client() as c:
        assert c.get("/healthz").status_code == 200
    assert total >= MIN_CASES, cases
    assert not transport_errors, transport_errors[:5]
    assert server_errors == 0, {k: v[:3] for k, v in failures.items()}
    assert not failures, "\n".join(f"{k} ({len(v)}x): {v[0]}" for k, v in failures.items())
