"""The hop wire format of the distributed mode (meshaudit.wire.hops): hops made by the real
decoders from real Envoy access logs, OpenTelemetry SDK spans and OTLP log records come back
with every field the rules read, the engine raises the same alerts on them, every piece of
evidence about one request gets one Kafka key, and hostile bytes are a clear error."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from infra import als
from infra.mutate import mutated
from infra.otlp import client_span, server_span
from meshaudit._proto.envoy.data.accesslog.v3 import accesslog_pb2
from meshaudit._proto.meshaudit.hops.v1 import hops_pb2
from meshaudit.config import MeshConfig
from meshaudit.model import (
    ALS_HTTP,
    ALS_TCP,
    INBOUND,
    ORIGIN_NAMES,
    OTEL_LOG,
    OUTBOUND,
    SPAN,
    Alert,
    Hop,
    Identity,
    identity,
)
from meshaudit.naming import Namer
from meshaudit.receivers.envoy_als import decode as als_decode
from meshaudit.receivers.envoy_als.decode import AlsHop, AlsTcpHop
from meshaudit.receivers.otlp.decode import (
    ExportLogsServiceRequest,
    ExportTraceServiceRequest,
    decode_logs,
    decode_traces,
)
from meshaudit.wire import hops as wire
from meshaudit.wire.hops import (
    WireError,
    correlation_key,
    decode,
    decode_split,
    encode,
    evidence_copy,
    evidence_key,
)
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_engine import engine

NAMER = Namer(MeshConfig())
# Entries' times: the ALS decoder trusts a start time within a day of the time it reads it.
T0 = float(int(time.time()))
SLOTS = Hop.__slots__
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"

# Hop slots the wire format deliberately does not carry, each with the reason. A slot added to
# Hop must be carried (a column in proto/meshaudit/hops/v1/hops.proto and in wire/hops.py) or
# listed here, or test_every_hop_slot_is_a_column fails.
OMITTED: dict[str, str] = {}


# --- hops from the real decoders ------------------------------------------------------------
def als_http_hops() -> list[Hop]:
    """What an Istio sidecar logs: mTLS with the evidence rules read lazily (peer metadata,
    x-forwarded-client-cert, user agent, times), plaintext, an RBAC denial, weak TLS, and the
    client sidecar's entries (retries, a traceparent read lazily)."""
    full = als.inbound_http(
        "frontend",
        path="/reviews/1",
        request_id="rid-1",
        traceparent=TRACEPARENT,
        local=als.spiffe("reviews"),
        start=T0 - 0.25,
        duration_ms=12.5,
        flags=["UF"],
        details="via_upstream",
        route_name="reviews-route",
        attempts=2,
    )
    full.request.user_agent = "curl/8.5"
    full.request.request_headers[als_decode.XFCC_HEADER] = (
        f'By={als.spiffe("reviews")};Hash=abc;Subject="CN=a,O=b";URI={als.spiffe("frontend")}'
    )
    als.peer_metadata(full, workload="frontend-v1", namespace="default", service="frontend", identity="frontend")
    als.peer_metadata(full, "upstream_peer", workload="reviews-v1", namespace="default", service="reviews")
    plaintext = als.inbound_http(None, path="/reviews/2", request_id="rid-2", remote="10.0.0.7:41000", start=T0)
    denied = als.inbound_http(
        "ratings",
        path="/reviews/3",
        request_id="rid-3",
        status=403,
        details="rbac_access_denied_matched_policy[ns[default]-policy[deny]-rule[0]]",
        start=T0,
    )
    weak = als.weaken_tls(
        als.inbound_http("frontend", path="/reviews/4", request_id="rid-4", start=T0),
        accesslog_pb2.TLSProperties.TLSv1_2,
        0xC009,
    )
    inbound = als.decode(als.http_message([full, plaintext, denied, weak], als.identifier("reviews")), NAMER)
    out1 = als.outbound_http(
        "reviews", request_id="rid-1", traceparent=TRACEPARENT, attempts=3, flags=["URX"], status=503, start=T0
    )
    out2 = als.outbound_http("reviews", request_id="rid-2", upstream_local="10.0.0.7:41000", start=T0)
    outbound = als.decode(als.http_message([out1, out2], als.identifier("frontend")), NAMER)
    return inbound + outbound


