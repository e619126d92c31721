"""The standard gRPC health service on the receivers' port (Kubernetes gRPC probes, Envoy
health checks), and the build-info metric: a real daemon answers SERVING for the server and for
each of its services; the status follows readiness, and a watcher sees it change."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from infra.daemon import Daemon, free_port
from meshaudit.receivers.grpc_health import SERVICES, GrpcHealth

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_ready_daemon_is_serving_for_every_service(daemon: Daemon) -> None:
    async with grpc.aio.insecure_channel(daemon.grpc) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in SERVICES:
            got = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert got.status == SERVING, name
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    scrape = daemon.scrape()
    assert 'meshaudit_build_info{grpcio="' in scrape and "_created" not in scrape


async def test_the_status_follows_readiness_and_watchers_see_it() -> None:
    server = grpc.aio.server()
    health = GrpcHealth()
    health.attach(server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    try:
        await health.update(True)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == SERVING
            await health.update(False)  # e.g. the ingest queue saturated
            assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
            check = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICES[1]), timeout=5)
            assert check.status == NOT_SERVING
            await health.shutdown()
            watch.cancel()
    finally:
        await server.stop(None)
