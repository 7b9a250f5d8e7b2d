"""A webhook receiver that is down for "10 minutes", then up: every event arrives, once per attempt.

Time is scaled by the retry schedule: the first retry waits ``webhook_retry_base_s`` (default 5 s,
here 0.25 s: a factor of 1/20), so the outage is 600 s / 20 = 30 s. The receiver is down *for each
event* for that long from the event's first attempt (it answers 503, as a load balancer in front
of a dead backend would), then answers 204.

Asserted for every event: exactly one attempt succeeds; the receiver saw exactly one POST per
attempt the service recorded (attempts 1..k, numbered without gaps, k-1 of them ``retrying``);
the same ``webhook-id`` and body on every attempt; every POST verifies under the
``standardwebhooks`` library; POSTs arrive in order of their ``webhook-timestamp`` (to its 1 s resolution); and a job's
events, ordered by their ``timestamp``, put ``job.started`` before ``job.succeeded``.

The default schedule (8 attempts, +-10% jitter) spans 571-699 s after the first failure, so it does
not guarantee a 10-minute outage; the test runs 9 attempts (see docs/reliability.md).
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from tests.integration.conftest import SECRET
from tests.reliability.support import Stack, percentile, wait_terminal, write_results
from tests.serving_support import start_hook_server, wait_until

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.slow]

SCALE = 1 / 20
OUTAGE_S = 600 * SCALE  # "10 minutes"
RETRY_BASE_S = 5.0 * SCALE
MAX_ATTEMPTS = 9
JOBS = 4
EVENTS = ["start", "completed"]  # job.started, job.succeeded (progress events are never retried)


class Receiver:
    """Answers 503 to an event until ``OUTAGE_S`` after its first POST, then 204; records every POST."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.first_seen: dict[str, float] = {}
        self.lock = threading.Lock()
        self.server, self.url = start_hook_server(self._answer)

    def _answer(self, headers: dict[str, str], body: bytes) -> int:
        now = time.monotonic()
        with self.lock:
            first = self.first_seen.setdefault(headers.get("webhook-id", ""), now)
            status = 503 if now - first < OUTAGE_S else 204
            self.posts.append({"headers": headers, "body": body, "at": now, "status": status})
        return status

    def delivered(self) -> set[str]:
        with self.lock:
            return {p["headers"]["webhook-id"] for p in self.posts if p["status"] == 204}


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_webhook_outage_then_every_event_arrives_once_per_attempt(model_path: Path, rel_redis: str,
                                                                  tmp_path: Path) -> None:
    t0 = time.monotonic()
    receiver = Receiver()
    (tmp_path / "logs").mkdir()
    stack = Stack.start(
        tmp_path / "logs", model_path, workers=1, redis_url=rel_redis, redis_prefix="hookout",
        allow_private_webhooks="true", webhook_retry_base_s=RETRY_BASE_S, webhook_max_attempts=MAX_ATTEMPTS,
        webhook_timeout_s=5,
    )
    try:
        with stack.client() as c:
            ids = []
            for i in range(JOBS):
                r = c.post("/v1/txt2img", json={"prompt": f"hook outage {i}", "width": 64, "height": 64,
                                                "steps": 4, "webhook": receiver.url, "webhook_events_filter": EVENTS})
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            jobs = wait_terminal(c, ids, 180)
            assert all(j["status"] == "succeeded" for j in jobs.values()), jobs

            def records() -> dict[str, list[dict]] | None:
                """The service's attempt records by webhook-id, once every event has been delivered."""
                by_id: dict[str, list[dict]] = defaultdict(list)
                for job_id in ids:
                    for rec in c.get(f"/v1/jobs/{job_id}").json()["webhook"]["deliveries"]:
                        by_id[rec["webhook_id"]].append({**rec, "job_id": job_id})
                done = len(by_id) == JOBS * len(EVENTS) and all(
                    any(r["result"] in ("delivered", "gave_up") for r in recs) for recs in by_id.values())
                return dict(by_id) if done else None

            # the last event's outage ends <= OUTAGE_S after the jobs finished; the 9th attempt of an
            # event comes at most ~1.1 * 0.25 * 255 s + rounding after its first
            recorded = wait_until(records, OUTAGE_S + 180, "every event delivered or given up", interval_s=0.5)
    finally:
        stack.stop()
        receiver.server.shutdown()

    posts = receiver.posts
    by_id: dict[str, list[dict]] = defaultdict(list)
    for p in posts:
        by_id[p["headers"]["webhook-id"]].append(p)
    verifier = Webhook(SECRET)
    bad_signatures = []
    for p in posts:
        try:
            verifier.verify(p["body"], p["headers"])
        except Exception as exc:  # noqa: BLE001 - collected
            bad_signatures.append(f"{p['headers'].get('webhook-id')}: {exc}")
    stamps = [int(p["headers"]["webhook-timestamp"]) for p in posts]
    attempts = [len(recs) for recs in recorded.values()]
    lateness = [_ts(b["at"]) - _ts(a["next_attempt_at"]) for recs in recorded.values()
                for a, b in zip(recs, recs[1:], strict=False) if a.get("next_attempt_at")]
    after_outage = [by_id[w][-1]["at"] - (receiver.first_seen[w] + OUTAGE_S) for w in by_id if by_id[w]]
    write_results("webhook_outage", {
        "jobs": JOBS, "events": len(recorded), "outage_s": OUTAGE_S, "scale": SCALE,
        "retry_base_s": RETRY_BASE_S, "max_attempts": MAX_ATTEMPTS, "posts_received": len(posts),
        "delivered": len(receiver.delivered()),
        "gave_up": sum(any(r["result"] == "gave_up" for r in recs) for recs in recorded.values()),
        "attempts_per_event": {"min": min(attempts), "max": max(attempts)},
        "delivery_after_outage_s": {"p50": round(percentile(after_outage, 50), 2),
                                    "max": round(max(after_outage), 2)},
        "retry_lateness_s": {"p50": round(percentile(lateness, 50), 2), "max": round(max(lateness, default=0), 2)},
        "bad_signatures": len(bad_signatures), "wall_s": round(time.monotonic() - t0, 1),
    })

    assert not bad_signatures, bad_signatures[:5]
    # in order of webhook-timestamp, to the header's resolution (whole seconds: concurrent senders
    # may stamp 10 and 11 and deliver them the other way round)
    out_of_order, latest = [], 0
    for stamp in stamps:
        if stamp < latest - 1:
            out_of_order.append((latest, stamp))
        latest = max(latest, stamp)
    assert not out_of_order, f"POSTs did not arrive in order of webhook-timestamp: {out_of_order[:5]}"
    assert set(by_id) == set(recorded), "the receiver and the service disagree on the events"
    for webhook_id, recs in recorded.items():
        got = by_id[webhook_id]
        results = [r["result"] for r in recs]
        assert [r["attempt"] for r in recs] == list(range(1, len(recs) + 1)), recs
        assert results[-1] == "delivered" and set(results[:-1]) <= {"retrying"}, (webhook_id, results)
        assert len(recs) >= 2, f"{webhook_id}: the outage covered no retry"
        assert len(got) == len(recs), f"{webhook_id}: {len(got)} POSTs for {len(recs)} attempts"
        assert [p["status"] for p in got].count(204) == 1, webhook_id
        assert len({p["body"] for p in got}) == 1, f"{webhook_id}: the body changed between attempts"
    for job_id in ids:
        events = sorted((json.loads(p[0]["body"]) for p in by_id.values()
                         if json.loads(p[0]["body"])["data"]["id"] == job_id), key=lambda e: _ts(e["timestamp"]))
        assert [e["type"] for e in events] == ["job.started", "job.succeeded"], events
