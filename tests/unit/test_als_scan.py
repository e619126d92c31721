"""The C scanner of HTTP access-log entries (``receivers/envoy_als/_scan.c``) against its reference,
``decode.read_http`` (the same fields read through protobuf): equal on every message upb parses,
merged and repeated fields included, or it declines the message and the receiver reads it through
protobuf (counted). The hops decoded either way are the same."""

from __future__ import annotations

import time
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from infra import als
from infra.mutate import mutated
from infra.protowire import delimited, varint
from meshaudit import metrics, naming
from meshaudit._proto.envoy.data.accesslog.v3 import accesslog_pb2
from meshaudit._proto.envoy.service.accesslog.v3 import als_pb2
from meshaudit.config import MeshConfig
from meshaudit.model import Hop
from meshaudit.naming import Namer
from meshaudit.receivers.envoy_als import decode
from meshaudit.receivers.envoy_als.decode import (
    StreamContext,
    decode_http,
    decode_tcp,
    flag_text,
    read_http,
    read_tcp,
)

Msg = als_pb2.StreamAccessLogsMessage
Entry = accesslog_pb2.HTTPAccessLogEntry
TcpEntry = accesslog_pb2.TCPAccessLogEntry
scan = decode.SCANNER


def test_the_scanner_is_built() -> None:
    # `pip install` (make install) builds it; without it every entry costs ~1 us more to decode.
    assert scan is not None


def reference(data: bytes, kind: str = "http_logs") -> list[Any] | None:
    """Protobuf's answer: each entry's fields when the message's log_entries is ``kind``."""
    m = Msg.FromString(data)
    if m.WhichOneof("log_entries") != kind:
        return None
    read = read_http if kind == "http_logs" else read_tcp
    return [read(e) for e in getattr(m, kind).log_entry]


def scanned(data: bytes, kind: str = "http_logs") -> list[Any] | None:
    """The scanner's answer for entries of ``kind``."""
    out: list[Any] | None = (scan.http_fields if kind == "http_logs" else scan.tcp_fields)(data)
    return out


TRACE = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
texts = st.text(max_size=12)
traceparents = st.one_of(
    st.just(TRACE),
    st.just(TRACE.upper()),
    st.just("00-" + "0" * 32 + "-" + "1" * 16 + "-01"),  # all-zero trace id: none
    st.just(TRACE[:54]),  # one character short
    st.just("é" * 30 + TRACE[30:]),  # non-ASCII: counted in characters, as Python does
    st.just("00-" + "ÄB" * 16 + "-" + "cd" * 8 + "-01"),  # non-ASCII inside the id: lowercased as str.lower
    st.text(min_size=50, max_size=60),
)


# Timestamps and durations: a second of this year, or any int64 (and any int32 of nanoseconds):
# upb checks no range, so neither may the scanner; its arithmetic must equal Python's to the bit.
seconds = st.one_of(st.integers(1_700_000_000, 1_900_000_000), st.integers(-(2**63), 2**63 - 1))
nanos = st.one_of(st.integers(0, 999_999_999), st.integers(-(2**31), 2**31 - 1))


def times(draw: Any, c: Any) -> None:
    """Set, or not, an entry's start_time and duration (an empty duration is still one)."""
    if draw(st.booleans()):
        c.start_time.seconds = draw(seconds)
        c.start_time.nanos = draw(nanos)
    if draw(st.booleans()):
        c.duration.SetInParent()
        if draw(st.booleans()):
            c.duration.seconds = draw(st.one_of(st.integers(0, 100), seconds))
        if draw(st.booleans()):
            c.duration.nanos = draw(nanos)


