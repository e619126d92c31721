"""The receiver role (``meshaudit run --role receiver``) against a real Tansu broker: real ALS
streams and OTel SDK spans go in, HopBatch records come out that a real aiokafka consumer reads
and ``wire.decode`` turns back into the same hops, every piece of evidence about one request in
one partition; with the broker frozen, the receiver pushes back (ALS dropped and counted, OTLP
told to retry), holds no more than its bounds, stays ready, and produces again by itself once the
broker answers."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from infra import als
from infra.brokers import Tansu
from infra.daemon import Daemon, free_port, running
from infra.otlp import server_span
from meshaudit.config import MeshConfig
from meshaudit.model import ALS_HTTP, INBOUND, SPAN, Hop
from meshaudit.naming import Namer
from meshaudit.wire.hops import COLUMNS, correlation_key, decode_split
from meshaudit.wire.partition import partition
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

pytestmark = pytest.mark.distributed

PARTITIONS = 4
RECEIVER = ("--role", "receiver")
TRACES_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _config(bootstrap: str, topic: str, **distributed: Any) -> dict[str, Any]:
    return {
        "distributed": {
            "bootstrap_servers": [bootstrap],
            "hops_topic": topic,
            "create_topic": True,
            "partitions": PARTITIONS,
            **distributed,
        }
    }


async def _consume(
    bootstrap: str,
    topic: str,
    done: Callable[[list[tuple[int, Hop]]], bool],
    timeout: float = 20,
    copies: list[tuple[int, Hop]] | None = None,
) -> list[tuple[int, Hop]]:
    """(partition, hop) of every record on ``topic`` from the start, until ``done`` says so;
    evidence copies go to ``copies``."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    got: list[tuple[int, Hop]] = []
    try:
        deadline = time.monotonic() + timeout
        while not done(got) and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=300)).items():
                for r in records:
                    assert r.value is not None
                    hops, n = decode_split(r.value)
                    got.extend((tp.partition, h) for h in hops[: len(hops) - n])
                    if copies is not None:
                        copies.extend((tp.partition, h) for h in hops[len(hops) - n :])
    finally:
        await consumer.stop()
    return got


def _row(h: Hop) -> tuple[Any, ...]:
    return tuple(getattr(h, c) for c in COLUMNS)


@pytest.fixture
def receiver(tmp_path: Path, tansu: Tansu) -> Iterator[tuple[Daemon, str]]:
    topic = f"hops-{uuid.uuid4().hex[:8]}"
    with running(tmp_path, _config(tansu.bootstrap, topic), "receiver", RECEIVER) as d:
        yield d, topic


