"""OTLP/HTTP receiver (default 127.0.0.1:4318): ``POST /v1/traces`` and ``POST /v1/logs``,
``application/x-protobuf`` and ``application/json``.

Status codes follow the OTLP/HTTP spec: 200 with an empty Export*ServiceResponse in the
request's encoding. Every refusal carries a ``google.rpc.Status`` in the request's encoding
(protobuf when it is neither) and is counted in ``meshaudit_rejected_total{receiver="otlp_http"}``
by reason: 400 for a body that does not decode (``undecodable``), an invalid trace or span id
(``invalid_id``) or too many entries (``too_many_entries``); 408 for a body that does not
arrive in time (``timeout``); 413 over the size limit (``too_large``); 415 for another content
type (``unsupported_media_type``) or a content encoding other than gzip and deflate
(``unsupported_encoding``); 429 with Retry-After when the ingest queue is full (``busy``, the
exporter retries); 404 / 405 (``not_found``, ``method_not_allowed``); 400 for a request that is
not HTTP (``bad_request``).

Connections are bounded at the protocol level (:class:`_Handler`, aiohttp's server has no
header timeout): a connection must send a complete request head within
``http_header_timeout_ms`` of opening or of its previous response, else it is closed (counted
``timeout``, unless it was an idle keep-alive connection); at most ``http_max_connections`` are
open at once, and more are closed at once (``too_many_connections``). Bad input is logged at
most once per reason per interval, with wire values escaped and truncated (meshaudit.logsafe).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from asyncio import sslproto
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.typedefs import Handler
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from meshaudit import metrics
from meshaudit.config import ReceiversConfig
from meshaudit.logsafe import RateLimited, wire
from meshaudit.model import Hop
from meshaudit.naming import Namer
from meshaudit.receivers.auth import HttpTls, Sender, SourceCheck, handshake_reason, spiffe_of_peercert, xfcc_sender
from meshaudit.receivers.envoy_als.decode import XFCC_HEADER
from meshaudit.receivers.ingest import IngestQueue
from meshaudit.receivers.otlp.decode import (
    Check,
    ExportLogsServiceRequest,
    ExportTraceServiceRequest,
    OtlpRejected,
    decode_logs,
    decode_traces,
    log_claims,
    parse_json,
    trace_claims,
    warn_if_not_scanned,
)

log = logging.getLogger("meshaudit.receivers.otlp_http")
RECEIVER = "otlp_http"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
ENCODINGS = frozenset(("", "identity", "gzip", "deflate"))  # what aiohttp undoes itself
# google.rpc.Code for each HTTP status we answer with.
RPC_CODE = {400: 3, 401: 16, 403: 7, 404: 5, 405: 12, 408: 4, 413: 8, 415: 3, 429: 8, 500: 13, 503: 14}
_CLOSE = "meshaudit.close"  # request key: close the connection once the answer is written
_DRAIN_SECS, _DRAIN_BYTES = 2.0, 64 << 20  # the most read of a refused body, so its sender reads the answer


@web.middleware
async def _announce_close(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A connection the server will not reuse says so in its answer ("Connection: close"): a
    refused body that was not read to its end, or one that broke the connection. Otherwise the
    client reuses the connection for its next request and meets a reset instead of an answer."""
    resp = await handler(request)
    if not request.get(_CLOSE) and not request.content.is_eof():
        # Refused before its body was read: read the rest here, bounded (aiohttp's own lingering
        # read would log a traceback for a body that cannot be decompressed).
        try:
            async with asyncio.timeout(_DRAIN_SECS):
                drained = 0
                while drained <= _DRAIN_BYTES and (chunk := await request.content.readany()):
                    drained += len(chunk)
        except Exception:  # a broken body or no time left: the connection ends after the answer
            request[_CLOSE] = True
        if not request.content.is_eof():
            request[_CLOSE] = True
    if request.get(_CLOSE) or not request.content.is_eof():
        resp.force_close()
    return resp


