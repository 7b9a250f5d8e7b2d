"""``python -m ldm_serve.healthcheck``: the container image's ``HEALTHCHECK`` (stdlib only).

Exits 0 when this container's ``/readyz`` answers 200, else 1. The port follows the
role: a worker (``LDM_WORKER_METRICS_PORT`` set) is probed on its metrics port, a
gateway on ``LDM_PORT`` (default 8000). ``LDM_HEALTHCHECK_URL`` overrides both.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping


def probe_url(env: Mapping[str, str]) -> str:
    """The readiness URL of this container's process."""
    if env.get("LDM_HEALTHCHECK_URL"):
        return env["LDM_HEALTHCHECK_URL"]
    port = env.get("LDM_WORKER_METRICS_PORT") or env.get("LDM_PORT") or "8000"
    return f"http://127.0.0.1:{port}/readyz"


def main(env: Mapping[str, str] | None = None, timeout_s: float = 4.0) -> int:
    url = probe_url(os.environ if env is None else env)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - a local URL
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"not ready: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
