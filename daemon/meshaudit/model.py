"""The one model every receiver normalizes into (``Hop``), the identities it names, and the
alert record the engine produces.

``Hop`` is built once per access-log entry or span on the hot path: a plain slotted class
with positional construction, no validation and no per-instance dicts. Identities repeat
endlessly (a mesh has few services and many requests), so they are interned, which saves
memory and makes most comparisons an identity check. Interning is an optimisation only: two
identities are equal when their five fields are (``==``, never ``is``), since the intern table
is bounded and a party seen before and after it was cleared is two objects.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from typing import Any, Final

import orjson

# --- Hop origins and directions (small ints: cheap to compare, cheap to store) -------------
ALS_HTTP: Final = 1  # Envoy gRPC access log, HTTP entry
ALS_TCP: Final = 2  # Envoy gRPC access log, TCP entry
OTEL_LOG: Final = 3  # Envoy OpenTelemetry access logger (OTLP log record)
SPAN: Final = 4  # OTLP span (Envoy tracer or an application SDK)

ORIGIN_NAMES: Final = {ALS_HTTP: "als_http", ALS_TCP: "als_tcp", OTEL_LOG: "otel_log", SPAN: "span"}

UNKNOWN: Final = 0
INBOUND: Final = 1  # observed by the destination's sidecar
OUTBOUND: Final = 2  # observed by the source's sidecar

DIRECTION_NAMES: Final = {UNKNOWN: "unknown", INBOUND: "inbound", OUTBOUND: "outbound"}

# Span kinds (OTLP enum values)
SPAN_KIND_SERVER: Final = 2
SPAN_KIND_CLIENT: Final = 3


class Identity:
    """One party of a hop. Use :func:`identity` to get the interned instance. Equal (and hashed)
    by value: its five fields."""

    __slots__ = ("__weakref__", "_hash", "address", "key", "namespace", "principal", "service", "uid", "workload")

    service: str | None
    namespace: str | None
    workload: str | None
    principal: str | None
    address: str | None
    key: str  # stable, readable aggregation key: "svc.ns", else principal, else address
    # The five fields as one string, unique per party: equality, hashing, and the key of the
    # policy's hot-path caches (an exact str with its hash cached: a dict lookup as fast as by
    # object, where a Python-level ``__hash__`` costs ~30 ns a lookup).
    uid: str

    def __init__(
        self,
        service: str | None,
        namespace: str | None,
        workload: str | None,
        principal: str | None,
        address: str | None,
    ) -> None:
        self.service = service
        self.namespace = namespace
        self.workload = workload
        self.principal = principal
        self.address = address
        if service:
            self.key = f"{service}.{namespace}" if namespace else service
        elif principal:
            self.key = principal
        elif address:
            self.key = address
        else:
            self.key = "unknown"
        self.uid = repr((service, namespace, workload, principal, address))
        self._hash = hash(self.uid)

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if isinstance(other, Identity):
            return self.uid == other.uid
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        if self is other:
            return False
        if isinstance(other, Identity):
            return self.uid != other.uid
        return NotImplemented

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[Any, tuple[str | None, ...]]:
        # Between worker processes: unpickled through identity(), so it is interned there too.
        return (identity, (self.service, self.namespace, self.workload, self.principal, self.address))

    def to_json(self) -> dict[str, str | None]:
        return {
            "service": self.service,
            "namespace": self.namespace,
            "workload": self.workload,
            "principal": self.principal,
            "address": self.address,
        }

    def __repr__(self) -> str:
        return f"Identity({self.key!r})"


_IDENTITIES: dict[tuple[str | None, ...], Identity] = {}
# A pathological input (random addresses) must not grow memory forever, so past this size the
# table is cleared and rebuilt lazily. Identities made before and after are then different
# objects for one party: they compare equal (value equality), so nothing depends on ``is``.
_IDENTITY_LIMIT = 100_000


def identity(
    service: str | None = None,
    namespace: str | None = None,
    workload: str | None = None,
    principal: str | None = None,
    address: str | None = None,
) -> Identity:
    k = (service, namespace, workload, principal, address)
    found = _IDENTITIES.get(k)
    if found is not None:
        return found
    if len(_IDENTITIES) >= _IDENTITY_LIMIT:
        _IDENTITIES.clear()
    ident = Identity(service, namespace, workload, principal, address)
    _IDENTITIES[k] = ident
    return ident


NOBODY: Final = identity()


class Hop:
    """One observed request or connection between two parties, from one observer.

    TLS facts are about the hop into the observer (the downstream connection): ``tls_version``
    None means plaintext. ``peer_principal`` is the peer certificate's URI SAN (SPIFFE id);
    ``tls_cipher`` the negotiated suite's IANA code (``meshaudit.tls`` names it).
    """

    __slots__ = (
        "attempts",
        "authority",
        "conn",
        "connection_termination_details",
        "direction",
        "downstream_peer",
        "dst",
        "duration_ms",
        "local_principal",
        "method",
        "observer",
        "observer_service",
        "origin",
        "parent_span_id",
        "path",
        "peer_principal",
        "request_id",
        "response_code_details",
        "response_flags",
        "route_name",
        "source_address",
        "span_id",
        "span_kind",
        "src",
        "start",
        "status",
        "tls_cipher",
        "tls_version",
        "trace_id",
        "upstream_cluster",
        "upstream_peer",
        "user_agent",
        "xfcc_by",
        "xfcc_uri",
    )

    def __init__(
        self,
        origin: int,
        observer: str,
        observer_service: Identity,
        direction: int,
        src: Identity,
        dst: Identity,
        start: float,
        *,
        tls_version: str | None = None,
        tls_cipher: int | None = None,
        peer_principal: str | None = None,
        local_principal: str | None = None,
        method: str | None = None,
        authority: str | None = None,
        path: str | None = None,
        status: int = 0,
        response_flags: str = "",
        response_code_details: str = "",
        route_name: str = "",
        upstream_cluster: str = "",
        attempts: int = 0,
        trace_id: str | None = None,
        span_id: str | None = None,
        parent_span_id: str | None = None,
        request_id: str | None = None,
        span_kind: int = 0,
        conn: str | None = None,
        connection_termination_details: str = "",
        downstream_peer: Identity | None = None,
        upstream_peer: Identity | None = None,
        xfcc_uri: str | None = None,
        xfcc_by: str | None = None,
        user_agent: str | None = None,
        source_address: str | None = None,
        duration_ms: float | None = None,
    ) -> None:
        self.origin = origin
        self.observer = observer  # sidecar node id, or "span:<service>"
        self.observer_service = observer_service  # the workload whose proxy/SDK observed it
        self.direction = direction
        self.src = src
        self.dst = dst
        self.start = start  # epoch seconds
        self.tls_version = tls_version  # "TLSv1.3", ...; None = plaintext
        self.tls_cipher = tls_cipher
        self.peer_principal = peer_principal
        self.local_principal = local_principal
        self.method = method  # None for TCP
        self.authority = authority
        self.path = path
        self.status = status
        self.response_flags = response_flags  # Envoy short flags, comma separated: "NR,URX"
        self.response_code_details = response_code_details
        self.route_name = route_name
        self.upstream_cluster = upstream_cluster
        self.attempts = attempts
        self.trace_id = trace_id  # 32 lowercase hex
        self.span_id = span_id  # 16 lowercase hex
        self.parent_span_id = parent_span_id
        self.request_id = request_id
        self.span_kind = span_kind
        # The client-side socket of the mesh connection, "ip:port": the downstream remote
        # address on an inbound entry, the upstream local address on an outbound one. The two
        # sidecars' entries of one connection share it, which pairs them even without a
        # request id (TCP).
        self.conn = conn
        # Why a filter closed a TCP connection (Envoy's CONNECTION_TERMINATION_DETAILS), e.g.
        # "rbac_access_denied_matched_policy[ns[db]-policy[deny]-rule[0]]"; "" for HTTP.
        self.connection_termination_details = connection_termination_details
        # Istio's peer metadata (filter state ``downstream_peer`` / ``upstream_peer``): the
        # workload at the other end of the connection, as the proxy discovered it.
        self.downstream_peer = downstream_peer
        self.upstream_peer = upstream_peer
        # ``x-forwarded-client-cert`` when logged: URI= is the client certificate's SPIFFE id,
        # By= the receiving proxy's own (the last element, the nearest hop).
        self.xfcc_uri = xfcc_uri
        self.xfcc_by = xfcc_by
        # For policy exceptions (read only when a violation is checked against them): the
        # request's User-Agent, and the address the request or connection came from ("ip:port":
        # the downstream remote address), whatever names its source.
        self.user_agent = user_agent
        self.source_address = source_address
        # How long the request or connection took, as its observer timed it (Envoy's
        # ``duration``, a span's end - start): the service graph's latency. None: not known.
        self.duration_ms = duration_ms

    def detach(self) -> None:
        """Called before a hop is kept past the batch it came in (a rule parks it): a hop that
        reads fields lazily from its source message reads them now and lets the message go."""

    @property
    def is_http(self) -> bool:
        return self.method is not None

    def __repr__(self) -> str:
        return (
            f"Hop({ORIGIN_NAMES.get(self.origin)}, {DIRECTION_NAMES.get(self.direction)}, "
            f"{self.src.key} -> {self.dst.key}, tls={self.tls_version}, {self.method} {self.path})"
        )


# Hop's own slots of two fields read of nearly every entry, read directly (a C call). A subclass
# that reads fields lazily puts a property over them (AlsHop: a Python call per read, ~2x the
# cost); read here, such a field not read yet raises AttributeError, and the reader falls back
# to the attribute: ``try: n = slot_attempts(h) except AttributeError: n = h.attempts``.
slot_attempts: Final = Hop.__dict__["attempts"].__get__
slot_trace_id: Final = Hop.__dict__["trace_id"].__get__


# --- Alerts ------------------------------------------------------------------------------
SCHEMA: Final = "meshaudit.alert.v1"
SEVERITIES: Final = ("info", "warning", "high", "critical")


_EPOCH: Final = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_MIN_TS: Final = (_dt.datetime(1, 1, 1, tzinfo=_dt.UTC) - _EPOCH).total_seconds()
_MAX_TS: Final = (_dt.datetime(9999, 12, 31, 23, 59, 59, 999500, tzinfo=_dt.UTC) - _EPOCH).total_seconds()


def rfc3339(ts: float) -> str:
    """RFC 3339 UTC with millisecond precision, e.g. 2026-11-22T03:26:39.123Z. Total: a time
    outside 0001-01-01 .. 9999-12-31 (a sender's bogus clock) is clamped to that range, and NaN
    reads as the epoch; it never raises."""
    if not _MIN_TS <= ts <= _MAX_TS:  # also NaN
        ts = _MIN_TS if ts < _MIN_TS else _MAX_TS if ts > _MAX_TS else 0.0
    # Epoch plus a timedelta, not fromtimestamp: no platform limits (years before 1970, 32-bit time_t).
    d = _EPOCH + _dt.timedelta(seconds=ts)
    return (
        f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}."
        f"{d.microsecond // 1000:03d}Z"
    )


def _ms(t: float) -> int:
    return int(t * 1000) if abs(t) < 1e15 else 0  # NaN, infinite or absurd: still an id, never a raise


def alert_id(
    rule: str,
    source_key: str,
    destination_key: str,
    window_start: float,
    seq: int,
    window_no: int = 0,
    first_seen: float | None = None,
) -> str:
    """Deterministic id of the ``seq``-th alert of one aggregation window of (rule, source,
    destination). The window is named by when it opened (``window_start``, receive time), its
    ordinal among the windows one aggregator opened (``window_no``) and the data time of its first
    violation (``first_seen``): two windows of one key never share all three, and a replay of
    the same data on the same clock gives the same ids."""
    first = "" if first_seen is None else str(_ms(first_seen))
    raw = f"{rule}|{source_key}|{destination_key}|{_ms(window_start)}|{window_no}|{first}|{seq}".encode()
    return hashlib.sha256(raw).hexdigest()[:32]


class Example:
    __slots__ = ("method", "observer", "path", "request_id", "trace_id")

    def __init__(self, hop: Hop) -> None:
        self.trace_id = hop.trace_id
        self.request_id = hop.request_id
        self.method = hop.method
        self.path = hop.path
        self.observer = hop.observer

    def to_json(self) -> dict[str, str | None]:
        return {
            "trace_id": self.trace_id,
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "observer": self.observer,
        }


class Alert:
    """One aggregated alert, ready for the sinks. Immutable once emitted."""

    __slots__ = (
        "_payload",
        "blocked",
        "count",
        "destination",
        "detail",
        "emitted_at",
        "examples",
        "first_seen",
        "id",
        "last_seen",
        "observers",
        "rule",
        "severity",
        "source",
        "summary",
        "window_secs",
    )

    def __init__(
        self,
        *,
        id: str,
        rule: str,
        severity: str,
        summary: str,
        source: Identity,
        destination: Identity,
        count: int,
        first_seen: float,
        last_seen: float,
        window_secs: int,
        examples: list[Example],
        detail: str | None,
        emitted_at: float,
        blocked: bool | None = None,
        observers: int = 1,
    ) -> None:
        self.id = id
        self.rule = rule
        self.severity = severity
        self.summary = summary
        self.source = source
        self.destination = destination
        self.count = count
        self.first_seen = first_seen
        self.last_seen = last_seen
        self.window_secs = window_secs
        self.examples = examples
        self.detail = detail
        self.emitted_at = emitted_at
        # Whether the mesh denied (RBAC, ext_authz) every request the alert counts; None for
        # rules where enforcement does not apply.
        self.blocked = blocked
        self.observers = observers
        self._payload: bytes | None = None

    def encode(self) -> bytes:
        """The JSON record (orjson), computed once and shared by every sink."""
        if self._payload is None:
            self._payload = orjson.dumps(self.to_json())
        return self._payload

    @property
    def key(self) -> str:
        """Kafka key and dedup key: ``rule|source|destination``."""
        return f"{self.rule}|{self.source.key}|{self.destination.key}"

    def to_json(self) -> dict[str, Any]:
        """The alert record, schema meshaudit.alert.v1 (proto/meshaudit/alert/v1/alert.proto)."""
        return {
            "schema": SCHEMA,
            "id": self.id,
            "rule": self.rule,
            "severity": self.severity,
            "summary": self.summary,
            "source": self.source.to_json(),
            "destination": self.destination.to_json(),
            "evidence": {
                "count": self.count,
                "first_seen": rfc3339(self.first_seen),
                "last_seen": rfc3339(self.last_seen),
                "window_secs": self.window_secs,
                "examples": [e.to_json() for e in self.examples],
                "detail": self.detail,
                "blocked": self.blocked,
                "observers": self.observers,
            },
            "emitted_at": rfc3339(self.emitted_at),
        }
