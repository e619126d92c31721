"""The standard gRPC health service (``grpc.health.v1.Health``) on the receivers' port, so a
Kubernetes gRPC probe or an Envoy health check asks the daemon itself (grpcio-health-checking).

Each of meshaudit's gRPC services, and the whole server (the empty name), is SERVING while the
daemon is ready (``/readyz``: receiving, its queue not saturated, a sink to deliver to) and alive
(no core task died: ``/healthz``), NOT_SERVING otherwise; ``Watch`` streams the changes. On
shutdown every service turns NOT_SERVING first, so a checker stops sending before the port closes.
"""

from __future__ import annotations

from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio

SERVICES: Final = (
    "",  # the server as a whole
    "envoy.service.accesslog.v3.AccessLogService",
    "opentelemetry.proto.collector.trace.v1.TraceService",
    "opentelemetry.proto.collector.logs.v1.LogsService",
)
SERVING: Final = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcHealth:
    def __init__(self) -> None:
        self.servicer = aio.HealthServicer()
        self.serving: bool | None = None  # as last set

    def attach(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def update(self, serving: bool) -> None:
        """Set every service's status; nothing is sent to watchers when it did not change."""
        if serving is self.serving:
            return
        self.serving = serving
        status = SERVING if serving else NOT_SERVING
        for name in SERVICES:
            await self.servicer.set(name, status)

    async def shutdown(self) -> None:
        await self.servicer.enter_graceful_shutdown()
