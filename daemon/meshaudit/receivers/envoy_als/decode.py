"""Envoy ALS entries -> Hops. The hot path: each protobuf field is read once (upb field access
costs ~0.3 us), optional submessages are tested with HasField, strings that repeat (clusters,
principals, addresses) resolve through caches, and no per-entry dict or f-string is built.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, ClassVar, Final

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from meshaudit import metrics
from meshaudit._proto.envoy.data.accesslog.v3 import accesslog_pb2
from meshaudit.logsafe import RateLimited
from meshaudit.model import ALS_HTTP, ALS_TCP, INBOUND, NOBODY, OUTBOUND, UNKNOWN, Hop, Identity, identity
from meshaudit.naming import (
    BLACKHOLE,
    CLUSTERS,
    Namer,
    cluster_of,
    strip_pod_hash,
)

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


ZERO_TRACE = "0" * 32
# HasField called through the class, not the message: a method looked up on a upb message is
# first looked for among its fields (a failed name lookup, then the generic one): ~35 ns a call
# instead of ~65 on the decoders' every entry.
_has: Final = accesslog_pb2.AccessLogCommon.HasField


def _addr(a: Any) -> str | None:
    """config.core.v3.Address -> "ip:port", "[ipv6]:port" (or pipe path), None when unset. IPv6 is
    bracketed, so that the port can be told from the address's last group."""
    which = a.WhichOneof("address")
    if which == "socket_address":
        s = a.socket_address
        ip = s.address
        return f"[{ip}]:{s.port_value}" if ":" in ip else f"{ip}:{s.port_value}"
    if which == "pipe":
        return str(a.pipe.path)
    return None


def _flag_mask(f: Any) -> int:
    """ResponseFlags as a bit mask: bit n, field n set (as the entry scanner gives them)."""
    mask = 0
    for fd, v in f.ListFields():
        if v:
            mask |= 1 << fd.number
    return mask


_FLAG_BY_NUMBER: Final = sorted(
    (fd.number, FLAG_NAMES.get(fd.name, fd.name)) for fd in accesslog_pb2.ResponseFlags.DESCRIPTOR.fields
)
_FLAG_TEXT: dict[int, str] = {0: ""}


def flag_text(mask: int) -> str:
    """``_flags``' text of a ``_flag_mask``: Envoy's short names in field order, comma separated."""
    found = _FLAG_TEXT.get(mask)
    if found is None:
        found = ",".join(name for n, name in _FLAG_BY_NUMBER if mask >> n & 1)
        if len(_FLAG_TEXT) < 4096:
            _FLAG_TEXT[mask] = found
    return found


def _flags(f: Any) -> str:
    return flag_text(_flag_mask(f))


def _uri_san(sans: Any) -> str | None:
    """The first URI SAN (the SPIFFE id); Istio certificates carry it first."""
    if not sans:
        return None
    uri: str = sans[0].uri
    if uri:
        return uri
    for san in sans:
        uri = san.uri
        if uri:
            return uri
    return None


def _tls(c: Any) -> tuple[int | None, str | None]:
    """TLS version (the enum's number) and peer URI SAN of the downstream connection; (None, None)
    for plaintext."""
    if not _has(c, "tls_properties"):
        return None, None
    t = c.tls_properties
    return t.tls_version, _uri_san(t.peer_certificate_properties.subject_alt_name)


def _tls_name(tv: int | None) -> str | None:
    return None if tv is None else TLS_VERSIONS[tv] if 0 <= tv < 5 else "unknown"


# An entry's start time is trusted within these bounds of the time it is read (within
# milliseconds of its arrival: the field is lazy, read when a rule or an alert needs it). A
# long-lived TCP connection is logged with the time it opened, so the past bound is generous;
# the future bound covers clock skew. Outside them (not representable at all: 1e12 s, a
# negative time; or unset: 0) the entry's time is the receive time instead, counted as
# meshaudit_rejected_total{receiver="envoy_als",reason="clamped_time"}.
MAX_PAST_SECS: Final = 10 * 366 * 86_400
MAX_FUTURE_SECS: Final = 86_400
_clamped = metrics.REJECTED.labels("envoy_als", "clamped_time")
_bad_input = RateLimited(logging.getLogger("meshaudit.receivers.envoy_als"))


