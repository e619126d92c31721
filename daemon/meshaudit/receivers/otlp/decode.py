"""OTLP traces and logs -> Hops, and OTLP/JSON -> protobuf.

Spans: an Envoy sidecar's span carries ``node_id``, ``upstream_cluster`` and
``guid:x-request-id`` tags; an application's span (OpenTelemetry SDK) is named by its resource
``service.name`` / ``service.namespace``. Log records from Envoy's OpenTelemetry access logger
carry trace_id/span_id and the attributes the user configured (README lists the recommended
set; several common spellings are accepted).

OTLP/JSON differs from the protobuf JSON mapping in one way that matters: trace and span ids
are hex strings, not base64 (enums are integers, which the mapping accepts). Receivers must
ignore unknown fields.

What cannot be evaluated is refused here, whole export at a time (:class:`OtlpRejected`, with
the reason counted in ``meshaudit_rejected_total``): a trace id that is not 16 bytes or a span
id that is not 8 (``invalid_id``), more spans or log records than ``max_entries_per_message``
(``too_many_entries``). A time that cannot be right (a span without one, or further than
``max_clock_skew_secs`` from now) is replaced by the receive time and counted
(``clamped_time``); a log record without a time takes its observed time, then the receive time.
"""

from __future__ import annotations

import base64
import functools
import importlib
import logging
import time
from typing import Any, Final

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from meshaudit import metrics
from meshaudit._proto.meshaudit.otlpview.v1 import view_pb2
from meshaudit.engine.sources import Claimed, claimed_by_node, claimed_by_resource
from meshaudit.logsafe import RateLimited
from meshaudit.model import (
    INBOUND,
    NOBODY,
    OTEL_LOG,
    OUTBOUND,
    SPAN,
    SPAN_KIND_CLIENT,
    SPAN_KIND_SERVER,
    UNKNOWN,
    Hop,
    Identity,
    identity,
)
from meshaudit.naming import CLUSTERS, Namer, cluster_direction, cluster_of, outbound_cluster_target
from meshaudit.tls import cipher_code_of_name

# The daemon parses OTLP into a wire-compatible view whose attributes are maps (see
# proto/meshaudit/otlpview/v1/view.proto): attributes are looked up by key in C.
ExportTraceServiceRequest = view_pb2.ExportTraceServiceRequest
ExportLogsServiceRequest = view_pb2.ExportLogsServiceRequest


