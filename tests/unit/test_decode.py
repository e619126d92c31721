"""Decoders from protobuf bytes, as Envoy sends them: full entries, entries with fields missing
(unset fields are defaults, optional submessages absent), and fuzzed bytes."""

from __future__ import annotations

import time

import orjson
import pytest
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from hypothesis import given, settings
from hypothesis import strategies as st
from infra import als
from meshaudit._proto.envoy.service.accesslog.v3 import als_pb2
from meshaudit._proto.meshaudit.alert.v1 import alert_pb2
from meshaudit.config import Config, MeshConfig
from meshaudit.engine.setup import build_engine
from meshaudit.model import ALS_HTTP, ALS_TCP, INBOUND, ORIGIN_NAMES, OTEL_LOG, OUTBOUND, SPAN, UNKNOWN, Hop
from meshaudit.naming import Namer
from meshaudit.receivers.envoy_als.decode import AlsHop, StreamContext, decode_http
from meshaudit.receivers.otlp.decode import (
    ExportLogsServiceRequest,
    ExportTraceServiceRequest,
    OtlpJsonError,
    decode_logs,
    decode_traces,
    parse_json,
)

NAMER = Namer(MeshConfig())


def _decode(msg: als_pb2.StreamAccessLogsMessage) -> list[Hop]:
    return als.decode(msg, NAMER)


def test_inbound_mtls_entry() -> None:
    e = als.inbound_http(
        "frontend", path="/reviews/1", request_id="rid", traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    )
    [h] = _decode(als.http_message([e], als.identifier("reviews")))
    assert h.direction == INBOUND
    assert (
        h.dst.service == "reviews" and h.dst.namespace == "default" and h.dst.workload == "reviews-v1-5d8f7c9b6-x2kq4"
    )
    assert h.src.principal == "spiffe://cluster.local/ns/default/sa/frontend" and h.src.service == "frontend"
    assert h.tls_version == "TLSv1.3" and h.method == "GET" and h.path == "/reviews/1" and h.status == 200
    assert h.request_id == "rid" and h.trace_id == "a" * 32
    assert h.conn is None  # the certificate names the source: the address is not read (hot path)


def test_outbound_entry_names_destination_from_cluster() -> None:
    e = als.outbound_http("ratings", ns="prod", upstream_local="10.0.0.1:5555")
    [h] = _decode(als.http_message([e], als.identifier("reviews")))
    assert h.direction == OUTBOUND and h.src.service == "reviews"
    assert h.dst.service == "ratings" and h.dst.namespace == "prod"
    assert h.conn is None  # HTTP pairs by request id; the connection key is read for TCP only
    t = als.tcp_entry(cluster="outbound|5432||db.prod.svc.cluster.local", tls=False, upstream_local="10.0.0.1:6")
    [th] = _decode(als.tcp_message([t], als.identifier("reviews")))
    assert th.conn == "10.0.0.1:6" and th.dst.service == "db"


def test_retries_flags_and_details_of_an_outbound_entry() -> None:
    """What the per-edge rules read: status, attempts, flags and details of an outbound entry are
    set at decode (rules read them of every one, and a read of a cold entry cost microseconds);
    an entry without a response has status 0."""
    e = als.outbound_http(
        "ratings", status=503, attempts=3, flags=["UF", "URX"], details="via_upstream", request_id="r1"
    )
    bare = als.outbound_http("ratings", request_id="r2")
    bare.ClearField("response")
    h, h2 = _decode(als.http_message([e, bare], als.identifier("reviews")))
    slot = Hop.__dict__  # the slots themselves: set at decode, before anything asked for them
    assert (slot["status"].__get__(h), slot["attempts"].__get__(h)) == (503, 3)
    assert (slot["response_flags"].__get__(h), slot["response_code_details"].__get__(h)) == ("UF,URX", "via_upstream")
    assert (h.status, h.attempts) == (503, 3)
    assert (h.response_flags, h.response_code_details) == ("UF,URX", "via_upstream")
    assert (h2.status, h2.attempts, h2.response_flags, h2.response_code_details) == (0, 0, "", "")
    i = als.inbound_http("frontend", status=503, details="via_upstream")
    [hi] = _decode(als.http_message([i], als.identifier("ratings")))
    assert (hi.status, hi.attempts, hi.response_code_details) == (503, 0, "via_upstream")


