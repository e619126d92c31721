"""Envoy AccessLogService/StreamAccessLogs receiver (HTTP and TCP entries).

Envoy sends the stream ``Identifier`` (node, log_name) only in the first message of a stream:
it is cached per stream. A stream that starts without one is aborted with INVALID_ARGUMENT
and counted; Envoy then opens a new stream, which carries the identifier.

Bounds: a message with more than ``receivers.max_entries_per_message`` entries is rejected whole
(counted as ``too_many_entries``) before any entry is decoded; the stream goes on. A large message
is decoded and queued in slices of ``SLICE`` entries, yielding to the event loop between slices,
so one message never stalls the loop (health checks, ticks, other streams) for long. Values from
the wire are logged escaped and truncated (``logsafe.wire``); bad input is logged at most once
per reason per interval (``logsafe.RateLimited``), never with a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import grpc

from meshaudit import metrics
from meshaudit._proto.envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from meshaudit.engine.sources import claimed_by_node
from meshaudit.logsafe import RateLimited, wire
from meshaudit.model import Hop
from meshaudit.naming import Namer
from meshaudit.receivers.envoy_als.decode import SCANNER, StreamContext, decode_http, decode_tcp
from meshaudit.receivers.ingest import IngestQueue

if TYPE_CHECKING:
    from meshaudit.receivers.auth import GrpcAuth, SourceCheck

log = logging.getLogger("meshaudit.receivers.envoy_als")
RECEIVER = "envoy_als"
SLICE: Final = 2048  # entries decoded (and later evaluated) between yields to the event loop

Decoder = Callable[[Sequence[Any], StreamContext, Namer, list[Hop], bytes | None], None]


def node_metadata(node: Any) -> dict[str, str]:
    """The node metadata a claim reads (Istio's ``NAMESPACE``, ``SERVICE_ACCOUNT``)."""
    fields = node.metadata.fields
    return {k: fields[k].string_value for k in ("NAMESPACE", "SERVICE_ACCOUNT") if k in fields}


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        queue: IngestQueue,
        namer: Namer,
        max_entries: int | None = None,
        auth: GrpcAuth | None = None,
        sources: SourceCheck | None = None,
    ) -> None:
        self.queue = queue
        self.namer = namer
        # Who sends (mTLS, or a trusted sidecar's XFCC) and whether it may claim its node: judged
        # once per stream, when it opens and when its identifier comes.
        self.auth = auth
        self.sources = sources
        # receivers.max_entries_per_message; the queue carries it, so every receiver sees it
        self.max_entries = queue.max_message_entries if max_entries is None else max_entries
        self._http = metrics.RECEIVED.labels(RECEIVER, "http")
        self._tcp = metrics.RECEIVED.labels(RECEIVER, "tcp")
        self._messages = metrics.MESSAGES.labels(RECEIVER)
        self._dropped = metrics.DROPPED.labels(RECEIVER, "queue_full")
        self._too_many = metrics.REJECTED.labels(RECEIVER, "too_many_entries")
        self._mismatch = metrics.REJECTED.labels(RECEIVER, "source_mismatch")
        self._bad = RateLimited(log)
        if SCANNER is None:
            log.warning(
                "meshaudit's C entry scanner is not built (pip install builds it from _scan.c): HTTP "
                "access-log entries are read through protobuf instead, about 1 us more each."
            )

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> als_pb2.StreamAccessLogsResponse:
        ctx: StreamContext | None = None
        peer = context.peer()
        sender = None
        if self.auth is not None and self.auth.active:
            sender, refuse = self.auth.sender(context)
            if refuse is not None:
                metrics.REJECTED.labels(RECEIVER, refuse).inc()
                self._bad.warning(
                    refuse, "Refused an access-log stream from %s (%s): no usable sender identity.", wire(peer), refuse
                )
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"meshaudit refuses this sender: {refuse}")
        rejected = False  # the sender may not claim this stream's node and enforce_sources is on
        metrics.STREAMS_OPENED.inc()
        metrics.STREAMS_ACTIVE.inc()
        try:
            async for msg, data in request_iterator:  # grpc_server.Received: message, wire bytes
                self._messages.inc()
                nbytes = len(data)
                if msg.HasField("identifier"):
                    ident = msg.identifier
                    node = ident.node
                    ctx = StreamContext(self.namer, node.id, node.cluster, ident.log_name)
                    log.info(
                        "Access-log stream opened: node=%s log_name=%s peer=%s sender=%s",
                        wire(ctx.node_id),
                        wire(ctx.log_name),
                        wire(peer),
                        wire(sender.principal) if sender is not None else "-",
                    )
                    if sender is not None and self.sources is not None:
                        claimed = claimed_by_node(node.id, node.cluster, node_metadata(node))
                        entries = self._count_entries(msg, msg.WhichOneof("log_entries"))
                        rejected = self.sources.judge(sender, claimed, RECEIVER, entries)
                kind = msg.WhichOneof("log_entries")
                if ctx is None:
                    n = self._count_entries(msg, kind)
                    metrics.REJECTED.labels(RECEIVER, "no_identifier").inc(max(n, 1))
                    self._bad.warning(
                        "no_identifier",
                        "Access-log stream from %s sent entries before its identifier; closing it.",
                        wire(peer),
                    )
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "the first StreamAccessLogsMessage of a stream must carry identifier (node, log_name)",
                    )
                    break
                if kind == "http_logs":
                    entries = msg.http_logs.log_entry
                    decode: Decoder = decode_http
                    received = self._http
                elif kind == "tcp_logs":
                    entries = msg.tcp_logs.log_entry
                    decode = decode_tcp
                    received = self._tcp
                else:
                    continue
                n = len(entries)  # the count only: no entry is touched yet
                if rejected:  # not evaluated: counted, the stream goes on (Envoy would only reconnect)
                    self._mismatch.inc(n)
                    continue
                if n > self.max_entries:
                    self._too_many.inc(n)
                    self._bad.warning(
                        "too_many_entries",
                        "Access-log message from node=%s carried %d entries, above "
                        "receivers.max_entries_per_message (%d); rejected whole, the stream goes on.",
                        wire(ctx.node_id),
                        n,
                        self.max_entries,
                    )
                    continue
                if n <= SLICE:
                    hops: list[Hop] = []
                    decode(entries, ctx, self.namer, hops, data)
                    received.inc(len(hops))
                    if hops and not self.queue.offer(hops, nbytes=nbytes):
                        self._dropped.inc(len(hops))
                else:
                    await self._sliced(entries, n, nbytes, decode, ctx, received)
        finally:
            metrics.STREAMS_ACTIVE.dec()
        return als_pb2.StreamAccessLogsResponse()

    async def _sliced(
        self, entries: Any, n: int, nbytes: int, decode: Decoder, ctx: StreamContext, received: Any
    ) -> None:
        """A large message, a slice at a time, yielding to the loop between slices. Once the queue
        refuses a slice, the rest of the message is dropped undecoded (and counted). Its entries
        are read through protobuf a slice at a time, not scanned: the scanner takes a whole
        message in one call, which for 300 000 entries would hold the loop ~0.1 s."""
        for i in range(0, n, SLICE):
            if i:
                await asyncio.sleep(0)
            hops: list[Hop] = []
            decode(entries[i : i + SLICE], ctx, self.namer, hops, None)
            received.inc(len(hops))
            if not self.queue.offer(hops, nbytes=nbytes * len(hops) // n):
                received.inc(n - i - len(hops))  # the rest, not decoded
                self._dropped.inc(n - i)
                return

    @staticmethod
    def _count_entries(msg: Any, kind: str | None) -> int:
        if kind == "http_logs":
            return len(msg.http_logs.log_entry)
        if kind == "tcp_logs":
            return len(msg.tcp_logs.log_entry)
        return 0
