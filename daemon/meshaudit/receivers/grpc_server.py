"""The one grpc.aio server (default 127.0.0.1:4317) for Envoy ALS and OTLP traces and logs.

Handlers are registered by hand (not with the generated ``add_*_to_server``) so that the
request deserializers can count undecodable messages per receiver before gRPC rejects them.
Channel options bound memory: grpc.aio buffers without limit when a handler is slower than its
stream, and BDP probing grows the window; with the probe off and a fixed lookahead, RSS stays
flat (BENCHMARKS.md: 2.5-3.5 GiB without them, under 75 MiB with them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from meshaudit import metrics
from meshaudit._proto.envoy.service.accesslog.v3 import als_pb2
from meshaudit.config import Config
from meshaudit.model import Hop
from meshaudit.naming import Namer
from meshaudit.receivers.envoy_als.server import RECEIVER as ALS
from meshaudit.receivers.envoy_als.server import AccessLogService
from meshaudit.receivers.ingest import IngestQueue
from meshaudit.receivers.otlp.decode import (
    ExportLogsServiceRequest,
    ExportTraceServiceRequest,
    decode_logs,
    decode_traces,
)

log = logging.getLogger("meshaudit.receivers.grpc")
OTLP = "otlp_grpc"


def _counting(parse: Callable[[bytes], Any], receiver: str) -> Callable[[bytes], Any]:
    rejected = metrics.REJECTED.labels(receiver, "undecodable")

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            rejected.inc()
            log.warning("Rejected an undecodable %s message (%d bytes).", receiver, len(data))
            raise

    return deserialize


class OtlpGrpc:
    """OTLP TraceService/Export and LogsService/Export."""

    def __init__(self, queue: IngestQueue, namer: Namer) -> None:
        self.queue = queue
        self.namer = namer
        self._spans = metrics.RECEIVED.labels(OTLP, "span")
        self._logs = metrics.RECEIVED.labels(OTLP, "log")
        self._messages = metrics.MESSAGES.labels(OTLP)
        self._busy = metrics.REJECTED.labels(OTLP, "busy")

    async def _offer(self, hops: list[Hop], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if hops and not self.queue.offer(hops):
            # Not accepted, so not lost: the exporter retries RESOURCE_EXHAUSTED with backoff.
            self._busy.inc(len(hops))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "meshaudit ingest queue is full; retry later")

    async def export_traces(self, req: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self._messages.inc()
        hops: list[Hop] = []
        self._spans.inc(decode_traces(req, self.namer, hops))
        await self._offer(hops, context)
        return trace_service_pb2.ExportTraceServiceResponse()

    async def export_logs(self, req: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self._messages.inc()
        hops: list[Hop] = []
        self._logs.inc(decode_logs(req, self.namer, hops))
        await self._offer(hops, context)
        return logs_service_pb2.ExportLogsServiceResponse()


def _service(
    service: str,
    method: str,
    kind: Callable[..., Any],
    handler: Callable[..., Any],
    request: Any,
    response: Any,
    receiver: str,
) -> Any:
    """One gRPC method whose undecodable requests are counted under ``receiver``."""
    return grpc.method_handlers_generic_handler(
        service,
        {
            method: kind(
                handler,
                request_deserializer=_counting(request.FromString, receiver),
                response_serializer=response.SerializeToString,
            )
        },
    )


def build_server(config: Config, queue: IngestQueue, namer: Namer, listen: str) -> tuple[grpc.aio.Server, int]:
    r = config.receivers
    options = [
        ("grpc.max_receive_message_length", r.max_message_bytes),
        ("grpc.max_connection_age_ms", int(r.grpc_max_connection_age_secs * 1000)),
        ("grpc.max_connection_age_grace_ms", int(r.grpc_max_connection_age_grace_secs * 1000)),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 262_144),
        ("grpc.so_reuseport", 1),
    ]
    server = grpc.aio.server(options=options)
    als = AccessLogService(queue, namer)
    otlp = OtlpGrpc(queue, namer)
    server.add_generic_rpc_handlers(
        (
            _service(
                "envoy.service.accesslog.v3.AccessLogService",
                "StreamAccessLogs",
                grpc.stream_unary_rpc_method_handler,
                als.StreamAccessLogs,
                als_pb2.StreamAccessLogsMessage,
                als_pb2.StreamAccessLogsResponse,
                ALS,
            ),
            _service(
                "opentelemetry.proto.collector.trace.v1.TraceService",
                "Export",
                grpc.unary_unary_rpc_method_handler,
                otlp.export_traces,
                ExportTraceServiceRequest,  # the map view: same bytes, attributes indexed in C
                trace_service_pb2.ExportTraceServiceResponse,
                OTLP,
            ),
            _service(
                "opentelemetry.proto.collector.logs.v1.LogsService",
                "Export",
                grpc.unary_unary_rpc_method_handler,
                otlp.export_logs,
                ExportLogsServiceRequest,
                logs_service_pb2.ExportLogsServiceResponse,
                OTLP,
            ),
        )
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {listen}")
    return server, port
