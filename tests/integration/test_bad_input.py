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


# --- issue 10: every refusal answered per the spec and counted; logs that cannot be flooded --------
TRACES_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
TRACE, SPAN = bytes.fromhex("5b8efff798038103d269b633813fc60c"), bytes.fromhex("eee19b7ec3c1b174")


async def _raw_unary(target: str, payload: bytes, method: str = TRACES_METHOD) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        call = ch.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            await call(payload, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _export(n_spans: int = 1, trace_id: bytes = TRACE, pad: int = 0) -> bytes:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    req = trace_service_pb2.ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for _ in range(n_spans):
        sp = ss.spans.add()
        sp.trace_id, sp.span_id, sp.name = trace_id, SPAN, "x" * pad
    return bytes(req.SerializeToString())


async def test_grpc_refusals_have_the_right_status_and_are_counted(daemon: Daemon) -> None:
    # Undecodable: INVALID_ARGUMENT (was UNKNOWN), for OTLP and for an ALS stream.
    assert await _raw_unary(daemon.grpc, b"\xff\xff\xff\xff garbage") == grpc.StatusCode.INVALID_ARGUMENT
    assert await _raw_stream(daemon.grpc, [b"\xff\xff\xff\xff garbage"]) == grpc.StatusCode.INVALID_ARGUMENT
    # Over max_message_bytes (4 MiB), under gRPC core's own limit: RESOURCE_EXHAUSTED and counted.
    big = _export(1, pad=5 * 1024 * 1024)
    assert await _raw_unary(daemon.grpc, big) == grpc.StatusCode.RESOURCE_EXHAUSTED
    entries = [als.inbound_http("frontend", path="/reviews/" + "x" * 4096) for _ in range(1100)]
    assert (
        await als.stream(daemon.grpc, [als.http_message(entries, als.identifier("reviews"))])
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    # A trace id that is not 16 bytes: INVALID_ARGUMENT.
    assert await _raw_unary(daemon.grpc, _export(1, trace_id=b"\x01" * 12)) == grpc.StatusCode.INVALID_ARGUMENT
    assert daemon.metric("meshaudit_rejected_total", receiver="otlp_grpc", reason="undecodable") == 1
    assert daemon.metric("meshaudit_rejected_total", receiver="envoy_als", reason="undecodable") == 1
    assert daemon.metric("meshaudit_rejected_total", receiver="otlp_grpc", reason="too_large") == 1
    assert daemon.metric("meshaudit_rejected_total", receiver="envoy_als", reason="too_large") == 1
    assert daemon.metric("meshaudit_rejected_total", receiver="otlp_grpc", reason="invalid_id") == 1
    # Still serving, and the good export is received.
    assert await _raw_unary(daemon.grpc, _export(2)) == grpc.StatusCode.OK
    assert daemon.metric("meshaudit_received_total", receiver="otlp_grpc", kind="span") == 2


async def test_1000_bad_messages_write_a_handful_of_log_lines_and_exact_counters(daemon: Daemon) -> None:
    import aiohttp

    garbage = b"\xff\xff\xff\xff\x0f garbage"
    async with grpc.aio.insecure_channel(daemon.grpc) as ch:
        call = ch.unary_unary(TRACES_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)

        async def one() -> grpc.StatusCode:
            try:
                await call(garbage, timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        codes: list[grpc.StatusCode] = []
        for _ in range(10):  # 10 rounds of 100 concurrent calls
            codes += await asyncio.gather(*(one() for _ in range(100)))
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    statuses: list[int] = []
    async with aiohttp.ClientSession() as http:
        for i in range(1000):
            body = (
                b"\xff\xfe garbage"
                if i % 2
                else b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz\\n"}]}]}]}'
            )
            ctype = "application/x-protobuf" if i % 2 else "application/json"
            async with http.post(f"http://{daemon.http}/v1/traces", data=body, headers={"Content-Type": ctype}) as r:
                statuses.append(r.status)
                await r.read()
    assert set(statuses) == {400}
    assert daemon.metric("meshaudit_rejected_total", receiver="otlp_grpc", reason="undecodable") == 1000
    assert daemon.metric("meshaudit_rejected_total", receiver="otlp_http", reason="undecodable") == 1000
    err = daemon.stderr()
    assert "Traceback" not in err and "Exception deserializing" not in err
    rejected = [line for line in err.splitlines() if "Rejected" in line]
    assert 2 <= len(rejected) <= 6, rejected  # one per receiver and reason per 10 s