@st.composite
def entries(draw: Any) -> Any:
    """An HTTP entry with any of the fields the scanner reads set, unset or odd."""
    e = Entry()
    c = e.common_properties
    times(draw, c)
    if draw(st.booleans()):
        c.upstream_cluster = draw(
            st.sampled_from(["inbound|8080||", "outbound|8080||reviews.default.svc.cluster.local", ""])
        )
    if draw(st.booleans()):
        c.upstream_request_attempt_count = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        t = c.tls_properties
        t.SetInParent()
        if draw(st.booleans()):
            t.tls_version = draw(st.integers(-(2**31), 2**31 - 1))
        for kind, value in draw(st.lists(st.tuples(st.sampled_from(["uri", "dns", "none"]), texts), max_size=3)):
            san = t.peer_certificate_properties.subject_alt_name.add()
            if kind != "none":
                setattr(san, kind, value)
        if draw(st.booleans()):
            t.local_certificate_properties.subject_alt_name.add().uri = "spiffe://x/ns/a/sa/b"
    if draw(st.booleans()):
        r = e.request
        r.SetInParent()
        r.request_method = draw(st.integers(-(2**31), 2**31 - 1))
        r.request_id = draw(texts)
        r.path = draw(texts)
        r.authority = draw(texts)
        for k in draw(st.lists(st.sampled_from(["traceparent", "x-b3-traceid", "TraceParent"]), max_size=2)):
            r.request_headers[k] = draw(traceparents)
    if draw(st.booleans()):
        e.response.response_code.value = draw(st.integers(0, 2**32 - 1))
        e.response.response_code_details = draw(st.one_of(st.sampled_from(["via_upstream", "direct_response"]), texts))
    flags(draw, c)
    return e


FLAGS = [fd for fd in accesslog_pb2.ResponseFlags.DESCRIPTOR.fields]


def flags(draw: Any, c: Any) -> None:
    """Set, clear or leave some of an entry's response flags."""
    for fd in draw(st.lists(st.sampled_from(FLAGS), max_size=3)):
        f = c.response_flags
        if fd.name == "unauthorized_details":
            f.unauthorized_details.SetInParent()
        else:
            setattr(f, fd.name, draw(st.booleans()))
            f.SetInParent()


def address(draw: Any, a: Any) -> None:
    kind = draw(st.sampled_from(["socket", "socket6", "named", "pipe", "internal", "empty"]))
    if kind.startswith("socket") or kind == "named":
        s = a.socket_address
        # (the scanner formats addresses of up to 114 bytes itself, longer ones through Python)
        hosts = ["10.0.0.7", "fd00::7", "", "é.local", "h" * 114, "é" * 58, "f:" * 60]
        s.address = draw(st.sampled_from(hosts)) if kind != "socket6" else "::1"
        if kind == "named":
            s.port_value = 80
            s.named_port = "http"  # the oneof's port_value is cleared
        elif draw(st.booleans()):
            s.port_value = draw(st.integers(0, 2**32 - 1))
    elif kind == "pipe":
        a.pipe.path = draw(texts)
    elif kind == "internal":
        a.envoy_internal_address.server_listener_name = "l"
    else:
        a.SetInParent()


@st.composite
def tcp_entries(draw: Any) -> Any:
    """A TCP entry with its addresses, TLS, response flags and termination details set or not."""
    e = TcpEntry()
    c = e.common_properties
    times(draw, c)
    if draw(st.booleans()):
        c.upstream_cluster = draw(st.sampled_from(["inbound|5432||", "outbound|5432||db.data.svc.cluster.local", ""]))
    if draw(st.booleans()):
        c.tls_properties.tls_version = draw(st.integers(-2, 6))
        if draw(st.booleans()):
            c.tls_properties.peer_certificate_properties.subject_alt_name.add().uri = draw(texts)
    if draw(st.booleans()):
        address(draw, c.downstream_remote_address)
    if draw(st.booleans()):
        address(draw, c.upstream_local_address)
    flags(draw, c)
    if draw(st.booleans()):
        c.connection_termination_details = draw(st.sampled_from(["rbac_access_denied_matched_policy[x]", "", "ü"]))
    return e


def wire(msg: Any) -> bytes:
    data: bytes = msg.SerializeToString()
    return data


@given(st.lists(entries(), max_size=5), st.sampled_from(["http", "tcp", "none"]))
@settings(max_examples=300, deadline=None)
def test_equal_to_protobuf_on_generated_messages(es: list[Any], kind: str) -> None:
    m = Msg()
    m.identifier.CopyFrom(als.identifier("reviews"))
    if kind == "http":
        m.http_logs.log_entry.extend(es)
    elif kind == "tcp":
        m.tcp_logs.log_entry.add().common_properties.upstream_cluster = "x"
    data = wire(m)
    assert scanned(data) == reference(data)


