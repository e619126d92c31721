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

from meshaudit.model import (
    INBOUND,
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

ExportTraceServiceRequest = trace_service_pb2.ExportTraceServiceRequest
ExportLogsServiceRequest = logs_service_pb2.ExportLogsServiceRequest


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


def _resource(res: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in res.attributes}


# --- traces ----------------------------------------------------------------------------------
# Span attribute keys meshaudit reads; every other key is skipped without decoding its value.
_SPAN_KEYS = frozenset(
    (
        "guid:x-request-id",
        "node_id",
        "upstream_cluster",
        "upstream_cluster.name",
        "peer.address",
        "istio.canonical_service",
        "istio.namespace",
        "http.method",
        "http.request.method",
        "http.url",
        "url.full",
        "url.path",
        "http.target",
        "http.route",
        "http.status_code",
        "http.response.status_code",
        "client.address",
        "net.peer.ip",
        "network.peer.address",
        "server.address",
        "http.request.header.x-request-id",
    )
)


def _path_of(url: str | None) -> str | None:
    if not url:
        return None
    i = url.find("://")
    if i >= 0:
        j = url.find("/", i + 3)
        return url[j:] if j >= 0 else "/"
    return url


def decode_traces(req: Any, namer: Namer, out: list[Hop]) -> int:
    """Append one hop per span; returns the number of spans read."""
    n = 0
    for rs in req.resource_spans:
        res = _resource(rs.resource) if rs.HasField("resource") else {}
        res_service = _str(res.get("service.name"))
        res_ns = _str(res.get("service.namespace")) or _str(res.get("k8s.namespace.name"))
        for ss in rs.scope_spans:
            for sp in ss.spans:
                n += 1
                a: dict[str, Any] = {}
                for kv in sp.attributes:
                    if kv.key in _SPAN_KEYS:
                        a[kv.key] = _value(kv.value)
                out.append(_span_hop(sp, a, res_service, res_ns, namer))
    return n


def _span_hop(sp: Any, a: dict[str, Any], res_service: str | None, res_ns: str | None, namer: Namer) -> Hop:
    kind = sp.kind
    trace_id = sp.trace_id.hex() or None
    span_id = sp.span_id.hex() or None
    parent = sp.parent_span_id.hex() or None
    start = sp.start_time_unix_nano / 1e9
    rid = _str(a.get("guid:x-request-id")) or _str(a.get("http.request.header.x-request-id"))
    method = _str(a.get("http.method")) or _str(a.get("http.request.method"))
    path = _str(a.get("url.path")) or _path_of(_str(a.get("http.url")) or _str(a.get("url.full")))
    path = path or _str(a.get("http.target"))
    status = _int(a.get("http.status_code") or a.get("http.response.status_code"))
    node_id = _str(a.get("node_id"))
    cluster = _str(a.get("upstream_cluster")) or _str(a.get("upstream_cluster.name")) or ""
    svc = _str(a.get("istio.canonical_service")) or res_service
    ns = _str(a.get("istio.namespace")) or res_ns
    peer_addr = _str(a.get("peer.address")) or _str(a.get("client.address")) or _str(a.get("network.peer.address"))
    if node_id:  # a sidecar's own span
        me = namer.node(node_id, f"{svc}.{ns}" if svc and ns else (svc or ""))
        observer = node_id
        direction = cluster_direction(cluster) if cluster else UNKNOWN
        if direction == UNKNOWN:
            direction = INBOUND if kind == SPAN_KIND_SERVER else OUTBOUND if kind == SPAN_KIND_CLIENT else UNKNOWN
    else:
        me = identity(svc, ns) if svc else identity(None, None, None, None, None)
        observer = "span:" + (me.key if svc else "unknown")
        direction = INBOUND if kind == SPAN_KIND_SERVER else OUTBOUND if kind == SPAN_KIND_CLIENT else UNKNOWN
    src: Identity
    dst: Identity
    if direction == OUTBOUND:
        src = me
        tsvc, tns = outbound_cluster_target(cluster)
        dst = namer.service(tsvc, tns) if tsvc else identity(_str(a.get("server.address")))
    else:
        src = namer.address(peer_addr) if peer_addr else identity()
        dst = me
    return Hop(
        SPAN,
        observer,
        me,
        direction,
        src,
        dst,
        start,
        method=method,
        path=path,
        status=status,
        upstream_cluster=cluster,
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        request_id=rid,
        span_kind=kind,
    )


# --- logs (Envoy's OpenTelemetry access logger) -------------------------------------------------
def _first(a: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        v = a.get(k)
        if v is not None and v not in {"", "-"}:
            return v
    return None


def decode_logs(req: Any, namer: Namer, out: list[Hop]) -> int:
    """Append one hop per access-log record; returns the number of records read."""
    n = 0
    for rl in req.resource_logs:
        res = _resource(rl.resource) if rl.HasField("resource") else {}
        node_id = _str(res.get("node_name")) or _str(res.get("node_id")) or ""
        node_cluster = _str(res.get("cluster_name")) or _str(res.get("service.name")) or ""
        observer_id = node_id or node_cluster or "unknown-node"
        me = namer.node(node_id, node_cluster)
        for sl in rl.scope_logs:
            for lr in sl.log_records:
                n += 1
                a = {kv.key: _value(kv.value) for kv in lr.attributes}
                out.append(_log_hop(lr, a, me, observer_id, namer))
    return n


def _log_hop(lr: Any, a: dict[str, Any], me: Identity, observer: str, namer: Namer) -> Hop:
    cluster = _str(_first(a, "upstream_cluster", "upstream.cluster", "envoy.upstream_cluster")) or ""
    direction = cluster_direction(cluster)
    tls = _str(_first(a, "downstream_tls_version", "tls.protocol.version", "tls_version"))
    peer = _str(_first(a, "downstream_peer_uri_san", "tls.client.subject_alt_name", "peer_uri_san"))
    remote = _str(_first(a, "downstream_remote_address", "client.address", "source.address"))
    method = _str(_first(a, "http.request.method", "http.method", "method"))
    path = _str(_first(a, "url.path", "http.target", "path"))
    authority = _str(_first(a, "authority", "server.address", "http.host"))
    rid = _str(_first(a, "x-request-id", "request_id", "http.request.header.x-request-id"))
    trace_id = lr.trace_id.hex() or None
    start = (lr.time_unix_nano or lr.observed_time_unix_nano) / 1e9
    src: Identity
    dst: Identity
    if direction == OUTBOUND:
        src = me
        tsvc, tns = outbound_cluster_target(cluster)
        dst = namer.service(tsvc, tns) if tsvc else identity(authority, None, cluster or None)
        conn = _str(_first(a, "upstream_local_address"))
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
        response_flags=_str(_first(a, "response_flags")) or "",
        response_code_details=_str(_first(a, "response_code_details")) or "",
        route_name=_str(_first(a, "route_name")) or "",
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


def parse_json(body: bytes, message: Any) -> None:
    """Parse an OTLP/JSON body into ``message`` (a fresh Export*ServiceRequest)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OtlpJsonError(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OtlpJsonError("the body must be a JSON object")
    _fix_ids(data, "$")
    try:
        json_format.ParseDict(data, message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise OtlpJsonError(str(exc)) from None