def _raw_start(c: Any) -> float:
    """An entry's ``start_time`` in epoch seconds, as sent (``_start`` clamps it)."""
    ts = c.start_time
    t: float = ts.seconds + ts.nanos * 1e-9
    return t


def _duration_ms(c: Any) -> float | None:
    """An entry's ``duration`` in milliseconds; None when it has none."""
    return c.duration.ToNanoseconds() / 1e6 if c.HasField("duration") else None


def _start(e: Any) -> float:
    c = e.common_properties
    t = _raw_start(c)
    now = time.time()
    if now - MAX_PAST_SECS <= t <= now + MAX_FUTURE_SECS:
        return t
    _clamped.inc()
    _bad_input.warning(
        "clamped_time",
        "An access-log entry's start_time (%d s) is more than ten years before or a day after now; "
        'its receive time is used instead (counted in meshaudit_rejected_total{reason="clamped_time"}).',
        c.start_time.seconds,
    )
    return now


def _local_principal(e: Any) -> str | None:
    c = e.common_properties
    if not c.HasField("tls_properties"):
        return None
    t = c.tls_properties
    return (
        _uri_san(t.local_certificate_properties.subject_alt_name)
        if t.HasField("local_certificate_properties")
        else None
    )


def _tls_cipher(e: Any) -> int | None:
    c = e.common_properties
    if not c.HasField("tls_properties"):
        return None
    t = c.tls_properties
    return int(t.tls_cipher_suite.value) if t.HasField("tls_cipher_suite") else None