def als_tcp_hops() -> list[Hop]:
    """Both sidecars' entries of one plaintext TCP connection (the server's closed by RBAC)."""
    server = als.tcp_entry(
        cluster="inbound|5432||",
        tls=False,
        remote="10.0.0.8:50000",
        start=T0,
        termination="rbac_access_denied_matched_policy[ns[default]-policy[db]-rule[0]]",
        flags=["UAEX"],
    )
    client = als.tcp_entry(
        cluster="outbound|5432||db.default.svc.cluster.local", tls=False, upstream_local="10.0.0.8:50000", start=T0
    )
    return als.decode(als.tcp_message([server], als.identifier("db")), NAMER) + als.decode(
        als.tcp_message([client], als.identifier("reviews")), NAMER
    )


def span_hops() -> list[Hop]:
    """Spans of two applications traced by the OpenTelemetry SDK, and a sidecar's span as
    Envoy's OpenTelemetry tracer tags it, through OTLP protobuf bytes."""
    server, client = InMemorySpanExporter(), InMemorySpanExporter()  # each is shut down with its app's provider
    server_span(server, "reviews", "/reviews/9")
    client_span(client, "frontend", "reviews.default.svc.cluster.local", "rid-9")
    req = encode_spans([*server.get_finished_spans(), *client.get_finished_spans()])
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name", value=common_pb2.AnyValue(string_value="reviews.default"))
    sp = rs.scope_spans.add().spans.add(
        trace_id=bytes.fromhex(TRACE),
        span_id=bytes.fromhex("00f067aa0ba902b7"),
        parent_span_id=bytes.fromhex("a3ce929d0e0e4736"),
        kind=2,
        start_time_unix_nano=int(T0 * 1e9),
        end_time_unix_nano=int(T0 * 1e9) + 3_500_000,
    )
    for key, value in (
        ("node_id", als.node_id("reviews")),
        ("upstream_cluster", "inbound|9080||"),
        ("guid:x-request-id", "rid-1"),
        ("http.url", "http://reviews:9080/reviews/1?x=1"),
        ("http.method", "GET"),
        ("peer.address", "10.0.0.9"),
        ("user_agent.original", "Go-http-client/1.1"),
    ):
        sp.attributes.add(key=key, value=common_pb2.AnyValue(string_value=value))
    sp.attributes.add(key="http.status_code", value=common_pb2.AnyValue(int_value=200))
    view = ExportTraceServiceRequest.FromString(req.SerializeToString())
    out: list[Hop] = []
    assert decode_traces(view, NAMER, out) == 3
    return out


def log_hops() -> list[Hop]:
    """Envoy's OpenTelemetry access logger: an inbound record with TLS, and an outbound one."""
    req = logs_service_pb2.ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    for key, value in (("node_name", als.node_id("ratings")), ("cluster_name", "ratings.default")):
        rl.resource.attributes.add(key=key, value=common_pb2.AnyValue(string_value=value))
    records = rl.scope_logs.add().log_records
    inbound = records.add(
        time_unix_nano=int(T0 * 1e9), trace_id=bytes.fromhex(TRACE), span_id=bytes.fromhex("00f067aa0ba902b7")
    )
    outbound = records.add(time_unix_nano=int(T0 * 1e9) + 1000)
    for record, attrs in (
        (
            inbound,
            {
                "upstream_cluster": "inbound|9080||",
                "downstream_tls_version": "TLSv1.2",
                "downstream_tls_cipher": "ECDHE-RSA-AES128-SHA",
                "downstream_peer_uri_san": als.spiffe("reviews"),
                "downstream_remote_address": "10.0.0.11:43000",
                "http.request.method": "GET",
                "url.path": "/ratings/1",
                "authority": "ratings:9080",
                "x-request-id": "rid-5",
                "response_flags": "-",
                "response_code_details": "via_upstream",
                "route_name": "default",
                "user_agent.original": "python-requests/2.32",
                "duration": "17",
            },
        ),
        (
            outbound,
            {
                "upstream_cluster": "outbound|9080||details.default.svc.cluster.local",
                "upstream_local_address": "10.0.0.12:51000",
                "method": "POST",
                "path": "/details/2",
                "response_flags": "URX",
                "upstream_request_attempt_count": "4",
            },
        ),
    ):
        for key, value in attrs.items():
            record.attributes.add(key=key, value=common_pb2.AnyValue(string_value=value))
    outbound.attributes.add(key="response_code", value=common_pb2.AnyValue(int_value=503))
    view = ExportLogsServiceRequest.FromString(req.SerializeToString())
    out: list[Hop] = []
    assert decode_logs(view, NAMER, out) == 2
    return out


