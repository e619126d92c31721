"""Envoy ALS entries -> Hops. The hot path: each protobuf field is read once (upb field access
costs ~0.3 us), optional submessages are tested with HasField, strings that repeat (clusters,
principals, addresses) resolve through caches, and no per-entry dict or f-string is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meshaudit.model import ALS_HTTP, ALS_TCP, INBOUND, OUTBOUND, UNKNOWN, Hop, Identity, identity
from meshaudit.naming import Namer, cluster_direction, outbound_cluster_target

METHODS = ("", "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
TLS_VERSIONS = ("unknown", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")

# Envoy's short response-flag names, by ResponseFlags field name.
FLAG_NAMES = {
    "failed_local_healthcheck": "LH",
    "no_healthy_upstream": "UH",
    "upstream_request_timeout": "UT",
    "local_reset": "LR",
    "upstream_remote_reset": "UR",
    "upstream_connection_failure": "UF",
    "upstream_connection_termination": "UC",
    "upstream_overflow": "UO",
    "no_route_found": "NR",
    "delay_injected": "DI",
    "fault_injected": "FI",
    "rate_limited": "RL",
    "unauthorized_details": "UAEX",
    "rate_limit_service_error": "RLSE",
    "downstream_connection_termination": "DC",
    "upstream_retry_limit_exceeded": "URX",
    "stream_idle_timeout": "SI",
    "invalid_envoy_request_headers": "IH",
    "downstream_protocol_error": "DPE",
    "upstream_max_stream_duration_reached": "UMSDR",
    "response_from_cache_filter": "RFCF",
    "no_filter_config_found": "NFCF",
    "duration_timeout": "DT",
    "upstream_protocol_error": "UPE",
    "no_cluster_found": "NC",
    "overload_manager": "OM",
    "dns_resolution_failure": "DF",
}


class StreamContext:
    """What the first message of an ALS stream told us, kept for the stream's life."""

    __slots__ = ("default_direction", "log_name", "node_cluster", "node_id", "observer")

    def __init__(self, namer: Namer, node_id: str, node_cluster: str, log_name: str) -> None:
        self.node_id = node_id or node_cluster or "unknown-node"
        self.node_cluster = node_cluster
        self.log_name = log_name
        self.observer: Identity = namer.node(node_id, node_cluster)
        d = namer.mesh.log_name_direction.get(log_name)
        self.default_direction = INBOUND if d == "inbound" else OUTBOUND if d == "outbound" else UNKNOWN


def traceparent_trace_id(value: str) -> str | None:
    """W3C ``traceparent`` ``00-<32 hex trace id>-<16 hex parent id>-<flags>`` -> trace id."""
    if len(value) >= 55 and value[2] == "-" and value[35] == "-":
        tid = value[3:35].lower()
        if tid != "0" * 32:
            return tid
    return None


def _addr(a: Any) -> str | None:
    """config.core.v3.Address -> "ip:port" (or pipe path), None when unset."""
    which = a.WhichOneof("address")
    if which == "socket_address":
        s = a.socket_address
        return f"{s.address}:{s.port_value}"
    if which == "pipe":
        return str(a.pipe.path)
    return None


def _flags(f: Any) -> str:
    return ",".join(FLAG_NAMES.get(fd.name, fd.name) for fd, v in f.ListFields() if v)


_CLUSTER_CACHE: dict[str, tuple[int, Identity | None]] = {}


def _cluster(cluster: str, namer: Namer) -> tuple[int, Identity | None]:
    """Direction and, for outbound clusters, the destination service."""
    found = _CLUSTER_CACHE.get(cluster)
    if found is not None:
        return found
    direction = cluster_direction(cluster)
    dst = None
    if direction == OUTBOUND:
        svc, ns = outbound_cluster_target(cluster)
        if svc:
            dst = namer.service(svc, ns)
    found = (direction, dst)
    if len(_CLUSTER_CACHE) < 10_000:
        _CLUSTER_CACHE[cluster] = found
    return found