@given(st.lists(st.tuples(entries(), entries()), min_size=1, max_size=3), st.lists(entries(), max_size=2))
@settings(max_examples=200, deadline=None)
def test_merged_fields_as_protobuf_merges_them(pairs: list[tuple[Any, Any]], more: list[Any]) -> None:
    # An entry sent as two concatenated encodings is one entry, the two merged (the later scalar
    # wins, submessages merge, repeated fields and maps concatenate): each entry field is written
    # by hand here, then the whole message twice (the log_entry lists concatenate).
    inner = b""
    for a, b in pairs:
        body = wire(a) + wire(b)
        inner += b"\x0a" + varint(len(body)) + body
    http = b"\x12" + varint(len(inner)) + inner
    m2 = Msg()
    m2.http_logs.log_entry.extend(more)
    data = http + wire(m2)
    assert scanned(data) == reference(data)
    assert len(reference(data) or []) == len(pairs) + len(more)


@given(st.lists(tcp_entries(), max_size=4), st.lists(st.tuples(tcp_entries(), tcp_entries()), max_size=2))
@settings(max_examples=300, deadline=None)
def test_tcp_entries_equal_protobuf_merged_or_not(es: list[Any], pairs: list[tuple[Any, Any]]) -> None:
    m = Msg()
    m.tcp_logs.log_entry.extend(es)
    inner = b""
    for a, b in pairs:  # one entry sent as two encodings: merged (addresses' oneofs switch, flags toggle)
        inner += b"\x0a" + delimited(wire(a) + wire(b))
    data = wire(m) + b"\x1a" + delimited(inner)
    assert scanned(data, "tcp_logs") == reference(data, "tcp_logs")
    assert scanned(data) is None and scanned(wire(als.http_message([], als.identifier("x"))), "tcp_logs") is None


def test_a_tcp_entrys_flags_read_as_envoy_names_them() -> None:
    t = als.tcp_entry(cluster="outbound|5432||db.default.svc.cluster.local", tls=False)
    f = t.common_properties.response_flags
    f.upstream_connection_failure = f.no_cluster_found = True
    f.unauthorized_details.SetInParent()
    data = wire(als.tcp_message([t], als.identifier("web")))
    got = scanned(data, "tcp_logs")
    assert got == reference(data, "tcp_logs")
    assert got is not None and flag_text(got[0][5]) == "UF,UAEX,NC"


def test_the_last_member_of_the_log_entries_oneof_wins() -> None:
    http = Msg()
    http.http_logs.log_entry.add().request.path = "/first"
    tcp = Msg()
    tcp.tcp_logs.log_entry.add().common_properties.upstream_cluster = "db"
    again = Msg()
    again.http_logs.log_entry.add().request.path = "/after"
    assert scanned(wire(http) + wire(tcp)) is None
    got = scanned(wire(http) + wire(tcp) + wire(again))
    assert got == reference(wire(http) + wire(tcp) + wire(again))
    assert got is not None and [f[5] for f in got] == ["/after"]


def test_a_san_whose_oneof_ends_on_dns_has_no_uri() -> None:
    # The first SAN holds a uri, then a dns (the oneof keeps dns): the peer is the second SAN's uri.
    uri_then_dns = b"\x0a\x03a:b\x12\x01d"
    first = b"\x0a" + delimited(
        b"\x22" + delimited(b"\x2a" + delimited(b"\x0a" + delimited(uri_then_dns)))
    )  # common.tls.peer.san
    e2 = Entry()
    e2.common_properties.tls_properties.peer_certificate_properties.subject_alt_name.add().uri = "spiffe://second"
    data = b"\x12" + delimited(b"\x0a" + delimited(first + wire(e2)))
    got = scanned(data)
    assert got == reference(data)
    assert got is not None and got[0][2] == "spiffe://second"


@pytest.mark.parametrize(
    "extra",
    [b"\x18\x01", b"\x10\x05", b"\x08\x01"],  # another field (3); the value (2), the key (1) as varints
    ids=["another field", "value not a string", "key not a string"],
)
def test_a_header_entry_upb_keeps_out_of_the_map_leaves_the_earlier_one(extra: bytes) -> None:
    # upb parses a map entry holding anything besides a string key (1) and value (2) into an
    # unknown field, not into the map: the traceparent logged before it stays the header's value.
    # (The scanner once took the later entry's value.)
    e = Entry()
    e.request.request_headers["traceparent"] = TRACE
    later = "00-" + "ef" * 16 + "-" + "cd" * 8 + "-01"
    entry = b"\x0a" + delimited(b"traceparent") + b"\x12" + delimited(later.encode()) + extra
    request = b"\x6a" + delimited(entry)  # HTTPRequestProperties.request_headers = 13
    data = b"\x12" + delimited(b"\x0a" + delimited(wire(e) + b"\x1a" + delimited(request)))
    want = reference(data)
    assert want is not None and want[0][6] == "ab" * 16
    assert scanned(data) == want


