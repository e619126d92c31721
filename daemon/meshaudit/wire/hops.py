"""Hop batches on the wire: ``encode(hops) -> bytes``, ``decode(bytes) -> list[Hop]``, and the
Kafka key that keeps every piece of evidence about one request in one partition
(``correlation_key``). The schema is proto/meshaudit/hops/v1/hops.proto (``HopBatch``): columnar,
with strings, trace ids and parties interned per batch.

Decoded hops are what the rules would have read of the originals: every field has the value the
original hop gives, parties come back interned through :func:`meshaudit.model.identity`, and an
access-log hop comes back as the ALS receiver's own hop class over its Envoy entry, so the fields
it reads lazily are read from the entry when a rule asks, as in one process.

Why Envoy's entries travel as they are rather than every field read at the receiver, measured
with ``python -m bench.inproc --wire`` (one core, ALS at 25 entries per message, median of 3;
today's parse + decode is ~2.7 us an entry, parse + decode + rules ~7.8 us):

                         receiver encode   evaluator decode   decode + rules   bytes/hop (zlib-1)
    with the entry            5.7 us            3.7 us            8.7 us         618 (162)
    every field read         22.6 us            4.4 us            8.5 us         180  (78)

Reading every lazy field costs the receiver ~17 us more an entry (three times its whole work)
and saves the evaluator nothing measurable: its rules read a lazy field of about a quarter of the
hops, most of them one. The entry costs bytes instead, about twice as many once compressed as a
Kafka producer does. OTLP hops carry every field (132 bytes/hop, encode 2.8 us, decode 2.7 us).

Senders' claims (log_source_mismatch) travel in batches of their own, with no hops:
``encode_claims(claims) -> bytes``, ``decode_claims(bytes) -> list[Claim]``. A batch carries hops
or claims, never both, so a hop batch is parsed once: ``decode`` of a claims batch is ``[]``.

Untrusted input: ``decode`` and ``decode_claims`` raise :class:`WireError` (and nothing else) for
bytes that are not a valid batch, and bound what they build: at most ``MAX_BATCH_BYTES`` in,
``MAX_HOPS`` hops or ``MAX_CLAIMS`` claims, tables no larger than those hops could need, every
reference checked, every claim's fields of the values a receiver makes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from itertools import accumulate, chain
from operator import attrgetter
from typing import Any, Final

from google.protobuf.message import DecodeError

from meshaudit._proto.meshaudit.hops.v1 import hops_pb2
from meshaudit.engine.sources import Claim, Claimed
from meshaudit.model import (
    ALS_HTTP,
    ALS_TCP,
    INBOUND,
    NOBODY,
    OUTBOUND,
    SPAN,
    SPAN_KIND_CLIENT,
    Hop,
    Identity,
    identity,
)  # fmt: skip
from meshaudit.receivers.envoy_als.decode import AlsHop, AlsTcpHop
from meshaudit.wire.partition import partition

HopBatch = hops_pb2.HopBatch
ClaimMessage = hops_pb2.Claim

MAX_HOPS: Final = 65_536  # a receiver sends one batch per transport message: 100 entries, 10 k spans
MAX_BATCH_BYTES: Final = 16 * 1024 * 1024
MAX_KEY_BYTES: Final = 128  # a longer correlation key is sent as its digest
MAX_CLAIMS: Final = 1024  # claims in one batch (a receiver holds at most 1000 waiting)
RECEIVERS: Final = ("envoy_als", "otlp_grpc", "otlp_http")  # a claim's receiver: where it was sent
_VIA: Final = {"mtls": ClaimMessage.MTLS, "xfcc": ClaimMessage.XFCC}
_VIA_NAME: Final = {v: k for k, v in _VIA.items()}


class WireError(ValueError):
    """Bytes that are not a valid hop batch; the message says what is wrong."""


# --- the columns, by kind ---------------------------------------------------------------------
# What the ALS decoder sets at once on every access-log hop (AlsHop.__init__), in this order,
# then ``attempts`` (set at once on an outbound HTTP entry): the columns an access-log hop fills.
ALS_EAGER: Final = (
    "origin",
    "observer",
    "observer_service",
    "direction",
    "src",
    "dst",
    "tls_version",
    "peer_principal",
    "method",
    "path",
    "request_id",
    "trace_id",
    "conn",
    "upstream_cluster",
    "status",
)
# The fields an access-log hop reads from its entry when asked (``attempts`` too, on an inbound
# or TCP entry); every other hop carries them in the columns.
ALS_LAZY: Final = (
    "start",
    "tls_cipher",
    "local_principal",
    "authority",
    "response_flags",
    "response_code_details",
    "route_name",
    "span_id",
    "parent_span_id",
    "span_kind",
    "connection_termination_details",
    "downstream_peer",
    "upstream_peer",
    "xfcc_uri",
    "xfcc_by",
    "user_agent",
    "source_address",
    "duration_ms",
)
ALS_COLUMNS: Final = (*ALS_EAGER, "attempts")  # an access-log hop's columns
COLUMNS: Final = (*ALS_COLUMNS, *ALS_LAZY)  # every slot of Hop, the order rows are built in

# Kinds of column (every name in COLUMNS is in exactly one).
# Tuples, not sets: a batch's tables are built in this order, the same in every process.
STRINGS: Final = (
    *("tls_version", "peer_principal", "local_principal", "method", "authority", "path", "request_id", "conn"),
    *("xfcc_uri", "xfcc_by", "user_agent", "source_address"),
)
TEXTS: Final = (  # typed str, never None: reference 0 is ""
    *("observer", "response_flags", "response_code_details", "route_name", "upstream_cluster"),
    "connection_termination_details",
)
IDS: Final = ("trace_id", "span_id", "parent_span_id")  # strings, lowercase hex ones as raw bytes
PARTIES: Final = ("observer_service", "src", "dst")  # typed Identity: reference 0 is NOBODY
PEERS: Final = ("downstream_peer", "upstream_peer")  # Identity or None
SMALL_INTS: Final = ("origin", "direction")  # uint32
INTS: Final = ("status", "attempts", "span_kind")  # sint64, saturated
_INT_BOUNDS: Final = {"uint32": (0, 2**32 - 1), "sint64": (-(2**63), 2**63 - 1), "uint64": (0, 2**64 - 1)}

_ROW: Final = attrgetter(*COLUMNS)
_ALS_ROW: Final = attrgetter(*ALS_EAGER)
# Each column's default, which costs nothing on the wire: an access-log hop's placeholders for the
# fields the evaluator reads from its entry.
_DEFAULTS: Final[dict[str, Any]] = {
    **dict.fromkeys((*STRINGS, *IDS, *PEERS, "tls_cipher", "duration_ms")),
    **dict.fromkeys(TEXTS, ""),
    **dict.fromkeys((*SMALL_INTS, *INTS), 0),
    **dict.fromkeys(PARTIES, NOBODY),
    "start": 0.0,
}
_ALS_LAZY_FILL: Final = tuple(_DEFAULTS[c] for c in ALS_LAZY)
_NAN: Final = math.nan
_PARTY_FIELDS: Final = attrgetter("service", "namespace", "workload", "principal", "address")


def _tag(field: int) -> bytes:
    """The key of a length-delimited field (a submessage), as a varint."""
    return _varint(field << 3 | 2)


def _varint(v: int) -> bytes:
    out = bytearray()
    while v > 0x7F:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


_HTTP_TAG: Final = _tag(HopBatch.DESCRIPTOR.fields_by_name["http_entries"].number)
_TCP_TAG: Final = _tag(HopBatch.DESCRIPTOR.fields_by_name["tcp_entries"].number)


def _saturated(values: Sequence[Any], kind: str) -> list[int]:
    lo, hi = _INT_BOUNDS[kind]
    out = []
    for v in values:
        try:
            i = int(v)
        except (TypeError, ValueError, OverflowError):  # None, NaN: not a number the rules could compare
            i = 0
        out.append(lo if i < lo else hi if i > hi else i)
    return out


def _ints(column: Any, values: Sequence[Any], kind: str) -> None:
    if not any(values):
        return
    try:
        column.extend(values)
    except (TypeError, ValueError):  # out of range, or not an int: a sender's absurd value
        del column[:]
        column.extend(_saturated(values, kind))


# --- encode -----------------------------------------------------------------------------------
def encode(hops: Sequence[Hop], *, entries: bool = True, evidence: int = 0) -> bytes:
    """One batch of ``hops``, at most ``MAX_HOPS``, the last ``evidence`` of them evidence copies
    (:func:`evidence_copy`). ``entries``: access-log hops carry their Envoy entry for the fields
    they read lazily (the default, see the module's figures); False reads every field of every
    hop at once (the alternative the benchmark compares). Raises (ValueError, TypeError,
    AttributeError) for a hop whose fields are not of the model's types."""
    n = len(hops)
    if n > MAX_HOPS:
        raise ValueError(f"{n} hops in one batch; at most {MAX_HOPS}")
    if not 0 <= evidence <= n:
        raise ValueError(f"{evidence} evidence copies in a batch of {n} hops")
    rows: list[tuple[Any, ...]] = []
    add_row = rows.append
    entry: list[int] = []
    add_entry = entry.append
    parts: list[bytes] = []  # the entries' fields, after the batch's own
    add = parts.append
    nhttp = ntcp = 0
    http_tag = _HTTP_TAG
    tcp_tag = _TCP_TAG
    own = n - evidence
    for h in hops[:own] if evidence else hops:
        if entries and isinstance(h, AlsHop):
            raw = h.entry_bytes()
            if h.origin == ALS_TCP:
                ntcp += 1
                add_entry(ntcp)
                add(tcp_tag)
                add_row((*_ALS_ROW(h), 0))
            else:
                nhttp += 1
                add_entry(nhttp)
                add(http_tag)
                add_row((*_ALS_ROW(h), h.attempts if h.direction != INBOUND else 0))
            # A repeated submessage field is its elements' bytes, each tagged: no copy, no parse.
            size = len(raw)
            add(
                bytes((size,))
                if size < 0x80
                else bytes((size & 0x7F | 0x80, size >> 7))
                if size < 0x4000
                else _varint(size)
            )
            add(raw)
        else:
            add_entry(0)
            add_row(_ROW(h))
    nlogs = 0  # evidence copies of access logs: an access-log hop's columns, no entry
    for h in hops[own:] if evidence else ():
        add_entry(0)
        if h.origin == SPAN:
            add_row(_ROW(h))
        else:
            nlogs += 1
            add_row((*_ALS_ROW(h), 0))
    batch = HopBatch(count=n, evidence=evidence)
    if n:
        if nhttp + ntcp + nlogs == n:  # access-log hops (and their copies) only: the columns they fill
            _columns(batch, n, dict(zip(ALS_COLUMNS, zip(*rows, strict=True), strict=True)))
        else:
            if nhttp or ntcp or nlogs:
                rows = [r if len(r) == len(COLUMNS) else (*r, *_ALS_LAZY_FILL) for r in rows]
            _columns(batch, n, dict(zip(COLUMNS, zip(*rows, strict=True), strict=True)))
        if nhttp or ntcp:
            batch.entry.extend(entry)
    out: bytes = batch.SerializeToString() + b"".join(parts)
    return out


def _columns(batch: Any, n: int, cols: dict[str, tuple[Any, ...]]) -> None:
    """Fill ``batch``'s tables and ``cols`` (a column absent from ``cols`` is all defaults).
    Interning is C work over whole columns (dict operations), not Python code per value."""
    str_cols = [(name, col) for name in STRINGS if (col := cols.get(name)) and col.count(None) != n]
    str_cols += [(name, col) for name in TEXTS if (col := cols.get(name)) and any(col)]
    # Parties by object: identities are interned, so one party is nearly always one object; two
    # equal objects (made before and after the intern table was cleared) are two entries, equal
    # again once decoded. (No ``count(None)`` on them: comparing an Identity calls Python.)
    party_cols = [(name, cols[name]) for name in PARTIES]
    party_cols += [(name, col) for name in PEERS if (col := cols.get(name)) and any(p is not None for p in col)]
    objects: dict[int, Identity | None] = {id(None): None}
    for _, col in party_cols:
        objects.update(zip(map(id, col), col, strict=True))
    party_ref = dict(zip(objects, range(len(objects)), strict=True)).__getitem__
    fields = list(zip(*map(_PARTY_FIELDS, list(objects.values())[1:]), strict=True)) or [()] * 5
    # Strings, numbered in order of first sight: None is 0, "" 1.
    seen = dict.fromkeys(chain((None, ""), *(col for _, col in str_cols), *fields))
    # Trace and span ids: all lowercase hex (nearly always), as one run of bytes after the strings.
    id_cols = [(name, col) for name in IDS if (col := cols.get(name)) and col.count(None) != n]
    ids = [s for s in dict.fromkeys(chain(*(col for _, col in id_cols))) if s is not None and s not in seen]
    joined = "".join(ids)
    raw = _hex(joined) if not any(len(s) & 1 for s in ids) else None
    if raw is None:
        seen.update(dict.fromkeys(ids))
        ids = []
    index = dict(zip(seen, range(len(seen)), strict=True))
    index.update(zip(ids, range(len(seen), len(seen) + len(ids)), strict=True))
    ref = index.__getitem__
    batch.strings.extend(list(seen)[1:])  # every string but None
    if ids:
        batch.hex_ids = raw
        batch.hex_id_sizes.extend([len(s) >> 1 for s in ids])
    for name, col in (*str_cols, *id_cols):
        getattr(batch, name).extend(map(ref, col))
    parties = batch.parties
    for name, values in zip(("service", "namespace", "workload", "principal", "address"), fields, strict=True):
        getattr(parties, name).extend(map(ref, values))
    for name, col in party_cols:
        getattr(batch, name).extend(map(party_ref, map(id, col)))
    for name in SMALL_INTS:
        _ints(getattr(batch, name), cols[name], "uint32")
    for name in INTS:
        if name in cols:
            _ints(getattr(batch, name), cols[name], "sint64")
    ciphers = cols.get("tls_cipher")
    if ciphers and ciphers.count(None) != n:
        _ints(batch.tls_cipher, [0 if c is None else c + 1 for c in ciphers], "uint64")
    start = cols.get("start")
    if start and any(start):
        batch.start.extend(start)
    durations = cols.get("duration_ms")
    if durations and durations.count(None) != n:
        batch.duration_ms.extend([_NAN if d is None else d for d in durations])


def _hex(joined: str) -> bytes | None:
    """``joined``'s bytes if it is lowercase hex (of whole bytes), else None."""
    try:
        raw = bytes.fromhex(joined)
    except ValueError:
        return None
    return raw if raw.hex() == joined else None


# --- decode -----------------------------------------------------------------------------------
def decode(data: bytes) -> list[Hop]:
    """Every hop of one batch, evidence copies included (state rebuilt by a replay takes them
    all). Raises :class:`WireError` when ``data`` is not a valid batch."""
    hops, _ = decode_split(data)
    return hops


def _parse(data: bytes) -> Any:
    """The HopBatch message of ``data``, of at most ``MAX_BATCH_BYTES``; WireError else."""
    if len(data) > MAX_BATCH_BYTES:
        raise WireError(f"a hop batch of {len(data)} bytes; at most {MAX_BATCH_BYTES}")
    try:
        return HopBatch.FromString(data)
    except DecodeError as exc:
        raise WireError(f"not a hop batch: {exc}") from None


def decode_split(data: bytes) -> tuple[list[Hop], int]:
    """The hops of one batch and how many of them, at the end, are evidence copies: indexed by
    the evaluator, never judged. Raises :class:`WireError` when ``data`` is not a valid batch."""
    b = _parse(data)
    n = b.count
    if n > MAX_HOPS:
        raise WireError(f"a batch of {n} hops; at most {MAX_HOPS}")
    parties = len(b.parties.service)
    if parties > 5 * n:  # a hop names at most five parties
        raise WireError(f"{parties} parties for {n} hops")
    strings = len(b.strings) + len(b.hex_id_sizes)
    if strings > 21 * n + 5 * parties + 1:  # 21 string columns, 5 per party, ""
        raise WireError(f"{strings} strings for {n} hops")
    if len(b.http_entries) + len(b.tcp_entries) > n:
        raise WireError(f"{len(b.http_entries) + len(b.tcp_entries)} Envoy entries for {n} hops")
    if b.evidence > n:
        raise WireError(f"{b.evidence} evidence copies in a batch of {n} hops")
    if not n:
        return [], 0  # no hops: a batch of claims (decode_claims), or an empty one
    if len(b.claims):
        raise WireError(f"{len(b.claims)} claims in a batch of {n} hops: a batch carries hops or claims")
    try:
        return _hops(b, n), b.evidence
    except IndexError:
        raise WireError("a reference past the end of its table") from None


def _hops(b: Any, n: int) -> list[Hop]:
    def column(name: str) -> Any:
        col = getattr(b, name)
        if len(col) not in (0, n):
            raise WireError(f"column {name} has {len(col)} values for {n} hops")
        return col

    def refs(name: str, table: list[Any]) -> list[Any]:
        col = column(name)
        return list(map(table.__getitem__, col)) if len(col) else [table[0]] * n

    def ints(name: str) -> list[int] | Any:
        col = column(name)
        return col if len(col) else zeros

    zeros = [0] * n
    strings = list(b.strings)
    if b.hex_id_sizes:
        ids = b.hex_ids.hex()
        ends = list(accumulate(2 * size for size in b.hex_id_sizes))
        if ends[-1] != len(ids):
            raise WireError(f"hex_id_sizes add up to {ends[-1] // 2} bytes, hex_ids has {len(ids) // 2}")
        strings += map(ids.__getitem__, map(slice, [0, *ends], ends))
    tab: list[str | None] = [None, *strings]
    text: list[str] = ["", *strings]
    s = tab.__getitem__
    p = b.parties
    if not len(p.service) == len(p.namespace) == len(p.workload) == len(p.principal) == len(p.address):
        raise WireError("the parties' columns differ in length")
    peers: list[Identity | None] = [None]
    columns = (p.service, p.namespace, p.workload, p.principal, p.address)
    peers += [identity(*fields) for fields in zip(*(map(s, col) for col in columns), strict=True)]
    parties: list[Any] = [NOBODY, *peers[1:]]
    cols: dict[str, Any] = {
        **{name: refs(name, tab) for name in (*STRINGS, *IDS)},
        **{name: refs(name, text) for name in TEXTS},
        **{name: refs(name, parties) for name in PARTIES},
        **{name: ints(name) for name in (*SMALL_INTS, "status", "attempts")},
    }
    entry = ints("entry")
    eager = zip(entry, cols["attempts"], *(cols[c] for c in ALS_EAGER), strict=True)
    if all(entry):  # access-log hops only: the other columns are read from their entries
        return [_als_hop(b, k, attempts, *row) for k, attempts, *row in eager]
    col = column("start")
    cols["start"] = col if len(col) else [0.0] * n
    col = column("duration_ms")
    cols["duration_ms"] = [None if math.isnan(d) else d for d in col] if len(col) else [None] * n
    col = column("tls_cipher")
    cols["tls_cipher"] = [c - 1 if c else None for c in col] if len(col) else [None] * n
    cols.update({name: refs(name, peers) for name in PEERS})
    cols["span_kind"] = ints("span_kind")
    out: list[Hop] = []
    append = out.append
    for k, row in zip(entry, zip(*(cols[c] for c in COLUMNS), strict=True), strict=True):
        if k:
            append(_als_hop(b, k, row[15], *row[:15]))
            continue
        (
            origin, observer, observer_service, direction, src, dst, tls_version, peer_principal, method, path,
            request_id, trace_id, conn, upstream_cluster, status, attempts, start, tls_cipher, local_principal,
            authority, response_flags, response_code_details, route_name, span_id, parent_span_id, span_kind,
            connection_termination_details, downstream_peer, upstream_peer, xfcc_uri, xfcc_by, user_agent,
            source_address, duration_ms,
        ) = row  # fmt: skip
        h = Hop(
            origin, observer, observer_service, direction, src, dst, start, tls_version=tls_version,
            tls_cipher=tls_cipher, peer_principal=peer_principal, local_principal=local_principal, method=method,
            authority=authority, path=path, status=status, response_flags=response_flags,
            response_code_details=response_code_details, route_name=route_name, upstream_cluster=upstream_cluster,
            attempts=attempts, trace_id=trace_id, span_id=span_id, parent_span_id=parent_span_id,
            request_id=request_id, span_kind=span_kind, conn=conn,
            connection_termination_details=connection_termination_details, downstream_peer=downstream_peer,
            upstream_peer=upstream_peer, xfcc_uri=xfcc_uri, xfcc_by=xfcc_by, user_agent=user_agent,
            source_address=source_address, duration_ms=duration_ms,
        )  # fmt: skip
        append(h)
    return out


def _als_hop(
    b: Any,
    k: int,
    attempts: int,
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
) -> Hop:
    """An access-log hop over its Envoy entry (the ``k``-th of its origin's)."""
    h: AlsHop
    if origin == ALS_HTTP:
        h = AlsHop(
            b.http_entries[k - 1], origin, observer, observer_service, direction, src, dst, tls_version,
            peer_principal, method, path, request_id, trace_id, conn, upstream_cluster, status,
        )  # fmt: skip
        if direction != INBOUND:
            h.attempts = attempts
        return h
    if origin == ALS_TCP:
        return AlsTcpHop(
            b.tcp_entries[k - 1], origin, observer, observer_service, direction, src, dst, tls_version,
            peer_principal, method, path, request_id, trace_id, conn, upstream_cluster, status,
        )  # fmt: skip
    raise WireError(f"an Envoy entry on a hop of origin {origin}")


# --- senders' claims ---------------------------------------------------------------------------
def encode_claims(claims: Sequence[Claim]) -> bytes:
    """One batch of ``claims`` (at most ``MAX_CLAIMS``) and no hops. Raises (ValueError,
    TypeError, AttributeError) for a claim whose fields are not of their types (a via other than
    ``mtls`` or ``xfcc``, entries outside uint32)."""
    if len(claims) > MAX_CLAIMS:
        raise ValueError(f"{len(claims)} claims in one batch; at most {MAX_CLAIMS}")
    batch = HopBatch()
    add = batch.claims.add
    for c in claims:
        via = _VIA.get(c.via)
        if via is None:
            raise ValueError(f"a claim authenticated by {c.via!r}; mtls or xfcc")
        said = c.claimed
        add(
            principal=c.principal,
            via=via,
            claimed=hops_pb2.Claimed(
                namespace=said.namespace,
                service_account=said.service_account,
                service=said.service,
                text=said.text,
            ),
            why=c.why,
            receiver=c.receiver,
            entries=c.entries,
            rejected=c.rejected,
            when=c.when,
        )
    out: bytes = batch.SerializeToString()
    return out


def decode_claims(data: bytes) -> list[Claim]:
    """The claims of one batch (none in a batch of hops). Raises :class:`WireError` when ``data``
    is not a valid batch, or a claim is not one a receiver makes: no principal, an unknown via
    or receiver, a time that is not one."""
    b = _parse(data)
    if not b.claims:
        return []
    if b.count:
        raise WireError(f"{len(b.claims)} claims in a batch of {b.count} hops: a batch carries hops or claims")
    if len(b.claims) > MAX_CLAIMS:
        raise WireError(f"a batch of {len(b.claims)} claims; at most {MAX_CLAIMS}")
    return [_claim(m) for m in b.claims]


def claim_key(claim: Claim) -> bytes:
    """A claim's partitioning key: its sender's principal (so one sender's claims, from every
    receiver, are judged by one evaluator, as in one process)."""
    return claim.principal.encode("utf-8", "surrogatepass")


def _claim(m: Any) -> Claim:
    via = _VIA_NAME.get(m.via)
    if via is None:
        raise WireError(f"a claim authenticated by an unknown means ({m.via})")
    if not m.principal:
        raise WireError("a claim without its sender's principal")
    if m.receiver not in RECEIVERS:
        raise WireError(f"a claim sent to an unknown receiver ({m.receiver[:64]!r})")
    if not 0.0 <= m.when < 1e11:  # NaN and the infinities too
        raise WireError(f"a claim at a time that is not one ({m.when})")
    said = m.claimed
    claimed = Claimed(
        said.namespace if said.HasField("namespace") else None,
        said.service_account if said.HasField("service_account") else None,
        said.service if said.HasField("service") else None,
        said.text,
    )
    return Claim(m.principal, via, claimed, m.why, m.receiver, m.entries, m.rejected, m.when)


# --- the Kafka key ----------------------------------------------------------------------------
def correlation_key(hop: Hop) -> bytes:
    """The key that puts every piece of evidence about one request in one partition: the request
    id when the hop has one (both sidecars' entries of a request, and an Envoy span, which tags
    it), else the trace id (an application's span), else the client socket of the connection
    (``conn``, which both sidecars of a TCP connection log), else the observer.

    The request id comes first because every sidecar logs it, while the trace id is in an entry
    only when the request was traced *and* the entry logs ``traceparent``: a request the sidecar
    answers itself (a ``direct_response``) is logged without it, though its span has it. A span
    of an application (no request id) joins its sidecar's entry by the trace id: such an entry
    goes to its request id's partition and, when the trace id's partition is another, an
    evidence copy goes there too (:func:`evidence_key`).

    A key longer than ``MAX_KEY_BYTES`` (a sender's outsized request id) is its 16-byte digest,
    prefixed ``#``."""
    return _key(hop.request_id or hop.trace_id or hop.conn or hop.observer)


def evidence_key(hop: Hop) -> bytes | None:
    """Where a copy of ``hop`` is needed besides its own partition, or None: the trace id of a
    hop keyed by its request id that a hop keyed by the trace id joins. That is an inbound
    access-log entry that logged the trace (an application's server span, with no request id,
    is joined to it: missing_access_log) and a client span (it names the source of a bypassed
    request, its child span in the same trace). The copy goes only where that partition differs
    from the hop's own (the producer compares). Cheapest tests first: an outbound entry's trace
    id is a lazy read."""
    if hop.origin == SPAN:
        if hop.span_kind != SPAN_KIND_CLIENT or not hop.span_id:
            return None
    elif hop.direction == OUTBOUND:
        return None
    if not hop.request_id:
        return None
    tid = hop.trace_id
    return _key(tid) if tid else None


def route(hops: Sequence[Hop], partitions: int) -> dict[int, tuple[list[Hop], list[Hop]]]:
    """``hops`` by partition (Kafka's default partitioner over :func:`correlation_key`), in
    their order: each partition's own hops, then the evidence copies it needs of hops of other
    partitions (:func:`evidence_key`, :func:`evidence_copy`)."""
    out: dict[int, tuple[list[Hop], list[Hop]]] = {}
    for h in hops:
        p = partition(correlation_key(h), partitions)
        slot = out.get(p)
        if slot is None:
            slot = out[p] = ([], [])
        slot[0].append(h)
        ek = evidence_key(h)
        if ek is not None:
            q = partition(ek, partitions)
            if q != p:
                other = out.get(q)
                if other is None:
                    other = out[q] = ([], [])
                other[1].append(evidence_copy(h))
    return out


def evidence_copy(hop: Hop) -> Hop:
    """What the joins of :func:`evidence_key` read of ``hop``, and nothing else: no Envoy entry, no
    request id (nothing at the copy's partition pairs by it), no time (an access log's is a lazy
    read, and no join reads it: the copy is indexed at the time it is read)."""
    if hop.origin == SPAN:
        return Hop(
            SPAN, hop.observer, hop.observer_service, hop.direction, hop.src, hop.dst, hop.start,
            trace_id=hop.trace_id, span_id=hop.span_id, span_kind=hop.span_kind,
        )  # fmt: skip
    return Hop(
        hop.origin, hop.observer, hop.observer_service, hop.direction, hop.src, hop.dst, 0.0, trace_id=hop.trace_id
    )


def _key(key: str) -> bytes:
    raw = key.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_KEY_BYTES:
        return raw
    return b"#" + hashlib.blake2b(raw, digest_size=16).digest()