def _common(
    c: Any,
    ctx: StreamContext,
    namer: Namer,
    authority: str | None,
    need_conn: bool,
) -> tuple[int, Identity, Identity, str | None, str | None, str | None, str | None, str, float]:
    """Fields every entry has: direction, src, dst, TLS facts, conn key, cluster, start time."""
    cluster = c.upstream_cluster
    direction, out_dst = _cluster(cluster, namer)
    if direction == UNKNOWN:
        direction = ctx.default_direction
    tls_version = peer = local = None
    if c.HasField("tls_properties"):
        t = c.tls_properties
        tls_version = TLS_VERSIONS[t.tls_version] if t.tls_version < 5 else "unknown"
        if t.HasField("peer_certificate_properties"):
            for san in t.peer_certificate_properties.subject_alt_name:
                uri = san.uri
                if uri:
                    peer = uri
                    break
        if t.HasField("local_certificate_properties"):
            for san in t.local_certificate_properties.subject_alt_name:
                uri = san.uri
                if uri:
                    local = uri
                    break
    ts = c.start_time
    start = ts.seconds + ts.nanos * 1e-9
    observer = ctx.observer
    if direction == INBOUND:
        if peer:  # mTLS: the certificate names the source; the address is not needed
            return direction, namer.principal(peer), observer, tls_version, peer, local, None, cluster, start
        remote = _addr(c.downstream_remote_address) if c.HasField("downstream_remote_address") else None
        src = namer.address(remote) if remote else identity()
        return direction, src, observer, tls_version, peer, local, remote, cluster, start
    # Outbound: the source is this sidecar's workload; the downstream is the local app. The
    # connection key pairs entries only where no request id does (TCP).
    upstream_local = _addr(c.upstream_local_address) if need_conn and c.HasField("upstream_local_address") else None
    if out_dst is None:
        upstream = _addr(c.upstream_remote_address) if c.HasField("upstream_remote_address") else None
        if direction == OUTBOUND:  # PassthroughCluster, BlackHoleCluster, or a plain-Envoy egress
            host = authority.rsplit(":", 1)[0] if authority else None
            out_dst = identity(host or upstream, None, cluster or None, None, upstream)
        else:
            out_dst = identity(cluster or None, None, None, None, upstream)
    return direction, observer, out_dst, tls_version, peer, local, upstream_local, cluster, start


def decode_http(entries: Iterable[Any], ctx: StreamContext, namer: Namer, out: list[Hop]) -> None:
    for e in entries:
        c = e.common_properties
        if e.HasField("request"):
            r = e.request
            m = r.request_method
            method = METHODS[m] if 0 < m < 10 else "OTHER"
            authority = r.authority or None
            path = r.path or None
            rid = r.request_id or None
            headers = r.request_headers
            tp = headers.get("traceparent") if headers else None
            trace_id = traceparent_trace_id(tp) if tp else None
        else:
            method = "OTHER"
            authority = path = rid = trace_id = None
        status = 0
        details = ""
        if e.HasField("response"):
            resp = e.response
            if resp.HasField("response_code"):
                status = resp.response_code.value
            details = resp.response_code_details
        direction, src, dst, tls_version, peer, local, conn, cluster, start = _common(
            c, ctx, namer, authority, rid is None
        )
        out.append(
            Hop(
                ALS_HTTP,
                ctx.node_id,
                ctx.observer,
                direction,
                src,
                dst,
                start,
                tls_version=tls_version,
                peer_principal=peer,
                local_principal=local,
                method=method,
                authority=authority,
                path=path,
                status=status,
                response_flags=_flags(c.response_flags) if c.HasField("response_flags") else "",
                response_code_details=details,
                route_name=c.route_name,
                upstream_cluster=cluster,
                attempts=c.upstream_request_attempt_count,
                trace_id=trace_id,
                request_id=rid,
                conn=conn,
            )
        )


def decode_tcp(entries: Iterable[Any], ctx: StreamContext, namer: Namer, out: list[Hop]) -> None:
    for e in entries:
        c = e.common_properties
        direction, src, dst, tls_version, peer, local, conn, cluster, start = _common(c, ctx, namer, None, True)
        out.append(
            Hop(
                ALS_TCP,
                ctx.node_id,
                ctx.observer,
                direction,
                src,
                dst,
                start,
                tls_version=tls_version,
                peer_principal=peer,
                local_principal=local,
                response_flags=_flags(c.response_flags) if c.HasField("response_flags") else "",
                upstream_cluster=cluster,
                attempts=c.upstream_request_attempt_count,
                conn=conn,
            )
        )