# Built once: its start times are the time it was built, and hypothesis replays the same bytes.
VALID = wire(
    als.http_message(
        [
            als.inbound_http("frontend", path="/a", request_id="r1", traceparent=TRACE),
            als.outbound_http("reviews", request_id="r2", attempts=3, status=503),
        ],
        als.identifier("reviews"),
    )
)


@given(st.data())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_messages_equal_protobuf_or_are_declined(data: Any) -> None:
    raw = mutated(VALID, data)
    try:
        want = reference(raw)
    except DecodeError:
        return  # upb refuses it: the receiver never scans it
    try:
        got = scanned(raw)
    except ValueError:
        with pytest.raises(ValueError):  # the hops' scan declines it too
            made(raw)
        return  # declined: read through protobuf instead (below)
    assert got == want
    hops_ = made(raw)
    assert (hops_ is None) == (got is None)
    assert [slots(h) for h in hops_ or []] == [f for f in got or []]


SLOT_NAMES = (
    "upstream_cluster", "tls_version", "peer_principal", "method", "request_id", "path", "trace_id", "status",
    "attempts", "start", "duration_ms", "response_flags", "response_code_details",
)  # fmt: skip


def made(data: bytes) -> list[Any] | None:
    """The scanner's hops of a message's HTTP entries (every start in range)."""
    out: list[Any] | None = scan.http_hops(
        data, decode.ScannedHop, decode._HTTP_SLOTS, decode._MESSAGE_SLOTS, ([], 1, "n", None), decode._INDEX_SLOT,
        -1e300, 1e300, flag_text,
    )  # fmt: skip
    return out


def slots(h: Any) -> tuple[Any, ...]:
    """A hop's scanned slots as the scanner's tuple holds them (the flags as their mask)."""
    out = [getattr(h, n) for n in SLOT_NAMES]
    out[11] = sum(1 << n for n, name in decode._FLAG_BY_NUMBER if name in out[11].split(","))
    return tuple(out)


def test_the_hop_maker_writes_only_slots_of_the_hops_class() -> None:
    # It stores into an object by a slot's offset: anything but a writable object slot of the
    # class (or one of its bases) is refused before any hop is made.
    data = wire(als.http_message([als.inbound_http("frontend", path="/a")], als.identifier("reviews")))
    args = [data, decode.ScannedHop, decode._HTTP_SLOTS, decode._MESSAGE_SLOTS, ([], 1, "n", None)]
    tail = [decode._INDEX_SLOT, 0.0, 1e300, flag_text]
    [h] = scan.http_hops(*args, *tail)
    assert h.path == "/a" and h._i == 0 and h.origin == 1 and h.observer == "n"

    class Other:
        __slots__ = ("x",)

    for bad in (Other.__dict__["x"], "path", Hop.__dict__["src"].__get__, type.__dict__["__name__"]):
        with pytest.raises(TypeError):
            scan.http_hops(data, decode.ScannedHop, (bad, *decode._HTTP_SLOTS[1:]), *args[3:], *tail)
    with pytest.raises(TypeError):
        scan.http_hops(data, decode.ScannedHop, decode._HTTP_SLOTS[1:], *args[3:], *tail)
    # a start out of range is left to the hop's lazy read (which clamps and counts it)
    [h] = scan.http_hops(*args, decode._INDEX_SLOT, 0.0, 1.0, flag_text)
    with pytest.raises(AttributeError):
        Hop.__dict__["start"].__get__(h)