def test_passthrough_is_an_edge_out_of_the_mesh() -> None:
    e = als.http_entry(cluster="PassthroughCluster", authority="api.example.com:443", tls=False)
    [h] = _decode(als.http_message([e], als.identifier("reviews")))
    assert h.direction == OUTBOUND and h.dst.service == "api.example.com" and h.dst.workload == "PassthroughCluster"


def test_entry_with_every_optional_part_missing() -> None:
    msg = als_pb2.StreamAccessLogsMessage()
    msg.identifier.node.id = "envoy-1"
    msg.http_logs.log_entry.add()
    msg.tcp_logs.log_entry.add()  # oneof: replaces http_logs
    [h] = _decode(msg)
    assert h.direction == UNKNOWN and h.tls_version is None and h.conn is None
    assert abs(h.start - time.time()) < 5  # no start_time (0): the receive time instead
    msg2 = als_pb2.StreamAccessLogsMessage()
    msg2.identifier.node.cluster = "plain-envoy"
    msg2.http_logs.log_entry.add()
    [h2] = _decode(msg2)
    assert h2.method == "OTHER" and h2.path is None and h2.status == 0 and h2.observer == "plain-envoy"


def test_plain_envoy_log_name_mapping() -> None:
    namer = Namer(
        MeshConfig.model_validate(
            {
                "clusters": {"edge": {"service": "gateway", "namespace": "infra"}},
                "log_name_direction": {"ingress": "inbound"},
            }
        )
    )
    ctx = StreamContext(namer, "edge-1", "edge", "ingress")
    out: list[Hop] = []
    decode_http([als.http_entry(cluster="backend", tls=False)], ctx, namer, out)
    assert out[0].direction == INBOUND and out[0].dst.service == "gateway" and out[0].dst.namespace == "infra"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzzed_bytes_never_crash_the_decoder(data: bytes) -> None:
    try:
        msg = als_pb2.StreamAccessLogsMessage.FromString(data)
    except DecodeError:
        return
    _decode(msg)


def _reviews_spans(*spans: dict[str, object]) -> bytes:
    """An OTLP/JSON trace export of the service reviews carrying ``spans``."""
    resource = {"attributes": [{"key": "service.name", "value": {"stringValue": "reviews"}}]}
    return orjson.dumps({"resourceSpans": [{"resource": resource, "scopeSpans": [{"spans": list(spans)}]}]})


def test_otlp_json_ids_and_unknown_fields() -> None:
    req = ExportTraceServiceRequest()
    parse_json(
        _reviews_spans(
            {
                "traceId": "5B8EFFF798038103D269B633813FC60C",
                "spanId": "eee19b7ec3c1b174",
                "kind": 2,
                "startTimeUnixNano": "1700000000000000000",
                "futureField": 1,
            }
        ),
        req,
    )
    out: list[Hop] = []
    assert decode_traces(req, NAMER, out) == 1
    assert out[0].trace_id == "5b8efff798038103d269b633813fc60c" and out[0].dst.service == "reviews"
    assert out[0].start == 1_700_000_000.0
    with pytest.raises(OtlpJsonError, match="expected 32 hex digits"):
        parse_json(b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"abcd"}]}]}]}', ExportTraceServiceRequest())


def test_alert_record_matches_the_published_schema() -> None:
    e = build_engine(Config(), Config().policy)
    alerts = e.evaluate(
        _decode(als.http_message([als.inbound_http(None, path="/x", remote="1.2.3.4:5")], als.identifier("reviews"))),
        1.0,
    )
    alerts += e.tick(10.0)
    assert alerts
    for a in alerts:
        record = orjson.loads(a.encode())
        # Unknown fields rejected: the JSON has exactly the schema's fields.
        json_format.ParseDict(record, alert_pb2.Alert(), ignore_unknown_fields=False)
        assert record["emitted_at"].endswith("Z") and len(record["id"]) == 32


