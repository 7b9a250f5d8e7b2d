"""The worker's small HTTP server: ``/metrics``, ``/healthz`` and ``/readyz`` on ``--metrics-port``.

It starts before the model loads, so that Prometheus and an orchestrator see the
process at once: ``/healthz`` answers 200 while the process lives, ``/readyz``
answers 503 until the worker has loaded and warmed up its model and registered
(then 200), and 503 again once it stops taking jobs (SIGTERM drain). Kubernetes
readiness probes and the image's ``HEALTHCHECK`` use ``/readyz``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class ProbeServer:
    """Serve metrics and probes of one worker process from a daemon thread.

    Args:
        registry: the Prometheus registry served on ``/metrics``.
        ready: called on each ``/readyz``; True when the worker takes jobs.
        host, port: where to listen (port 0 picks a free one; see :attr:`port`).
    """

    def __init__(
        self, registry: CollectorRegistry, ready: Callable[[], bool], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.registry = registry
        self.ready = ready
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._json(200, {"status": "ok"})
                elif path == "/readyz":
                    ok = bool(server.ready())
                    self._json(200 if ok else 503, {"status": "ready" if ok else "not_ready"})
                else:
                    self._json(404, {"error": "not_found", "paths": ["/metrics", "/healthz", "/readyz"]})

            def _json(self, code: int, body: dict) -> None:
                self._send(code, json.dumps(body).encode(), "application/json")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not news
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="probe-server", daemon=True)

    def start(self) -> ProbeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