async def test_hops_reach_kafka_as_they_were_decoded_each_request_in_one_partition(
    receiver: tuple[Daemon, str], tansu: Tansu
) -> None:
    d, topic = receiver
    outbound, inbound, traces = [], [], []
    for i in range(12):
        exporter = OTLPSpanExporter(endpoint=d.grpc, insecure=True)  # the span's provider shuts it down
        trace_id, traceparent = server_span(exporter, "reviews", f"/reviews/{i}")
        traces.append(trace_id)
        rid = str(uuid.uuid4())
        kw = {"path": f"/reviews/{i}", "request_id": rid, "traceparent": traceparent}
        outbound.append(als.outbound_http("reviews", **kw))
        inbound.append(als.inbound_http("frontend", **kw))
    # A TCP connection logged by both sidecars: no trace, no request id, one client socket.
    tcp_out = als.tcp_entry(cluster="outbound|5432||db.default.svc.cluster.local", upstream_local="10.0.0.1:41000")
    tcp_in = als.tcp_entry(cluster="inbound|5432||", peer=als.spiffe("frontend"), remote="10.0.0.1:41000")
    streams = {"frontend": (outbound, tcp_out), "reviews": (inbound, tcp_in)}
    for sidecar, (http, tcp) in streams.items():  # each sidecar on its own stream
        messages = [als.http_message(http, als.identifier(sidecar)), als.tcp_message([tcp])]
        assert await als.stream(d.grpc, messages) == grpc.StatusCode.OK

    namer = Namer(MeshConfig())  # as the receiver decodes each stream's entries
    sent = [
        h
        for sidecar, (http, tcp) in streams.items()
        for h in als.decode(als.http_message(http, als.identifier(sidecar)), namer)
        + als.decode(als.tcp_message([tcp], als.identifier(sidecar)), namer)
    ]
    assert len(sent) == 26
    # An inbound entry's evidence copy goes to its trace's partition where that is not its own.
    rids = [e.request.request_id for e in inbound]
    split = sum(
        partition(r.encode(), PARTITIONS) != partition(t.encode(), PARTITIONS)
        for r, t in zip(rids, traces, strict=True)
    )
    copies: list[tuple[int, Hop]] = []
    got = await _consume(tansu.bootstrap, topic, lambda g: len(g) >= 38 and len(copies) >= split, copies=copies)
    assert len(got) == 38  # 24 HTTP entries, 2 TCP entries, 12 spans: each once

    # The access-log hops are the receiver's own, field for field, each where Kafka's partitioner
    # puts its correlation key.
    logged = [(p, h) for p, h in got if h.origin != SPAN]
    assert sorted(map(_row, (h for _, h in logged)), key=repr) == sorted(map(_row, sent), key=repr)
    for p, h in got:
        assert p == partition(correlation_key(h), PARTITIONS)
    # Both sidecars' entries of one request: one partition (the request id's). The application's
    # span (no request id) is in its trace id's, with the inbound entry or its evidence copy.
    for trace_id in traces:
        of_request = [(p, h) for p, h in got if h.trace_id == trace_id]
        assert sorted(h.origin for _, h in of_request) == sorted([ALS_HTTP, ALS_HTTP, SPAN])
        logs = {p for p, h in of_request if h.origin != SPAN}
        (span_p,) = [p for p, h in of_request if h.origin == SPAN]
        assert len(logs) == 1 and span_p == partition(trace_id.encode(), PARTITIONS)
        copied = [(p, h) for p, h in copies if h.trace_id == trace_id]
        if span_p in logs:
            assert copied == []
        else:
            (p, c), (_, entry) = copied[0], next((p, h) for p, h in of_request if h.direction == INBOUND)
            assert len(copied) == 1 and p == span_p
            assert (c.direction, c.observer_service.key, c.request_id) == (INBOUND, entry.observer_service.key, None)
    assert len(copies) == split > 0 and d.metric("meshaudit_hop_evidence_copies_total") == split
    span = next(h for _, h in got if h.origin == SPAN and h.trace_id == traces[3])
    assert (span.method, span.path, span.observer_service.service) == ("GET", "/reviews/3", "reviews")
    tcp = [p for p, h in got if h.conn == "10.0.0.1:41000"]
    assert len(tcp) == 2 and len(set(tcp)) == 1
    assert len({p for p, _ in got}) > 1  # the requests spread over the partitions

    assert d.wait_metric("meshaudit_hops_produced_total", 38) == 38
    assert d.metric("meshaudit_hop_records_produced_total") >= 1
    assert d.metric("meshaudit_hop_produced_bytes_total") > 38 * 100
    assert d.metric("meshaudit_hop_produce_seconds_count") == d.metric("meshaudit_hop_records_produced_total")
    assert d.metric("meshaudit_hop_in_flight_bytes") == 0
    assert d.metric("meshaudit_hops_topic_up") == 1
    assert d.metric("meshaudit_hops_evaluated_total") == 0  # no engine here
    status, body = d.readyz(verbose=True)
    assert status == 200 and body["sinks"] == {"hops_topic": "ok"}


