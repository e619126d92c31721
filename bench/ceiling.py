"""The ceiling: a minimal grpc.aio + uvloop server that only decodes and counts ALS entries and
OTLP spans, with the same server options meshaudit should use. Whatever meshaudit does on top
of decoding is measured as a ratio to this, in the same run, on the same core.

``/bench.Ceiling/Stats`` (unary, raw bytes) answers the counters as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uvloop
from meshaudit._proto.envoy.service.accesslog.v3 import als_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    # Without these grpc.aio buffered 2.5-3.5 GiB under a slow handler (BENCHMARKS.md, "bench/ceiling.py").
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 262144),
]

COUNTS = {"als_messages": 0, "als_entries": 0, "otlp_exports": 0, "spans": 0}
_EMPTY = b""


async def stream_access_logs(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> bytes:
    decode = als_pb2.StreamAccessLogsMessage.FromString
    counts = COUNTS
    async for raw in requests:
        m = decode(raw)
        counts["als_messages"] += 1
        counts["als_entries"] += len(m.http_logs.log_entry) + len(m.tcp_logs.log_entry)
    return _EMPTY


async def export(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
    req = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
    n = 0
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            n += len(ss.spans)
    COUNTS["otlp_exports"] += 1
    COUNTS["spans"] += n
    return _EMPTY  # an empty ExportTraceServiceResponse


async def stats(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return json.dumps(COUNTS).encode()


async def serve(addr: str) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    # Raw bytes in and out: the handlers decode themselves, exactly once.
    handlers = [
        grpc.method_handlers_generic_handler(
            "envoy.service.accesslog.v3.AccessLogService",
            {"StreamAccessLogs": grpc.stream_unary_rpc_method_handler(stream_access_logs)},
        ),
        grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(export)},
        ),
        grpc.method_handlers_generic_handler("bench.Ceiling", {"Stats": grpc.unary_unary_rpc_method_handler(stats)}),
    ]
    server.add_generic_rpc_handlers(handlers)
    server.add_insecure_port(addr)
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description="decode-and-count gRPC server (the ceiling)")
    p.add_argument("--grpc", required=True, help="HOST:PORT")
    args = p.parse_args()
    uvloop.install()
    asyncio.run(serve(args.grpc))


if __name__ == "__main__":
    main()
