"""Prometheus metrics of the gateway (``GET /metrics``), on a registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    """Request, submission and queue metrics. Labels are bounded: route templates, not URLs."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ldm_http_requests_total", "HTTP requests by route template, method and status code",
            ["route", "method", "code"], registry=r,
        )
        self.request_seconds = Histogram(
            "ldm_http_request_duration_seconds", "Time to the response headers", ["route", "method"],
            buckets=SECONDS_BUCKETS, registry=r,
        )
        self.grpc_requests = Counter(
            "ldm_grpc_requests_total", "gRPC calls of ldm_serve.v1.GenerationService by method and status code",
            ["method", "code"], registry=r,
        )
        self.grpc_request_seconds = Histogram(
            "ldm_grpc_request_duration_seconds", "Time to the call's end (a WatchJob: the whole stream)",
            ["method"], buckets=SECONDS_BUCKETS, registry=r,
        )
        self.jobs_submitted = Counter(
            "ldm_jobs_submitted_total", "Jobs accepted by the gateway", ["model", "kind"], registry=r
        )
        self.jobs_rejected = Counter(
            "ldm_jobs_rejected_total", "Submissions refused", ["reason"], registry=r
        )
        self.jobs_rejected.labels("queue_full")  # exported at 0 from the start (rate() sees the first 429)
        self.queue_depth = Gauge("ldm_queue_depth", "Jobs waiting in each queue", ["queue"], registry=r)
        self.workers_alive = Gauge("ldm_workers_alive", "Workers with a live heartbeat", registry=r)
        self.webhook_backlog = Gauge(
            "ldm_webhook_deliveries_pending", "Webhook deliveries not yet done: queued (due) or scheduled (retry)",
            ["state"], registry=r,
        )
