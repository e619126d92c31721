"""The evaluator role (``meshaudit run --role evaluator``) against a real Kafka-protocol broker
(Tansu): hop batches produced to the hops topic the way a receiver does (the real ALS and OTLP
decoders' hops, ``wire.encode``, one partition per record by Kafka's default partitioner over the
correlation key) are judged by a consumer group of evaluators.

1. One evaluator raises exactly the alerts the one-process daemon raises on the same Envoy access
   logs and spans, none extra.
2. Two evaluators, one killed (SIGKILL) while traffic flows: its partitions move to the other,
   which replays their last TTL and judges from the committed offset. No false alert comes from
   the gap, every violation is alerted, and the alert ids are a superset of those of a run of the
   same traffic without the kill (duplicates counted).
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from infra import als
from infra.brokers import Tansu
from infra.daemon import Daemon, deep_merge, running
from meshaudit.config import MeshConfig
from meshaudit.model import Hop
from meshaudit.naming import Namer
from meshaudit.receivers.otlp.decode import ExportTraceServiceRequest, decode_traces
from meshaudit.wire import hops as wire
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from integration.conftest import CONFIG

pytestmark = pytest.mark.distributed

PARTITIONS = 4
NAMER = Namer(MeshConfig())
REVIEWS, FRONTEND = als.identifier("reviews"), als.identifier("frontend")
PATH, PLAIN = "/reviews/1", "10.1.1.1:5000"  # a path inside policy; a plaintext client's socket


# --- what sidecars and apps send, and the hops a receiver makes of it -------------------------------
def app_span(trace: str, start: float, client: str = "10.0.0.44", path: str = "/reviews/1") -> bytes:
    """An OTLP export of one SERVER span of reviews' application (OpenTelemetry SDK attributes)."""
    req = trace_service_pb2.ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    for key, value in (("service.name", "reviews"), ("service.namespace", "default")):
        rs.resource.attributes.add(key=key, value=common_pb2.AnyValue(string_value=value))
    sp = rs.scope_spans.add().spans.add(
        trace_id=bytes.fromhex(trace),
        span_id=bytes.fromhex(trace[:16]),
        name=f"GET {path}",
        kind=trace_pb2.Span.SPAN_KIND_SERVER,
        start_time_unix_nano=int(start * 1e9),
        end_time_unix_nano=int((start + 0.005) * 1e9),
    )
    for key, value in (("http.request.method", "GET"), ("url.path", path), ("client.address", client)):
        sp.attributes.add(key=key, value=common_pb2.AnyValue(string_value=value))
    out: bytes = req.SerializeToString()
    return out


def traceparent(trace: str) -> str:
    return f"00-{trace}-{trace[:16]}-01"


Step = tuple[str, Any]  # ("als", StreamAccessLogsMessage) or ("otlp", serialized traces export)


def logged_by(ident: Any, entry: Any) -> Step:
    """One ALS message of the sidecar ``ident`` names (its stream's identifier) with one entry."""
    return "als", als.http_message([entry], ident)


def hops_of(step: Step) -> list[Hop]:
    """What a receiver makes of one message: the real decoders' hops."""
    kind, msg = step
    if kind == "als":
        return als.decode(msg, NAMER)
    out: list[Hop] = []
    decode_traces(ExportTraceServiceRequest.FromString(msg), NAMER, out)
    return out


def records_of(step: Step) -> list[tuple[int, bytes, bytes]]:
    """A receiver's records for one message: (partition, key, HopBatch), one per partition, its
    evidence copies (``wire.route``) at the end."""
    out = []
    for p, (own, copies) in sorted(wire.route(hops_of(step), PARTITIONS).items()):
        key = wire.correlation_key((own or copies)[0])  # a copy has no request id: its trace id
        out.append((p, key, wire.encode(own + copies, evidence=len(copies))))
    return out


# --- brokers and processes --------------------------------------------------------------------------
async def create_topic(tansu: Tansu, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, PARTITIONS, 1)])
    finally:
        await admin.close()


def evaluator_config(tansu: Tansu, topic: str) -> dict[str, Any]:
    return deep_merge(
        CONFIG,
        {
            "distributed": {
                "bootstrap_servers": [tansu.bootstrap],
                "hops_topic": topic,
                "group_id": f"{topic}-evaluators",
                "session_timeout_ms": 3000,
                "commit_interval_ms": 500,
                "edges_topic": f"{topic}-edges",  # stage 2, created by the first evaluator
                "edges_partitions": PARTITIONS,
                "create_topic": True,
            }
        },
    )