def _trace_of(tp: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header (``00-<trace id>-<parent>-<flags>``)."""
    if not tp or len(tp) < 55 or tp[2] != "-" or tp[35] != "-":
        return None
    trace_id = tp[3:35].lower()
    return None if trace_id == ZERO_TRACE else trace_id


def _trace_id(e: Any) -> str | None:
    return _trace_of(e.request.request_headers.get("traceparent")) if e.HasField("request") else None


def _details(e: Any) -> str:
    return str(e.response.response_code_details)


def _response_flags(e: Any) -> str:
    c = e.common_properties
    return _flags(c.response_flags) if c.HasField("response_flags") else ""


# --- evidence read only when a rule asks: Istio's peer metadata, x-forwarded-client-cert ------
# Istio >= 1.24 logs its peer metadata as filter state ``downstream_peer`` / ``upstream_peer``
# (``filter_state_objects_to_log``): an Any holding a google.protobuf.Struct with string fields
# ``workload``, ``namespace``, ``service`` (canonical service), ``name`` (pod), ``identity``,
# ``cluster``, ``app``, ``version``, ``revision``, ``type``. Older Istio logs
# ``wasm.downstream_peer`` as FlatBuffers bytes, which meshaudit does not read: such an entry is
# counted (once per entry, when its downstream peer is read) as
# meshaudit_rejected_total{receiver="envoy_als",reason="unsupported_peer_metadata"}.
PEER_STRUCT_TYPE: Final = "type.googleapis.com/google.protobuf.Struct"
_unsupported_peer = metrics.REJECTED.labels("envoy_als", "unsupported_peer_metadata")
_PEERS: dict[bytes, Identity | None] = {}  # the Struct's bytes -> the party: one pod, one value


def _unsupported(what: str) -> None:
    _unsupported_peer.inc()
    _bad_input.warning(
        "unsupported_peer_metadata",
        "An access-log entry carries peer metadata meshaudit cannot read (%s); it is skipped "
        '(counted in meshaudit_rejected_total{reason="unsupported_peer_metadata"}).',
        what,
    )


def _peer_identity(a: Any, count: bool) -> Identity | None:
    raw: bytes = a.value
    found = _PEERS.get(raw)
    if found is not None or raw in _PEERS:
        return found
    if a.type_url != PEER_STRUCT_TYPE:
        if count:
            _unsupported(f"type {a.type_url[:100]!r}")
        return None
    try:
        fields = struct_pb2.Struct.FromString(raw).fields
    except DecodeError:
        if count:
            _unsupported("an undecodable Struct")
        return None

    def text(key: str) -> str | None:
        v = fields.get(key)
        return (v.string_value or None) if v is not None else None

    workload = text("workload")
    service = text("service") or text("app") or (strip_pod_hash(workload) if workload else None)
    ident = identity(service, text("namespace"), workload, text("identity"), None) if service else None
    if len(_PEERS) >= 10_000:
        _PEERS.clear()
    _PEERS[raw] = ident
    return ident


def _downstream_peer(e: Any) -> Identity | None:
    fso = e.common_properties.filter_state_objects
    if not fso:
        return None
    a = fso.get("downstream_peer")
    if a is None:
        if "wasm.downstream_peer" in fso:
            _unsupported("wasm.downstream_peer, FlatBuffers from Istio before 1.24")
        return None
    return _peer_identity(a, True)


def _upstream_peer(e: Any) -> Identity | None:
    fso = e.common_properties.filter_state_objects
    if not fso:
        return None
    a = fso.get("upstream_peer")
    return None if a is None else _peer_identity(a, False)  # counted once per entry: downstream only


XFCC_HEADER: Final = "x-forwarded-client-cert"


@lru_cache(maxsize=4096)
def parse_xfcc(value: str) -> tuple[str | None, str | None]:
    """``x-forwarded-client-cert`` -> (By, URI) of its last element (the nearest hop: each proxy
    that appends adds one). Elements are separated by ``,``, pairs by ``;``; values may be
    quoted (a Subject holds commas). The first URI when the element has several."""
    last: tuple[str | None, str | None] = (None, None)
    by = uri = None
    key: list[str] = []
    val: list[str] = []
    in_value = quoted = False
    for ch in value[:16_384] + ",":
        if quoted:
            if ch == '"':
                quoted = False
            else:
                val.append(ch)
        elif ch == '"' and in_value:
            quoted = True
        elif ch == "=" and not in_value:
            in_value = True
        elif ch in ";,":
            k = "".join(key).strip().lower()
            v = "".join(val).strip() or None
            if k == "by":
                by = v
            elif k == "uri" and uri is None:
                uri = v
            key, val, in_value = [], [], False
            if ch == ",":
                if by is not None or uri is not None:
                    last = (by, uri)
                by = uri = None
        elif in_value:
            val.append(ch)
        else:
            key.append(ch)
    return last


def _xfcc(e: Any) -> tuple[str | None, str | None]:
    if not e.HasField("request"):
        return None, None
    v = e.request.request_headers.get(XFCC_HEADER)
    return parse_xfcc(v) if v else (None, None)


# Hop fields an ALS entry fills only when something reads them (a rule that uses them, an
# alert's evidence): most entries never need them, and each protobuf read costs. HTTP and TCP
# entries differ: a TCP entry has no request or response.
_LAZY_COMMON: dict[str, Callable[[Any], Any]] = {
    "start": _start,
    "local_principal": _local_principal,
    "tls_cipher": _tls_cipher,
    "response_flags": _response_flags,
    "route_name": lambda e: str(e.common_properties.route_name),
    "attempts": lambda e: int(e.common_properties.upstream_request_attempt_count),
    "span_id": lambda e: None,
    "parent_span_id": lambda e: None,
    "span_kind": lambda e: 0,
    "downstream_peer": _downstream_peer,
    "upstream_peer": _upstream_peer,
    "duration_ms": lambda e: _duration_ms(e.common_properties),
    "source_address": lambda e: (
        _addr(e.common_properties.downstream_remote_address)
        if e.common_properties.HasField("downstream_remote_address")
        else None
    ),
}
_LAZY_HTTP: dict[str, Callable[[Any], Any]] = {
    **_LAZY_COMMON,
    "authority": lambda e: (e.request.authority or None) if e.HasField("request") else None,
    "response_code_details": _details,
    "trace_id": _trace_id,
    "connection_termination_details": lambda e: "",
    "xfcc_uri": lambda e: _xfcc(e)[1],
    "xfcc_by": lambda e: _xfcc(e)[0],
    "user_agent": lambda e: (e.request.user_agent or None) if e.HasField("request") else None,
}
_LAZY_TCP: dict[str, Callable[[Any], Any]] = {
    **_LAZY_COMMON,
    "authority": lambda e: None,
    "response_code_details": lambda e: "",
    "trace_id": lambda e: None,
    "connection_termination_details": lambda e: str(e.common_properties.connection_termination_details),
    "xfcc_uri": lambda e: None,
    "xfcc_by": lambda e: None,
    "user_agent": lambda e: None,
}


# The slots of the fields an AlsHop may read lazily, used directly: set without the lazy
# field's property (below), read to tell a field read already from one not read yet.
_SLOT_GET: Final = {name: Hop.__dict__[name].__get__ for name in _LAZY_HTTP}
_SLOT_SET: Final = {name: Hop.__dict__[name].__set__ for name in _LAZY_HTTP}
_SLOT_DEL: Final = {name: Hop.__dict__[name].__delete__ for name in _LAZY_HTTP}
_set_trace_id: Final = _SLOT_SET["trace_id"]


class AlsHop(Hop):
    """A Hop from an Envoy access-log entry: the fields every rule reads are set at once (by
    ``decode_http`` and ``decode_tcp``, from the entry scanner's tuples: ``trace_id`` and
    ``attempts`` too, and a TCP entry's ``response_flags`` and ``connection_termination_details``),
    the rest (see ``_LAZY_HTTP``, ``_LAZY_TCP``) are read from the entry on first use. The entry is
    immutable once parsed.

    Each lazy field is a property over the field's own slot (``_lazy``), not a ``__getattr__``:
    a class with ``__getattr__`` makes every attribute read of its instances, the eager fields'
    too, take CPython's slow path (its attribute-read specialization requires the generic
    lookup), ~50 ns where a slot read costs ~10, and the rules read a hop's fields ~100 times."""

    # ``_e``: the hop's Envoy entry; or, ``_i`` >= 0, the repeated field of its message that holds
    # it at ``_i`` (the decoders take no wrapper object of an entry they need not read: ~0.1 us
    # each, made and freed); or its bytes, once detached.
    __slots__ = ("_e", "_i")
    _ENTRY: ClassVar[Any] = accesslog_pb2.HTTPAccessLogEntry  # what a detached hop parses again

    def __init__(
        self,
        e: Any,
        origin: int,
        observer: str,
        observer_service: Identity,
        direction: int,
        src: Identity,
        dst: Identity,
        tls_version: str | None,
        peer_principal: str | None,
        method: str | None,
        path: str | None,
        request_id: str | None,
        trace_id: str | None,
        conn: str | None,
        upstream_cluster: str,
        status: int,
    ) -> None:
        self._e = e
        self._i = -1
        self.origin = origin
        self.observer = observer
        self.observer_service = observer_service
        self.direction = direction
        self.src = src
        self.dst = dst
        self.tls_version = tls_version
        self.peer_principal = peer_principal
        self.method = method
        self.path = path
        self.request_id = request_id
        _set_trace_id(self, trace_id)  # into the slot: the property's setter is a Python call
        self.conn = conn
        self.upstream_cluster = upstream_cluster
        self.status = status

    def detach(self) -> None:
        """A hop kept past its batch must not keep the whole message it came in alive (25-100
        entries, 12-50 KB): it keeps its own entry's bytes instead (~0.5 us, ~450 B), parsed
        again only if a field not read yet is asked for (~0.7 us; a parked hop's alert reads its
        time). Reading every lazy field at once cost ~6 us a parked hop. A field read once keeps
        its value: nothing is read (or counted) twice."""
        e = self._e
        if self._i >= 0:
            e = e[self._i]
            self._i = -1
        if e is not None and e.__class__ is not bytes:
            self._e = e.SerializeToString()

    def entry_bytes(self) -> bytes:
        """Envoy's entry of this hop, serialized (the hops topic carries it as it is): its bytes
        when detached, else the parsed entry written out. The hop stays as it was."""
        e = self._e
        if self._i >= 0:
            e = e[self._i]
        if e.__class__ is bytes:
            out: bytes = e
            return out
        raw: bytes = e.SerializeToString()
        return raw

    def _entry(self) -> Any:
        e = self._e
        i = self._i
        if i >= 0:  # the entry's wrapper, taken from its message once
            e = self._e = e[i]
            self._i = -1
        elif e.__class__ is bytes:  # detached: this entry alone, parsed again
            e = self._e = self._ENTRY.FromString(e)
        return e


def _lazy(name: str) -> property:
    """The property of a lazy field: its slot's value once set (at decode, or by a read before),
    else read from the entry (``_LAZY_HTTP``, ``_LAZY_TCP`` by the hop's origin) into the slot."""
    get, put = _SLOT_GET[name], _SLOT_SET[name]
    read_http, read_tcp = _LAZY_HTTP[name], _LAZY_TCP[name]

    def read(self: AlsHop) -> Any:
        try:
            return get(self)
        except AttributeError:  # not read yet
            value = (read_tcp if self.origin == ALS_TCP else read_http)(self._entry())
            put(self, value)
            return value

    return property(read, put, _SLOT_DEL[name], doc=f"``{name}``, read from the entry on first use")


for _name in _LAZY_HTTP:
    setattr(AlsHop, _name, _lazy(_name))


def _tcp_end(name: str) -> property:
    """How a TCP connection ended, read in one go: its response flags and its connection
    termination details (the rules that judge a TCP entry, route_mismatch and authz_denied,
    need both, so a healthy entry costs one lazy read, not two)."""
    get = _SLOT_GET[name]
    put_flags, put_details = _SLOT_SET["response_flags"], _SLOT_SET["connection_termination_details"]

    def read(self: AlsHop) -> Any:
        try:
            return get(self)
        except AttributeError:  # not read yet
            c = self._entry().common_properties
            flags = _flags(c.response_flags) if c.HasField("response_flags") else ""
            details = str(c.connection_termination_details)
            put_flags(self, flags)
            put_details(self, details)
            return flags if name == "response_flags" else details

    return property(
        read, _SLOT_SET[name], _SLOT_DEL[name], doc=f"``{name}``, read with the other end field on first use"
    )


class AlsTcpHop(AlsHop):
    """A Hop from a TCP entry. How the connection ended (its response flags and its connection
    termination details) is read in one go (``_tcp_end``)."""

    __slots__ = ()
    _ENTRY = accesslog_pb2.TCPAccessLogEntry

    response_flags = _tcp_end("response_flags")
    connection_termination_details = _tcp_end("connection_termination_details")


class ScannedHop(AlsHop):
    """The hop ``decode_http`` makes: the fields it sets from the scanner's tuple (``SCANNED``)
    are plain slots here, not lazy properties (a write through a property's setter costs ~35 ns,
    a slot's ~7); its other fields are read lazily as an ``AlsHop``'s."""

    __slots__ = ()


class ScannedTcpHop(AlsTcpHop):
    """The hop ``decode_tcp`` makes, as ``ScannedHop``: how the connection ended is set too."""

    __slots__ = ()


# The lazy fields the decoders always set (plain slots of their hops' classes). A TCP entry's
# attempts stay lazy (only the service graph reads them, of an outbound TCP entry), and so does
# ``start``: set at decode too, but only when in range, so that an entry whose start_time is not
# (or is unset, as a synthetic client may send it) is clamped and counted only if read, as before.
SCANNED: Final = ("trace_id", "attempts", "duration_ms", "response_flags", "response_code_details")
SCANNED_TCP: Final = ("trace_id", "duration_ms", "response_flags", "connection_termination_details")
for _name in SCANNED:
    setattr(ScannedHop, _name, Hop.__dict__[_name])
for _name in SCANNED_TCP:
    setattr(ScannedTcpHop, _name, Hop.__dict__[_name])


def _outbound_fallback(e: Any, direction: int, cluster: str, authority: str | None) -> Identity:
    """Destination of an outbound entry whose cluster names no service."""
    c = e.common_properties
    upstream = _addr(c.upstream_remote_address) if c.HasField("upstream_remote_address") else None
    if upstream is None and cluster == BLACKHOLE and c.HasField("downstream_local_address"):
        upstream = _addr(c.downstream_local_address)  # connected to nothing: the address the app asked for
    if direction == OUTBOUND:  # PassthroughCluster, BlackHoleCluster, or a plain-Envoy egress
        host = authority.rsplit(":", 1)[0] if authority else None
        return identity(host or upstream, None, cluster or None, None, upstream)
    return identity(cluster or None, None, None, None, upstream)


# What decode_http reads of every HTTP entry, as a tuple: (upstream_cluster, TLS version's name
# (None: no tls_properties), peer URI SAN or None, method's name, request_id or None, path or None,
# trace id or None, response code, upstream_request_attempt_count, start_time in epoch seconds (not
# clamped: the decoder leaves one out of range to the hop's lazy read), duration in ms or None, response
# flags (``_flag_mask``), response_code_details; the last four are read by the service graph,
# exceptions, windows and the rules that judge a request by how it ended, where a lazy read
# cost ~0.7 us an entry, several times that once its message is cold). The C scanner (``_scan.c``)
# takes them from the message's bytes in one pass; ``read_http`` reads them through protobuf: the
# reference the scanner must equal, and the way when the scanner is not built or declines a message.
HttpFields = tuple[
    str, str | None, str | None, str, str | None, str | None, str | None, int, int, float, float | None, int, str
]


def read_http(e: Any) -> HttpFields:
    """An entry's ``HttpFields`` through protobuf."""
    c = e.common_properties
    r = e.request
    tv, peer = _tls(c)
    m = r.request_method
    return (
        c.upstream_cluster,
        _tls_name(tv),
        peer,
        METHODS[m] if 0 < m < 10 else "OTHER",
        r.request_id or None,
        r.path or None,
        _trace_of(r.request_headers.get("traceparent")),
        e.response.response_code.value,
        c.upstream_request_attempt_count,
        _raw_start(c),
        _duration_ms(c),
        _flag_mask(c.response_flags) if _has(c, "response_flags") else 0,
        e.response.response_code_details,
    )


def _scanner() -> Any:
    """The C entry scanner (``_scan.c``), which `pip install` builds; None in a source tree where
    it was not built (the receiver then warns: protobuf reads the fields, ~1 us more an entry)."""
    try:
        return importlib.import_module("meshaudit.receivers.envoy_als._scan")
    except ImportError:
        return None


SCANNER: Final = _scanner()
_scan_declined = metrics.REJECTED.labels("envoy_als", "scan_declined")


# What decode_tcp reads of every TCP entry: (upstream_cluster, TLS version's name, peer URI SAN,
# downstream_remote_address, upstream_local_address (as ``_addr`` writes them, None when unset),
# response flags (``_flag_mask``), connection_termination_details, start, duration_ms (as HttpFields)).
TcpFields = tuple[str, str | None, str | None, str | None, str | None, int, str, float, float | None]


def read_tcp(e: Any) -> TcpFields:
    """A TCP entry's ``TcpFields`` through protobuf."""
    c = e.common_properties
    tv, peer = _tls(c)
    return (
        c.upstream_cluster,
        _tls_name(tv),
        peer,
        _addr(c.downstream_remote_address) if _has(c, "downstream_remote_address") else None,
        _addr(c.upstream_local_address) if _has(c, "upstream_local_address") else None,
        _flag_mask(c.response_flags) if _has(c, "response_flags") else 0,
        c.connection_termination_details,
        _raw_start(c),
        _duration_ms(c),
    )


def _scanned(entries: Sequence[Any], data: bytes | None, scan: Callable[[bytes], Any] | None) -> list[Any] | None:
    """``scan(data)``: one item per entry, when the scanner is built and takes the message; else
    None, for the caller to read the entries through protobuf. A message the scanner declines
    (never one upb parsed, unless upb accepts what the scanner does not: a group, an over-long
    varint) is counted."""
    if data is None or scan is None:
        return None
    try:
        got: list[Any] | None = scan(data)
    except ValueError:
        got = None
    if got is not None and len(got) == len(entries):
        return got
    _scan_declined.inc()
    _bad_input.warning(
        "scan_declined",
        "An access-log message parsed by protobuf was declined by the entry scanner; its entries "
        'were read through protobuf (counted in meshaudit_rejected_total{reason="scan_declined"}).',
    )
    return None


def tcp_fields(entries: Sequence[Any], data: bytes | None) -> list[TcpFields]:
    """``TcpFields`` of each entry of a message (``entries``: its parsed ``tcp_logs.log_entry``;
    ``data``: its wire bytes, which upb parsed into ``entries``)."""
    got = _scanned(entries, data, SCANNER.tcp_fields if SCANNER is not None else None)
    return got if got is not None else [read_tcp(e) for e in entries]


# The slots an HTTP entry's fields go to, in ``HttpFields``' order, and those set alike on every
# hop of a message: the C scanner makes the hops itself (``http_hops``), the tuple's items stored
# straight into the slots (~0.3 us an entry less than unpacking the tuple and setting them here).
_HTTP_SLOTS: Final = tuple(
    Hop.__dict__[n]
    for n in (
        "upstream_cluster", "tls_version", "peer_principal", "method", "request_id", "path", "trace_id", "status",
        "attempts", "start", "duration_ms", "response_flags", "response_code_details",
    )
)  # fmt: skip
_MESSAGE_SLOTS: Final = (
    AlsHop.__dict__["_e"],
    Hop.__dict__["origin"],
    Hop.__dict__["observer"],
    Hop.__dict__["observer_service"],
)
_INDEX_SLOT: Final = AlsHop.__dict__["_i"]
# The slots ``http_hops`` sets itself when the caches answer (naming.CLUSTERS, Namer.principals):
# nearly every entry of a mesh; decode_http's loop sets them for the others.
_PARTY_SLOTS: Final = (Hop.__dict__["direction"], Hop.__dict__["src"], Hop.__dict__["dst"], Hop.__dict__["conn"])


def _http_hop(
    f: HttpFields, entries: Sequence[Any], i: int, node_id: str, observer: Identity, earliest: float, latest: float
) -> ScannedHop:
    """The hop the scanner's ``http_hops`` makes of an entry, made of its fields read through
    protobuf (its direction and parties not set yet)."""
    h: ScannedHop = object.__new__(ScannedHop)
    h._e = entries
    h._i = i
    h.origin = ALS_HTTP
    h.observer = node_id
    h.observer_service = observer
    h.upstream_cluster, h.tls_version, h.peer_principal, h.method, h.request_id, h.path = f[:6]
    h.trace_id, h.status, h.attempts, start, h.duration_ms, flags, h.response_code_details = f[6:]
    if earliest <= start <= latest:  # else read (clamped, counted) on first use
        h.start = start
    h.response_flags = flag_text(flags)
    return h


def decode_http(
    entries: Sequence[Any], ctx: StreamContext, namer: Namer, out: list[Hop], data: bytes | None = None
) -> None:
    """Hops of a message's HTTP entries (``data``: the message's wire bytes, which upb parsed into
    ``entries``; None: read through protobuf)."""
    node_id = ctx.node_id
    observer = ctx.observer
    now = time.time()
    earliest, latest = now - MAX_PAST_SECS, now + MAX_FUTURE_SECS  # a start outside: clamped when read

    # Each entry's hop with the fields every rule reads set (a ScannedHop: see SCANNED), made by
    # the scanner, else of the fields read through protobuf. The scanner also sets its direction
    # and parties where the caches answer (as the loop below would: the scanner's tests compare
    # the two ways); the loop sets them for the others (``pending``: every hop read through
    # protobuf).
    default_direction = ctx.default_direction
    clusters = CLUSTERS
    principals = namer.principals
    pending: list[ScannedHop] = []

    def scan(d: bytes) -> Any:
        assert SCANNER is not None
        fixed = (entries, ALS_HTTP, node_id, observer)
        caches = (clusters, principals, observer, default_direction)
        return SCANNER.http_hops(
            d, ScannedHop, _HTTP_SLOTS, _MESSAGE_SLOTS, fixed, _INDEX_SLOT, earliest, latest, flag_text, caches,
            _PARTY_SLOTS, pending,
        )  # fmt: skip

    hops: list[ScannedHop] | None = _scanned(entries, data, scan if SCANNER is not None else None)
    if hops is None:
        pending = hops = [
            _http_hop(read_http(e), entries, i, node_id, observer, earliest, latest) for i, e in enumerate(entries)
        ]
    has = _has
    for h in pending:
        cluster = h.upstream_cluster
        peer = h.peer_principal
        found = clusters.get(cluster) or cluster_of(cluster)
        direction = found[1] or default_direction
        if direction == UNKNOWN and peer:
            # No upstream cluster: the sidecar answered itself (an RBAC denial, no route, a direct
            # response). A downstream that presented a mesh certificate makes it the inbound side:
            # an outbound entry's downstream is the local app, which never speaks mTLS.
            direction = INBOUND
        conn = None
        if direction == INBOUND:
            h.dst = observer
            if peer:  # mTLS: the certificate names the source; the address is not needed
                h.src = principals.get(peer) or namer.principal(peer)
            else:
                c = entries[h._i].common_properties
                conn = _addr(c.downstream_remote_address) if has(c, "downstream_remote_address") else None
                h.src = namer.address(conn) if conn else NOBODY
        else:
            # Outbound: the source is this sidecar's workload; the downstream is the local app.
            # The connection key pairs entries only where no request id does.
            h.src = observer
            named = found[2]
            if named is None:
                e = entries[h._i]
                named = _outbound_fallback(e, direction, cluster, e.request.authority or None)
            h.dst = named
            if h.request_id is None:
                c = entries[h._i].common_properties
                if has(c, "upstream_local_address"):
                    conn = _addr(c.upstream_local_address)
        h.direction = direction
        h.conn = conn
    out.extend(hops)


def decode_tcp(
    entries: Sequence[Any], ctx: StreamContext, namer: Namer, out: list[Hop], data: bytes | None = None
) -> None:
    """Hops of a message's TCP entries (``data``: as ``decode_http``)."""
    node_id = ctx.node_id
    observer = ctx.observer
    default_direction = ctx.default_direction
    append = out.append
    new_hop = object.__new__
    fields = tcp_fields(entries, data)  # one per entry
    now = time.time()
    earliest, latest = now - MAX_PAST_SECS, now + MAX_FUTURE_SECS
    for i, (cluster, tls_version, peer, remote, local, flags, details, start, ms) in enumerate(fields):
        found = CLUSTERS.get(cluster) or cluster_of(cluster)
        direction = found[1] or default_direction
        if direction == INBOUND:
            dst = observer
            conn = remote
            src = namer.principal(peer) if peer else namer.address(conn) if conn else NOBODY
        else:
            src = observer
            dst = found[2] or _outbound_fallback(entries[i], direction, cluster, None)
            conn = local
        # AlsTcpHop(e, ALS_TCP, node_id, observer, ...), inlined as in decode_http
        h = new_hop(ScannedTcpHop)
        h._e = entries
        h._i = i
        h.origin = ALS_TCP
        h.observer = node_id
        h.observer_service = observer
        h.direction = direction
        h.src = src
        h.dst = dst
        h.tls_version = tls_version
        h.peer_principal = peer
        h.method = h.path = h.request_id = h.trace_id = None
        h.conn = conn
        h.upstream_cluster = cluster
        h.status = 0
        # how it ended: route_mismatch and authz_denied read both of every TCP entry
        h.response_flags = flag_text(flags)
        h.connection_termination_details = details
        if earliest <= start <= latest:  # else read (clamped, counted) on first use
            h.start = start
        h.duration_ms = ms
        append(h)