def _is_set(h: Hop, name: str) -> bool:
    try:
        Hop.__dict__[name].__get__(h, Hop)  # the slot itself, not through a lazy read
    except AttributeError:
        return False
    return True


def assert_same(originals: list[Hop], decoded: list[Hop]) -> None:
    """Every field reads the same; access-log hops stay access-log hops of their kind (fields read
    from the entry), others are plain Hops; parties are the interned identities."""
    assert len(decoded) == len(originals)
    for h, g in zip(originals, decoded, strict=True):
        for name in SLOTS:
            assert getattr(g, name) == getattr(h, name), (ORIGIN_NAMES[h.origin], name)
        if isinstance(h, AlsHop):  # an access-log hop (decoded from its entry, or sent): HTTP or TCP still
            assert isinstance(g, AlsHop) and isinstance(g, AlsTcpHop) == isinstance(h, AlsTcpHop)
        else:
            assert type(g) is Hop
        # Parties are Identities equal to the interned ones (interning is an optimisation only:
        # the intern table may be cleared between two reads, and a decoder's own cache keeps
        # the older object, so ``is`` cannot be required; model.py says the same).
        for name in ("observer_service", "src", "dst", "downstream_peer", "upstream_peer"):
            p = getattr(g, name)
            if p is not None:
                assert type(p) is Identity
                assert p == identity(p.service, p.namespace, p.workload, p.principal, p.address), name


# --- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [als_http_hops, als_tcp_hops, span_hops, log_hops])
def test_every_field_of_decoded_hops_reads_as_the_original(make: Any) -> None:
    originals = make()
    assert_same(originals, decode(encode(originals)))


def test_a_mixed_batch_and_every_field_read_at_the_receiver() -> None:
    """One batch of every origin, in both forms an access-log hop can travel: with its Envoy
    entry (the default) and with every field read at the receiver (plain Hops)."""
    originals = als_http_hops() + span_hops() + als_tcp_hops() + log_hops()
    assert {h.origin for h in originals} == {ALS_HTTP, ALS_TCP, SPAN, OTEL_LOG}
    assert_same(originals, decode(encode(originals)))
    flat = decode(encode(originals, entries=False))
    assert {type(h) for h in flat} == {Hop}
    for h, g in zip(originals, flat, strict=True):
        assert [getattr(g, n) for n in SLOTS] == [getattr(h, n) for n in SLOTS], ORIGIN_NAMES[h.origin]