def test_the_scanner_names_the_parties_where_the_caches_answer() -> None:
    # An inbound mTLS entry whose certificate the namer knows and an outbound entry to a named
    # service with a request id: the scanner sets their direction and parties; a plaintext inbound
    # entry (its client's address is read through protobuf) is left to the decoder.
    namer = Namer(MeshConfig())
    es = [
        als.inbound_http("frontend", path="/a", request_id="r1"),
        als.outbound_http("ratings", request_id="r2"),
        als.inbound_http(None, path="/b", request_id="r3"),
    ]
    data = wire(als.http_message(es, als.identifier("reviews")))
    first = hops(data, True, namer)  # fills the caches
    m = Msg.FromString(data)
    ctx = StreamContext(namer, m.identifier.node.id, m.identifier.node.cluster, m.identifier.log_name)
    pending: list[Any] = []
    caches = (naming.CLUSTERS, namer.principals, ctx.observer, ctx.default_direction)
    fixed = (m.http_logs.log_entry, 1, "n", ctx.observer)
    made_ = scan.http_hops(
        data, decode.ScannedHop, decode._HTTP_SLOTS, decode._MESSAGE_SLOTS, fixed, decode._INDEX_SLOT, -1e300, 1e300,
        flag_text, caches, decode._PARTY_SLOTS, pending,
    )  # fmt: skip
    assert [h.path for h in pending] == ["/b"]
    for h, g in zip(made_[:2], first[:2], strict=True):
        assert (h.direction, h.src, h.dst, h.conn) == (g.direction, g.src, g.dst, g.conn)
    assert first[0].src.service == "frontend" and first[1].dst.service == "ratings"


def test_a_declined_message_is_read_through_protobuf_and_counted() -> None:
    # An unknown group inside an entry: upb keeps it as an unknown field, the scanner declines.
    m = als.http_message([als.inbound_http("frontend", path="/g", request_id="rid")], als.identifier("reviews"))
    e = m.http_logs.log_entry[0]
    group = b"\xfb\x07" + b"\x08\x01" + b"\xfc\x07"  # field 127, start group; a varint; end group
    body = wire(e) + group
    data = wire(Msg(identifier=m.identifier)) + b"\x12" + delimited(b"\x0a" + delimited(body))
    with pytest.raises(ValueError):
        scanned(data)
    declined = metrics.REJECTED.labels("envoy_als", "scan_declined")
    before = declined._value.get()
    got = [slots(h) for h in hops(data, True)]  # decode_http, given the bytes the scanner declines
    assert got == reference(data)
    assert declined._value.get() == before + 1


def hops(data: bytes, scan_it: bool, namer: Namer | None = None) -> list[Hop]:
    namer = namer or Namer(MeshConfig())
    m = Msg.FromString(data)
    ctx = StreamContext(namer, m.identifier.node.id, m.identifier.node.cluster, m.identifier.log_name)
    out: list[Hop] = []
    if m.WhichOneof("log_entries") == "tcp_logs":
        decode_tcp(m.tcp_logs.log_entry, ctx, namer, out, data if scan_it else None)
    else:
        decode_http(m.http_logs.log_entry, ctx, namer, out, data if scan_it else None)
    return out


FIELDS = ("direction", "src", "dst", "tls_version", "peer_principal", "method", "path", "request_id", "trace_id")
LATER = (
    "conn", "upstream_cluster", "status", "attempts", "authority", "response_flags", "response_code_details",
    "user_agent", "duration_ms",
)  # fmt: skip


@given(st.lists(entries(), min_size=1, max_size=4))
@settings(max_examples=150, deadline=None)
def test_the_hops_are_the_same_either_way(es: list[Any]) -> None:
    m = als.http_message(es, als.identifier("reviews"))
    data = wire(m)
    # the scanner with the namer's and the clusters' caches cold (the decoder names the parties)
    # and warm (the scanner names them where the caches answer), and protobuf
    namer = Namer(MeshConfig())
    a, warm, b = hops(data, True, namer), hops(data, True, namer), hops(data, False)
    want = [[getattr(h, f) for f in FIELDS + LATER] for h in b]
    assert [[getattr(h, f) for f in FIELDS + LATER] for h in a] == want
    assert [[getattr(h, f) for f in FIELDS + LATER] for h in warm] == want


@given(st.lists(tcp_entries(), min_size=1, max_size=4))
@settings(max_examples=150, deadline=None)
def test_tcp_hops_are_the_same_either_way(es: list[Any]) -> None:
    data = wire(als.tcp_message(es, als.identifier("db")))
    a, b = hops(data, True), hops(data, False)
    fields = (*FIELDS, "conn", "upstream_cluster", "response_flags", "connection_termination_details", "duration_ms")
    assert [[getattr(h, f) for f in fields] for h in a] == [[getattr(h, f) for f in fields] for h in b]


