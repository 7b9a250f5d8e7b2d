"""``ldm-serve gateway``: run the FastAPI app under uvicorn."""

from __future__ import annotations

import logging

from ldm_serve.settings import Settings
from service.app import create_app


def run_gateway(settings: Settings) -> None:
    """Serve the gateway on ``settings.host:settings.port`` until SIGINT/SIGTERM."""
    import uvicorn

    logging.getLogger("ldm_serve").setLevel(logging.INFO)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=5,
        # grpc.aio shares the loop (settings.grpc_port); it is built for asyncio's own loop, not uvloop
        loop="asyncio" if settings.grpc_port is not None else "auto",
    )