async def _topic_config(bootstrap: str, topic: str) -> tuple[int, dict[str, str]]:
    """The topic's partition count and the configs the broker reports for it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [(name, partitions)] = [(t["topic"], len(t["partitions"])) for t in await admin.describe_topics([topic])]
        assert name == topic
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        [resource] = response.resources
        assert resource[0] == 0, resource  # error_code
        return partitions, {entry[0]: entry[1] for entry in resource[4]}
    finally:
        await admin.close()


@pytest.mark.parametrize("retention_ms", [7_200_000, None])
async def test_create_topic_creates_the_hops_topic_with_its_partitions_and_retention(
    tmp_path: Path, tansu: Tansu, retention_ms: int | None
) -> None:
    """What deploy/kubernetes/overlays/distributed relies on: the first receiver creates the topic
    with ``partitions`` and ``retention_ms`` (retention.ms), or the broker's default retention."""
    topic = f"hops-{uuid.uuid4().hex[:8]}"
    extra = {} if retention_ms is None else {"retention_ms": retention_ms}
    with running(tmp_path, _config(tansu.bootstrap, topic, **extra), "receiver", RECEIVER) as d:
        assert d.wait_metric("meshaudit_hops_topic_up", 1) == 1
        partitions, configs = await _topic_config(tansu.bootstrap, topic)
        assert partitions == PARTITIONS
        if retention_ms is None:
            assert "retention.ms" not in configs  # not set by us: the broker's default applies
            assert "retention the broker's default" in d.stderr()
        else:
            assert configs["retention.ms"] == str(retention_ms)
            assert f"created with {PARTITIONS} partitions, retention {retention_ms} ms" in d.stderr()