def test_the_fields_the_decoders_fill_are_the_ones_the_rules_see() -> None:
    """The decoded values themselves, not only their equality with the originals'."""
    full, plaintext, denied, weak, out1, _ = decode(encode(als_http_hops()))
    assert (full.src.service, full.dst.service, full.trace_id, full.request_id) == (
        "frontend",
        "reviews",
        TRACE,
        "rid-1",
    )
    assert (full.xfcc_uri, full.xfcc_by, full.user_agent) == (als.spiffe("frontend"), als.spiffe("reviews"), "curl/8.5")
    assert full.downstream_peer == identity("frontend", "default", "frontend-v1", "frontend", None)
    assert (full.start, full.duration_ms, full.route_name, full.attempts) == (T0 - 0.25, 12.5, "reviews-route", 2)
    assert (full.tls_version, full.tls_cipher, full.local_principal) == ("TLSv1.3", 0x1301, als.spiffe("reviews"))
    assert (plaintext.tls_version, plaintext.conn, plaintext.src.address) == (None, "10.0.0.7:41000", "10.0.0.7")
    assert denied.status == 403 and denied.response_code_details.startswith("rbac_access_denied")
    assert (weak.tls_version, weak.tls_cipher) == ("TLSv1.2", 0xC009)
    assert (out1.direction, out1.attempts, out1.response_flags, out1.trace_id) == (OUTBOUND, 3, "URX", TRACE)
    server, client = decode(encode(als_tcp_hops()))
    assert (server.direction, server.method, server.conn) == (INBOUND, None, "10.0.0.8:50000")
    assert server.connection_termination_details.startswith("rbac_access_denied")
    assert (client.direction, client.dst.service, client.conn) == (OUTBOUND, "db", "10.0.0.8:50000")
    *_, envoy_span = decode(encode(span_hops()))
    assert (envoy_span.span_id, envoy_span.parent_span_id, envoy_span.span_kind) == (
        "00f067aa0ba902b7",
        "a3ce929d0e0e4736",
        2,
    )
    assert (envoy_span.path, envoy_span.duration_ms, envoy_span.source_address) == ("/reviews/1?x=1", 3.5, "10.0.0.9")
    log_in, log_out = decode(encode(log_hops()))
    assert (log_in.tls_cipher, log_in.duration_ms, log_in.response_flags) == (0xC013, 17.0, "")
    assert (log_out.status, log_out.attempts, log_out.conn) == (503, 4, "10.0.0.12:51000")


def test_the_receiver_reads_no_lazy_field_and_the_evaluator_reads_them_from_the_entry() -> None:
    """An access-log hop's lazy fields are not read to encode it (but the trace id, its Kafka
    key); decoded, they are read from the entry on first use, as in one process."""
    originals = als_http_hops() + als_tcp_hops()

    def lazy_set() -> list[list[str]]:
        return [[n for n in wire.ALS_LAZY if _is_set(h, n)] for h in originals]

    # decoding set none but the times (the service graph reads every entry's duration) and how it
    # ended (its flags, and an HTTP entry's details or a TCP entry's termination details: the rules
    # that judge a request by its end read them), all scanned with the eager fields
    scanned = {"start", "duration_ms", "response_flags"}
    http = scanned | {"response_code_details"}
    tcp = scanned | {"connection_termination_details"}
    want = [[n for n in wire.ALS_LAZY if n in (http if h.origin == ALS_HTTP else tcp)] for h in originals]
    assert lazy_set() == want
    batch = encode(originals)
    assert lazy_set() == want
    decoded = decode(batch)
    assert not any(_is_set(g, "route_name") for g in decoded)
    assert [g.route_name for g in decoded] == [h.route_name for h in originals]


def test_detached_hops_travel_with_their_own_entry() -> None:
    """A hop a rule parked (detached: its entry kept as bytes) encodes from those bytes."""
    originals = als_http_hops() + als_tcp_hops()
    twins = als_http_hops() + als_tcp_hops()
    for h in originals:
        h.detach()
    assert_same(twins, decode(encode(originals)))


def test_decoded_hops_detach_like_the_receivers() -> None:
    decoded = decode(encode(als_http_hops()))
    for g in decoded:
        g.detach()
    assert_same(als_http_hops(), decoded)


def test_ids_that_are_not_lowercase_hex_travel_as_text() -> None:
    """A traceparent's trace id is what the header says, hex or not: it comes back as sent."""
    odd = als.inbound_http("frontend", traceparent="00-" + "Z" * 32 + "-00f067aa0ba902b7-01", start=T0)
    hops = als.decode(als.http_message([odd], als.identifier("reviews")), NAMER) + span_hops()
    assert hops[0].trace_id == "z" * 32
    assert_same(hops, decode(encode(hops)))
    assert not hops_pb2.HopBatch.FromString(encode(hops)).hex_ids
    assert hops_pb2.HopBatch.FromString(encode(span_hops())).hex_ids  # the usual case: raw bytes


