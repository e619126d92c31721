"""OTLP traces and logs -> Hops, and OTLP/JSON -> protobuf.

Spans: an Envoy sidecar's span carries ``node_id``, ``upstream_cluster`` and
``guid:x-request-id`` tags; an application's span (OpenTelemetry SDK) is named by its resource
``service.name`` / ``service.namespace``. Log records from Envoy's OpenTelemetry access logger
carry trace_id/span_id and the attributes the user configured (README lists the recommended
set; several common spellings are accepted).

OTLP/JSON differs from the protobuf JSON mapping in one way that matters: trace and span ids
are hex strings, not base64 (enums are integers, which the mapping accepts). Receivers must
ignore unknown fields.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from meshaudit._proto.meshaudit.otlpview.v1 import view_pb2
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
from meshaudit.naming import Namer, cluster_direction, outbound_cluster_target

# The daemon parses OTLP into a wire-compatible view whose attributes are maps (see
# proto/meshaudit/otlpview/v1/view.proto): attributes are looked up by key in C.
ExportTraceServiceRequest = view_pb2.ExportTraceServiceRequest
ExportLogsServiceRequest = view_pb2.ExportLogsServiceRequest


class OtlpJsonError(ValueError):
    """The body is not valid OTLP/JSON; the message says where."""


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


def _str(v: Any) -> str | None:
    return None if v is None or v in {"", "-"} else str(v)


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
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
def decode_traces(req: Any, namer: Namer, out: list[Hop]) -> int:
    """Append one hop per span; returns the number of spans read."""
    n = 0
    append = out.append
    for rs in req.resource_spans:
        res = rs.resource.attributes
        res_service = _first_str(res, "service.name")
        res_ns = _first_str(res, "service.namespace", "k8s.namespace.name")
        for ss in rs.scope_spans:
            for sp in ss.spans:
                n += 1
                append(_span_hop(sp, res_service, res_ns, namer))
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


def _span_hop(sp: Any, res_service: str | None, res_ns: str | None, namer: Namer) -> Hop:
    """Envoy's tracer tags (node_id, upstream_cluster, guid:x-request-id, http.url, peer.address)
    are looked up first; OpenTelemetry semantic-convention names are the fallbacks. The keys
    meshaudit needs hold strings, but for the status code, which may be an int."""
    g = sp.attributes.get
    kind = sp.kind
    node_id = _sv(g("node_id"))
    rid = _sv(g("guid:x-request-id")) or _sv(g("http.request.header.x-request-id"))
    url = _sv(g("http.url"))
    if url is not None:
        path = _path_of(url)
    else:
        path = _sv(g("url.path")) or _path_of(_sv(g("url.full"))) or _sv(g("http.target"))
    cluster = _sv(g("upstream_cluster")) or _sv(g("upstream_cluster.name")) or ""
    svc = _sv(g("istio.canonical_service")) or res_service
    ns = _sv(g("istio.namespace")) or res_ns
    cluster = _shared(cluster)
    if node_id:  # a sidecar's own span
        node_id = _shared(node_id)
        me = namer.node(node_id, f"{svc}.{ns}" if svc and ns else (svc or ""))
        observer = node_id
        direction = cluster_direction(cluster) if cluster else UNKNOWN
        if direction == UNKNOWN:
            direction = INBOUND if kind == SPAN_KIND_SERVER else OUTBOUND if kind == SPAN_KIND_CLIENT else UNKNOWN
    else:
        me = identity(svc, ns) if svc else NOBODY
        observer = _shared("span:" + (me.key if svc else "unknown"))
        direction = INBOUND if kind == SPAN_KIND_SERVER else OUTBOUND if kind == SPAN_KIND_CLIENT else UNKNOWN
    src: Identity
    dst: Identity
    if direction == OUTBOUND:
        src = me
        tsvc, tns = outbound_cluster_target(cluster)
        dst = namer.service(tsvc, tns) if tsvc else identity(_sv(g("server.address")))
    else:
        peer_addr = (
            _sv(g("peer.address"))
            or _sv(g("client.address"))
            or _sv(g("network.peer.address"))
            or _sv(g("net.peer.ip"))
        )
        src = namer.address(peer_addr) if peer_addr else NOBODY
        dst = me
    method = _sv(g("http.method")) or _sv(g("http.request.method"))
    return Hop(
        SPAN,
        observer,
        me,
        direction,
        src,
        dst,
        sp.start_time_unix_nano / 1e9,
        method=_shared(method) if method else None,
        path=path,
        status=_int(_first(sp.attributes, "http.status_code", "http.response.status_code")),
        upstream_cluster=cluster,
        trace_id=sp.trace_id.hex() or None,
        span_id=sp.span_id.hex() or None,
        parent_span_id=sp.parent_span_id.hex() or None,
        request_id=rid,
        span_kind=kind,
    )


# --- logs (Envoy's OpenTelemetry access logger) -------------------------------------------------
def decode_logs(req: Any, namer: Namer, out: list[Hop]) -> int:
    """Append one hop per access-log record; returns the number of records read."""
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
                out.append(_log_hop(lr, me, observer_id, namer))
    return n


def _log_hop(lr: Any, me: Identity, observer: str, namer: Namer) -> Hop:
    a = lr.attributes
    cluster = _first_str(a, "upstream_cluster", "upstream.cluster", "envoy.upstream_cluster") or ""
    direction = cluster_direction(cluster)
    tls = _first_str(a, "downstream_tls_version", "tls.protocol.version", "tls_version")
    peer = _first_str(a, "downstream_peer_uri_san", "tls.client.subject_alt_name", "peer_uri_san")
    remote = _first_str(a, "downstream_remote_address", "client.address", "source.address")
    method = _first_str(a, "http.request.method", "http.method", "method")
    path = _first_str(a, "url.path", "http.target", "path")
    authority = _first_str(a, "authority", "server.address", "http.host")
    rid = _first_str(a, "x-request-id", "request_id", "http.request.header.x-request-id")
    trace_id = lr.trace_id.hex() or None
    start = (lr.time_unix_nano or lr.observed_time_unix_nano) / 1e9
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
    )


# --- OTLP/JSON --------------------------------------------------------------------------------
_ID_FIELDS = {"traceId": 16, "spanId": 8, "parentSpanId": 8}


def _fix_ids(node: Any, where: str) -> None:
    """Rewrite hex trace/span ids to base64 in place, validating them."""
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
                    raise OtlpJsonError(f"{where}.{k}: expected {size * 2} hex digits, got {len(v)}")
                node[k] = base64.b64encode(raw).decode()
            else:
                _fix_ids(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _fix_ids(v, f"{where}[{i}]")


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
    except json_format.ParseError as exc:
        raise OtlpJsonError(str(exc)) from None
    message.ParseFromString(official.SerializeToString())
