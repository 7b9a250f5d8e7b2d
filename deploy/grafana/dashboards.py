"""The Grafana dashboards of ldm-serve, as code: ``python deploy/grafana/dashboards.py`` rewrites
``deploy/grafana/dashboards/*.json`` (commit both; a test checks they match).

Every panel is one :class:`Panel` row below: title, unit, description and its PromQL
queries. ``tests/integration/test_dashboards.py`` evaluates each query against a real
Prometheus scraping a live gateway and worker. Plain dictionaries in Grafana's JSON model
(schemaVersion 39, Grafana 10.4+), no library: the whole definition fits on these pages.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "ldm-prometheus"}  # provisioning/datasources/prometheus.yml
OUT_DIR = Path(__file__).resolve().parent / "dashboards"
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    description: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"
    gpu_only: bool = False  # returns data only when a worker runs on CUDA
    width: int = 12


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _q(expr: str, legend: str) -> Query:
    return Query(" ".join(expr.split()), legend)


def _quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99), selector: str = "") -> tuple[
    Query, ...
]:
    group = f"le, {by}" if by else "le"
    prefix = "{{" + by + "}} " if by else ""
    return tuple(
        _q(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{selector}[{RATE}])))",
           f"{prefix}p{round(q * 100)}")
        for q in qs
    )


SERVICE = Dashboard(
    "ldm-service",
    "ldm-serve / Service overview",
    "What clients see: requests, errors, latency, jobs, queues and rejections (gateway and worker metrics).",
    (
        Panel("Request rate by route and code", "reqps",
              "HTTP requests per second at the gateway, by route template and status code.",
              (_q(f"sum by (route, code) (rate(ldm_http_requests_total[{RATE}]))", "{{route}} {{code}}"),)),
        Panel("Error ratio by code", "percentunit",
              "Share of all HTTP requests answered with a 4xx or 5xx code (by code), and the recorded 5xx ratio "
              "over 5 minutes that the LdmHighErrorRatio alert watches.",
              (_q(f"sum by (code) (rate(ldm_http_requests_total{{code=~\"4..|5..\"}}[{RATE}])) / ignoring(code) "
                  f"group_left() sum(rate(ldm_http_requests_total[{RATE}]))", "{{code}}"),
               _q("ldm:http_error_ratio:rate5m", "5xx (5m, alerting)"))),
        Panel("Submit latency", "s",
              "Time from a submission (POST /v1/txt2img or /v1/inpaint) to its response headers; with Prefer: wait "
              "this includes the wait for the result.",
              _quantiles("ldm_http_request_duration_seconds",
                         selector='{route=~"/v1/txt2img|/v1/inpaint", method="POST"}')),
        Panel("Jobs submitted by kind", "ops",
              "Jobs accepted per second by the gateway, by kind (txt2img, img2img, inpaint).",
              (_q(f"sum by (kind) (rate(ldm_jobs_submitted_total[{RATE}]))", "{{kind}}"),)),
        Panel("Jobs finished by status", "ops",
              "Jobs finished per second by the workers, by final status (succeeded, failed, canceled, expired).",
              (_q(f"sum by (status) (rate(ldm_jobs_finished_total[{RATE}]))", "{{status}}"),)),
        Panel("Queue depth by priority", "short",
              "Jobs waiting in the Redis queues, by priority, summed over models (as the gateway last read them).",
              (_q('sum by (priority) (label_replace(ldm:queue_depth:max, "priority", "$1", "queue", '
                  '".*-(high|normal|low)"))', "{{priority}}"),)),
        Panel("Queue wait", "s",
              "Time from submission until a worker starts the job (p50, p95, p99 over 5 minutes, recorded). "
              "The LdmQueueWaitSLO alert fires when p95 stays above 30 s.",
              tuple(_q(f"model:ldm_job_queue_wait_seconds:p{p}_5m", "{{model}} p" + p) for p in ("50", "95", "99"))),
        Panel("End-to-end latency", "s",
              "Time from submission to the job's last image (p50, p95, p99 over 5 minutes, recorded).",
              tuple(_q(f"model:ldm_job_e2e_seconds:p{p}_5m", "{{model}} p" + p) for p in ("50", "95", "99"))),
        Panel("Images per second", "ops",
              "Images generated and stored per second, by model (recorded over 5 minutes).",
              (_q("model:ldm_images_generated:rate5m", "{{model}}"),)),
        Panel("Rejected submissions (429)", "ops",
              "Submissions refused per second, by reason (queue_full answers 429 with Retry-After), and every "
              "HTTP 429 the gateway sent.",
              (_q(f"sum by (reason) (rate(ldm_jobs_rejected_total[{RATE}]))", "{{reason}}"),
               _q(f'sum(rate(ldm_http_requests_total{{code="429"}}[{RATE}]))', "HTTP 429"))),
    ),
)

WORKERS = Dashboard(
    "ldm-workers",
    "ldm-serve / Workers and engine",
    "Inside the workers: liveness, the continuous-batching engine, step and decode times, GPU memory.",
    (
        Panel("Workers alive and busy", "short",
              "Workers with a live heartbeat (the gateway's view), workers scraped by Prometheus, and workers in a "
              "batched step at scrape time.",
              (_q("max(ldm_workers_alive)", "alive (heartbeat)"),
               _q('sum(up{job="ldm-worker"})', "scraped"),
               _q("sum(ldm_worker_busy)", "busy"))),
        Panel("Running and waiting rows", "short",
              "Rows (images) in the engine's running batch, and rows taken from the queue that wait to join it.",
              (_q("sum by (model) (ldm_engine_running_rows)", "{{model}} running"),
               _q("sum by (model) (ldm_engine_waiting_rows)", "{{model}} waiting"))),
        Panel("Rows per UNet call (batch fill)", "short",
              "Average rows per batched denoising step: how full the batches are. Compare with LDM_MAX_BATCH_ROWS.",
              (_q(f"sum by (model) (rate(ldm_batch_size_rows_sum[{RATE}])) / "
                  f"sum by (model) (rate(ldm_batch_size_rows_count[{RATE}]))", "{{model}} rows/step"),)),
        Panel("Admitted and padded rows", "ops",
              "Rows admitted into the running batch per second, and padding rows added to reach a compiled batch "
              "size (cudagraphs, tensorrt, engine buckets): padding is wasted work.",
              (_q(f"sum by (model) (rate(ldm_engine_admitted_rows_total[{RATE}]))", "{{model}} admitted"),
               _q(f"sum by (model) (rate(ldm_engine_padded_rows_total[{RATE}]))", "{{model}} padded"))),
        Panel("Denoise step time", "s",
              "Wall time of one batched DDIM step (UNet with guidance) over all rows of the batch.",
              _quantiles("ldm_denoise_step_seconds", "model", (0.5, 0.95))),
        Panel("Decode time", "s",
              "Time from a row's last DDIM step to its decoded image (VAE decoder).",
              _quantiles("ldm_decode_seconds", "model", (0.5, 0.95))),
        Panel("Queue to first step", "s",
              "Time from submission until the job's first denoising step: queue wait plus admission.",
              _quantiles("ldm_queue_to_first_step_seconds", "model", (0.5, 0.95))),
        Panel("Jobs not succeeded", "ops",
              "Jobs per second that ended other than succeeded (failed, canceled, expired), and jobs the engine "
              "dropped because they failed alone.",
              (_q(f'sum by (status) (rate(ldm_jobs_finished_total{{status!="succeeded"}}[{RATE}]))', "{{status}}"),
               _q(f"sum(rate(ldm_engine_failed_jobs_total[{RATE}]))", "engine failures"))),
        Panel("Images per second per worker", "ops",
              "Per-worker breakdown: images stored per second by each worker (instance).",
              (_q(f"sum by (instance) (rate(ldm_images_generated_total[{RATE}]))", "{{instance}}"),)),
        Panel("Busy fraction per worker", "percentunit",
              "Per-worker breakdown: fraction of wall time each worker spends in engine steps (1 = saturated).",
              (_q(f"sum by (instance) (rate(ldm_engine_step_seconds_sum[{RATE}]))", "{{instance}}"),)),
        Panel("GPU memory", "bytes",
              "CUDA workers only: memory of this worker's tensors and its allocator's reserve (torch), and the "
              "device's used memory (NVML, every process).",
              (_q("ldm_gpu_memory_allocated_bytes", "{{instance}} gpu{{device}} allocated"),
               _q("ldm_gpu_memory_reserved_bytes", "{{instance}} gpu{{device}} reserved"),
               _q("ldm_gpu_memory_used_bytes", "{{instance}} gpu{{device}} used (NVML)")),
              gpu_only=True),
        Panel("GPU utilisation", "percentunit",
              "CUDA workers with pynvml (nvidia-ml-py) only: fraction of time the GPU ran kernels (NVML).",
              (_q("ldm_gpu_utilization_ratio", "{{instance}} gpu{{device}}"),), gpu_only=True),
    ),
)

WEBHOOKS = Dashboard(
    "ldm-webhooks",
    "ldm-serve / Webhooks",
    "Signed webhook deliveries from the workers' delivery threads: results, latency, backlog.",
    (
        Panel("Deliveries by result", "ops",
              "Delivery attempts per second by result: delivered, retrying (will retry with backoff), gave_up "
              "(every attempt failed: the LdmWebhookFailures alert), refused (private target).",
              (_q(f"sum by (result) (rate(ldm_webhook_deliveries_total[{RATE}]))", "{{result}}"),)),
        Panel("Delivery latency", "s",
              "Duration of one HTTP delivery attempt (p50, p95): the receivers' response time.",
              _quantiles("ldm_webhook_delivery_seconds", "", (0.5, 0.95))),
        Panel("Retries pending", "short",
              "Deliveries not done yet: queued (due now) and scheduled (retries waiting for their backoff).",
              (_q("max by (state) (ldm_webhook_deliveries_pending)", "{{state}}"),)),
        Panel("Events enqueued by type", "ops",
              "Webhook events put on the delivery queue per second, by event type.",
              (_q(f"sum by (event) (rate(ldm_webhook_events_enqueued_total[{RATE}]))", "{{event}}"),)),
    ),
)

DASHBOARDS = (SERVICE, WORKERS, WEBHOOKS)


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    """One panel in Grafana's JSON model."""
    targets = [
        {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend,
         "range": True}
        for i, q in enumerate(panel.queries)
    ]
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {"unit": panel.unit, "min": 0, "custom": {"lineWidth": 1, "fillOpacity": 10}},
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": targets,
    }


def dashboard_json(dash: Dashboard) -> dict:
    """A whole dashboard, panels laid out two per row."""
    panels, x, y = [], 0, 0
    for i, panel in enumerate(dash.panels, start=1):
        if x + panel.width > 24:
            x, y = 0, y + 8
        panels.append(panel_json(panel, i, x, y))
        x += panel.width
    return {
        "uid": dash.uid,
        "title": dash.title,
        "description": dash.description,
        "tags": ["ldm-serve"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "templating": {"list": []},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{d.uid}.json": json.dumps(dashboard_json(d), indent=2) + "\n" for d in DASHBOARDS}


def main() -> int:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT_DIR / name).write_text(text)
        print(OUT_DIR / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