async def _unary(target: str, payload: bytes) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.unary_unary(TRACES_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            await call(payload, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _export(n: int) -> bytes:
    req = trace_service_pb2.ExportTraceServiceRequest()
    spans = req.resource_spans.add().scope_spans.add().spans
    for _ in range(n):
        sp = spans.add()
        sp.trace_id, sp.span_id, sp.name = uuid.uuid4().bytes, uuid.uuid4().bytes[:8], "GET"
    return bytes(req.SerializeToString())


def _post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, body, {"Content-Type": "application/x-protobuf"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _burst(tag: str, n: int, size: int = 100) -> list[Any]:
    """``n`` messages of ``size`` inbound entries, paths ``/<tag>/<i>/<j>`` padded to ~600 bytes."""
    pad = "x" * 500
    return [
        als.http_message([als.inbound_http("frontend", path=f"/{tag}/{i}/{j}/{pad}") for j in range(size)])
        for i in range(n)
    ]


async def test_a_frozen_broker_pushes_back_within_the_bounds_and_production_resumes_by_itself(
    tmp_path: Path, tansu_factory: Callable[..., Tansu]
) -> None:
    broker = tansu_factory()
    topic = "meshaudit.hops"
    in_flight_bound = 1024 * 1024
    config = {
        **_config(
            broker.bootstrap,
            topic,
            max_in_flight_bytes=in_flight_bound,
            max_record_bytes=64 * 1024,
            max_hops_per_record=100,
            request_timeout_ms=1500,
        ),
        "receivers": {
            "max_entries_per_message": 200,
            "ingest_queue_entries": 1000,
            "max_message_bytes": 256 * 1024,
            "ingest_queue_bytes": 1024 * 1024,
        },
    }
    with running(tmp_path, config, "receiver", RECEIVER) as d:
        ident = als.identifier("reviews")
        first = _burst("before", 1, 50)
        first[0].identifier.CopyFrom(ident)
        assert await als.stream(d.grpc, first) == grpc.StatusCode.OK
        assert d.wait_metric("meshaudit_hops_produced_total", 50) == 50

        broker.pause()
        try:
            # Far more than the bounds hold (~6 MB of entries against 1 MiB in flight and 1000
            # queued entries), on one stream as one Envoy sends them.
            flood = _burst("during", 60)
            flood[0].identifier.CopyFrom(ident)
            assert await als.stream(d.grpc, flood) == grpc.StatusCode.OK
            assert d.metric("meshaudit_dropped_total", receiver="envoy_als", reason="queue_full") > 0
            # OTLP callers are told to retry: gRPC RESOURCE_EXHAUSTED, HTTP 429 (or 503).
            assert await _unary(d.grpc, _export(10)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _post(f"http://{d.http}/v1/traces", _export(10)) in (429, 503)
            assert d.metric("meshaudit_rejected_total", receiver="otlp_http", reason="busy") == 10
            # The producer finds out (its requests time out), and stays within its bounds.
            assert d.wait_metric("meshaudit_hops_topic_up", 0, timeout=10) == 0
            for _ in range(3):
                assert 0 < d.metric("meshaudit_hop_in_flight_bytes") <= in_flight_bound
                assert d.metric("meshaudit_ingest_queue_entries") <= 1000
                await asyncio.sleep(0.5)
            assert d.metric("meshaudit_hop_produce_errors_total", reason="timeout") > 0
            # Still ready: the broker is everyone's, and here Envoy's drops are counted.
            status, body = d.readyz(verbose=True)
            assert status == 200, body
            assert body["sinks"]["hops_topic"].startswith("cannot produce for")
        finally:
            broker.resume()

        # Back by itself: what was accepted is produced, then new traffic flows.
        assert d.wait_metric("meshaudit_hops_topic_up", 1, timeout=20) == 1
        received = d.metric("meshaudit_received_total", receiver="envoy_als", kind="http")
        dropped = d.metric("meshaudit_dropped_total", receiver="envoy_als", reason="queue_full")
        accepted = received - dropped
        assert received == 50 + 6000 and 0 < dropped < 6000
        assert d.wait_metric("meshaudit_hops_produced_total", accepted, timeout=20) == accepted
        after = _burst("after", 1, 20)
        after[0].identifier.CopyFrom(ident)
        assert await als.stream(d.grpc, after) == grpc.StatusCode.OK
        assert d.wait_metric("meshaudit_hops_produced_total", accepted + 20, timeout=10) == accepted + 20
        assert d.metric("meshaudit_hops_unproduced_total") == 0

        def paths(g: list[tuple[int, Hop]]) -> set[str]:
            return {h.path.split("/")[1] + "/" + "/".join(h.path.split("/")[2:4]) for _, h in g if h.path}

        want = {f"after/0/{j}" for j in range(20)}
        got = await _consume(broker.bootstrap, topic, lambda g: want <= paths(g))
        seen = paths(got)
        assert want <= seen and {f"before/0/{j}" for j in range(50)} <= seen
        # Every accepted entry is on the topic (a record sent again may be there twice: at-least-once).
        assert len({p for p in seen if p.startswith("during/")}) == accepted - 50


async def test_no_broker_at_start_the_receiver_serves_and_counts_what_it_could_not_produce(tmp_path: Path) -> None:
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = {**_config(nobody, "meshaudit.hops"), "receivers": {"max_entries_per_message": 200,
              "ingest_queue_entries": 300}}  # fmt: skip
    d = Daemon(tmp_path, config, "receiver", RECEIVER).start()
    try:
        burst = _burst("nobroker", 5)
        burst[0].identifier.CopyFrom(als.identifier("reviews"))
        assert await als.stream(d.grpc, burst) == grpc.StatusCode.OK  # listening without a broker
        assert d.metric("meshaudit_dropped_total", receiver="envoy_als", reason="queue_full") == 200
        assert d.metric("meshaudit_hops_topic_up") == 0
        status, body = d.readyz(verbose=True)
        assert status == 200 and body["components"]["ingest_queue"] == "ok", body
        assert body["sinks"]["hops_topic"].startswith("cannot produce for")
        assert "Cannot produce to Kafka topic meshaudit.hops" in d.stderr()
        t0 = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - t0 < 14
        assert "Stopping with 300 hops not acknowledged by the broker" in d.stderr()
    finally:
        d.kill()


def test_tls_files_that_cannot_be_loaded_stop_the_receiver_at_start(tmp_path: Path) -> None:
    config = _config("127.0.0.1:9", "meshaudit.hops", tls={"ca_file": str(tmp_path / "missing-ca.pem")})
    d = Daemon(tmp_path, config, "receiver", RECEIVER)
    with pytest.raises(RuntimeError, match="exited with 1"):
        d.start()
    assert d.stop() == 1
    assert "Cannot produce hops: distributed.tls: cannot load certificates" in d.stderr()
