"""Continuous batching end to end: a real gateway, Redis and worker (the default batching mode)."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest

from tests.integration.conftest import Service
from tests.integration.test_service_api import image_of, submit, wait_done
from tests.serving_support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONG = {"prompt": "a long walk on the beach", "seed": 505, "steps": 50, "guidance_scale": 4.0, "eta": 0.5}
SHORT = {"prompt": "a quick look", "seed": 606, "steps": 4, "guidance_scale": 1.0}


def _t(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_a_job_submitted_while_another_runs_starts_and_ends_first_with_identical_images(service: Service) -> None:
    with service.client() as c:
        # each job alone first (the worker is idle between tests)
        refs = {}
        for name, body in (("long", LONG), ("short", SHORT)):
            done = wait_done(c, submit(c, body).json()["id"], timeout_s=180)
            assert done["status"] == "succeeded" and done["batch"]["jobs"] == 1, done
            refs[name] = np.asarray(image_of(c, done))

        long_id = submit(c, LONG).json()["id"]

        def long_is_running() -> bool:
            job = c.get(f"/v1/jobs/{long_id}").json()
            return job["status"] == "running" and job["progress"]["step"] >= 2

        wait_until(long_is_running, 120, "the long job to run")
        short_id = submit(c, SHORT).json()["id"]
        short = wait_done(c, short_id, timeout_s=120)
        assert short["status"] == "succeeded", short
        assert c.get(f"/v1/jobs/{long_id}").json()["status"] == "running"  # still going when the short one ended
        long = wait_done(c, long_id, timeout_s=180)
        assert long["status"] == "succeeded", long

        assert _t(short["started_at"]) < _t(long["finished_at"])
        assert _t(short["finished_at"]) < _t(long["finished_at"])
        assert short["batch"]["id"] == long["batch"]["id"] and long["batch"]["jobs"] == 2
        np.testing.assert_array_equal(np.asarray(image_of(c, long)), refs["long"])
        np.testing.assert_array_equal(np.asarray(image_of(c, short)), refs["short"])
