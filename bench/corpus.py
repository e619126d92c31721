"""Pre-encoded, realistic traffic for the load generator: Envoy ALS batches (HTTP and TCP entries
with Istio naming, mixed mTLS and plaintext, many request ids and paths), OTLP span exports, and
the violating probe entries the latency scenario times.

Everything is encoded once at start-up; sending costs one ``bytes.replace`` per message: each
template carries an 8-byte token (``TOKEN``) in its request ids, trace ids and some paths, replaced
by a fresh 8-hex-digit message counter, so every message has new request ids without re-encoding
(same length, so the protobuf stays valid).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from google.protobuf import struct_pb2
from meshaudit._proto.envoy.config.core.v3 import base_pb2
from meshaudit._proto.envoy.data.accesslog.v3 import accesslog_pb2
from meshaudit._proto.envoy.service.accesslog.v3 import als_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

TOKEN = b"ZZZZZZZZ"
_TOKEN_S = TOKEN.decode()
TRUST_DOMAIN = "cluster.local"
NAMESPACES = ("shop", "bookinfo", "payments", "identity")
SERVICES = (
    ("frontend", "shop"),
    ("cart", "shop"),
    ("catalog", "shop"),
    ("checkout", "shop"),
    ("search", "shop"),
    ("productpage", "bookinfo"),
    ("reviews", "bookinfo"),
    ("ratings", "bookinfo"),
    ("details", "bookinfo"),
    ("gateway", "bookinfo"),
    ("payments", "payments"),
    ("ledger", "payments"),
    ("fraud", "payments"),
    ("invoices", "payments"),
    ("refunds", "payments"),
    ("auth", "identity"),
    ("users", "identity"),
    ("sessions", "identity"),
    ("tokens", "identity"),
    ("audit", "identity"),
)
# Plaintext callers the bench policy exempts (kubelet probes, Prometheus scrapes).
EXEMPT_PLAINTEXT_PREFIX = "10.99."
METHODS = (
    base_pb2.GET,
    base_pb2.GET,
    base_pb2.GET,
    base_pb2.GET,
    base_pb2.POST,
    base_pb2.POST,
    base_pb2.PUT,
    base_pb2.DELETE,
)
PATHS = (
    "/api/v1/items",
    "/api/v1/items/{n}",
    "/api/v1/cart/{n}/lines",
    "/api/v2/search?q={tok}",
    "/api/v1/users/{tok}/profile",
    "/healthz",
)
VIOLATION_PATH = "/admin/debug/pprof"


def spiffe(sa: str, ns: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}"


def pod_ip(svc_index: int, replica: int) -> str:
    return f"10.{16 + svc_index // 250}.{svc_index % 250}.{10 + replica}"


def node_id(svc: str, ns: str, svc_index: int, replica: int) -> str:
    return f"sidecar~{pod_ip(svc_index, replica)}~{svc}-7d9f{svc_index:02x}-{replica:05x}.{ns}~{ns}.svc.cluster.local"


def _extensions_blob(size: int) -> bytes:
    """Raw bytes of Node field 9 (extensions): real Envoy sends ~60 KB of them per stream."""
    out = bytearray()
    i = 0
    while len(out) < size:
        name = f"envoy.filters.http.extension_{i:04d}".encode()
        cat = b"envoy.filters.http"
        ext = b"\x0a" + bytes([len(name)]) + name + b"\x12" + bytes([len(cat)]) + cat
        out += b"\x4a" + bytes([len(ext)]) + ext
        i += 1
    return bytes(out)


_EXTENSIONS = _extensions_blob(60_000)


def identifier_bytes(svc_index: int, replica: int, log_name: str = "envoy_accesslog") -> bytes:
    """A serialized StreamAccessLogsMessage holding only the Identifier of one Istio sidecar."""
    svc, ns = SERVICES[svc_index % len(SERVICES)]
    node_msg = base_pb2.Node()
    node_msg.id = node_id(svc, ns, svc_index, replica)
    node_msg.cluster = f"{svc}.{ns}"
    node_msg.user_agent_name = "envoy"
    node_msg.user_agent_version = "1.40.0"
    meta = node_msg.metadata
    meta.update(
        {
            "NAME": f"{svc}-7d9f{svc_index:02x}-{replica:05x}",
            "NAMESPACE": ns,
            "WORKLOAD_NAME": svc,
            "CLUSTER_ID": "Kubernetes",
            "ISTIO_VERSION": "1.24.0",
            "SERVICE_ACCOUNT": svc,
        }
    )
    labels = struct_pb2.Struct()
    labels.update({"app": svc, "version": "v1"})
    meta.fields["LABELS"].struct_value.CopyFrom(labels)
    msg = als_pb2.StreamAccessLogsMessage()
    msg.identifier.log_name = log_name
    msg.identifier.node.MergeFromString(node_msg.SerializeToString() + _EXTENSIONS)
    return bytes(msg.SerializeToString())


@dataclass
class TrafficShape:
    """What the generated entries look like. Fractions are per entry."""

    plaintext_exempt: float = 0.04  # plaintext inbound from exempted probe addresses
    plaintext_violation: float = 0.001  # plaintext inbound from a mesh pod (plaintext_hop)
    path_violation: float = 0.001  # a path outside the route policy (unexpected_path)
    outbound: float = 0.35  # entries observed by the client's sidecar
    # Of the outbound entries (excessive_retries, error_burst; below their thresholds per edge):
    retried: float = 0.03  # fixed by one retry: 200 after 2 attempts
    retries_exhausted: float = 0.005  # 503 after 3 attempts, URX
    upstream_failure: float = 0.005  # 503, UF (connection failure)
    tcp_messages: float = 0.1  # messages carrying TCP entries instead of HTTP
    random_paths: bool = False  # cardinality stress: every path distinct
    source_accounts: int = 0  # >0: extra distinct source service accounts (edge cardinality)


@dataclass
class AlsCorpus:
    per_message: int
    # Batches of one destination sidecar (index = service index); TCP batches kept apart.
    http: list[list[bytes]] = field(default_factory=list)
    tcp: list[list[bytes]] = field(default_factory=list)

    @property
    def entry_bytes(self) -> float:
        sizes = [len(b) for group in self.http for b in group]
        return sum(sizes) / max(1, len(sizes)) / self.per_message


def _fill_common(
    c: accesslog_pb2.AccessLogCommon,
    rnd: random.Random,
    *,
    inbound: bool,
    svc_index: int,
    src_ip: str,
    peer: str | None,
    local_principal: str,
    dst_cluster: str,
    idx: int,
) -> None:
    c.sample_rate = 1.0
    c.downstream_remote_address.socket_address.address = src_ip
    c.downstream_remote_address.socket_address.port_value = rnd.randint(32768, 60999)
    c.downstream_local_address.socket_address.address = pod_ip(svc_index, 0)
    c.downstream_local_address.socket_address.port_value = 8080 if inbound else 15001
    if peer is not None:
        tls = c.tls_properties
        tls.tls_version = accesslog_pb2.TLSProperties.TLSv1_3
        tls.tls_cipher_suite.value = 0x1301
        tls.tls_sni_hostname = f"outbound_.8080_._.{dst_cluster}"
        tls.peer_certificate_properties.subject_alt_name.add().uri = peer
        tls.local_certificate_properties.subject_alt_name.add().uri = local_principal
    c.start_time.seconds = 1_763_780_000 + idx
    c.start_time.nanos = rnd.randint(0, 999_999) * 1000
    c.upstream_remote_address.socket_address.address = "127.0.0.6" if inbound else pod_ip(rnd.randrange(20), 1)
    c.upstream_remote_address.socket_address.port_value = 8080
    c.upstream_local_address.socket_address.address = "127.0.0.6" if inbound else pod_ip(svc_index, 0)
    c.upstream_local_address.socket_address.port_value = rnd.randint(32768, 60999)
    c.upstream_cluster = "inbound|8080||" if inbound else f"outbound|8080||{dst_cluster}"
    c.route_name = "default"
    c.duration.nanos = rnd.randint(200_000, 40_000_000)
    c.upstream_request_attempt_count = 1
    c.access_log_type = accesslog_pb2.DownstreamEnd
    c.stream_id = f"{_TOKEN_S}{idx:08x}-stream"


def _request_id(idx: int, rnd: random.Random) -> str:
    a, b, c = rnd.getrandbits(12), rnd.getrandbits(12), rnd.getrandbits(48)
    return f"{_TOKEN_S}-{idx & 0xFFFF:04x}-4{a:03x}-a{b:03x}-{c:012x}"


def _http_entry(rnd: random.Random, shape: TrafficShape, svc_index: int, idx: int) -> accesslog_pb2.HTTPAccessLogEntry:
    svc, ns = SERVICES[svc_index]
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.protocol_version = (
        accesslog_pb2.HTTPAccessLogEntry.HTTP2 if rnd.random() < 0.5 else accesslog_pb2.HTTPAccessLogEntry.HTTP11
    )
    outbound = rnd.random() < shape.outbound
    local = spiffe(svc, ns)
    if outbound:
        dst_i = rnd.randrange(len(SERVICES))
        dsvc, dns_ = SERVICES[dst_i]
        dst_cluster = f"{dsvc}.{dns_}.svc.cluster.local"
        _fill_common(
            e.common_properties,
            rnd,
            inbound=False,
            svc_index=svc_index,
            src_ip=pod_ip(svc_index, 0),
            peer=None,
            local_principal=local,
            dst_cluster=dst_cluster,
            idx=idx,
        )
        authority = f"{dsvc}.{dns_}:8080"
    else:
        r = rnd.random()
        if r < shape.plaintext_exempt:
            src_ip, peer = f"{EXEMPT_PLAINTEXT_PREFIX}{rnd.randrange(4)}.{rnd.randrange(250)}", None
        elif r < shape.plaintext_exempt + shape.plaintext_violation:
            src_i = rnd.randrange(len(SERVICES))
            src_ip, peer = pod_ip(src_i, rnd.randrange(3)), None
        else:
            src_i = rnd.randrange(len(SERVICES))
            ssvc, sns = SERVICES[src_i]
            if shape.source_accounts:
                ssvc = f"client-{rnd.randrange(shape.source_accounts):05d}"
            src_ip, peer = pod_ip(src_i, rnd.randrange(3)), spiffe(ssvc, sns)
        _fill_common(
            e.common_properties,
            rnd,
            inbound=True,
            svc_index=svc_index,
            src_ip=src_ip,
            peer=peer,
            local_principal=local,
            dst_cluster=f"{svc}.{ns}.svc.cluster.local",
            idx=idx,
        )
        authority = f"{svc}.{ns}:8080"
    req = e.request
    req.request_method = rnd.choice(METHODS)
    req.scheme = "http"
    req.authority = authority
    if shape.random_paths:
        path = f"/api/v1/r/{_TOKEN_S}/{rnd.getrandbits(40):010x}"
    elif rnd.random() < shape.path_violation:
        path = VIOLATION_PATH
    else:
        path = rnd.choice(PATHS).format(n=rnd.randrange(100_000), tok=_TOKEN_S)
    req.path = path
    req.user_agent = "Go-http-client/1.1" if rnd.random() < 0.5 else "python-requests/2.32.3"
    rid = _request_id(idx, rnd)
    req.request_id = rid
    req.request_headers_bytes = rnd.randint(300, 900)
    req.request_headers["traceparent"] = f"00-{_TOKEN_S}{rnd.getrandbits(96):024x}-{rnd.getrandbits(64):016x}-01"
    resp = e.response
    code = 200 if rnd.random() < 0.97 else rnd.choice((404, 500, 503))
    resp.response_code.value = code
    resp.response_code_details = "via_upstream"
    resp.response_headers_bytes = rnd.randint(100, 300)
    resp.response_body_bytes = rnd.randint(0, 20_000)
    if outbound:
        # Its own random stream, so that the rest of the corpus stays as it was.
        fate = random.Random(idx).random()
        c = e.common_properties
        if fate < shape.retried:
            c.upstream_request_attempt_count = 2
        elif fate < shape.retried + shape.retries_exhausted:
            c.upstream_request_attempt_count = 3
            c.response_flags.upstream_retry_limit_exceeded = True
            resp.response_code.value = 503
        elif fate < shape.retried + shape.retries_exhausted + shape.upstream_failure:
            c.response_flags.upstream_connection_failure = True
            resp.response_code.value = 503
            resp.response_code_details = "upstream_reset_before_response_started{connection_failure}"
    return e


def _tcp_entry(rnd: random.Random, svc_index: int, idx: int) -> accesslog_pb2.TCPAccessLogEntry:
    svc, ns = SERVICES[svc_index]
    e = accesslog_pb2.TCPAccessLogEntry()
    src_i = rnd.randrange(len(SERVICES))
    ssvc, sns = SERVICES[src_i]
    _fill_common(
        e.common_properties,
        rnd,
        inbound=True,
        svc_index=svc_index,
        src_ip=pod_ip(src_i, 1),
        peer=spiffe(ssvc, sns),
        local_principal=spiffe(svc, ns),
        dst_cluster=f"{svc}.{ns}.svc.cluster.local",
        idx=idx,
    )
    e.common_properties.upstream_cluster = "inbound|5432||"
    e.connection_properties.received_bytes = rnd.randint(100, 100_000)
    e.connection_properties.sent_bytes = rnd.randint(100, 100_000)
    return e


def build_als(
    per_message: int, batches_per_service: int = 8, shape: TrafficShape | None = None, seed: int = 7
) -> AlsCorpus:
    shape = shape or TrafficShape()
    rnd = random.Random(seed)
    corpus = AlsCorpus(per_message=per_message)
    idx = 0
    for svc_index in range(len(SERVICES)):
        http_group: list[bytes] = []
        tcp_group: list[bytes] = []
        for _ in range(batches_per_service):
            m = als_pb2.StreamAccessLogsMessage()
            for _ in range(per_message):
                m.http_logs.log_entry.append(_http_entry(rnd, shape, svc_index, idx))
                idx += 1
            http_group.append(bytes(m.SerializeToString()))
        for _ in range(max(1, batches_per_service // 4)):
            m = als_pb2.StreamAccessLogsMessage()
            for _ in range(per_message):
                m.tcp_logs.log_entry.append(_tcp_entry(rnd, svc_index, idx))
                idx += 1
            tcp_group.append(bytes(m.SerializeToString()))
        corpus.http.append(http_group)
        corpus.tcp.append(tcp_group)
    return corpus


# --- probes: one violating entry each, unique source so aggregation never suppresses it --------
PROBE_NAMESPACE = "intruder"


def probe_message(n: int, dst_index: int = 0) -> bytes:
    """An mTLS inbound entry from a service account no policy allows (unexpected_edge), alone in
    its message; the source ``probe-<n>.intruder`` names the probe in the alert."""
    rnd = random.Random(n)
    svc, ns = SERVICES[dst_index]
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.protocol_version = accesslog_pb2.HTTPAccessLogEntry.HTTP2
    _fill_common(
        e.common_properties,
        rnd,
        inbound=True,
        svc_index=dst_index,
        src_ip=f"10.250.{(n >> 8) & 255}.{n & 255}",
        peer=spiffe(f"probe-{n}", PROBE_NAMESPACE),
        local_principal=spiffe(svc, ns),
        dst_cluster=f"{svc}.{ns}.svc.cluster.local",
        idx=n,
    )
    e.request.request_method = base_pb2.GET
    e.request.authority = f"{svc}.{ns}:8080"
    e.request.path = "/api/v1/items"
    e.request.request_id = f"probe-{n:08d}-0000-4000-a000-000000000000"
    e.response.response_code.value = 200
    m = als_pb2.StreamAccessLogsMessage()
    m.http_logs.log_entry.append(e)
    return bytes(m.SerializeToString())


# --- OTLP ------------------------------------------------------------------------------------
def _attr(kv: common_pb2.KeyValue, key: str, value: str | int) -> None:
    kv.key = key
    if isinstance(value, int):
        kv.value.int_value = value
    else:
        kv.value.string_value = value


def build_otlp(spans_per_export: int = 200, exports: int = 40, seed: int = 11) -> list[bytes]:
    """ExportTraceServiceRequests as Envoy's OpenTelemetry tracer sends them: one resource (the
    proxy's service), server spans for inbound and client spans for outbound requests."""
    rnd = random.Random(seed)
    out: list[bytes] = []
    for x in range(exports):
        svc_index = x % len(SERVICES)
        svc, ns = SERVICES[svc_index]
        req = trace_service_pb2.ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        _attr(rs.resource.attributes.add(), "service.name", f"{svc}.{ns}")
        _attr(rs.resource.attributes.add(), "telemetry.sdk.name", "envoy")
        ss = rs.scope_spans.add()
        ss.scope.name = "envoy"
        ss.scope.version = "1.40.0"
        for i in range(spans_per_export):
            sp = ss.spans.add()
            sp.trace_id = TOKEN + rnd.randbytes(8)
            sp.span_id = rnd.randbytes(8)
            sp.parent_span_id = rnd.randbytes(8)
            inbound = rnd.random() < 0.6
            sp.kind = trace_pb2.Span.SPAN_KIND_SERVER if inbound else trace_pb2.Span.SPAN_KIND_CLIENT
            dsvc, dns_ = (svc, ns) if inbound else SERVICES[rnd.randrange(len(SERVICES))]
            path = rnd.choice(PATHS).format(n=rnd.randrange(100_000), tok=_TOKEN_S)
            sp.name = f"{dsvc}.{dns_}.svc.cluster.local:8080{path.split('?')[0]}"
            start = 1_763_780_000_000_000_000 + (x * spans_per_export + i) * 1_000_000
            sp.start_time_unix_nano = start
            sp.end_time_unix_nano = start + rnd.randint(200_000, 40_000_000)
            a = sp.attributes
            _attr(a.add(), "node_id", node_id(svc, ns, svc_index, 0))
            _attr(a.add(), "zone", "")
            _attr(a.add(), "guid:x-request-id", _request_id(i, rnd))
            _attr(a.add(), "http.url", f"http://{dsvc}.{dns_}:8080{path}")
            _attr(a.add(), "http.method", rnd.choice(("GET", "GET", "POST")))
            _attr(a.add(), "downstream_cluster", "-")
            _attr(a.add(), "user_agent", "Go-http-client/1.1")
            _attr(a.add(), "http.protocol", "HTTP/1.1")
            _attr(a.add(), "peer.address", pod_ip(rnd.randrange(20), 0))
            _attr(a.add(), "request_size", 0)
            _attr(
                a.add(),
                "upstream_cluster",
                "inbound|8080||" if inbound else f"outbound|8080||{dsvc}.{dns_}.svc.cluster.local",
            )
            _attr(a.add(), "upstream_cluster.name", "inbound|8080||" if inbound else "outbound")
            _attr(a.add(), "http.status_code", "200")
            _attr(a.add(), "response_size", rnd.randint(0, 20_000))
            _attr(a.add(), "response_flags", "-")
            _attr(a.add(), "component", "proxy")
        out.append(bytes(req.SerializeToString()))
    return out