def test_an_empty_batch() -> None:
    assert decode(encode([])) == []


# --- the schema carries every slot ------------------------------------------------------------
def test_every_hop_slot_is_a_column() -> None:
    """Fails when Hop gains a slot the wire format does not carry (add a column to hops.proto
    and to wire/hops.py, or list it in OMITTED with the reason)."""
    columns = {f.name for f in hops_pb2.HopBatch.DESCRIPTOR.fields if 10 <= f.number < 50}
    assert set(SLOTS) - set(OMITTED) == columns
    assert set(wire.COLUMNS) == columns and len(wire.COLUMNS) == len(columns)
    kinds = (wire.STRINGS, wire.TEXTS, wire.IDS, wire.PARTIES, wire.PEERS, wire.SMALL_INTS, wire.INTS)
    typed = [n for kind in kinds for n in kind] + ["start", "duration_ms", "tls_cipher"]
    assert sorted(typed) == sorted(columns)  # each column has exactly one kind


def test_every_field_an_access_log_hop_leaves_to_the_evaluator_is_lazy_in_the_receiver() -> None:
    """A decoded access-log hop reads what its columns do not carry from its entry: the ALS
    decoder must read each such field lazily, for HTTP and TCP entries alike."""
    for name in (*wire.ALS_LAZY, "attempts"):
        assert name in als_decode._LAZY_HTTP and name in als_decode._LAZY_TCP, name
    assert set(wire.ALS_COLUMNS) | set(wire.ALS_LAZY) == set(SLOTS)


# --- the engine ------------------------------------------------------------------------------
def _alerts(hops: list[Hop]) -> list[dict[str, Any]]:
    e = engine()
    alerts: list[Alert] = e.evaluate(hops, T0)
    for dt in (1, 5, 30, 120):
        alerts += e.tick(T0 + dt)
    return [a.to_json() for a in alerts]


def test_the_engine_raises_the_same_alerts_on_decoded_hops() -> None:
    originals = als_http_hops() + als_tcp_hops() + span_hops() + log_hops()
    batch = encode(originals)
    want = _alerts(originals)
    assert len({a["rule"] for a in want}) >= 5, sorted(a["rule"] for a in want)
    assert _alerts(decode(batch)) == want
    assert _alerts(decode(encode(originals, entries=False))) == want


# --- the Kafka key ----------------------------------------------------------------------------
def test_every_piece_of_evidence_about_one_request_gets_one_key() -> None:
    full, plaintext, _, _, out1, out2 = als_http_hops()
    app_server, app_client, envoy_span = span_hops()
    log_in, _ = log_hops()
    # The request id: both sidecars' entries, traced or not, and the sidecar's span (its tag).
    assert correlation_key(full) == correlation_key(out1) == correlation_key(envoy_span) == b"rid-1"
    assert correlation_key(plaintext) == correlation_key(out2) == b"rid-2"
    assert correlation_key(log_in) == b"rid-5"
    # An application's span without a request id: its trace id, where the entries of the trace
    # it is joined to are copied (an inbound entry that logged the trace; a client span).
    assert app_server.request_id is None and app_server.trace_id
    assert correlation_key(app_server) == app_server.trace_id.encode()
    assert evidence_key(full) == evidence_key(log_in) == TRACE.encode()
    assert evidence_key(out1) is None and evidence_key(envoy_span) is None and evidence_key(plaintext) is None
    assert app_client.request_id == "rid-9" and app_client.trace_id
    assert evidence_key(app_client) == app_client.trace_id.encode()
    # TCP: the client socket both sidecars log.
    server, client = als_tcp_hops()
    assert correlation_key(server) == correlation_key(client) == b"10.0.0.8:50000"
    assert evidence_key(server) is None
    # Nothing at all: the observer.
    bare = Hop(ALS_HTTP, "sidecar~1", identity("a"), INBOUND, identity(), identity("a"), T0)
    assert correlation_key(bare) == b"sidecar~1"