def test_an_address_is_named_once_its_pod_ip_is_learned() -> None:
    """A plaintext source seen before its pod's sidecar connected is named after it has."""
    namer = Namer(MeshConfig())
    assert namer.address("10.7.0.5:41000").service is None
    namer.node("sidecar~10.7.0.5~ratings-v1-5d8f7c9b6-x2kq4.prod~prod.svc.cluster.local", "ratings.prod")
    got = namer.address("10.7.0.5:41000")
    assert (got.service, got.namespace, got.address) == ("ratings", "prod", "10.7.0.5:41000")


def _every_origin() -> list[list[Hop]]:
    """One HTTP and one TCP-like hop from each origin, decoded twice (the same bytes each time)."""
    http = als.http_message(
        [als.inbound_http(None, path="/x", request_id="r1", remote="10.0.0.7:41000", start=1_700_000_002.25)],
        als.identifier("reviews"),
    )
    tcp = als.tcp_message(
        [als.tcp_entry(cluster="inbound|5432||", tls=True, peer=als.spiffe("api"), start=1_700_000_001.5)],
        als.identifier("db"),
    )
    traces = ExportTraceServiceRequest()
    parse_json(
        _reviews_spans(
            {
                "traceId": "5b8efff798038103d269b633813fc60c",
                "spanId": "eee19b7ec3c1b174",
                "parentSpanId": "aaa19b7ec3c1b174",
                "kind": 2,
                "startTimeUnixNano": "1700000000000000000",
                "attributes": [
                    {"key": "http.request.method", "value": {"stringValue": "GET"}},
                    {"key": "url.path", "value": {"stringValue": "/y"}},
                ],
            }
        ),
        traces,
    )
    logs = ExportLogsServiceRequest()
    parse_json(
        orjson.dumps(
            {
                "resourceLogs": [
                    {
                        "resource": {"attributes": [{"key": "node_name", "value": {"stringValue": "reviews-1"}}]},
                        "scopeLogs": [
                            {
                                "logRecords": [
                                    {
                                        "timeUnixNano": "1700000003000000000",
                                        "traceId": "5b8efff798038103d269b633813fc60c",
                                        "attributes": [
                                            {"key": "upstream_cluster", "value": {"stringValue": "inbound|9080||"}},
                                            {"key": "url.path", "value": {"stringValue": "/z"}},
                                            {"key": "http.request.method", "value": {"stringValue": "POST"}},
                                        ],
                                    }
                                ]
                            }
                        ],
                    }
                ]
            }
        ),
        logs,
    )
    out: list[list[Hop]] = []
    for _ in range(2):
        hops = [*_decode(http), *_decode(tcp)]
        decode_traces(traces, NAMER, hops)
        decode_logs(logs, NAMER, hops)
        out.append(hops)
    return out


def _is_set(h: Hop, name: str) -> bool:
    try:
        Hop.__dict__[name].__get__(h, Hop)  # the slot itself, not through __getattr__
    except AttributeError:
        return False
    return True


def test_hops_kept_past_their_batch_let_their_message_go_and_read_the_same() -> None:
    """A parked hop lets its message go (detach): it refers to no protobuf object of the message
    it came in (an access-log entry's hop keeps its own entry's bytes), and every field of a
    detached hop, of every origin, reads what the undetached twin reads."""
    lazy, detached = _every_origin()
    assert sorted(h.origin for h in detached) == [ALS_HTTP, ALS_TCP, OTEL_LOG, SPAN]
    for h in detached:
        h.detach()
        kept = [Hop.__dict__[n].__get__(h, Hop) for n in Hop.__slots__ if _is_set(h, n)]
        kept += [h._e] if isinstance(h, AlsHop) else []
        assert not any(isinstance(v, Message) for v in kept), ORIGIN_NAMES[h.origin]
    slots = [s for s in Hop.__slots__ if not s.startswith("_")]
    for twin, h in zip(lazy, detached, strict=True):
        for name in slots:
            assert getattr(h, name) == getattr(twin, name), (ORIGIN_NAMES[h.origin], name)
    http, tcp, span, log = detached
    assert (http.start, http.conn, http.status, http.method, http.path) == (
        1_700_000_002.25,
        "10.0.0.7:41000",
        200,
        "GET",
        "/x",
    )
    assert (tcp.start, tcp.status, tcp.method, tcp.peer_principal, tcp.tls_version) == (
        1_700_000_001.5,
        0,
        None,
        als.spiffe("api"),
        "TLSv1.3",
    )
    assert (span.start, span.parent_span_id, span.path) == (1_700_000_000.0, "aaa19b7ec3c1b174", "/y")
    assert (log.start, log.method, log.path) == (1_700_000_003.0, "POST", "/z")