def status_response(status: int, message: str, ctype: str, headers: dict[str, str] | None = None) -> web.Response:
    """An OTLP/HTTP error: a google.rpc.Status in the request's encoding."""
    st = status_pb2.Status(code=RPC_CODE.get(status, 2), message=message)
    if ctype == JSON:
        body = json_format.MessageToJson(st, indent=None).encode()
    else:
        body, ctype = st.SerializeToString(), PROTOBUF
    return web.Response(status=status, body=body, content_type=ctype, headers=headers)


class OtlpHttp:
    def __init__(
        self, queue: IngestQueue, namer: Namer, limits: ReceiversConfig, sources: SourceCheck | None = None
    ) -> None:
        self.queue = queue
        self.namer = namer
        self.limits = limits
        # TLS (its own handshake per connection, so that refusals are counted: _Handler), who
        # sends (the certificate's SPIFFE id, or a trusted sidecar's XFCC) and what it may claim.
        self.tls = HttpTls(limits.tls) if limits.tls is not None else None
        self.mutual = limits.tls is not None and limits.tls.client_auth != "none"
        self.xfcc = limits.trust_forwarded_client_cert
        self.enforce = limits.enforce_sources
        self.sources = sources
        self.max_body_bytes = self.limits.max_message_bytes
        self.open_connections = 0
        self._messages = metrics.MESSAGES.labels(RECEIVER)
        self._log = RateLimited(log)
        warn_if_not_scanned()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_announce_close])
        app.router.add_route("*", "/v1/traces", self.traces)
        app.router.add_route("*", "/v1/logs", self.logs)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        return app

    async def serve(self, addr: str, runners: list[web.AppRunner], reuse_port: bool = False) -> str:
        """Listen on ``addr`` (HOST:PORT, port 0 for any) with the connection limits; returns the
        bound HOST:PORT. ``reuse_port`` only for ``workers`` above 1 (they share the port)."""
        runner = _Runner(self.app(), self)
        await runner.setup()
        runners.append(runner)
        host, _, port = addr.rpartition(":")
        site = web.TCPSite(runner, host, int(port), reuse_address=True, reuse_port=reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(f"cannot listen on {addr}: address in use") from None
            raise
        sockets = getattr(site._server, "sockets", None) or ()
        bound_port = sockets[0].getsockname()[1] if sockets else int(port)
        return f"{host}:{bound_port}"

    # --- counting and answering refusals --------------------------------------------------------
    def reject(
        self,
        status: int,
        reason: str,
        message: str,
        ctype: str,
        peer: Any = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        metrics.REJECTED.labels(RECEIVER, reason).inc()
        self._log.warning(
            reason, "Rejected an OTLP/HTTP request from %s (%d %s): %s", wire(peer), status, reason, wire(message)
        )
        return status_response(status, message, ctype, headers)

    def count(self, reason: str, message: str, *args: object) -> None:
        """A connection closed without an answer (timeout, too_many_connections)."""
        metrics.REJECTED.labels(RECEIVER, reason).inc()
        self._log.warning(reason, message, *args)

    # --- who sends ------------------------------------------------------------------------------
    def sender_of(self, request: web.Request) -> tuple[Sender | None, str | None]:
        """(sender, None); (None, None): no identity, let through; (None, reason): refuse (401)."""
        if self.mutual:
            conn = request.protocol
            principal = getattr(conn, "principal", None)
            if principal is not None:
                return Sender(principal, "mtls", str(request.remote)), None
            return None, "unauthenticated" if getattr(conn, "has_cert", False) else "no_client_certificate"
        if self.xfcc:
            remote = request.remote or ""
            found = xfcc_sender(request.headers.get(XFCC_HEADER), remote, remote)
            if found is not None:
                return found, None
        return None, ("unauthenticated" if self.enforce else None)

    def _judge(self, sender: Sender, message: Any, kind: str) -> int:
        """The entries to reject (enforce_sources), 0 when the export may be evaluated."""
        assert self.sources is not None
        claims = trace_claims(message) if kind == "traces" else log_claims(message)
        judged = [(n, self.sources.judge(sender, claimed, RECEIVER, n)) for claimed, n in claims]
        return sum(n for n, _ in judged) if any(reject for _, reject in judged) else 0

    # --- requests ---------------------------------------------------------------------------
    async def not_found(self, request: web.Request) -> web.Response:
        ctype = request.content_type if request.content_type == JSON else PROTOBUF
        return self.reject(404, "not_found", f"no OTLP endpoint at {request.path[:200]}", ctype, request.remote)

    async def _read_body(self, request: web.Request, ctype: str) -> bytes | web.Response:
        """The decoded body, or the answer that refuses it."""
        limit = self.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.http_body_timeout_ms / 1000):
                while chunk := await request.content.readany():
                    size += len(chunk)
                    if size > limit:  # the decoded size: a compressed bomb stops here too
                        request[_CLOSE] = True
                        return self.reject(413, "too_large", f"body over {limit} bytes", ctype, request.remote)
                    chunks.append(chunk)
        except TimeoutError:
            request[_CLOSE] = True
            ms = self.limits.http_body_timeout_ms
            return self.reject(408, "timeout", f"the body did not arrive within {ms} ms", ctype, request.remote)
        except (web.RequestPayloadError, ContentEncodingError) as exc:
            request[_CLOSE] = True
            return self.reject(400, "undecodable", f"cannot read the body: {exc}", ctype, request.remote)
        return b"".join(chunks)

    async def _handle(self, request: web.Request, message: Any, response: Any, kind: str) -> web.Response:
        self._messages.inc()
        ctype = request.content_type
        answer = ctype if ctype in (PROTOBUF, JSON) else PROTOBUF
        peer = request.remote
        if request.method != "POST":
            return self.reject(405, "method_not_allowed", f"{request.method[:20]} is not POST", answer, peer)
        sender: Sender | None = None
        if self.mutual or self.xfcc:
            sender, refuse = self.sender_of(request)
            if refuse is not None:
                return self.reject(401, refuse, "meshaudit refuses this sender: no usable identity", answer, peer)
        if ctype not in (PROTOBUF, JSON):
            return self.reject(
                415, "unsupported_media_type", f"content type {ctype[:100]!r} is not {PROTOBUF} or {JSON}", answer, peer
            )
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ENCODINGS:
            msg = f"content encoding {encoding[:100]!r} is not gzip or deflate"
            return self.reject(415, "unsupported_encoding", msg, answer, peer)
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return self.reject(413, "too_large", f"body over {self.max_body_bytes} bytes", answer, peer)
        body = await self._read_body(request, answer)
        if isinstance(body, web.Response):
            return body
        try:
            if ctype == JSON:
                parse_json(body, message)
            else:
                message.ParseFromString(body)
        except DecodeError as exc:
            return self.reject(400, "undecodable", f"cannot decode the {kind} export: {exc}", answer, peer)
        except OtlpRejected as exc:
            return self.reject(400, exc.reason, f"cannot decode the {kind} export: {exc}", answer, peer)
        if sender is not None and self.sources is not None:
            refused = self._judge(sender, message, kind)
            if refused:
                metrics.REJECTED.labels(RECEIVER, "source_mismatch").inc(refused)
                msg = f"{sender.principal} may not send telemetry for what this export names"
                return status_response(403, msg, answer)
        hops: list[Hop] = []
        check = Check(self.limits.max_entries_per_message, self.limits.max_clock_skew_secs, receiver=RECEIVER)
        try:
            if kind == "traces":
                # a protobuf body's spans are scanned from its bytes; a JSON body's through protobuf
                n = decode_traces(message, self.namer, hops, check, body if ctype == PROTOBUF else None)
                metrics.RECEIVED.labels(RECEIVER, "span").inc(n)
            else:
                n = decode_logs(message, self.namer, hops, check)
                metrics.RECEIVED.labels(RECEIVER, "log").inc(n)
        except OtlpRejected as exc:
            return self.reject(400, exc.reason, f"{kind} export refused: {exc}", answer, peer)
        if check.clamped:
            metrics.REJECTED.labels(RECEIVER, "clamped_time").inc(check.clamped)
            self._log.warning(
                "clamped_time", "%d OTLP/HTTP span or log times were implausible: receive time used.", check.clamped
            )
        if hops and not self.queue.offer(hops, nbytes=len(body)):
            metrics.REJECTED.labels(RECEIVER, "busy").inc(len(hops))
            return status_response(429, "ingest queue full; retry later", answer, {"Retry-After": "1"})
        if ctype == JSON:
            return web.Response(body=json_format.MessageToJson(response).encode(), content_type=JSON)
        return web.Response(body=response.SerializeToString(), content_type=PROTOBUF)

    async def traces(self, request: web.Request) -> web.Response:
        return await self._handle(
            request,
            ExportTraceServiceRequest(),
            trace_service_pb2.ExportTraceServiceResponse(),
            "traces",
        )

    async def logs(self, request: web.Request) -> web.Response:
        return await self._handle(
            request,
            ExportLogsServiceRequest(),
            logs_service_pb2.ExportLogsServiceResponse(),
            "logs",
        )


# --- connections --------------------------------------------------------------------------------
class _Handler(web.RequestHandler):
    """aiohttp's HTTP/1.1 protocol with a request-head deadline and the connection limit.

    The head deadline starts when the connection opens and again after each response; it ends
    when a complete request head has been parsed. The body is bounded by the request handler
    (``http_body_timeout_ms``). A connection over ``http_max_connections`` is closed at once.
    """

    __slots__ = (
        "_busy", "_got_bytes", "_head_timer", "_otlp", "_raw_peer", "_rejected", "_served", "_tls_pending",
        "has_cert", "principal",
    )  # fmt: skip

    def __init__(self, manager: web.Server, *, otlp: OtlpHttp, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._otlp = otlp
        self._head_timer: asyncio.TimerHandle | None = None
        self._busy = False  # a request head arrived and its response is not written yet
        self._got_bytes = False  # bytes since the last response
        self._rejected = False
        self._served = 0
        self._tls_pending = False  # the TLS handshake runs: the next connection_made is its transport
        self._raw_peer: Any = None
        self.has_cert = False  # the client presented a certificate (verified: a bad one fails the handshake)
        self.principal: str | None = None  # its SPIFFE id

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        o = self._otlp
        if self._tls_pending:  # the handshake is done: this is the TLS transport
            self._tls_pending = False
            ssl_object = transport.get_extra_info("ssl_object")
            cert = ssl_object.getpeercert() if ssl_object is not None else None
            self.has_cert = bool(cert)
            self.principal = spiffe_of_peercert(cert)
            super().connection_made(transport)
            self._arm()
            return
        if o.open_connections >= o.limits.http_max_connections:
            self._rejected = True
            transport.close()
            o.count(
                "too_many_connections",
                "Closed an OTLP/HTTP connection at once: %d are open (receivers.http_max_connections).",
                o.open_connections,
            )
            return
        o.open_connections += 1
        if o.tls is not None:
            self._start_tls(transport)
            return
        super().connection_made(transport)
        self._arm()

    def _start_tls(self, raw: asyncio.BaseTransport) -> None:
        """Run the TLS handshake here rather than in the server (``create_server(ssl=...)``), so
        that a refused one is seen and counted, and each connection takes the context of the
        certificates on disk now. asyncio's own SSL protocol wraps the accepted connection at once
        (``loop.start_tls`` would start a step later: uvloop reads the ClientHello first)."""
        o = self._otlp
        assert o.tls is not None
        loop = asyncio.get_running_loop()
        self._tls_pending = True
        self._raw_peer = raw.get_extra_info("peername")
        waiter: asyncio.Future[None] = loop.create_future()
        proto = sslproto.SSLProtocol(
            loop,
            self,
            o.tls.context(),
            waiter,
            server_side=True,
            call_connection_made=True,
            ssl_handshake_timeout=max(1, o.limits.http_header_timeout_ms // 1000),  # typeshed: int seconds
        )
        raw.set_protocol(proto)
        proto.connection_made(raw)
        waiter.add_done_callback(self._handshake_done)

    def _handshake_done(self, waiter: asyncio.Future[None]) -> None:
        exc = None if waiter.cancelled() else waiter.exception()
        if exc is None and not waiter.cancelled():
            return
        # Refused: this handler never got a connection, so no connection_lost will come.
        self._tls_pending = False
        self._rejected = True
        self._otlp.open_connections -= 1
        reason = handshake_reason(exc) if exc is not None else "tls_handshake_failed"
        self._otlp.count(
            reason, "Refused a TLS handshake on OTLP/HTTP from %s (%s): %s", wire(self._raw_peer), reason, wire(exc)
        )

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        delay = self._otlp.limits.http_header_timeout_ms / 1000
        self._head_timer = asyncio.get_running_loop().call_later(delay, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._busy or self.transport is None:
            return
        if self._served and not self._got_bytes:  # an idle keep-alive connection: not an offence
            self.force_close()
            return
        ms = self._otlp.limits.http_header_timeout_ms
        self._otlp.count(
            "timeout",
            "Closed an OTLP/HTTP connection from %s: no complete request head within %d ms.",
            wire(self.peername),
            ms,
        )
        self.force_close()

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        if data and not self._busy:
            self._got_bytes = True
        super().data_received(data)
        if not self._busy and self._messages:  # a complete request head was parsed
            self._busy = True
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        if request.get(_CLOSE):
            self.force_close()  # a body that timed out, grew too large or did not decode: no lingering
        elif not request.content.is_eof():
            self.close()  # the rest of the body is read for at most lingering_time, then the connection ends
        else:
            self._busy = bool(self._messages)
            self._served += 1
            self._got_bytes = False
            if not self._busy:
                self._arm()
        return result

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """A request aiohttp could not parse (or, 500, a bug in a handler): answered with a
        google.rpc.Status and counted, one log line per reason per interval, no traceback for
        bad input."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response was sent already")
        o = self._otlp
        ctype = JSON if request.headers.get("Content-Type", "").startswith(JSON) else PROTOBUF
        if isinstance(exc, ContentEncodingError):
            resp: web.StreamResponse = o.reject(415, "unsupported_encoding", str(exc).strip(), ctype, request.remote)
        elif status >= 500:
            metrics.REJECTED.labels(RECEIVER, "internal_error").inc()
            o._log.log(logging.ERROR, "internal_error", "OTLP/HTTP handler failed (a bug): %r", exc)
            resp = status_response(500, "internal error", ctype)
        else:
            text = str(exc or message or "bad request").strip()
            resp = o.reject(status, "bad_request", text, ctype, request.remote)
        resp.force_close()
        return resp

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._rejected:
            return
        self._otlp.open_connections -= 1
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


class _Server(web.Server):
    def __init__(self, handler: Any, *, otlp: OtlpHttp, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._otlp = otlp
        self._handler_loop = asyncio.get_running_loop()

    def __call__(self) -> web.RequestHandler:
        return _Handler(self, otlp=self._otlp, loop=self._handler_loop, access_log=None)


class _Runner(web.AppRunner):
    """An AppRunner whose connections are :class:`_Handler`."""

    __slots__ = ("_otlp",)

    def __init__(self, app: web.Application, otlp: OtlpHttp) -> None:
        super().__init__(app, access_log=None, handle_signals=False)
        self._otlp = otlp

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # the application's startup and request factory
        return _Server(
            base.request_handler,
            otlp=self._otlp,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
        )
