"""``queue`` events of a job's SSE stream: the position while queued, updated as jobs ahead leave
(the playground shows them). The ``aux`` gateway has no worker, so its jobs stay queued."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.integration.conftest import Service

pytestmark = pytest.mark.integration

KEY = {"Authorization": "Bearer key-a"}


def _events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    name = None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            yield name or "message", json.loads(line[6:])


def test_a_queued_job_streams_its_queue_position(aux: Service) -> None:
    with aux.client(headers=KEY) as c:
        ids = []
        try:
            for prompt in ("first in line", "second in line"):
                r = c.post("/v1/txt2img", json={"prompt": prompt, "steps": 4})
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            first, second = ids
            ahead = c.get(f"/v1/jobs/{first}").json()["queue_position"]
            with c.stream("GET", f"/v1/jobs/{second}/events") as resp:
                events = _events(resp.iter_lines())
                assert next(events) == ("status", {"status": "queued"})
                assert next(events) == ("queue", {"position": ahead + 1})
                assert c.post(f"/v1/jobs/{first}/cancel").json()["status"] == "canceled"
                assert next(events) == ("queue", {"position": ahead})  # the job ahead left the queue
                assert c.post(f"/v1/jobs/{second}/cancel").json()["status"] == "canceled"
                assert next(events) == ("status", {"status": "canceled"})
                name, final = next(events)
                assert name == "done" and final["status"] == "canceled" and final["queue_position"] is None
        finally:
            for job_id in ids:
                c.delete(f"/v1/jobs/{job_id}")