def test_evidence_copies_travel_at_the_end_of_a_batch_with_what_their_joins_read() -> None:
    full, *_ = als_http_hops()
    _, app_client, _ = span_hops()
    copies = [evidence_copy(full), evidence_copy(app_client)]
    hops, n = decode_split(encode([full, *copies], evidence=2))
    assert n == 2 and len(hops) == 3 and len(decode(encode([full, *copies], evidence=2))) == 3
    log_copy, span_copy = hops[1:]
    assert (log_copy.trace_id, log_copy.observer_service, log_copy.direction, log_copy.src) == (
        TRACE, full.observer_service, full.direction, full.src,
    )  # fmt: skip
    assert log_copy.request_id is None and log_copy.start == 0.0  # no join reads it: not read at the receiver
    assert (span_copy.span_id, span_copy.span_kind, span_copy.trace_id) == (
        app_client.span_id, app_client.span_kind, app_client.trace_id,
    )  # fmt: skip
    with pytest.raises(ValueError):
        encode([full], evidence=2)
    forged = hops_pb2.HopBatch.FromString(encode([full]))
    forged.evidence = 5
    with pytest.raises(WireError, match="evidence"):
        decode(forged.SerializeToString())


def test_an_outsized_request_id_is_keyed_by_its_digest() -> None:
    def key(rid: str) -> bytes:
        return correlation_key(Hop(ALS_HTTP, "o", identity(), INBOUND, identity(), identity(), T0, request_id=rid))

    big = key("x" * 10_000)
    assert big.startswith(b"#") and len(big) == 17 and big == key("x" * 10_000) and big != key("x" * 10_001)
    assert key("r" * wire.MAX_KEY_BYTES) == b"r" * wire.MAX_KEY_BYTES


# --- any hop of the model's types -------------------------------------------------------------
_text = st.none() | st.text(max_size=12)
_ids = st.none() | st.sampled_from(["", TRACE, "00f067aa0ba902b7", "ABCDEF", "abc", "z" * 32]) | st.text(max_size=8)
_parties = st.builds(identity, _text, _text, _text, _text, _text)
_any_int = st.integers(min_value=-(2**70), max_value=2**70)


def _saturate(v: int, lo: int = -(2**63), hi: int = 2**63 - 1) -> int:
    return min(max(v, lo), hi)


@st.composite
def hops(draw: Any) -> Hop:
    return Hop(
        draw(st.integers(0, 2**32 - 1)),
        draw(st.text(max_size=12)),
        draw(_parties),
        draw(st.integers(0, 2**32 - 1)),
        draw(_parties),
        draw(_parties),
        draw(st.floats(allow_nan=False)),
        tls_version=draw(_text),
        tls_cipher=draw(st.none() | st.integers(0, 2**64 - 2)),
        peer_principal=draw(_text),
        local_principal=draw(_text),
        method=draw(_text),
        authority=draw(_text),
        path=draw(_text),
        status=draw(_any_int),
        response_flags=draw(st.text(max_size=12)),
        response_code_details=draw(st.text(max_size=12)),
        route_name=draw(st.text(max_size=12)),
        upstream_cluster=draw(st.text(max_size=12)),
        attempts=draw(_any_int),
        trace_id=draw(_ids),
        span_id=draw(_ids),
        parent_span_id=draw(_ids),
        request_id=draw(_text),
        span_kind=draw(_any_int),
        conn=draw(_text),
        connection_termination_details=draw(st.text(max_size=12)),
        downstream_peer=draw(st.none() | _parties),
        upstream_peer=draw(st.none() | _parties),
        xfcc_uri=draw(_text),
        xfcc_by=draw(_text),
        user_agent=draw(_text),
        source_address=draw(_text),
        duration_ms=draw(st.none() | st.floats(allow_nan=False)),
    )


