"""Chaos: 3 workers, 100 jobs, ``kill -9`` of a random worker every few seconds (each replaced at
once, so capacity stays), and a restart of Redis/Valkey (append-only file, ``appendfsync
everysec``) in the middle of the submissions.

The Redis restart is graceful (``SHUTDOWN``, which fsyncs the append-only file), so no
acknowledged write may be lost; a ``kill -9`` of Redis could lose the last second of writes under
``appendfsync everysec``, which is the documented bound, not something to assert on.

Asserted: every accepted job (a 2xx to its submission, retried with its ``Idempotency-Key``
through 503s) ends ``succeeded`` or ``failed`` with an error type and message; none is lost (every
id still answers); none ran twice to completion (exactly one ``succeeded`` status event in the job's
Redis stream of a succeeded job, none in a failed one); every succeeded job's image can be fetched.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis

from ldm_serve.contract import Keys
from tests.reliability.support import AofServer, Stack, write_results

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.slow]

JOBS = 100
WORKERS = 3
SEED = 20261204  # which worker dies when: the same on every run
SUBMIT_EVERY_S = 0.25  # 100 jobs over ~25 s
KILL_EVERY_S = 4.0
MAX_KILLS = 10
REDIS_RESTART_AT_S = 10.0  # in the middle of the submissions
DEADLINE_S = 420  # generous: a loaded 2-core machine, workers restarting
PREFIX = "chaos"
BODY = {"width": 64, "height": 64, "steps": 4, "guidance_scale": 3.0}


class Submitter(threading.Thread):
    """Submits the jobs one by one, each retried with its Idempotency-Key until accepted."""

    def __init__(self, url: str) -> None:
        super().__init__(name="chaos-submitter", daemon=True)
        self.url = url
        self.accepted: dict[int, str] = {}
        self.retries: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            for i in range(JOBS):
                body = {**BODY, "prompt": f"chaos {i}", "seed": i}
                while not self.stop.is_set():
                    try:
                        r = c.post("/v1/txt2img", json=body, headers={"Idempotency-Key": f"chaos-{i}"})
                    except httpx.HTTPError as exc:
                        self.retries[type(exc).__name__] += 1
                        self.stop.wait(0.2)
                        continue
                    if r.status_code in (200, 202):
                        self.accepted[i] = r.json()["id"]
                        break
                    if r.status_code in (429, 503):
                        self.retries[str(r.status_code)] += 1
                        self.stop.wait(0.2)
                        continue
                    self.unexpected.append(f"job {i}: {r.status_code} {r.text[:300]}")
                    break
                self.stop.wait(SUBMIT_EVERY_S)


def _statuses(conn: redis.Redis, keys: Keys, ids: list[str]) -> dict[str, str | None]:
    pipe = conn.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(keys.job(job_id), "status")
    return {job_id: (v.decode() if v else None) for job_id, v in zip(ids, pipe.execute(), strict=True)}


def test_chaos_kills_and_a_redis_restart_lose_no_job(model_path: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    server = AofServer(tmp_path / "redis")
    server.start()
    keys = Keys(PREFIX)
    conn = redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=5)
    stack = None
    submitter = None
    kills: list[dict] = []
    redis_restart: dict = {}
    t0 = time.monotonic()
    try:
        (tmp_path / "logs").mkdir()
        stack = Stack.start(
            tmp_path / "logs", model_path, workers=WORKERS, redis_url=server.url, redis_prefix=PREFIX,
            max_attempts=3, max_batch_rows=4, max_images=4,
        )
        started = time.monotonic()
        submitter = Submitter(stack.url)
        submitter.start()
        next_kill = started + KILL_EVERY_S
        deadline = started + DEADLINE_S
        finished = False
        while time.monotonic() < deadline:
            now = time.monotonic()
            if len(kills) < MAX_KILLS and now >= next_kill:
                victim = rng.choice(sorted(stack.workers))
                stack.kill_worker(victim)
                replacement = stack.add_worker()
                kills.append({"at_s": round(now - started, 1), "killed": victim, "started": replacement})
                next_kill += KILL_EVERY_S
            if not redis_restart and now - started >= REDIS_RESTART_AT_S:
                accepted_before = len(submitter.accepted)
                away = server.restart()
                redis_restart = {"at_s": round(now - started, 1), "away_s": round(away, 2),
                                 "accepted_before": accepted_before}
            if not submitter.is_alive() and redis_restart:
                try:
                    states = _statuses(conn, keys, list(submitter.accepted.values()))
                except (redis.ConnectionError, redis.TimeoutError):
                    states = {}
                if states and all(s in ("succeeded", "failed", "canceled", "expired") for s in states.values()):
                    finished = True
                    break
            time.sleep(0.2)
        submitter.stop.set()
        submitter.join(30)
        chaos_s = time.monotonic() - started

        # ---- what happened to every accepted job
        ids = list(submitter.accepted.values())
        states = _statuses(conn, keys, ids)
        outcome: Counter[str] = Counter(str(s) for s in states.values())
        lost = [j for j, s in states.items() if s is None]
        failed_without_reason, double, reruns_with_images, attempts = [], [], 0, Counter()
        missing_images = []
        with stack.client() as c:
            for job_id in ids:
                events = conn.xrange(keys.events(job_id))
                done = sum(1 for _, f in events
                           if f[b"type"] == b"status" and json.loads(f[b"data"]).get("status") == "succeeded")
                images = sum(1 for _, f in events if f[b"type"] == b"image")
                reruns_with_images += images > 1
                job = c.get(f"/v1/jobs/{job_id}").json() if states[job_id] else {}
                attempts[str(job.get("attempts"))] += 1
                if states[job_id] == "succeeded":
                    if done != 1:
                        double.append(f"{job_id}: {done} succeeded events")
                    if c.get(f"/v1/jobs/{job_id}/images/0").status_code != 200:
                        missing_images.append(job_id)
                elif states[job_id] == "failed":
                    err = job.get("error") or {}
                    if done != 0:
                        double.append(f"{job_id}: failed after {done} succeeded events")
                    if not (err.get("type") and err.get("message")):
                        failed_without_reason.append(job_id)
            failures = Counter(f"{(j.get('error') or {}).get('type')}" for j in
                               (c.get(f"/v1/jobs/{i}").json() for i, s in states.items() if s == "failed"))
        figures = {
            "jobs": JOBS, "workers": WORKERS, "accepted": len(ids), "outcomes": dict(outcome),
            "failed_by_type": dict(failures), "lost": len(lost), "ran_twice_to_completion": len(double),
            "jobs_with_repeated_image_events": reruns_with_images, "attempts": dict(attempts),
            "kills": len(kills), "kill_schedule": kills, "redis_restart": redis_restart,
            "submit_retries": dict(submitter.retries), "unexpected_submit_answers": submitter.unexpected[:10],
            "all_terminal_in_time": finished, "chaos_s": round(chaos_s, 1),
            "wall_s": round(time.monotonic() - t0, 1),
        }
        write_results("chaos", figures)

        assert redis_restart, "Redis was never restarted"
        assert len(kills) >= 5, kills
        assert not submitter.unexpected, submitter.unexpected[:5]
        assert len(ids) == JOBS, f"only {len(ids)} of {JOBS} jobs were accepted"
        assert not lost, f"{len(lost)} accepted job(s) lost: {lost[:5]}"
        assert finished, f"not every job finished within {DEADLINE_S} s: {dict(outcome)}"
        assert set(outcome) <= {"succeeded", "failed"}, dict(outcome)
        assert not failed_without_reason, failed_without_reason[:5]
        assert not double, double[:5]
        assert not missing_images, missing_images[:5]
    finally:
        if submitter is not None:
            submitter.stop.set()
        if stack is not None:
            stack.stop()
        conn.close()
        server.stop()