class OtlpRejected(ValueError):
    """The export is refused as a whole; ``reason`` is the ``meshaudit_rejected_total`` label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class OtlpJsonError(OtlpRejected):
    """The body is not valid OTLP/JSON; the message says where."""

    def __init__(self, message: str, reason: str = "undecodable") -> None:
        super().__init__(reason, message)


class Check:
    """One export's checks: the entry limit, and the receive time that bounds span and log times.
    ``clamped`` counts the times replaced by the receive time. The receivers pass one built from
    the configuration, naming themselves (``receiver``: the label a span-scanner decline is
    counted under); decoding without one (tests, bench) keeps the times as sent, and a decline is
    only logged."""

    __slots__ = ("clamped", "max_entries", "max_skew", "now", "receiver")

    def __init__(
        self,
        max_entries: int = 100_000,
        max_skew: float = float("inf"),
        now: float | None = None,
        receiver: str | None = None,
    ) -> None:
        self.max_entries = max_entries
        self.max_skew = max_skew
        self.now = time.time() if now is None else now
        self.clamped = 0
        self.receiver = receiver

    def entries(self, n: int, kind: str) -> None:
        if n > self.max_entries:
            raise OtlpRejected("too_many_entries", f"{n} {kind} in one export; at most {self.max_entries}")

    def time(self, ns: int) -> float:
        """Seconds since the epoch, or the receive time (counted) when ``ns`` cannot be right."""
        t = ns / 1e9
        if abs(t - self.now) > self.max_skew:
            self.clamped += 1
            return self.now
        return t


def _bad_id(what: str, raw: bytes, size: int, i: int) -> OtlpRejected:
    return OtlpRejected("invalid_id", f"{what} of entry {i} has {len(raw)} bytes, not {size}")


def _value(v: Any) -> Any:
    """AnyValue -> a Python scalar (strings, ints, bools, doubles); None for others."""
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "int_value":
        return v.int_value
    if which == "bool_value":
        return v.bool_value
    if which == "double_value":
        return v.double_value
    return None


def _int(v: Any) -> int:
    """A status code as an int; 0 for a value that is none (a word, NaN, an infinity)."""
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):
        return 0


def _attr(attrs: Any, key: str) -> Any:
    """One attribute's value: a string (nearly always) or another scalar; None when absent,
    empty or "-" (Envoy's "unset")."""
    v = attrs.get(key)
    if v is None:
        return None
    s = v.string_value
    if s:
        return None if s == "-" else s
    x = _value(v)
    return None if x == "" else x


def _first(attrs: Any, *keys: str) -> Any:
    for k in keys:
        v = _attr(attrs, k)
        if v is not None:
            return v
    return None


def _first_str(attrs: Any, *keys: str) -> str | None:
    v = _first(attrs, *keys)
    return None if v is None else str(v)


def _path_of(url: str | None) -> str | None:
    if not url:
        return None
    i = url.find("://")
    if i >= 0:
        j = url.find("/", i + 3)
        return url[j:] if j >= 0 else "/"
    return url


# --- traces ----------------------------------------------------------------------------------
# What decode_traces reads of every span, as a tuple: (trace_id, span_id, parent_span_id (hex; None
# when empty), kind, start (start_time_unix_nano / 1e9, before Check's bound), duration_ms (None
# unless end > start), node_id, request_id, path, upstream_cluster ("" when none), the
# canonical service, the Istio namespace, server.address, the peer's address, method, status
# (an int, or a value ``_int`` makes one), user_agent). The C scanner (``_spanscan.c``, whose
# header lists each item's keys) takes them from the export's bytes in one pass; ``read_span``
# reads them through protobuf: the reference the scanner must equal, and the way when the scanner
# is not built or declines an export.
SpanFields = tuple[
    str, str, str | None, int, float, float | None, str | None, str | None, str | None, str,
    str | None, str | None, str | None, str | None, str | None, Any, str | None,
]  # fmt: skip
# Of every ResourceSpans: its service.name, service.namespace and k8s.namespace.name as ``_attr``
# reads them, and its spans' fields (all its scope_spans', in order).
ResourceFields = tuple[Any, Any, Any, list[SpanFields]]


def read_span(sp: Any) -> SpanFields:
    """A span's ``SpanFields`` through protobuf. Envoy's tracer tags (node_id, upstream_cluster,
    guid:x-request-id, http.url, peer.address) come first; OpenTelemetry semantic-convention names
    are the fallbacks. The keys meshaudit needs hold strings, but for the status code, which may
    be an int."""
    g = sp.attributes.get
    url = _sv(g("http.url"))
    if url is not None:
        path = _path_of(url)
    else:
        path = _sv(g("url.path")) or _path_of(_sv(g("url.full"))) or _sv(g("http.target"))
    start = sp.start_time_unix_nano
    end = sp.end_time_unix_nano
    return (
        sp.trace_id.hex(),
        sp.span_id.hex(),
        sp.parent_span_id.hex() or None,
        sp.kind,
        start / 1e9,
        (end - start) / 1e6 if end > start else None,
        _sv(g("node_id")),
        _sv(g("guid:x-request-id")) or _header(g("http.request.header.x-request-id")),
        path,
        _sv(g("upstream_cluster")) or _sv(g("upstream_cluster.name")) or "",
        _sv(g("istio.canonical_service")),
        _sv(g("istio.namespace")),
        _sv(g("server.address")),
        _sv(g("peer.address")) or _sv(g("client.address")) or _sv(g("network.peer.address")) or _sv(g("net.peer.ip")),
        _sv(g("http.method")) or _sv(g("http.request.method")),
        _int(_first(sp.attributes, "http.status_code", "http.response.status_code")),
        _sv(g("user_agent.original")),  # the semantic conventions' (http.user_agent before 1.19)
    )


def read_spans(req: Any) -> list[ResourceFields]:
    """Every resource's and span's fields through protobuf. Raises :class:`OtlpRejected`
    (``invalid_id``, naming the span by its number in the export) for a trace id that is not 16
    bytes, a span id that is not 8, a parent span id neither empty nor 8."""
    out: list[ResourceFields] = []
    n = 0
    for rs in req.resource_spans:
        res = rs.resource.attributes
        spans: list[SpanFields] = []
        for ss in rs.scope_spans:
            for sp in ss.spans:
                n += 1
                tid = sp.trace_id
                sid = sp.span_id
                pid = sp.parent_span_id
                if len(tid) != 16:
                    raise _bad_id("trace_id", tid, 16, n)
                if len(sid) != 8:
                    raise _bad_id("span_id", sid, 8, n)
                if pid and len(pid) != 8:
                    raise _bad_id("parent_span_id", pid, 8, n)
                spans.append(read_span(sp))
        claims = (_attr(res, "service.name"), _attr(res, "service.namespace"), _attr(res, "k8s.namespace.name"))
        out.append((*claims, spans))
    return out


def _scanner() -> Any:
    """The C span scanner (``_spanscan.c``), which `pip install` builds; None in a source tree
    where it was not built (the receivers then warn: protobuf reads the spans, ~3 us more each)."""
    try:
        return importlib.import_module("meshaudit.receivers.otlp._spanscan")
    except ImportError:
        return None


SCANNER: Final = _scanner()
_log = logging.getLogger("meshaudit.receivers.otlp")
_bad_input = RateLimited(_log)


@functools.cache  # both OTLP receivers call it as they start: one line
def warn_if_not_scanned() -> None:
    """Say at start, once, that spans are read the slow way when the scanner is not built."""
    if SCANNER is None:
        _log.warning(
            "meshaudit's C span scanner is not built (pip install builds it from _spanscan.c): OTLP spans "
            "are read through protobuf instead, about 3 us more each."
        )


def span_fields(req: Any, data: bytes | None, n: int, check: Check) -> list[ResourceFields]:
    """The fields of an export's ``n`` spans (``req``: the export parsed by upb; ``data``: its wire
    bytes, None when there are none: an OTLP/JSON body): scanned when the scanner is built, else
    read through protobuf. An export with an id of the wrong size is read through protobuf, which
    refuses it. An export the scanner declines (never one upb parsed, unless upb accepts what the
    scanner does not: a group, an over-long varint) is read through protobuf, and counted under
    ``check.receiver``."""
    if data is not None and SCANNER is not None:
        try:
            found: list[ResourceFields] | None = SCANNER.spans(data)
        except ValueError:
            pass
        else:
            if found is None:
                return read_spans(req)
            if len(found) == len(req.resource_spans) and sum(len(r[3]) for r in found) == n:
                return found
        if check.receiver is not None:
            metrics.REJECTED.labels(check.receiver, "scan_declined").inc()
        _bad_input.warning(
            "scan_declined",
            "An OTLP trace export parsed by protobuf was declined by the span scanner; its spans were read "
            'through protobuf (counted in meshaudit_rejected_total{reason="scan_declined"}).',
        )
    return read_spans(req)


def decode_traces(req: Any, namer: Namer, out: list[Hop], check: Check | None = None, data: bytes | None = None) -> int:
    """Append one hop per span; returns the number of spans read. Raises :class:`OtlpRejected`
    (nothing of the export is to be used, nothing is appended) for too many spans or an invalid
    id. ``data``: the export's wire bytes, which upb parsed into ``req`` (see ``span_fields``)."""
    if check is None:
        check = Check()
    n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
    check.entries(n, "spans")
    _span_hops(span_fields(req, data, n, check), namer, out, check)
    return n


_SHARED: dict[str, str] = {}


def _shared(s: str) -> str:
    """One copy of a string that repeats across spans (node id, cluster, method): spans wait
    in missing_access_log's store, so each copy would cost ~60-100 bytes for seconds."""
    found = _SHARED.get(s)
    if found is None:
        if len(_SHARED) >= 10_000:
            _SHARED.clear()
        found = _SHARED[s] = s
    return found


def _sv(v: Any) -> str | None:
    """A string attribute value (``attrs.get(key)``): None when absent, empty or "-"."""
    if v is None:
        return None
    s: str = v.string_value
    return s if s and s != "-" else None


def _header(v: Any) -> str | None:
    """A request header captured as a span attribute: ``http.request.header.<name>`` is a string
    array in the semantic conventions (its first value), a string in older instrumentations."""
    if v is None:
        return None
    if v.HasField("array_value"):
        values = v.array_value.values
        return _sv(values[0]) if values else None
    return _sv(v)


def _span_hops(resources: list[ResourceFields], namer: Namer, out: list[Hop], check: Check) -> None:
    """A hop per span of ``resources``. A span's own istio.canonical_service and istio.namespace
    name its workload before its resource's service.name and namespace do."""
    now = check.now
    max_skew = check.max_skew
    append = out.append
    shared = _SHARED.get
    clusters = CLUSTERS.get
    new_hop = object.__new__
    for service_name, service_ns, k8s_ns, spans in resources:
        res_service = None if service_name is None else str(service_name)
        ns_value = service_ns if service_ns is not None else k8s_ns
        res_ns = None if ns_value is None else str(ns_value)
        for (
            trace_id, span_id, parent_span_id, kind, sent_start, duration_ms, node, rid, path, upstream,
            canonical, istio_ns, server_address, peer, method, code, user_agent,
        ) in spans:  # fmt: skip
            start = sent_start
            if abs(start - now) > max_skew:  # Check.time, inlined
                check.clamped += 1
                start = now
            cluster, direction, named = clusters(upstream) or cluster_of(upstream)
            svc = canonical or res_service
            ns = istio_ns or res_ns
            if node:  # a sidecar's own span
                node_id = shared(node) or _shared(node)
                me = namer.node(node_id, f"{svc}.{ns}" if svc and ns else (svc or ""))
                observer = node_id
            else:
                me = identity(svc, ns) if svc else NOBODY
                observer = _shared("span:" + (me.key if svc else "unknown"))
                direction = UNKNOWN  # an application's span: only its kind says
            if direction == UNKNOWN:
                direction = INBOUND if kind == SPAN_KIND_SERVER else OUTBOUND if kind == SPAN_KIND_CLIENT else UNKNOWN
            src: Identity
            dst: Identity
            if direction == OUTBOUND:
                src = me
                dst = named if named is not None else identity(server_address)
                peer_addr = None
            else:
                peer_addr = peer
                src = namer.address(peer_addr) if peer_addr else NOBODY
                dst = me
            # Hop(SPAN, observer, me, direction, src, dst, start, ...), inlined: a class call with
            # keywords runs __init__ through C (its arguments packed and unpacked), ~0.5 us per
            # span more than setting every slot here (test_otlp_scan checks each one is set).
            h = new_hop(Hop)
            h.origin = SPAN
            h.observer = observer
            h.observer_service = me
            h.direction = direction
            h.src = src
            h.dst = dst
            h.start = start
            h.method = (shared(method) or _shared(method)) if method else None
            h.path = path
            h.status = code if code.__class__ is int else _int(code)
            h.upstream_cluster = cluster
            h.trace_id = trace_id
            h.span_id = span_id
            h.parent_span_id = parent_span_id
            h.request_id = rid
            h.span_kind = kind
            h.user_agent = user_agent
            h.source_address = peer_addr
            h.duration_ms = duration_ms
            h.tls_version = h.tls_cipher = h.peer_principal = h.local_principal = h.authority = h.conn = None
            h.downstream_peer = h.upstream_peer = h.xfcc_uri = h.xfcc_by = None
            h.response_flags = h.response_code_details = h.route_name = h.connection_termination_details = ""
            h.attempts = 0
            append(h)


# --- logs (Envoy's OpenTelemetry access logger) -------------------------------------------------
def decode_logs(req: Any, namer: Namer, out: list[Hop], check: Check | None = None) -> int:
    """Append one hop per access-log record; returns the number of records read. Raises
    :class:`OtlpRejected` for an invalid id or too many records."""
    if check is None:
        check = Check()
    check.entries(sum(len(sl.log_records) for rl in req.resource_logs for sl in rl.scope_logs), "log records")
    n = 0
    for rl in req.resource_logs:
        res = rl.resource.attributes
        node_id = _first_str(res, "node_name", "node_id") or ""
        node_cluster = _first_str(res, "cluster_name", "service.name") or ""
        observer_id = node_id or node_cluster or "unknown-node"
        me = namer.node(node_id, node_cluster)
        for sl in rl.scope_logs:
            for lr in sl.log_records:
                n += 1
                tid = lr.trace_id
                sid = lr.span_id
                if tid and len(tid) != 16:
                    raise _bad_id("trace_id", tid, 16, n)
                if sid and len(sid) != 8:
                    raise _bad_id("span_id", sid, 8, n)
                ns = lr.time_unix_nano or lr.observed_time_unix_nano
                out.append(_log_hop(lr, me, observer_id, namer, check.time(ns) if ns else check.now))
    return n


def _log_hop(lr: Any, me: Identity, observer: str, namer: Namer, start: float) -> Hop:
    a = lr.attributes
    cluster = _first_str(a, "upstream_cluster", "upstream.cluster", "envoy.upstream_cluster") or ""
    direction = cluster_direction(cluster)
    tls = _first_str(a, "downstream_tls_version", "tls.protocol.version", "tls_version")
    cipher = cipher_code_of_name(_first_str(a, "downstream_tls_cipher", "tls.cipher")) if tls else None
    peer = _first_str(a, "downstream_peer_uri_san", "tls.client.subject_alt_name", "peer_uri_san")
    remote = _first_str(a, "downstream_remote_address", "client.address", "source.address")
    method = _first_str(a, "http.request.method", "http.method", "method")
    path = _first_str(a, "url.path", "http.target", "path")
    authority = _first_str(a, "authority", "server.address", "http.host")
    rid = _first_str(a, "x-request-id", "request_id", "http.request.header.x-request-id")
    trace_id = lr.trace_id.hex() or None
    src: Identity
    dst: Identity
    if direction == OUTBOUND:
        src = me
        tsvc, tns = outbound_cluster_target(cluster)
        dst = namer.service(tsvc, tns) if tsvc else identity(authority, None, cluster or None)
        conn = _first_str(a, "upstream_local_address")
    else:
        src = namer.principal(peer) if peer else (namer.address(remote) if remote else identity())
        dst = me
        conn = remote
    return Hop(
        OTEL_LOG,
        observer,
        me,
        direction,
        src,
        dst,
        start,
        tls_version=tls,
        tls_cipher=cipher,
        peer_principal=peer,
        method=method,
        authority=authority,
        path=path,
        status=_int(_first(a, "http.response.status_code", "response_code", "http.status_code")),
        response_flags=_first_str(a, "response_flags") or "",
        response_code_details=_first_str(a, "response_code_details") or "",
        route_name=_first_str(a, "route_name") or "",
        upstream_cluster=cluster,
        attempts=_int(_first(a, "upstream_request_attempt_count")),
        trace_id=trace_id,
        span_id=lr.span_id.hex() or None,
        request_id=rid,
        conn=conn,
        user_agent=_first_str(a, "user_agent.original", "user_agent", "http.user_agent"),
        source_address=remote,
        duration_ms=_duration_ms(_first(a, "duration", "duration_ms")),
    )


def _duration_ms(v: Any) -> float | None:
    """Envoy's ``%DURATION%`` (milliseconds), as an int or a string attribute."""
    try:
        ms = float(v) if v is not None and v != "-" else None
    except (TypeError, ValueError):
        return None
    return ms if ms is not None and 0 <= ms < 1e12 else None


# --- who the data says it is (log_source_mismatch) ---------------------------------------------
def trace_claims(req: Any) -> list[tuple[Claimed, int]]:
    """Each resource's claim (``service.name``, ``service.namespace``, ``k8s.namespace.name``)
    and its spans' count. Read only for an authenticated sender."""
    out = []
    for rs in req.resource_spans:
        res = rs.resource.attributes
        claimed = claimed_by_resource(
            _first_str(res, "service.name"), _first_str(res, "service.namespace"), _first_str(res, "k8s.namespace.name")
        )
        out.append((claimed, sum(len(ss.spans) for ss in rs.scope_spans)))
    return out


def log_claims(req: Any) -> list[tuple[Claimed, int]]:
    """Each resource's claim: an Envoy access logger's node (``node_name``, ``cluster_name``),
    else its service and namespace; and its records' count."""
    out = []
    for rl in req.resource_logs:
        res = rl.resource.attributes
        node_id = _first_str(res, "node_name", "node_id")
        n = sum(len(sl.log_records) for sl in rl.scope_logs)
        if node_id:
            claimed = claimed_by_node(node_id, _first_str(res, "cluster_name") or "", {})
        else:
            claimed = claimed_by_resource(
                _first_str(res, "service.name"),
                _first_str(res, "service.namespace"),
                _first_str(res, "k8s.namespace.name"),
            )
        out.append((claimed, n))
    return out


# --- OTLP/JSON --------------------------------------------------------------------------------
# The protobuf JSON parser also takes the proto field names (trace_id): they are ids too, in hex.
_ID_FIELDS = {"traceId": 16, "spanId": 8, "parentSpanId": 8, "trace_id": 16, "span_id": 8, "parent_span_id": 8}
MAX_JSON_DEPTH = 64  # OTLP needs about 10 levels, plus 3 per nested AnyValue


def _fix_ids(node: Any, where: str, depth: int = 0) -> None:
    """Rewrite hex trace/span ids to base64 in place, validating them."""
    if depth > MAX_JSON_DEPTH:
        raise OtlpJsonError(f"{where[:100]}: nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(node, dict):
        for k, v in node.items():
            size = _ID_FIELDS.get(k)
            if size is not None and isinstance(v, str):
                if v == "":
                    continue
                try:
                    raw = bytes.fromhex(v)
                except ValueError:
                    raise OtlpJsonError(f"{where}.{k}: not a hex id: {v[:40]!r}") from None
                if len(raw) != size:
                    raise OtlpJsonError(f"{where}.{k}: expected {size * 2} hex digits, got {len(v)}", "invalid_id")
                node[k] = base64.b64encode(raw).decode()
            else:
                _fix_ids(v, f"{where}.{k}", depth + 1)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _fix_ids(v, f"{where}[{i}]", depth + 1)


_OFFICIAL: dict[Any, Any] = {
    ExportTraceServiceRequest: trace_service_pb2.ExportTraceServiceRequest,
    ExportLogsServiceRequest: logs_service_pb2.ExportLogsServiceRequest,
}


def parse_json(body: bytes, message: Any) -> None:
    """Parse an OTLP/JSON body into ``message`` (a fresh view Export*ServiceRequest). The JSON
    mapping follows the official messages (attributes are arrays of key/value objects there), so
    the body is parsed into the official message and its bytes re-read as the view."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OtlpJsonError(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OtlpJsonError("the body must be a JSON object")
    _fix_ids(data, "$")
    official = _OFFICIAL[type(message)]()
    try:
        json_format.ParseDict(data, official, ignore_unknown_fields=True)
        message.ParseFromString(official.SerializeToString())
    except (json_format.ParseError, DecodeError) as exc:
        raise OtlpJsonError(str(exc)) from None
    except RecursionError:  # kept off by MAX_JSON_DEPTH; never a 500 should that change
        raise OtlpJsonError("nested too deeply") from None