def test_a_negative_tls_version_is_unknown_not_tls_1_3() -> None:
    # An enum is an int32 on the wire: -1 once indexed the versions' table from its end.
    e = als.inbound_http("frontend", path="/", request_id="rid")
    e.common_properties.tls_properties.tls_version = -1
    (h,) = als.decode(als.http_message([e], als.identifier("reviews")), Namer(MeshConfig()))
    assert h.tls_version == "unknown"
    t = als.tcp_entry(cluster="inbound|5432||", tls=True)
    t.common_properties.tls_properties.tls_version = -1
    (h,) = als.decode(als.tcp_message([t], als.identifier("db")), Namer(MeshConfig()))
    assert h.tls_version == "unknown"


@given(st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_any_bytes_give_fields_none_or_value_error(raw: bytes) -> None:
    # The receiver scans only what upb parsed; the scanner still stays within the bytes it is given.
    try:
        got = scanned(raw)
    except ValueError:
        return
    assert got is None or all(len(f) == 13 for f in got)
    try:
        tcp = scanned(raw, "tcp_logs")
    except ValueError:
        return
    assert tcp is None or all(len(f) == 9 for f in tcp)


def test_a_time_and_a_duration_in_the_wrong_wire_type_are_no_value() -> None:
    # upb keeps a Timestamp's or Duration's field of another wire type as an unknown field: the
    # value before it stays (seconds 7 as a fixed64, nanos 9 as a length-delimited field).
    e = Entry()
    e.common_properties.start_time.seconds = 1_800_000_000
    e.common_properties.duration.nanos = 5_000_000
    odd = b"\x09" + (7).to_bytes(8, "little") + b"\x12" + delimited(b"\x09")
    common = b"\x2a" + delimited(odd) + b"\xba\x01" + delimited(odd)  # start_time = 5, duration = 23
    data = b"\x12" + delimited(b"\x0a" + delimited(wire(e) + b"\x0a" + delimited(common)))
    want = reference(data)
    assert want is not None and want[0][9:11] == (1_800_000_000.0, 5.0)
    assert scanned(data) == want


@given(st.lists(st.one_of(entries(), tcp_entries()), min_size=1, max_size=4))
@settings(max_examples=150, deadline=None)
def test_a_hops_start_and_duration_are_what_reading_its_entry_gives(es: list[Any]) -> None:
    # Set at decode (the service graph reads every entry's duration, an exception's count its
    # start): the values the entry's lazy read gives. A start out of range (or unset, as a
    # synthetic client may send it) is left to the hop's first read, which clamps it to the time
    # of the read and counts it, as before: an entry nothing reads the start of is not counted.
    tcp = [x for x in es if isinstance(x, TcpEntry)]
    http = [x for x in es if not isinstance(x, TcpEntry)]
    clamped = metrics.REJECTED.labels("envoy_als", "clamped_time")
    for m, lazy in (
        (als.tcp_message(tcp, als.identifier("db")), decode._LAZY_TCP),
        (als.http_message(http, als.identifier("reviews")), decode._LAZY_HTTP),
    ):
        data = wire(m)
        kind = m.WhichOneof("log_entries")
        sent = list(getattr(m, kind).log_entry) if kind else []
        t0 = time.time()
        before = clamped._value.get()
        got = hops(data, True)
        assert clamped._value.get() == before  # nothing counted at decode
        for h, e in zip(got, sent, strict=True):
            assert h.duration_ms == lazy["duration_ms"](e)
            t = decode._raw_start(e.common_properties)
            before = clamped._value.get()
            if t0 - decode.MAX_PAST_SECS <= t <= t0 + decode.MAX_FUTURE_SECS:
                assert h.start == t == lazy["start"](e)
                assert clamped._value.get() == before
            else:
                assert t0 <= h.start <= time.time()
                assert clamped._value.get() == before + 1


@pytest.mark.parametrize("secs,ns", [(417_612_917_817, 247_891_063), (-686_293_018_323, 523_832_096)])
def test_a_duration_is_the_exact_nanoseconds_rounded_once(secs: int, ns: int) -> None:
    # Durations where seconds * 1e9 and nanos added as doubles round twice and land elsewhere.
    e = Entry()
    e.common_properties.duration.seconds = secs
    e.common_properties.duration.nanos = ns
    data = wire(als.http_message([e], als.identifier("reviews")))
    got = scanned(data)
    assert got == reference(data)
    assert got is not None and got[0][10] == (secs * 10**9 + ns) / 1e6 != (secs * 1e9 + ns) / 1e6
