"""Every Grafana panel's PromQL returns data from a real Prometheus scraping a live service.

Starts Debian's ``prometheus`` (skipped with the reason where it is not installed) with the
project's recording and alerting rules, scraping a real gateway and a real worker (the tiny
random model) every second; sends traffic (txt2img and inpaint jobs, a cancel, a 4xx, 429s from
a full queue, a webhook whose first delivery fails), then evaluates each panel query of
``deploy/grafana/dashboards/*.json`` over the test's time range through Prometheus's HTTP API.
With ``LDM_WRITE_DOCS=1`` it also renders each dashboard's data to ``docs/images/``.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.serving_support import (
    ROOT,
    child_env,
    free_port,
    redis_for_tests,
    require_redis,
    start_hook_server,
    start_process,
    stop_process,
    wait_http,
    wait_until,
)

pytestmark = pytest.mark.integration

DASHBOARD_DB = 13
RATE_INTERVAL = "20s"  # what Grafana's $__rate_interval would be at a 1 s scrape interval, with margin
SECRET = "whsec_" + base64.b64encode(b"dashboards-test-secret-key-01234").decode()
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"


class Receiver:
    """A webhook receiver that fails the first delivery (500) and accepts the rest."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.server, self.url = start_hook_server(self._answer)

    def _answer(self, _headers: dict[str, str], _body: bytes) -> int:
        code = 500 if not self.calls else 200
        self.calls.append(code)
        return code


def _png(size: int, mode: str, color: object) -> str:
    buf = io.BytesIO()
    Image.new(mode, (size, size), color).save(buf, format="PNG")  # type: ignore[arg-type]
    return base64.b64encode(buf.getvalue()).decode()


class Prom:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert r["status"] == "success", r
        return r["data"]["result"]

    def query_range(self, expr: str, start: float, end: float) -> dict:
        return httpx.get(
            f"{self.url}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": 1}, timeout=20
        ).json()


