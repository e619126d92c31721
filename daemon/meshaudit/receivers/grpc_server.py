"""The one grpc.aio server (default 127.0.0.1:4317) for Envoy ALS and OTLP traces and logs.

Handlers are registered by hand (not with the generated ``add_*_to_server``) so that the
request deserializers can count bad messages per receiver. A deserializer never raises into
gRPC (grpc would log a traceback per message and answer UNKNOWN): it counts the message
(``undecodable`` or ``too_large``), logs at most one line per reason per interval and returns
a sentinel; the handler, or for the ALS stream a wrapper around it, then aborts with
INVALID_ARGUMENT or RESOURCE_EXHAUSTED. gRPC core's own size limit is set to twice
``max_message_bytes`` so that the deserializer sees, counts and refuses the oversized
messages; above twice the limit gRPC core refuses them itself, uncounted.
Channel options bound memory: grpc.aio buffers without limit when a handler is slower than its
stream, and BDP probing grows the window; with the probe off and a fixed lookahead, RSS stays
flat (BENCHMARKS.md: 2.5-3.5 GiB without them, under 75 MiB with them). Streams per connection
are bounded (``grpc_max_concurrent_streams``), quiet connections are pinged and dropped when the
ping goes unanswered, and a client pinging too often is sent away (keepalive enforcement).

SO_REUSEPORT is on only with ``workers`` above 1 (the workers share the coordinator's ports);
one process refuses a port another process listens on: "cannot listen on ADDR: address in use".
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, NamedTuple

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from meshaudit import metrics
from meshaudit._proto.envoy.service.accesslog.v3 import als_pb2
from meshaudit.config import Config
from meshaudit.logsafe import RateLimited, wire
from meshaudit.model import Hop
from meshaudit.naming import Namer
from meshaudit.receivers.auth import GrpcAuth, SourceCheck, grpc_credentials
from meshaudit.receivers.envoy_als.server import RECEIVER as ALS
from meshaudit.receivers.envoy_als.server import AccessLogService
from meshaudit.receivers.ingest import IngestQueue
from meshaudit.receivers.otlp.decode import (
    Check,
    ExportLogsServiceRequest,
    ExportTraceServiceRequest,
    OtlpRejected,
    decode_logs,
    decode_traces,
    log_claims,
    trace_claims,
    warn_if_not_scanned,
)
from meshaudit.receivers.sockets import ensure_free

log = logging.getLogger("meshaudit.receivers.grpc")
OTLP = "otlp_grpc"
_bad = RateLimited(log)


class _Bad:
    """What a deserializer returns instead of a message it refused (already counted)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details


class Received(NamedTuple):
    """A decoded request message and its wire bytes: their size bounds the ingest queue (asking
    protobuf for the size again would cost as much as parsing it), and the ALS and OTLP trace
    receivers scan them for the fields every rule reads (``envoy_als.decode.decode_http``,
    ``otlp.decode.span_fields``)."""

    msg: Any
    data: bytes


UNDECODABLE: Final = _Bad(grpc.StatusCode.INVALID_ARGUMENT, "the message does not decode")
TOO_LARGE: Final = _Bad(grpc.StatusCode.RESOURCE_EXHAUSTED, "the message is over the size limit")


def _counting(parse: Callable[[bytes], Any], receiver: str, max_bytes: int) -> Callable[[bytes], Any]:
    undecodable = metrics.REJECTED.labels(receiver, "undecodable")
    too_large = metrics.REJECTED.labels(receiver, "too_large")

    def deserialize(data: bytes) -> Any:
        if len(data) > max_bytes:
            too_large.inc()
            _bad.warning(
                f"{receiver}:too_large",
                "Rejected a %s message of %d bytes (receivers.max_message_bytes is %d).",
                receiver,
                len(data),
                max_bytes,
            )
            return TOO_LARGE
        try:
            return Received(parse(data), data)
        except Exception as exc:  # DecodeError, or anything else: never into gRPC
            undecodable.inc()
            _bad.warning(
                f"{receiver}:undecodable",
                "Rejected an undecodable %s message (%d bytes): %s",
                receiver,
                len(data),
                wire(exc),
            )
            return UNDECODABLE

    return deserialize