@settings(max_examples=100, deadline=None)
@given(st.lists(hops(), max_size=6))
def test_any_hop_comes_back_with_its_values(originals: list[Hop]) -> None:
    """Integers beyond int64 (a sender's absurd status) come back saturated, which keeps how
    they compare with any real status or count."""
    decoded = decode(encode(originals))
    for h, g in zip(originals, decoded, strict=True):
        for name in SLOTS:
            want = getattr(h, name)
            if name in wire.INTS:
                want = _saturate(want)
            assert getattr(g, name) == want, name


def test_a_nan_duration_comes_back_unknown() -> None:
    h = Hop(SPAN, "span:a", identity("a"), INBOUND, identity(), identity("a"), T0, duration_ms=math.nan)
    [g] = decode(encode([h]))
    assert g.duration_ms is None


def test_a_batch_is_bounded_on_the_way_out() -> None:
    h = Hop(SPAN, "span:a", identity("a"), INBOUND, identity(), identity("a"), T0)
    with pytest.raises(ValueError, match="at most"):
        encode([h] * (wire.MAX_HOPS + 1))


# --- hostile input ----------------------------------------------------------------------------
_TYPES: dict[str, tuple[type, ...]] = {
    **{n: (str, type(None)) for n in (*wire.STRINGS, *wire.IDS)},
    **{n: (str,) for n in wire.TEXTS},
    **{n: (Identity,) for n in wire.PARTIES},
    **{n: (Identity, type(None)) for n in wire.PEERS},
    **{n: (int,) for n in (*wire.SMALL_INTS, *wire.INTS)},
    "start": (float,),
    "duration_ms": (float, type(None)),
    "tls_cipher": (int, type(None)),
}


def _check_decoded(data: bytes) -> None:
    """Either a clear WireError, or hops whose every field has the model's type and reads
    without raising (an access-log hop's lazy fields from its entry)."""
    try:
        decoded = decode(data)
    except WireError:
        return
    for g in decoded:
        for name in SLOTS:
            value = getattr(g, name)
            if type(g) is Hop or name in wire.ALS_COLUMNS:
                assert isinstance(value, _TYPES[name]), (name, value)


def _valid() -> bytes:
    return encode(als_http_hops()[:2] + als_tcp_hops()[:1] + span_hops()[2:] + log_hops()[:1])


VALID = _valid()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_are_a_wire_error_or_well_typed_hops(data: bytes) -> None:
    _check_decoded(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_batches_are_a_wire_error_or_well_typed_hops(data: Any) -> None:
    _check_decoded(mutated(VALID, data))


def _batch(**fields: Any) -> bytes:
    b = hops_pb2.HopBatch.FromString(VALID)
    for name, value in fields.items():
        field = getattr(b, name)
        if isinstance(value, list):
            del field[:]
            field.extend(value)
        else:
            setattr(b, name, value)
    return bytes(b.SerializeToString())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"path": [99_999] * 5}, "past the end"),
        ({"src": [1, 2]}, "column src has 2 values for 5 hops"),
        ({"count": wire.MAX_HOPS + 1}, "at most"),
        ({"origin": [SPAN] * 5}, "an Envoy entry on a hop of origin 4"),
        ({"entry": [1, 9, 1, 0, 0]}, "past the end"),
        ({"hex_id_sizes": [1000]}, "hex_id_sizes add up to 1000 bytes"),
        ({"count": 0}, "8 parties for 0 hops"),
    ],
)
def test_invalid_batches_are_a_clear_error(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode(_batch(**fields))


def test_bytes_that_are_no_batch_and_oversized_input_are_refused() -> None:
    with pytest.raises(WireError, match="not a hop batch"):
        decode(b"\xff\xff\xff")
    with pytest.raises(WireError, match="bytes; at most"):
        decode(b"\x00" * (wire.MAX_BATCH_BYTES + 1))
    bad = hops_pb2.HopBatch.FromString(VALID)
    bad.parties.service.append(1)
    with pytest.raises(WireError, match="parties' columns differ"):
        decode(bad.SerializeToString())