@pytest.fixture(scope="module")
def stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (Debian package `prometheus`): dashboards test skipped")
    url = redis_for_tests(DASHBOARD_DB)
    require_redis(url)
    tmp = tmp_path_factory.mktemp("dashboards")
    env = child_env(
        redis_url=url, redis_prefix="dash", max_batch_rows=1, max_images=1, max_queue_depth=3,
        heartbeat_interval_s=0.5, heartbeat_ttl_s=10, reap_interval_s=1, allow_private_webhooks="true",
        webhook_secret=SECRET, webhook_retry_base_s=0.5, webhook_progress_interval_s=0, max_width=256,
        max_height=256, max_steps=60,
        default_priority_high="true",  # the queue-depth panels want jobs of every priority
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        wport, gport, pport = free_port(), free_port(), free_port()
        worker = start_process(
            ["worker", "--model", str(model_path), "--name", "dash-worker", "--metrics-port", str(wport)],
            env, tmp / "worker.log",
        )
        procs.append(worker)
        gateway = start_process(["gateway", "--port", str(gport)], env, tmp / "gateway.log")
        procs.append(gateway)
        gw = f"http://127.0.0.1:{gport}"
        wait_http(f"{gw}/healthz", 60, gateway, tmp / "gateway.log")
        # /readyz answers 503 while the model loads; before that (the worker may re-execute itself
        # onto jemalloc first) nothing listens on the port yet
        wait_http(f"http://127.0.0.1:{wport}/readyz", 180, worker, tmp / "worker.log")
        rules = sorted(str(p) for p in (ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
        (tmp / "prometheus.yml").write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": rules,
            "scrape_configs": [
                {"job_name": "ldm-gateway", "static_configs": [{"targets": [f"127.0.0.1:{gport}"]}]},
                {"job_name": "ldm-worker", "static_configs": [{"targets": [f"127.0.0.1:{wport}"]}]},
            ],
        }))
        prom_proc = subprocess.Popen(
            [prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{pport}"],
            stdout=open(tmp / "prometheus.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )
        procs.append(prom_proc)
        prom_url = f"http://127.0.0.1:{pport}"
        wait_http(f"{prom_url}/-/ready", 60, prom_proc, tmp / "prometheus.log")
        prom = Prom(prom_url)
        start = time.time()
        # rate() needs a sample before each increase: both targets scraped before any traffic, and the
        # traffic sent twice with a scrape between (a counter's first sample is the baseline of its rate)
        wait_until(lambda: len(prom.query('up{job=~"ldm-.*"} == 1')) == 2, 60, "Prometheus to scrape both targets",
                   interval_s=0.5)
        receiver = Receiver()
        _traffic(gw, worker, receiver, 1)
        wait_until(lambda: prom.query('ldm_jobs_rejected_total{reason="queue_full"}'), 60,
                   "Prometheus to scrape the first round", interval_s=0.5)
        _traffic(gw, worker, receiver, 2)
        receiver.server.shutdown()
        # everything the traffic did has been scraped and the 5-minute recording rules have values
        for expr in ('ldm_jobs_finished_total{status="canceled"}', 'ldm_webhook_deliveries_total{result="delivered"}',
                     'ldm_jobs_rejected_total{reason="queue_full"}', "model:ldm_job_e2e_seconds:p95_5m > 0",
                     "model:ldm_job_queue_wait_seconds:p95_5m >= 0",
                     "ldm:http_error_ratio:rate5m", 'ldm_http_requests_total{code="422"}'):
            try:
                wait_until(lambda e=expr: prom.query(e), 60, f"Prometheus to return {expr}", interval_s=0.5)
            except AssertionError as exc:
                seen = {q: prom.query(q) for q in ("ldm_job_e2e_seconds_count", "model:ldm_job_e2e_seconds:p95_5m",
                                                   "ldm_jobs_finished_total", "up")}
                raise AssertionError(f"{exc}; Prometheus has {json.dumps(seen)}") from None
        yield {"prom": prom, "start": start, "tmp": tmp}
    finally:
        for p in reversed(procs):
            stop_process(p)
        if os.environ.get("LDM_TEST_SHOW_LOGS"):
            for log in sorted(tmp.glob("*.log")):
                print(f"===== {log.name}\n{log.read_text()[-4000:]}")


def _traffic(gw: str, worker: subprocess.Popen[bytes], receiver: Receiver, round_: int) -> None:
    with httpx.Client(base_url=gw, timeout=60) as c:
        wait = {"Prefer": "wait=50"}
        for i, prio in enumerate(("high", "normal", "low")):
            r = c.post("/v1/txt2img", headers=wait, json={"prompt": f"dash {i}", "steps": 6, "seed": i,
                                                          "priority": prio})
            assert r.status_code in (200, 202) and r.json()["status"] == "succeeded", r.text
        r = c.post("/v1/inpaint", headers=wait, json={
            "prompt": "dash fill", "steps": 6, "image": _png(64, "RGB", (200, 30, 30)), "mask": _png(64, "L", 255)})
        assert r.json()["status"] == "succeeded", r.text
        r = c.post("/v1/txt2img", headers=wait, json={"prompt": "dash hook", "steps": 4, "webhook": receiver.url})
        assert r.json()["status"] == "succeeded", r.text
        bad = c.post("/v1/txt2img", json={"prompt": "dash bad", "steps": 100000})
        assert bad.status_code == 422
        # Since issue 10 nothing a client sends passes the gateway and then fails in the worker (an
        # over-long prompt runs truncated, with a warning), so the failed-job series are the ones the
        # worker exports at 0 from its start; this job still exercises the warning path.
        r = c.post("/v1/txt2img", headers=wait, json={"prompt": "a " * 140, "steps": 4})
        assert r.json()["status"] == "succeeded" and r.json()["warnings"], r.text
        # a full queue: the worker is paused while we submit, so the bound (3) is reached and 429s follow
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            codes, accepted = [], []
            for i in range(8):
                r = c.post("/v1/txt2img", json={"prompt": f"dash burst {i}", "steps": 4})
                codes.append(r.status_code)
                if r.status_code == 202:
                    accepted.append(r.json()["id"])
            assert 429 in codes and accepted, codes
            assert c.post(f"/v1/jobs/{accepted[-1]}/cancel").status_code in (200, 202)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        for job_id in accepted:
            wait_until(lambda j=job_id: c.get(f"/v1/jobs/{j}").json()["status"] in ("succeeded", "canceled"), 120,
                       f"job {job_id} to end")
        # a running job canceled: the worker ends it as canceled (a queued one never reaches a worker)
        for attempt in range(5):
            job_id = c.post("/v1/txt2img", json={"prompt": f"dash long {attempt}", "steps": 60}).json()["id"]
            wait_until(lambda j=job_id: c.get(f"/v1/jobs/{j}").json()["status"] != "queued", 60, "the job to start")
            c.post(f"/v1/jobs/{job_id}/cancel")
            status = wait_until(lambda j=job_id: (s := c.get(f"/v1/jobs/{j}").json()["status"]) in (
                "succeeded", "canceled") and s, 60, f"job {job_id} to end")
            if status == "canceled":
                break
        else:
            pytest.fail("five 60-step jobs all finished before their cancel arrived")
    wait_until(lambda: receiver.calls.count(200) >= round_, 60, "the webhook to be delivered (after one failure)")


def _targets() -> list[tuple[str, dict, dict]]:
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for target in panel["targets"]:
                out.append((dash["uid"], panel, target))
    return out


GPU_METRICS = ("ldm_gpu_",)


def _finite_points(result: list[dict]) -> int:
    return sum(1 for s in result for _, v in s["values"] if math.isfinite(float(v)))


def test_every_panel_query_returns_data(stack: dict) -> None:
    prom: Prom = stack["prom"]
    failures, gpu_skipped, results = [], [], {}

    def query(expr: str) -> dict:
        # The 1 s step grid runs start, start + 1, ... <= end: it goes 2 s past now, so a series whose first
        # sample is only just in (a recording rule, a rate's second scrape) is not missed between two grid
        # points; on a loaded machine the last scrape or rule evaluation may lag behind the traffic, so an
        # empty answer is asked again for up to 30 s before it counts (both races seen under load).
        res = prom.query_range(expr, stack["start"], time.time() + 2)
        deadline = time.monotonic() + 30
        while res.get("status") == "success" and not res["data"]["result"] and time.monotonic() < deadline:
            time.sleep(0.5)
            res = prom.query_range(expr, stack["start"], time.time() + 2)
        return res

    for uid, panel, target in _targets():
        expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
        gpu = any(m in expr for m in GPU_METRICS)
        res = prom.query_range(expr, stack["start"], time.time()) if gpu else query(expr)
        where = f"{uid} / {panel['title']} / {target['refId']}: {expr}"
        if res.get("status") != "success":
            failures.append(f"{where}: error {res.get('error')}")
            continue
        result = res["data"]["result"]
        results[(uid, panel["id"], target["refId"])] = result
        if gpu:
            gpu_skipped.append(where)  # a CPU worker exports no GPU series; the query must still parse
            continue
        if not result:
            failures.append(f"{where}: no series")
        elif not _finite_points(result):
            failures.append(f"{where}: only NaN")
    assert not failures, "\n".join(failures)
    assert len(gpu_skipped) == 4  # the two GPU panels' queries, checked for syntax only here
    if os.environ.get("LDM_WRITE_DOCS") == "1":
        _render(results, ROOT / "docs" / "images", stack["start"])
    else:
        _render(results, stack["tmp"], stack["start"])


def test_alert_rules_load_and_stay_quiet_on_a_healthy_stack(stack: dict) -> None:
    prom: Prom = stack["prom"]
    groups = httpx.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert {"LdmNoWorkerAlive", "LdmQueueWaitSLO", "LdmHighErrorRatio", "LdmWebhookFailures",
            "LdmWorkerStuckBusy"} <= set(rules)
    assert all(r["health"] == "ok" for r in rules.values()), [r for r in rules.values() if r["health"] != "ok"]
    assert not [r["name"] for r in rules.values() if r.get("state") == "firing"]


def _render(results: dict, out_dir: Path, t0: float) -> None:
    """One PNG per dashboard: each panel's series as Grafana would draw them (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        panels = dash["panels"]
        cols = 2
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(13, 2.6 * rows), squeeze=False)
        for ax, panel in zip(axes.flat, panels, strict=False):
            unit = panel["fieldConfig"]["defaults"]["unit"]
            drawn = 0
            for target in panel["targets"]:
                for series in results.get((dash["uid"], panel["id"], target["refId"]), []):
                    pts = [(float(t), float(v)) for t, v in series["values"] if math.isfinite(float(v))]
                    if not pts:
                        continue
                    label = target["legendFormat"]
                    for k, v in series["metric"].items():
                        label = label.replace("{{" + k + "}}", v)
                    ax.plot([p[0] - t0 for p in pts], [p[1] for p in pts], label=label[:40], linewidth=1)
                    drawn += 1
            ax.set_title(f"{panel['title']} [{unit}]", fontsize=9)
            ax.tick_params(labelsize=7)
            if drawn:
                ax.legend(fontsize=6, loc="upper left")
            else:
                ax.text(0.5, 0.5, "no data (GPU workers only)", ha="center", va="center", transform=ax.transAxes)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"{dash['title']} (test traffic; x: seconds into the test)", fontsize=11)
        fig.tight_layout()
        fig.savefig(out_dir / f"dashboard-{dash['uid']}.png", dpi=80)
        plt.close(fig)