def wait_until(what: str, pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def partitions(d: Daemon) -> float:
    return d.metric("meshaudit_evaluator_partitions")


def start_evaluator(started: list[Daemon], workdir: Path, config: dict[str, Any], name: str) -> Daemon:
    d = Daemon(workdir, config, name, args=["--role", "evaluator"])
    started.append(d)
    return d.start()


async def produce(tansu: Tansu, topic: str, timeline: list[tuple[float, int, bytes, bytes]]) -> None:
    """Each record at its time (seconds from now), in order, as receivers would send them."""
    producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        t0 = time.monotonic()
        pending = []
        for at, partition, key, value in timeline:
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(await producer.send(topic, value, key=key, partition=partition))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def post_traces(d: Daemon, body: bytes) -> None:
    req = urllib.request.Request(
        f"http://{d.http}/v1/traces", data=body, headers={"Content-Type": "application/x-protobuf"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200


def what_a_user_sees(alert: dict[str, Any]) -> dict[str, Any]:
    """An alert but for its id (windows named by data time in the evaluator, by receive time in
    one process) and its emission time."""
    return {k: v for k, v in alert.items() if k not in ("id", "emitted_at")}


def key_of(alert: dict[str, Any]) -> tuple[str, str | None, str | None]:
    src = alert["source"]
    return alert["rule"], src["service"] or src["address"], alert["destination"]["service"]


# --- 1. one evaluator = one process -----------------------------------------------------------------
def scenario(t: float) -> list[Step]:
    """An mTLS request inside policy, a plaintext one named by its client's entry (which comes
    second), an edge outside policy, a traced request whose access log follows its span, and one
    that bypassed the sidecar (traced, never logged)."""
    ok, bypass = "1a" * 16, "2b" * 16
    return [
        logged_by(REVIEWS, als.inbound_http("frontend", path="/reviews/0", start=t)),
        logged_by(REVIEWS, als.inbound_http(None, request_id="plain-1", path=PATH, remote=PLAIN, start=t)),
        logged_by(FRONTEND, als.outbound_http("reviews", request_id="plain-1", path="/reviews/1", start=t)),
        logged_by(REVIEWS, als.inbound_http("ratings", request_id="edge-1", path="/reviews/2", start=t)),
        ("otlp", app_span(ok, t + 0.1)),
        logged_by(REVIEWS, als.inbound_http("frontend", path="/reviews/1", traceparent=traceparent(ok), start=t + 0.1)),
        ("otlp", app_span(bypass, t + 0.2)),
    ]  # fmt: skip


async def test_one_evaluator_raises_what_one_process_raises(
    tansu: Tansu, tmp_path: Path, evaluators: list[Daemon]
) -> None:
    steps = scenario(time.time())
    rules = {"plaintext_hop", "unexpected_edge", "missing_access_log"}

    with running(tmp_path, CONFIG, name="single") as single:
        for kind, msg in steps:
            if kind == "als":
                await als.stream(single.grpc, [msg])
            else:
                post_traces(single, msg)
            await asyncio.sleep(0.1)
        expected = single.wait_alerts(lambda a: {x["rule"] for x in a} >= rules, timeout=10)
        await asyncio.sleep(1.5)  # every wait (grace 1 s, attribution 0.5 s) over: nothing more comes
        expected = single.alerts()
    assert {a["rule"] for a in expected} == rules and len(expected) == 3, expected

    topic = "hops-one"
    await create_topic(tansu, topic)
    ev = start_evaluator(evaluators, tmp_path, evaluator_config(tansu, topic), "evaluator")
    await asyncio.to_thread(wait_until, "the evaluator to own every partition", lambda: partitions(ev) == 4, 20)
    timeline = [(i * 0.1, p, k, v) for i, step in enumerate(steps) for p, k, v in records_of(step)]
    await produce(tansu, topic, timeline)
    got = ev.wait_alerts(lambda a: len(a) >= len(expected), timeout=10)
    await asyncio.sleep(1.5)
    got = ev.alerts()

    assert sorted(map(what_a_user_sees, got), key=key_of) == sorted(map(what_a_user_sees, expected), key=key_of)
    plain = next(a for a in got if a["rule"] == "plaintext_hop")
    assert plain["source"]["service"] == "frontend"  # named by the client sidecar's entry
    assert ev.metric("meshaudit_evaluator_hops_total", phase="judge") == sum(len(hops_of(s)) for s in steps)
    assert ev.metric("meshaudit_evaluator_hops_total", phase="replay") == 0
    status, body = ev.readyz()
    assert status == 200 and body["components"] == {"engine": "ok", "consumer": "ok"}, body
    assert ev.stop() == 0


# --- 2. two evaluators, one killed ------------------------------------------------------------------
SECS, STEP_SECS, KILL_AT = 14.0, 0.05, 4.0


def traffic(t0: float) -> tuple[list[tuple[float, int, bytes, bytes]], dict[tuple[str, str | None, str | None], float]]:
    """Requests every STEP_SECS for SECS, with data times from ``t0`` (the same in both runs, so
    that the same violations get the same alert ids). Each request's two pieces of evidence are
    0.3 s apart, in both orders: a traced request's span and access log, a plaintext request's
    server and client entries (a plaintext_hop violation, always named frontend). Every 7th
    request is also an edge outside policy from its own intruder, every 11th a request that
    bypassed the sidecar from its own client address: one alert key each. Returns the records
    (send time, partition, key, value) and each violation's key with its send time."""
    timeline: list[tuple[float, Step]] = []
    violations: dict[tuple[str, str | None, str | None], float] = {}
    n = int(SECS / STEP_SECS)
    for i in range(n):
        at = i * STEP_SECS
        t = t0 + at
        trace = f"{i:08x}" + "c0ffee00" * 3
        rid = f"req-{i}"
        first: Step
        second: Step
        if i % 4 < 2:
            span: Step = ("otlp", app_span(trace, t))
            log = logged_by(REVIEWS, als.inbound_http("frontend", path=PATH, traceparent=traceparent(trace), start=t))
            first, second = (span, log) if i % 4 == 0 else (log, span)
        else:
            server = logged_by(REVIEWS, als.inbound_http(None, request_id=rid, path=PATH, remote=PLAIN, start=t))
            client = logged_by(FRONTEND, als.outbound_http("reviews", request_id=rid, path=PATH, start=t))
            first, second = (server, client) if i % 4 == 2 else (client, server)
            violations.setdefault(("plaintext_hop", "frontend", "reviews"), at)
        timeline += [(at, first), (at + 0.3, second)]
        if i % 7 == 3:
            who = f"intruder-{i}"
            timeline.append((at, logged_by(REVIEWS, als.inbound_http(who, request_id=f"edge-{i}", path=PATH, start=t))))
            violations[("unexpected_edge", who, "reviews")] = at
        if i % 11 == 5:
            client_ip = f"10.9.{i // 250}.{i % 250 + 1}"
            timeline.append((at, ("otlp", app_span(f"{i:08x}" + "bad0" * 6, t, client=client_ip))))
            violations[("missing_access_log", client_ip, "reviews")] = at
    timeline.sort(key=lambda x: x[0])
    return [(at, p, k, v) for at, step in timeline for p, k, v in records_of(step)], violations  # fmt: skip


async def run_pair(
    tansu: Tansu, workdir: Path, started: list[Daemon], topic: str, records: list[Any], kill: bool
) -> tuple[list[dict[str, Any]], Daemon, float | None]:
    """Two evaluators on a fresh topic and group; the traffic; with ``kill``, the first evaluator
    SIGKILLed at KILL_AT. Returns every alert written (both evaluators' files), the survivor, and
    when (seconds into the traffic) it owned every partition again."""
    await create_topic(tansu, topic)
    cfg = evaluator_config(tansu, topic)
    await asyncio.to_thread(workdir.mkdir)
    first = start_evaluator(started, workdir, cfg, "first")
    await asyncio.to_thread(wait_until, "the first evaluator to join", lambda: partitions(first) == 4, 20)
    second = start_evaluator(started, workdir, cfg, "second")
    await asyncio.to_thread(
        wait_until, "the group to split", lambda: partitions(first) == 2 and partitions(second) == 2, 30
    )
    t0 = time.monotonic()
    sending = asyncio.create_task(produce(tansu, topic, records))
    settled: float | None = None
    if kill:
        await asyncio.sleep(KILL_AT)
        assert first.proc is not None
        first.proc.send_signal(signal.SIGKILL)  # the evaluator this test started, by its PID
        first.proc.wait()
        await asyncio.to_thread(wait_until, "the survivor to own every partition", lambda: partitions(second) == 4, 20)
        settled = time.monotonic() - t0
    await sending
    await asyncio.sleep(3.0)  # the last waits (grace 1 s) end and their alerts are written
    alerts = first.alerts() + second.alerts()
    return alerts, second, settled


async def test_a_killed_evaluators_partitions_move_without_false_or_lost_alerts(
    tansu: Tansu, tmp_path: Path, evaluators: list[Daemon]
) -> None:
    records, violations = traffic(time.time())
    expected_keys = set(violations)

    calm, _, _ = await run_pair(tansu, tmp_path / "calm", evaluators, "hops-calm", records, kill=False)
    assert {key_of(a) for a in calm} == expected_keys  # the reference run is right itself
    calm_ids = {a["id"] for a in calm}

    rough, survivor, settled = await run_pair(tansu, tmp_path / "rough", evaluators, "hops-rough", records, kill=True)
    assert settled is not None and settled < SECS - 2, f"the partitions moved only {settled} s in"
    keys = {key_of(a) for a in rough}
    # No false alert from the gap: no missing_access_log for a request whose access log came
    # before or after the kill, no plaintext_hop named by an address alone.
    assert keys - expected_keys == set(), [a for a in rough if key_of(a) not in expected_keys]
    assert not [a for a in rough if a["rule"] == "plaintext_hop" and a["source"]["service"] != "frontend"]
    # Every violation is alerted, those sent after the survivor took over among them.
    after = {k for k, at in violations.items() if at > settled}
    assert after and after <= keys
    assert keys == expected_keys
    # The ids: a superset of the calm run's; duplicates (judged again after the failover) counted.
    ids = [a["id"] for a in rough]
    assert set(ids) >= calm_ids
    duplicates = len(ids) - len(set(ids))
    print(f"failover: took over {settled:.1f} s in; {len(ids)} alerts, {duplicates} duplicates by id")
    # The survivor rebuilt the moved partitions' state from before the committed offset.
    assert survivor.metric("meshaudit_evaluator_hops_total", phase="replay") > 0
    assert survivor.metric("meshaudit_evaluator_rebalances_total") >= 2


# --- 3. a partition revoked while its hops wait -----------------------------------------------------
async def test_a_moved_partitions_waiting_spans_are_judged_by_its_new_owner_only(
    tansu: Tansu, tmp_path: Path, evaluators: list[Daemon]
) -> None:
    """Spans wait for their access logs (a long grace) at the only evaluator; a second joins and
    takes half the partitions; then the logs come, to the partitions' new owner. The first must
    not alert on the spans it no longer owns (their logs went elsewhere): it drops their waits.
    The new owner judges the spans again from the committed offset with their logs: no alert,
    but for the one request that really bypassed the sidecar, which is alerted once."""
    topic = "hops-revoke"
    await create_topic(tansu, topic)
    cfg = deep_merge(evaluator_config(tansu, topic), {"rules": {"missing_access_log": {"grace_ms": 12_000}}})
    first = start_evaluator(evaluators, tmp_path, cfg, "first")
    await asyncio.to_thread(wait_until, "the first evaluator to join", lambda: partitions(first) == 4, 20)
    t = time.time()
    traces = [f"{i:08x}" + "5eed" * 6 for i in range(24)]
    bypassed = "bad1" * 8
    spans = [("otlp", app_span(tr, t)) for tr in traces] + [("otlp", app_span(bypassed, t, client="10.9.9.9"))]
    records = [r for step in spans for r in records_of(step)]
    records += records_of(logged_by(REVIEWS, als.inbound_http("frontend", path=PATH, start=t)))  # reviews logs
    await produce(tansu, topic, [(0.0, p, k, v) for p, k, v in records])
    second = start_evaluator(evaluators, tmp_path, cfg, "second")
    await asyncio.to_thread(
        wait_until, "the group to split", lambda: partitions(first) == 2 and partitions(second) == 2, 30
    )
    logs = [
        logged_by(REVIEWS, als.inbound_http("frontend", path=PATH, traceparent=traceparent(tr), start=t + 0.1))
        for tr in traces
    ]
    await produce(tansu, topic, [(0.0, p, k, v) for step in logs for p, k, v in records_of(step)])
    released = first.metric("meshaudit_evaluator_released_total")
    assert released > 0  # spans of the moved partitions were waiting there
    # Past the grace of every span (12 s from when the first evaluator took them).
    await asyncio.to_thread(
        wait_until,
        "the bypassed request's alert",
        lambda: any(a["rule"] == "missing_access_log" for a in first.alerts() + second.alerts()),
        20,
    )
    await asyncio.sleep(1.0)
    alerts = first.alerts() + second.alerts()
    assert [(key_of(a), a["evidence"]["examples"][0]["trace_id"]) for a in alerts] == [
        (("missing_access_log", "10.9.9.9", "reviews"), bypassed)
    ], alerts