def test_a_plaintext_tcp_connection_waiting_for_its_client_alerts() -> None:
    """Decoded TCP entries through the engine, inbound first: the inbound waits for the client
    sidecar's entry, then alerts named by it; with no client entry it alerts with the address."""
    e = build_engine(Config(), Config().policy)
    [inb] = _decode(als.tcp_message([als.tcp_entry(cluster="inbound|5432||", tls=False)], als.identifier("db")))
    assert e.evaluate([inb], 1_700_000_000.0) == []
    assert [a.rule for a in e.tick(1_700_000_010.0)] == ["plaintext_hop"]
    inb2 = _decode(als.tcp_message([als.tcp_entry(cluster="inbound|5432||", tls=False)], als.identifier("db")))
    out = _decode(
        als.tcp_message(
            [
                als.tcp_entry(
                    cluster="outbound|5432||db.default.svc.cluster.local", tls=False, upstream_local="10.0.0.9:40000"
                )
            ],
            als.identifier("reviews"),
        )
    )
    e2 = build_engine(Config(), Config().policy)
    assert e2.evaluate(inb2, 1_700_000_000.0) == []
    got = e2.evaluate(out, 1_700_000_000.5)
    assert [a.rule for a in got] == ["plaintext_hop"] and got[0].source.key == "reviews.default"


@pytest.mark.parametrize("start", [1e12, -1e12, 2**62, 0])
def test_a_start_time_out_of_range_is_the_receive_time_and_counted(start: float) -> None:
    from meshaudit import metrics

    counted = metrics.REJECTED.labels("envoy_als", "clamped_time")
    before = counted._value.get()
    e = als.inbound_http("frontend", path="/reviews/1")
    e.common_properties.start_time.seconds = int(start)
    [h] = _decode(als.http_message([e], als.identifier("reviews")))
    t0 = time.time()
    assert t0 - 5 < h.start <= t0 + 1
    assert counted._value.get() == before + 1
    # within range: kept as sent, not counted
    ok = als.inbound_http("frontend", path="/reviews/1", start=t0 - 86_400 * 30)
    [h2] = _decode(als.http_message([ok], als.identifier("reviews")))
    assert h2.start == pytest.approx(t0 - 86_400 * 30, abs=1e-3)
    assert counted._value.get() == before + 1


def test_an_unnamed_ipv6_source_is_its_address_whatever_its_port() -> None:
    """IPv6 sockets are bracketed, so the ephemeral port never becomes part of the party."""
    hops = [
        h
        for port in (41000, 41001)
        for h in _decode(
            als.http_message([als.inbound_http(None, path="/x", remote=f"fd00::7:{port}")], als.identifier("reviews"))
        )
    ]
    assert [h.conn for h in hops] == ["[fd00::7]:41000", "[fd00::7]:41001"]
    assert {h.src.key for h in hops} == {"fd00::7"}


def test_a_local_reply_to_an_mtls_peer_is_the_inbound_side() -> None:
    """An RBAC denial (or no route, or a direct response) has no upstream cluster; a downstream
    that presented a mesh certificate makes it the destination sidecar's inbound entry."""
    denied = als.http_entry(
        cluster="",
        peer=als.spiffe("checkout"),
        status=403,
        details="rbac_access_denied_matched_policy[ns[default]-policy[deny-internal]-rule[0]]",
    )
    [h] = _decode(als.http_message([denied], als.identifier("catalog")))
    assert h.direction == INBOUND
    assert (h.src.key, h.dst.key) == ("checkout.default", "catalog.default")
    app = als.http_entry(cluster="", tls=False, status=404)  # plaintext: cannot tell, stays unknown
    [u] = _decode(als.http_message([app], als.identifier("catalog")))
    assert u.direction == UNKNOWN
