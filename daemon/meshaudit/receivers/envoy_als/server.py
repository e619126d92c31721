"""Envoy AccessLogService/StreamAccessLogs receiver (HTTP and TCP entries).

Envoy sends the stream ``Identifier`` (node, log_name) only in the first message of a stream:
it is cached per stream. A stream that starts without one is aborted with INVALID_ARGUMENT
and counted; Envoy then opens a new stream, which carries the identifier.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from meshaudit import metrics
from meshaudit._proto.envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from meshaudit.model import Hop
from meshaudit.naming import Namer
from meshaudit.receivers.envoy_als.decode import StreamContext, decode_http, decode_tcp
from meshaudit.receivers.ingest import IngestQueue

log = logging.getLogger("meshaudit.receivers.envoy_als")
RECEIVER = "envoy_als"


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, queue: IngestQueue, namer: Namer) -> None:
        self.queue = queue
        self.namer = namer
        self._http = metrics.RECEIVED.labels(RECEIVER, "http")
        self._tcp = metrics.RECEIVED.labels(RECEIVER, "tcp")
        self._messages = metrics.MESSAGES.labels(RECEIVER)
        self._dropped = metrics.DROPPED.labels(RECEIVER, "queue_full")

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> als_pb2.StreamAccessLogsResponse:
        ctx: StreamContext | None = None
        metrics.STREAMS_OPENED.inc()
        metrics.STREAMS_ACTIVE.inc()
        peer = context.peer()
        try:
            async for msg in request_iterator:
                self._messages.inc()
                if msg.HasField("identifier"):
                    ident = msg.identifier
                    node = ident.node
                    ctx = StreamContext(self.namer, node.id, node.cluster, ident.log_name)
                    log.info(
                        "Access-log stream opened: node=%s log_name=%s peer=%s",
                        ctx.node_id,
                        ctx.log_name,
                        peer,
                    )
                kind = msg.WhichOneof("log_entries")
                if ctx is None:
                    n = self._count_entries(msg, kind)
                    metrics.REJECTED.labels(RECEIVER, "no_identifier").inc(max(n, 1))
                    log.warning("Access-log stream from %s sent entries before its identifier; closing it.", peer)
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "the first StreamAccessLogsMessage of a stream must carry identifier (node, log_name)",
                    )
                    break
                hops: list[Hop] = []
                if kind == "http_logs":
                    entries = msg.http_logs.log_entry
                    decode_http(entries, ctx, self.namer, hops)
                    self._http.inc(len(hops))
                elif kind == "tcp_logs":
                    entries = msg.tcp_logs.log_entry
                    decode_tcp(entries, ctx, self.namer, hops)
                    self._tcp.inc(len(hops))
                if hops and not self.queue.offer(hops):
                    self._dropped.inc(len(hops))
        finally:
            metrics.STREAMS_ACTIVE.dec()
        return als_pb2.StreamAccessLogsResponse()

    @staticmethod
    def _count_entries(msg: Any, kind: str | None) -> int:
        if kind == "http_logs":
            return len(msg.http_logs.log_entry)
        if kind == "tcp_logs":
            return len(msg.tcp_logs.log_entry)
        return 0
