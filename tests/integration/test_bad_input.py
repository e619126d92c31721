"""Bad input on the gRPC port: a clear error or a counted reject, and the daemon keeps serving
other streams."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from infra import als
from infra.daemon import Daemon

ALS_METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


async def _raw_stream(target: str, payloads: list[bytes]) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.stream_unary(ALS_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)

        async def gen() -> Any:
            for p in payloads:
                yield p

        try:
            await call(gen(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_garbage_and_truncated_messages_are_rejected_and_counted(daemon: Daemon) -> None:
    good = als.http_message([als.inbound_http("frontend", path="/reviews/1")], als.identifier("reviews"))
    raw = good.SerializeToString()
    assert await _raw_stream(daemon.grpc, [b"\xff\xff\xff\xff garbage"]) != grpc.StatusCode.OK
    assert await _raw_stream(daemon.grpc, [raw[: len(raw) // 2]]) != grpc.StatusCode.OK
    assert daemon.metric("meshaudit_rejected_total", receiver="envoy_als", reason="undecodable") == 2
    # Still serving.
    assert await als.stream(daemon.grpc, [good]) == grpc.StatusCode.OK
    assert daemon.metric("meshaudit_received_total", receiver="envoy_als", kind="http") == 1


async def test_oversized_message_is_refused(daemon: Daemon) -> None:
    entries = [als.inbound_http("frontend", path="/reviews/" + "x" * 4096) for _ in range(1100)]
    code = await als.stream(daemon.grpc, [als.http_message(entries, als.identifier("reviews"))])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        await als.stream(daemon.grpc, [als.http_message(entries[:2], als.identifier("reviews"))]) == grpc.StatusCode.OK
    )


async def test_stream_without_identifier_is_rejected_while_others_keep_flowing(daemon: Daemon) -> None:
    ident = als.identifier("reviews")
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def gen() -> Any:
        while (m := await queue.get()) is not None:
            yield m

    async with grpc.aio.insecure_channel(daemon.grpc) as ch:
        from meshaudit._proto.envoy.service.accesslog.v3 import als_pb2_grpc

        good_call = als_pb2_grpc.AccessLogServiceStub(ch).StreamAccessLogs(gen(), timeout=20)
        await queue.put(als.http_message([als.inbound_http("frontend", path="/reviews/1")], ident))
        # A second stream that never says who it is.
        code = await als.stream(daemon.grpc, [als.http_message([als.inbound_http("frontend")])])
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        await queue.put(als.http_message([als.inbound_http("frontend", path="/reviews/2")]))
        await queue.put(None)
        await good_call
    assert daemon.metric("meshaudit_rejected_total", receiver="envoy_als", reason="no_identifier") == 1
    assert daemon.metric("meshaudit_received_total", receiver="envoy_als", kind="http") == 2
    assert "before its identifier" in daemon.stderr()
