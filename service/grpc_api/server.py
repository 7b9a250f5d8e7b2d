"""The gRPC server of the gateway: ``grpc.aio`` on the gateway's own event loop, next to REST.

It runs inside the gateway process (not as a separate ``ldm-serve grpc``) so that both faces
share one :class:`~service.deps.Gateway`: the Redis connections, the API keys, the quota limiter
and the metrics registry, whose ``ldm_grpc_*`` series are in the same ``/metrics``. It serves
``ldm_serve.v1.GenerationService``, the standard health service (``""``: the process is up;
``ldm_serve.v1.GenerationService``: SERVING while ``/readyz`` would say ready) and server reflection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ldm_serve.errors import LdmServeError
from service.bodies import UPLOAD_PATHS, body_limit
from service.deps import Gateway
from service.grpc_api.pb import generation_service_pb2_grpc as pb_grpc
from service.grpc_api.servicer import SERVICE_NAME, GenerationServicer
from service.routes.system import readiness

log = logging.getLogger("ldm_serve.gateway.grpc")

HEALTH_INTERVAL_S = 2.0
GRACE_S = 5.0  # as uvicorn's timeout_graceful_shutdown


@dataclass
class GrpcServer:
    """A started server; :meth:`stop` it when the gateway stops."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    tracker: asyncio.Task[None]

    async def stop(self) -> None:
        self.tracker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.tracker
        await self.health.enter_graceful_shutdown()
        await self.server.stop(GRACE_S)


async def start_grpc_server(gw: Gateway, host: str, port: int) -> GrpcServer:
    """Serve the gRPC API on ``host:port`` (0: any free port; see :attr:`GrpcServer.port`)."""
    limit, _ = body_limit(gw.settings, next(iter(UPLOAD_PATHS)))  # the REST upload body limit
    # no SO_REUSEPORT: a second gateway on the same port fails, as uvicorn does, instead of sharing it
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)])
    pb_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(gw), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise RuntimeError(f"the gRPC API cannot listen on {host}:{port} (in use?): {exc}") from None
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    tracker = asyncio.create_task(_track_readiness(gw, health_servicer))
    log.info("gRPC API (%s) on %s:%d", SERVICE_NAME, host, bound)
    return GrpcServer(server, bound, health_servicer, tracker)


async def _track_readiness(gw: Gateway, health_servicer: health.aio.HealthServicer) -> None:
    """Keep the service's health status equal to ``/readyz``'s verdict."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    while True:
        try:
            ready = (await readiness(gw))["status"] == "ready"
        except LdmServeError:
            ready = False
        await health_servicer.set(SERVICE_NAME, serving if ready else not_serving)
        await asyncio.sleep(HEALTH_INTERVAL_S)
