"""The C scanner of OTLP spans (``receivers/otlp/_spanscan.c``) against its reference,
``decode.read_spans`` (the same fields read through protobuf from the map view upb parses): equal
on every export upb parses, merged and repeated fields included, or it declines the export and the
receiver reads it through protobuf (counted). The hops decoded either way are the same, slot by
slot; ids of the wrong size are refused the same way, naming the same span."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from infra.mutate import mutated
from infra.otlp import client_span, server_span
from infra.protowire import field, varint
from meshaudit import metrics
from meshaudit.config import MeshConfig
from meshaudit.model import Hop, identity
from meshaudit.naming import Namer
from meshaudit.receivers.otlp import decode
from meshaudit.receivers.otlp.decode import Check, ExportTraceServiceRequest, OtlpRejected, decode_traces, read_spans
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

Export = trace_service_pb2.ExportTraceServiceRequest  # the official messages: repeated KeyValue
SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT
scan = decode.SCANNER
NOW = 1_763_780_000.0


def test_the_scanner_is_built() -> None:
    # `pip install` (make install) builds it; without it every span costs ~3 us more to decode.
    assert scan is not None


def wire(msg: Any) -> bytes:
    data: bytes = msg.SerializeToString()
    return data


def reference(data: bytes) -> list[Any] | None:
    """Protobuf's answer (upb parses ``data``, DecodeError otherwise): the fields, or None when
    an id has the wrong size (``decode_traces`` refuses the export)."""
    try:
        return read_spans(ExportTraceServiceRequest.FromString(data))
    except OtlpRejected as exc:
        assert exc.reason == "invalid_id"
        return None


def scanned(data: bytes) -> list[Any] | None:
    """The scanner's answer, its status codes made ints as the decoder makes them (``_int``: the
    scanner leaves a float or a string that is not plain digits to it)."""
    out: list[Any] | None = scan.spans(data)
    if out is None:
        return None
    for *_, spans in out:
        for i, sp in enumerate(spans):
            if sp[15].__class__ is not int:
                spans[i] = (*sp[:15], decode._int(sp[15]), sp[16])
    return out


def same(a: Any, b: Any) -> bool:
    """Equal, NaN included, and of the same types (repr tells True from 1, 1.0 from 1, -0.0 from 0.0)."""
    return repr(a) == repr(b)


# --- generated exports -------------------------------------------------------------------------
SPAN_KEYS = [
    "node_id", "guid:x-request-id", "http.request.header.x-request-id", "http.url", "url.path", "url.full",
    "http.target", "upstream_cluster", "upstream_cluster.name", "istio.canonical_service", "istio.namespace",
    "server.address", "peer.address", "client.address", "network.peer.address", "net.peer.ip", "http.method",
    "http.request.method", "http.status_code", "http.response.status_code", "user_agent.original",
    "http.user_agent", "zone", "", "node_id ", "Node_id",
]  # fmt: skip
RESOURCE_KEYS = ["service.name", "service.namespace", "k8s.namespace.name", "telemetry.sdk.name", ""]
STRINGS = [
    "", "-", "--", "GET", "POST", "/a/b?c=d", "http://reviews:9080/reviews/1?x=1", "https://h.example", "x://",
    "://", "a://b/c://d/e", "a:/b/c", "no scheme", "200", "0200", "503", " 200", "2_00", "+200", "-1", "٢٠٠",
    "1" * 18, "9" * 19, "1e3", "é/ü", "outbound|9080||reviews.default.svc.cluster.local", "outbound|80||",
    "inbound|9080||", "PassthroughCluster", "BlackHoleCluster",
    "sidecar~10.0.0.7~reviews-v1-5d8f7c9b6-x2kq4.default~default.svc.cluster.local",
    "10.0.0.9", "10.0.0.9:4000", "fd00::9", "reviews", "default",
]  # fmt: skip
strings = st.one_of(st.sampled_from(STRINGS), st.text(max_size=8))


@st.composite
def any_values(draw: Any, depth: int = 0) -> Any:
    """An AnyValue of any kind, kvlist and bytes included (the view does not declare those: they
    leave its oneof as it was), or none set."""
    v = common_pb2.AnyValue()
    kind = draw(st.sampled_from(["string", "string", "int", "bool", "double", "array", "kvlist", "bytes", "unset"]))
    if kind == "string":
        v.string_value = draw(strings)
    elif kind == "int":
        v.int_value = draw(st.one_of(st.sampled_from([0, 200, 404, -1]), st.integers(-(2**63), 2**63 - 1)))
    elif kind == "bool":
        v.bool_value = draw(st.booleans())
    elif kind == "double":
        v.double_value = draw(st.floats())
    elif kind == "array":
        v.array_value.SetInParent()
        if depth < 2:
            v.array_value.values.extend(draw(st.lists(any_values(depth + 1), max_size=3)))
    elif kind == "kvlist":
        v.kvlist_value.values.add(key="k", value=common_pb2.AnyValue(string_value="v"))
    elif kind == "bytes":
        v.bytes_value = b"\xff\x00"
    return v


def key_values(draw: Any, keys: list[str], into: Any, max_size: int) -> None:
    """Attributes, keys drawn with repetition: a key sent twice is one map entry, the later."""
    for key in draw(st.lists(st.sampled_from(keys), max_size=max_size)):
        into.add(key=key, value=draw(any_values()))


IDS = st.sampled_from([16, 16, 16, 8, 0, 17])
SPAN_IDS = st.sampled_from([8, 8, 8, 0, 16, 7])


@st.composite
def spans(draw: Any, bad_ids: bool = False) -> Any:
    """A span with any of the fields the scanner reads set, unset or odd, and some it skips."""
    sp = trace_pb2.Span()
    sp.trace_id = bytes(range(draw(IDS) if bad_ids else 16))
    sp.span_id = bytes(range(100, 100 + (draw(SPAN_IDS) if bad_ids else 8)))
    if draw(st.booleans()):
        sp.parent_span_id = bytes(range(50, 50 + (draw(SPAN_IDS) if bad_ids else 8)))
    sp.kind = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5]), st.integers(-(2**31), 2**31 - 1)))
    if draw(st.booleans()):
        sp.start_time_unix_nano = draw(st.one_of(st.just(int(NOW * 1e9)), st.integers(0, 2**64 - 1)))
    if draw(st.booleans()):
        sp.end_time_unix_nano = draw(st.one_of(st.just(int(NOW * 1e9) + 3_500_000), st.integers(0, 2**64 - 1)))
    key_values(draw, SPAN_KEYS, sp.attributes, 12)
    if draw(st.booleans()):  # fields the view leaves out
        sp.name = draw(strings)
        sp.status.code = trace_pb2.Status.STATUS_CODE_ERROR
        sp.events.add(name="e").attributes.add(key="http.method", value=common_pb2.AnyValue(string_value="PUT"))
        sp.links.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    return sp


@st.composite
def exports(draw: Any, bad_ids: bool = False) -> Any:
    """0-3 resources of 0-2 scopes of 0-3 spans each."""
    req = Export()
    for _ in range(draw(st.integers(0, 3))):
        rs = req.resource_spans.add()
        if draw(st.booleans()):
            key_values(draw, RESOURCE_KEYS, rs.resource.attributes, 5)
        for _ in range(draw(st.integers(0, 2))):
            ss = rs.scope_spans.add()
            if draw(st.booleans()):
                ss.scope.name = "envoy"
            ss.spans.extend(draw(st.lists(spans(bad_ids), max_size=3)))
    return req


@given(exports())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_equal_to_protobuf_on_generated_exports(req: Any) -> None:
    data = wire(req)
    want = reference(data)
    assert want is not None and same(scanned(data), want)


@given(exports(bad_ids=True))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_an_id_of_the_wrong_size_is_left_to_protobuf(req: Any) -> None:
    # None: decode_traces reads the export through protobuf, which refuses it naming the span.
    data = wire(req)
    assert same(scanned(data), reference(data))


def test_no_spans_and_no_resources() -> None:
    assert scanned(b"") == reference(b"") == []
    req = Export()
    req.resource_spans.add().scope_spans.add()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name", value=common_pb2.AnyValue(string_value="reviews"))
    assert scanned(wire(req)) == reference(wire(req)) == [(None, None, None, []), ("reviews", None, None, [])]


# --- merged encodings --------------------------------------------------------------------------


@st.composite
def entries(draw: Any, keys: list[str]) -> bytes:
    """One attribute map entry, sent as one or two encodings of a KeyValue (merged: the later key
    counts when set, the values merge: the later oneof member wins, arrays concatenate)."""
    parts = []
    for _ in range(draw(st.integers(1, 2))):
        kv = common_pb2.KeyValue(key=draw(st.sampled_from(keys)), value=draw(any_values()))
        if draw(st.booleans()):
            kv.ClearField("value")
        parts.append(wire(kv))
    return b"".join(parts)


@st.composite
def merged_spans(draw: Any) -> bytes:
    """A span sent as two encodings, with attribute entries themselves sent as two encodings."""
    a, b = draw(spans()), draw(spans())
    if draw(st.booleans()):
        b.ClearField("trace_id")  # the earlier one stays
    body = wire(a) + wire(b)
    for e in draw(st.lists(entries(SPAN_KEYS), max_size=4)):
        body += field(9, e)
    return body


@given(st.lists(st.tuples(st.lists(merged_spans(), max_size=3), st.lists(entries(RESOURCE_KEYS), max_size=3))))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_merged_fields_as_protobuf_merges_them(resources: list[tuple[list[bytes], list[bytes]]]) -> None:
    # Each resource sent as two encodings too: its resource merged (attribute entries concatenate),
    # its scope_spans concatenated.
    data = b""
    for bodies, res_entries in resources:
        scope = b"".join(field(2, body) for body in bodies)
        first = field(1, b"".join(field(1, e) for e in res_entries[:1])) + field(2, scope)
        second = field(1, b"".join(field(1, e) for e in res_entries[1:])) + field(2, scope)
        data += field(1, first + second)
    want = reference(data)
    assert want is not None and same(scanned(data), want)
    assert sum(len(r[3]) for r in want) == 2 * sum(len(b) for b, _ in resources)


def _export_of(*bodies: bytes) -> bytes:
    """An export of one resource, one scope and a span per encoded body."""
    return field(1, field(2, b"".join(field(2, body) for body in bodies)))


def test_the_last_entry_of_a_key_and_the_last_member_of_a_value_win() -> None:
    sp = trace_pb2.Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    sp.attributes.add(key="http.method", value=common_pb2.AnyValue(string_value="GET"))
    sp.attributes.add(key="http.method", value=common_pb2.AnyValue())  # replaces it whole: no method
    sp.attributes.add(key="http.request.method", value=common_pb2.AnyValue(string_value="PUT"))
    sp.attributes.add(key="upstream_cluster", value=common_pb2.AnyValue(string_value="inbound|80||"))
    one = wire(sp)
    # one entry: the key, an array value, then an int: the int wins, then a string: the string wins
    hdr = common_pb2.KeyValue(key="http.request.header.x-request-id")
    hdr.value.array_value.values.add(string_value="rid-in-array")
    one += field(9, wire(hdr) + field(2, b"\x18\x05") + field(2, b"\x0a\x06rid-st"))
    # kvlist_value (6) is not in the view: the string before it in the same value stays
    one += field(9, field(1, b"url.path") + field(2, field(1, b"/p") + field(6, b"")))
    # an array, an int, then two arrays: one array (the first one cleared), ["a", "b"]
    two = wire(trace_pb2.Span(trace_id=b"\x03" * 16, span_id=b"\x04" * 8))
    z, a, b = (field(5, field(1, field(1, x))) for x in (b"z", b"a", b"b"))
    value = z + b"\x18\x05" + a + b
    two += field(9, field(1, b"http.request.header.x-request-id") + field(2, value))
    # the entry's last key counts, its value merged from both encodings
    two += field(9, field(1, b"url.path") + field(2, field(1, b"/x")) + field(1, b"http.target"))
    data = _export_of(one, two)
    got = scanned(data)
    assert same(got, reference(data))
    assert got is not None
    first, second = got[0][3]
    assert (first[7], first[8], first[9], first[14]) == ("rid-st", "/p", "inbound|80||", "PUT")
    assert (second[7], second[8], second[14]) == ("a", "/x", None)


def test_a_field_of_another_wire_type_is_an_unknown_field() -> None:
    # upb keeps a field whose wire type is not its declared one as an unknown field: the value
    # before it stays. An int32 sent as a 64-bit varint keeps its low 32 bits.
    start = int(NOW * 1e9)
    sp = wire(trace_pb2.Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, kind=SERVER, start_time_unix_nano=start))
    sp += b"\x08\x01"  # trace_id as a varint
    sp += b"\x30" + varint(2**32 + 3)  # kind 2**32 + 3: 3
    sp += b"\x38\x05" + b"\x45\x01\x00\x00\x00"  # start_time as a varint, end_time as a fixed32
    sp += field(6, b"\x04") + b"\x35\x04\x00\x00\x00"  # kind as bytes, as a fixed32
    sp += b"\x48\x01"  # attributes as a varint
    # a string, then an int as bytes, a string as a varint, a double as a fixed32: the string stays
    path = field(1, b"/q") + field(3, b"\x05") + b"\x08\x01" + b"\x25\x01\x00\x00\x00"
    sp += field(9, field(1, b"url.path") + field(2, path))
    # an int, then a bool and an int as fixed64s: the int stays
    status = b"\x18\xc8\x01" + b"\x11" + b"\x01" * 8 + b"\x19" + b"\x02" * 8
    sp += field(9, field(1, b"http.status_code") + field(2, status))
    sp += field(9, field(1, b"http.request.method") + field(2, field(1, b"PUT") + b"\x2a\x00"))  # an array
    data = _export_of(sp)
    got = scanned(data)
    assert same(got, reference(data))
    assert got is not None
    (t,) = got[0][3]
    assert (t[0], t[3], t[4], t[8], t[14], t[15]) == ("01" * 16, 3, start / 1e9, "/q", None, 200)


def test_a_map_entry_with_a_field_of_its_own_is_not_in_the_map() -> None:
    # upb keeps such an entry whole as an unknown field of the span (or resource): the entry of
    # its key before it stays. A key or value of another wire type is such a field.
    sp = wire(trace_pb2.Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8))
    entry = field(1, b"http.method") + field(2, field(1, b"GET"))
    extras = [
        field(3, b"x"),
        field(9, b"x"),
        b"\x10\x01",
        b"\x08\x01",
        b"\x1d\x00\x00\x00\x00",
        b"\x09" + b"\x00" * 8,
    ]
    bodies = []
    for extra in extras:
        later = field(1, b"http.method") + field(2, field(1, b"POST"))
        bodies.append(sp + field(9, entry) + field(9, later + extra) + field(9, extra + later))
    service = field(1, b"service.name") + field(2, field(1, b"GET"))
    res = field(1, service) + field(1, field(1, b"service.name") + b"\x18\x01")  # a varint of its own
    data = field(1, field(1, res) + field(2, b"".join(field(2, body) for body in bodies)))
    got = scanned(data)
    assert same(got, reference(data))
    assert got is not None and got[0][0] == "GET" and [t[14] for t in got[0][3]] == ["GET"] * len(extras)


def test_status_codes_as_decode_reads_them() -> None:
    array = common_pb2.AnyValue()
    array.array_value.values.add(string_value="500")
    cases: list[tuple[Any, int]] = [
        (common_pb2.AnyValue(string_value="503"), 503),
        (common_pb2.AnyValue(string_value=" 503 "), 503),  # int() takes spaces
        (common_pb2.AnyValue(string_value="5_03"), 503),  # and underscores
        (common_pb2.AnyValue(string_value="٥٠٣"), 503),  # and other scripts' digits
        (common_pb2.AnyValue(string_value="9" * 19), 9_999_999_999_999_999_999),
        (common_pb2.AnyValue(string_value="abc"), 0),  # not a number: 0, the second key unread
        (common_pb2.AnyValue(int_value=404), 404),
        (common_pb2.AnyValue(int_value=0), 0),
        (common_pb2.AnyValue(bool_value=True), 1),
        (common_pb2.AnyValue(double_value=201.9), 201),
        (common_pb2.AnyValue(double_value=float("nan")), 0),
        # int() of an infinity raises OverflowError: it once escaped decode and failed the whole
        # export, uncounted, where any other value that is not a number reads as 0
        (common_pb2.AnyValue(double_value=float("inf")), 0),
        (common_pb2.AnyValue(double_value=float("-inf")), 0),
        (common_pb2.AnyValue(string_value="-"), 299),  # none: the second key's
        (common_pb2.AnyValue(string_value=""), 299),
        (common_pb2.AnyValue(), 299),
        (array, 299),
    ]
    for value, status in cases:
        sp = trace_pb2.Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
        sp.attributes.add(key="http.status_code", value=value)
        sp.attributes.add(key="http.response.status_code", value=common_pb2.AnyValue(string_value="299"))
        data = _export_of(wire(sp))
        got = scanned(data)
        assert same(got, reference(data)), value
        assert got is not None and got[0][3][0][15] == status, value
        assert hops(data, True)[2][0][Hop.__slots__.index("status")] == status


# --- what the OpenTelemetry SDK sends ----------------------------------------------------------
def sdk_export() -> Any:
    """Spans of instrumented applications, as the SDK's OTLP exporter encodes them: two services,
    each with its resource; attributes of every type the SDK allows, arrays included; events,
    links and statuses the view leaves out."""
    server, client, other = InMemorySpanExporter(), InMemorySpanExporter(), InMemorySpanExporter()
    server_span(server, "reviews", "/reviews/9")
    client_span(client, "frontend", "reviews.default.svc.cluster.local", "rid-9")
    provider = TracerProvider(
        resource=Resource.create({"service.name": "ratings", "k8s.namespace.name": "shop", "service.version": 3})
    )
    provider.add_span_processor(SimpleSpanProcessor(other))
    first = provider.get_tracer("app", "1.0")
    second = provider.get_tracer("db-client")
    with first.start_as_current_span("GET /ratings", kind=SpanKind.SERVER) as span:
        span.set_attributes(
            {
                "http.request.method": "GET",
                "url.full": "https://ratings.shop:9443/ratings/7?x=1",
                "http.response.status_code": 200,
                "network.peer.address": "10.0.0.31",
                "user_agent.original": "curl/8.5.0",
                "istio.canonical_service": "ratings-v2",
                "http.request.header.x-request-id": ["rid-1", "rid-2"],
                "retry": True,
                "ratio": 0.25,
            }
        )
        span.add_event("cache miss", {"key": "r7"})
        ctx = span.get_span_context()
        with second.start_as_current_span("SELECT", kind=SpanKind.CLIENT, links=[Link(ctx)]) as inner:
            inner.set_attributes({"server.address": "db.data", "http.status_code": "503", "peer.address": "-"})
            inner.set_status(Status(StatusCode.ERROR, "down"))
        with second.start_as_current_span("internal") as inner:
            inner.set_attribute("http.request.header.x-request-id", [])
    provider.shutdown()
    return encode_spans([*server.get_finished_spans(), *client.get_finished_spans(), *other.get_finished_spans()])


def hops(data: bytes, scan_it: bool, check: Check | None = None) -> tuple[int, int, list[list[Any]]]:
    """(spans, clamped times, every Hop slot of every hop) decoded from ``data``, scanned or not."""
    out: list[Hop] = []
    check = check or Check(now=NOW, max_skew=86_400)
    n = decode_traces(
        ExportTraceServiceRequest.FromString(data), Namer(MeshConfig()), out, check, data if scan_it else None
    )
    return n, check.clamped, [[getattr(h, s) for s in Hop.__slots__] for h in out]


def test_what_the_sdk_sends_reads_the_same_either_way() -> None:
    data = wire(sdk_export())
    got = scanned(data)
    assert got is not None and same(got, reference(data))
    assert [len(r[3]) for r in got] == [1, 1, 3]
    assert got[2][:3] == ("ratings", None, "shop")
    (ratings,) = [sp for sp in got[2][3] if sp[10] == "ratings-v2"]
    assert ratings[7:9] == ("rid-1", "/ratings/7?x=1") and ratings[13:16] == ("10.0.0.31", "GET", 200)
    a, b = hops(data, True), hops(data, False)
    assert a == b and a[0] == 5
    # what the hops say, as decode made them before the scanner: the span's canonical service first,
    # the resource's namespace (service.namespace, else k8s.namespace.name), the peer's address
    slot = {name: Hop.__slots__.index(name) for name in ("path", "source_address", "observer_service", "observer")}
    assert [h[slot["source_address"]] for h in a[2] if h[slot["path"]] == "/reviews/9"] == ["10.0.0.44"]
    (h,) = [h for h in a[2] if h[slot["path"]] == "/ratings/7?x=1"]
    assert (
        h[slot["observer_service"]] == identity("ratings-v2", "shop") and h[slot["observer"]] == "span:ratings-v2.shop"
    )


# --- hops ------------------------------------------------------------------------------------------
@given(exports())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_hops_are_the_same_either_way(req: Any) -> None:
    # Every slot of Hop: one the scanner's hop builder left unset would raise here.
    data = wire(req)
    assert hops(data, True) == hops(data, False)


@given(st.lists(merged_spans(), min_size=1, max_size=4))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_merged_spans_make_the_same_hops_either_way(bodies: list[bytes]) -> None:
    data = _export_of(*bodies)
    assert hops(data, True) == hops(data, False)


@given(exports(bad_ids=True))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_an_invalid_id_is_refused_the_same_way_naming_the_same_span(req: Any) -> None:
    data = wire(req)
    outcomes: list[tuple[Any, ...]] = []
    for scan_it in (True, False):
        out: list[Hop] = []
        try:
            n = decode_traces(
                ExportTraceServiceRequest.FromString(data), Namer(MeshConfig()), out, Check(), data if scan_it else None
            )
            outcomes.append(("ok", n, len(out)))
        except OtlpRejected as exc:
            outcomes.append((exc.reason, str(exc), len(out)))
    assert outcomes[0] == outcomes[1]


def test_too_many_spans_is_refused_before_an_invalid_id_either_way() -> None:
    req = Export()
    ss = req.resource_spans.add().scope_spans.add()
    ss.spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    ss.spans.add(trace_id=b"\x01" * 15, span_id=b"\x02" * 8)
    data = wire(req)
    for scan_it in (True, False):
        view = ExportTraceServiceRequest.FromString(data)
        with pytest.raises(OtlpRejected) as info:
            decode_traces(view, Namer(MeshConfig()), [], Check(max_entries=1), data if scan_it else None)
        assert info.value.reason == "too_many_entries"
        with pytest.raises(OtlpRejected) as info:
            decode_traces(view, Namer(MeshConfig()), [], Check(), data if scan_it else None)
        assert str(info.value) == "trace_id of entry 2 has 15 bytes, not 16"


def test_implausible_times_are_clamped_and_counted_the_same_way() -> None:
    req = Export()
    ss = req.resource_spans.add().scope_spans.add()
    close, far = int(NOW * 1e9) - 86_399_000_000_007, int((NOW - 86_401) * 1e9)  # a day is the bound
    for start in (0, 2**64 - 1, close, far):
        ss.spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, start_time_unix_nano=start, end_time_unix_nano=close)
    data = wire(req)
    a, b = hops(data, True), hops(data, False)
    assert a == b and a[:2] == (4, 3)
    assert [s[Hop.__slots__.index("start")] for s in a[2]] == [NOW, NOW, close / 1e9, NOW]
    assert [s[Hop.__slots__.index("duration_ms")] for s in a[2]] == [close / 1e6, None, None, (close - far) / 1e6]


# --- declined, mutated and arbitrary bytes ---------------------------------------------------------
def test_a_declined_export_is_read_through_protobuf_and_counted() -> None:
    # An unknown group inside a span: upb keeps it as an unknown field, the scanner declines.
    req = wire(sdk_export())
    sp = trace_pb2.Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, kind=SERVER)
    sp.attributes.add(key="http.url", value=common_pb2.AnyValue(string_value="http://a/b"))
    group = b"\xfb\x07" + b"\x08\x01" + b"\xfc\x07"  # field 127, start group; a varint; end group
    data = req + field(1, field(2, field(2, wire(sp) + group)))
    ExportTraceServiceRequest.FromString(data)  # upb accepts it
    with pytest.raises(ValueError):
        scan.spans(data)
    for receiver in ("otlp_grpc", "otlp_http"):
        declined = metrics.REJECTED.labels(receiver, "scan_declined")
        before = declined._value.get()
        got = hops(data, True, Check(now=NOW, max_skew=86_400, receiver=receiver))
        assert got == hops(data, False) and got[0] == 6
        assert declined._value.get() == before + 1
    # JSON bodies have no bytes to scan: not a decline
    before = metrics.REJECTED.labels("otlp_http", "scan_declined")._value.get()
    hops(data, False, Check(receiver="otlp_http"))
    assert metrics.REJECTED.labels("otlp_http", "scan_declined")._value.get() == before


async def test_the_receivers_hand_the_scanner_the_exports_bytes() -> None:
    # The same declined export through each receiver: counted under its label only if its bytes
    # reached the scanner. A JSON body has none to scan: read through protobuf, not a decline.
    from aiohttp.test_utils import TestClient, TestServer
    from meshaudit.config import ReceiversConfig
    from meshaudit.receivers.grpc_server import OtlpGrpc, Received, _unary
    from meshaudit.receivers.ingest import IngestQueue
    from meshaudit.receivers.otlp.http import OtlpHttp

    sp = trace_pb2.Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, kind=SERVER)
    data = _export_of(wire(sp) + b"\xfb\x07\x08\x01\xfc\x07")  # an unknown group: declined
    queue, namer = IngestQueue(max_entries=1_000), Namer(MeshConfig())
    grpc_declined = metrics.REJECTED.labels("otlp_grpc", "scan_declined")
    http_declined = metrics.REJECTED.labels("otlp_http", "scan_declined")
    before = grpc_declined._value.get(), http_declined._value.get()

    class Context:
        async def abort(self, code: Any, details: str) -> None:
            raise AssertionError(f"{code}: {details}")

        def peer(self) -> str:
            return "ipv4:127.0.0.1:40000"

    answer = await _unary(OtlpGrpc(queue, namer).export_traces)(
        Received(ExportTraceServiceRequest.FromString(data), data), Context()
    )
    assert answer == trace_service_pb2.ExportTraceServiceResponse()
    async with TestClient(TestServer(OtlpHttp(queue, namer, ReceiversConfig()).app())) as client:
        pb = await client.post("/v1/traces", data=data, headers={"Content-Type": "application/x-protobuf"})
        body = {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "01" * 16, "spanId": "02" * 8}]}]}]}
        js = await client.post("/v1/traces", json=body)
        assert (pb.status, js.status) == (200, 200)
    assert (grpc_declined._value.get(), http_declined._value.get()) == (before[0] + 1, before[1] + 1)
    assert queue.entries == 3  # a hop each way: evaluated all the same


# Built once: hypothesis replays the same bytes.
VALID = wire(sdk_export()) + field(1, field(2, b"".join(field(2, wire(sp)) for sp in [
    trace_pb2.Span(
        trace_id=b"\x05" * 16, span_id=b"\x06" * 8, parent_span_id=b"\x07" * 8, kind=CLIENT,
        start_time_unix_nano=9, end_time_unix_nano=99,
        attributes=[
            common_pb2.KeyValue(key=k, value=common_pb2.AnyValue(string_value=v))
            for k, v in [("node_id", "sidecar~10.0.0.7~reviews-v1-5d8f7c9b6-x2kq4.default~default.svc.cluster.local"),
                         ("upstream_cluster", "outbound|9080||ratings.default.svc.cluster.local"),
                         ("guid:x-request-id", "rid-1"), ("http.url", "http://ratings:9080/ratings/1"),
                         ("http.method", "GET"), ("http.status_code", "200")]
        ],
    ),
])))  # fmt: skip


@given(st.data())
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_exports_equal_protobuf_or_are_declined(data: Any) -> None:
    raw = mutated(VALID, data)
    try:
        want = reference(raw)
    except DecodeError:
        return  # upb refuses it: the receiver never scans it
    try:
        got = scanned(raw)
    except ValueError:
        return  # declined: read through protobuf instead
    assert same(got, want)


@given(st.binary(max_size=400))
@settings(max_examples=600, deadline=None)
def test_any_bytes_give_spans_none_or_value_error(raw: bytes) -> None:
    # The receiver scans only what upb parsed; the scanner still stays within the bytes it is given.
    try:
        got = scan.spans(raw)
    except ValueError:
        return
    assert got is None or all(len(r) == 4 and all(len(sp) == 17 for sp in r[3]) for r in got)