async def _abort(bad: _Bad, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(bad.code, bad.details)


def _unary(handler: Callable[..., Any]) -> Callable[..., Any]:
    """A unary handler that answers a refused request with its status before ``handler`` runs."""

    async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Bad):
            await _abort(request, context)
        return await handler(request.msg, request.data, context)

    return checked


def _stream(handler: Callable[..., Any]) -> Callable[..., Any]:
    """A stream-unary handler whose stream ends with the refused message's status: ``handler``
    (the ALS servicer) never sees a sentinel, only :class:`Received` messages."""

    async def checked(request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async def messages() -> AsyncIterator[Any]:
            async for msg in request_iterator:
                if isinstance(msg, _Bad):
                    await _abort(msg, context)
                yield msg

        return await handler(messages(), context)

    return checked


class OtlpGrpc:
    """OTLP TraceService/Export and LogsService/Export."""

    def __init__(
        self,
        queue: IngestQueue,
        namer: Namer,
        max_entries: int = 100_000,
        max_skew: float = 86_400,
        auth: GrpcAuth | None = None,
        sources: SourceCheck | None = None,
    ) -> None:
        self.auth = auth
        self.sources = sources
        self.queue = queue
        self.namer = namer
        self.max_entries = max_entries
        self.max_skew = max_skew
        self._spans = metrics.RECEIVED.labels(OTLP, "span")
        self._logs = metrics.RECEIVED.labels(OTLP, "log")
        self._messages = metrics.MESSAGES.labels(OTLP)
        self._busy = metrics.REJECTED.labels(OTLP, "busy")
        self._clamped = metrics.REJECTED.labels(OTLP, "clamped_time")
        warn_if_not_scanned()

    async def _offer(self, hops: list[Hop], nbytes: int, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if hops and not self.queue.offer(hops, nbytes=nbytes):
            # Not accepted, so not lost: the exporter retries RESOURCE_EXHAUSTED with backoff.
            self._busy.inc(len(hops))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "meshaudit ingest queue is full; retry later")

    async def _authorize(
        self, req: Any, context: grpc.aio.ServicerContext[Any, Any], claims: Callable[[Any], list[Any]]
    ) -> None:
        """Refuse a call without a usable sender (UNAUTHENTICATED) or, with enforce_sources, one
        whose sender may not speak for a resource it carries (PERMISSION_DENIED); both counted."""
        auth = self.auth
        if auth is None or not auth.active:
            return
        sender, refuse = auth.sender(context)
        if refuse is not None:
            metrics.REJECTED.labels(OTLP, refuse).inc()
            _bad.warning(f"{OTLP}:{refuse}", "Refused an OTLP/gRPC export from %s (%s).", wire(context.peer()), refuse)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"meshaudit refuses this sender: {refuse}")
        if sender is None or self.sources is None:
            return
        judged = [(n, self.sources.judge(sender, claimed, OTLP, n)) for claimed, n in claims(req)]
        if any(reject for _, reject in judged):
            metrics.REJECTED.labels(OTLP, "source_mismatch").inc(sum(n for n, _ in judged))
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{sender.principal} may not send telemetry for what this export names",
            )

    async def _export(
        self, req: Any, data: bytes, context: grpc.aio.ServicerContext[Any, Any], decode: Callable[..., int]
    ) -> int:
        self._messages.inc()
        await self._authorize(req, context, trace_claims if decode is decode_traces else log_claims)
        hops: list[Hop] = []
        check = Check(self.max_entries, self.max_skew, receiver=OTLP)
        n = 0
        try:
            if decode is decode_traces:
                n = decode_traces(req, self.namer, hops, check, data)  # the spans scanned from the bytes
            else:
                n = decode(req, self.namer, hops, check)
        except OtlpRejected as exc:
            metrics.REJECTED.labels(OTLP, exc.reason).inc()
            _bad.warning(f"{OTLP}:{exc.reason}", "Rejected an OTLP/gRPC export (%s): %s", exc.reason, wire(exc))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if check.clamped:
            self._clamped.inc(check.clamped)
            _bad.warning(
                f"{OTLP}:clamped_time",
                "%d OTLP/gRPC span or log times were implausible: receive time used.",
                check.clamped,
            )
        await self._offer(hops, len(data), context)
        return n

    async def export_traces(self, req: Any, data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self._spans.inc(await self._export(req, data, context, decode_traces))
        return trace_service_pb2.ExportTraceServiceResponse()

    async def export_logs(self, req: Any, data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self._logs.inc(await self._export(req, data, context, decode_logs))
        return logs_service_pb2.ExportLogsServiceResponse()


def _service(
    service: str,
    method: str,
    kind: Callable[..., Any],
    handler: Callable[..., Any],
    request: Any,
    response: Any,
    receiver: str,
    max_bytes: int,
) -> Any:
    """One gRPC method whose refused requests are counted under ``receiver`` and answered
    INVALID_ARGUMENT (undecodable) or RESOURCE_EXHAUSTED (over ``max_bytes``)."""
    wrap = _stream if kind is grpc.stream_unary_rpc_method_handler else _unary
    return grpc.method_handlers_generic_handler(
        service,
        {
            method: kind(
                wrap(handler),
                request_deserializer=_counting(request.FromString, receiver, max_bytes),
                response_serializer=response.SerializeToString,
            )
        },
    )


def grpc_options(config: Config) -> list[tuple[str, int]]:
    r = config.receivers
    return [
        # gRPC core refuses (uncounted) above this; our deserializer counts and refuses above max_message_bytes.
        ("grpc.max_receive_message_length", min(2 * r.max_message_bytes, 2**31 - 1)),
        ("grpc.max_connection_age_ms", int(r.grpc_max_connection_age_secs * 1000)),
        ("grpc.max_connection_age_grace_ms", int(r.grpc_max_connection_age_grace_secs * 1000)),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 262_144),
        ("grpc.max_concurrent_streams", r.grpc_max_concurrent_streams),
        ("grpc.keepalive_time_ms", int(r.grpc_keepalive_time_secs * 1000)),
        ("grpc.keepalive_timeout_ms", int(r.grpc_keepalive_timeout_secs * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(r.grpc_min_ping_interval_secs * 1000)),
        ("grpc.http2.max_ping_strikes", r.grpc_max_ping_strikes),
        # A connection that never completes its HTTP/2 preface is closed as a slow OTLP/HTTP head is.
        ("grpc.server_handshake_timeout_ms", r.http_header_timeout_ms),
        # Only our own workers share a port; one process must not join another's.
        ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
    ]


def build_server(
    config: Config, queue: IngestQueue, namer: Namer, listen: str, sources: SourceCheck | None = None
) -> tuple[grpc.aio.Server, int]:
    """The server on ``listen``; ``sources`` judges authenticated senders' claims (None: no check)."""
    r = config.receivers
    if config.workers <= 1:
        ensure_free(listen)
    server = grpc.aio.server(options=grpc_options(config))
    auth = GrpcAuth(r)
    if r.tls is not None and r.tls.client_auth == "request":
        log.info(
            "receivers.tls.client_auth is request: on the gRPC port it acts as require (grpcio cannot ask for an "
            "optional client certificate), so a client without one is refused in the TLS handshake, uncounted."
        )
    als = AccessLogService(queue, namer, auth=auth, sources=sources)
    otlp = OtlpGrpc(queue, namer, r.max_entries_per_message, r.max_clock_skew_secs, auth, sources)
    limit = r.max_message_bytes
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
                limit,
            ),
            _service(
                "opentelemetry.proto.collector.trace.v1.TraceService",
                "Export",
                grpc.unary_unary_rpc_method_handler,
                otlp.export_traces,
                ExportTraceServiceRequest,  # the map view: same bytes, attributes indexed in C
                trace_service_pb2.ExportTraceServiceResponse,
                OTLP,
                limit,
            ),
            _service(
                "opentelemetry.proto.collector.logs.v1.LogsService",
                "Export",
                grpc.unary_unary_rpc_method_handler,
                otlp.export_logs,
                ExportLogsServiceRequest,
                logs_service_pb2.ExportLogsServiceResponse,
                OTLP,
                limit,
            ),
        )
    )
    try:
        if r.tls is not None:
            try:
                credentials = grpc_credentials(r.tls)
            except ValueError as exc:
                raise OSError(f"cannot use receivers.tls: {exc}") from None
            port = server.add_secure_port(listen, credentials)
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError:  # taken between our check and gRPC's bind
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {listen}: address in use or not available")
    return server, port
