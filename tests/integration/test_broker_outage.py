"""The broker down for 30 s (issue 15): one receiver and one evaluator on a private Tansu, which is
killed (SIGKILL: the process gone, its address refusing connections) while ALS load keeps
coming, then started again on the same port. During the outage the receiver pushes back (ALS
dropped and counted, OTLP told to retry), its memory stays bounded, ``hops_topic_up`` is 0, it
stays ready (README, "Distributed mode") and neither process floods its log. After it, with
nobody restarting either process, the receiver produces again and the evaluator consumes and
alerts on every violation sent after recovery, and on those the receiver accepted during it.

This Tansu keeps nothing across a restart (infra.brokers): the broker comes back empty and the
hops topic is created again before clients can reach it, as a deployment's topic job would; the
group, its committed offsets and the records of before are gone, which the evaluator (which had
committed what it judged) must notice: its positions in the old log would skip records of the
new one.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from infra import als
from infra.brokers import Forwarder, Tansu, create_topic, free_port
from infra.daemon import Daemon, deep_merge
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from integration.conftest import CONFIG

pytestmark = pytest.mark.distributed

PARTITIONS = 4
TOPIC = "meshaudit.hops"
OUTAGE_SECS = 30.0
REVIEWS = als.identifier("reviews")
GROUP = "outage-evaluators"
TRACES_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
# The receiver's bounds (small, so that the outage reaches them at once): what it may hold.
IN_FLIGHT = 1024 * 1024
QUEUE_ENTRIES, QUEUE_BYTES = 1000, 1024 * 1024
# Resident memory the receiver may gain over the outage, on top of what it had when it began:
# its bounds hold ~2 MiB of messages and records; the rest is the allocator's slack.
RSS_GROWTH_MIB = 32.0
# Log lines each process may write over the outage: the Kafka client's complaints, each kind at
# most once per 10 s, and the daemon's own (it retries every 0.1-5 s).
LOG_LINES = 120


def _distributed(broker: Forwarder) -> dict[str, Any]:
    return {"bootstrap_servers": [broker.address], "hops_topic": TOPIC, "partitions": PARTITIONS}


def _receiver(broker: Forwarder) -> dict[str, Any]:
    return {
        "distributed": {
            **_distributed(broker),
            "create_topic": True,
            "request_timeout_ms": 1500,
            "max_in_flight_bytes": IN_FLIGHT,
            "max_record_bytes": 64 * 1024,
            "max_hops_per_record": 100,
            "linger_ms": 1,
        },
        "receivers": {
            "max_entries_per_message": 200,
            "max_message_bytes": 256 * 1024,
            "ingest_queue_entries": QUEUE_ENTRIES,
            "ingest_queue_bytes": QUEUE_BYTES,
        },
    }


def _evaluator(broker: Forwarder) -> dict[str, Any]:
    group = {"group_id": GROUP, "session_timeout_ms": 3000, "commit_interval_ms": 500}
    stage2 = {"edges_topic": f"{TOPIC}-edges", "edges_partitions": PARTITIONS, "create_topic": True}
    return deep_merge(CONFIG, {"distributed": {**_distributed(broker), **group, **stage2}})


def _intruders(tag: str, n: int) -> Any:
    """One ALS message of reviews' sidecar: ``n`` requests from callers outside policy, each its
    own unexpected_edge alert (source ``<tag>-<i>``)."""
    entries = [als.inbound_http(f"{tag}-{i}", request_id=f"{tag}-{i}", path="/reviews/1") for i in range(n)]
    return als.http_message(entries, REVIEWS)


def _load(tag: str, messages: int, size: int = 100) -> list[Any]:
    """Requests inside policy (frontend -> reviews, mTLS, GET /reviews/*), ~600 bytes an entry."""
    pad = "x" * 500
    out = [
        als.http_message([als.inbound_http("frontend", path=f"/reviews/{tag}-{i}-{j}-{pad}") for j in range(size)])
        for i in range(messages)
    ]
    out[0].identifier.CopyFrom(REVIEWS)
    return out


def _export() -> bytes:
    req = trace_service_pb2.ExportTraceServiceRequest()
    sp = req.resource_spans.add().scope_spans.add().spans.add()
    sp.trace_id, sp.span_id, sp.name = b"\x01" * 16, b"\x02" * 8, "GET"
    return bytes(req.SerializeToString())


async def _otlp_grpc(target: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.unary_unary(TRACES_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            await call(_export(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _otlp_http(d: Daemon) -> tuple[int, str | None]:
    """(status, Retry-After) of one OTLP/HTTP export."""
    req = urllib.request.Request(f"http://{d.http}/v1/traces", _export(), {"Content-Type": "application/x-protobuf"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status), r.headers.get("Retry-After")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Retry-After")


async def _committed(broker: Forwarder) -> dict[int, int]:
    """The evaluator group's committed offsets, by partition (read without joining the group)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.address, group_id=GROUP, enable_auto_commit=False)
    await consumer.start()
    try:
        got = {p: await consumer.committed(TopicPartition(TOPIC, p)) for p in range(PARTITIONS)}
    finally:
        await consumer.stop()
    return {p: offset for p, offset in got.items() if offset is not None}


def _sources(d: Daemon, tag: str) -> set[str]:
    return {a["source"]["service"] for a in d.alerts() if a["rule"] == "unexpected_edge"} & {
        f"{tag}-{i}" for i in range(100)
    }


async def _wait(what: str, pred: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(pred):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.2)


async def test_broker_down_30s_receivers_push_back_within_bounds_and_both_tiers_recover_by_themselves(
    tmp_path: Path, tansu_factory: Callable[..., Tansu], forwarder_factory: Callable[..., Forwarder]
) -> None:
    # Clients know the forwarder's address, which Tansu advertises (infra.brokers: the topic
    # must exist again before any client reaches the restarted broker).
    address = free_port()
    tansu = tansu_factory(advertised_port=address)
    broker = forwarder_factory(tansu.port, port=address)
    await create_topic(tansu.port, TOPIC, PARTITIONS)
    receiver = Daemon(tmp_path, _receiver(broker), "receiver", ["--role", "receiver"])
    evaluator = Daemon(tmp_path, _evaluator(broker), "evaluator", ["--role", "evaluator"])
    try:
        receiver.start()
        evaluator.start()
        pids = (receiver.proc.pid if receiver.proc else 0, evaluator.proc.pid if evaluator.proc else 0)
        await _wait(
            "the evaluator to own the partitions", lambda: evaluator.metric("meshaudit_evaluator_partitions") == 4, 20
        )
        assert await als.stream(receiver.grpc, [_intruders("before", 3), *_load("before", 2)[1:]]) == grpc.StatusCode.OK
        await _wait("the alerts of before", lambda: len(_sources(evaluator, "before")) == 3, 15)
        for _ in range(50):  # the evaluator commits what it judged once its waits are over (~2 s)
            if await _committed(broker):
                break
            await asyncio.sleep(0.2)
        assert await _committed(broker), "the evaluator committed nothing"

        # --- the outage -------------------------------------------------------------------------
        logged = {d: len(d.stderr().splitlines()) for d in (receiver, evaluator)}
        tansu.kill()
        broker.stop()  # the broker's address refuses connections, theirs are closed
        down_at = time.monotonic()
        rss: list[tuple[float, float]] = [(0.0, await asyncio.to_thread(receiver.rss_mib))]
        checked: dict[str, Any] = {}
        i = 0
        # The first burst fits in the bounds: accepted whole, its violations among it.
        assert await als.stream(receiver.grpc, [_intruders("during", 5), *_load("during", 3)[1:]]) == grpc.StatusCode.OK
        assert receiver.metric("meshaudit_dropped_total") == 0
        sent = 205
        while time.monotonic() - down_at < OUTAGE_SECS:  # bounded: 30 s of bursts
            burst = _load(f"during{i}", 5)
            assert await als.stream(receiver.grpc, burst) == grpc.StatusCode.OK
            sent += 500
            i += 1
            if i == 3:  # right after a burst, once the bounds are reached: the ingest queue is full
                checked["otlp_grpc"] = await _otlp_grpc(receiver.grpc)
                checked["otlp_http"] = await asyncio.to_thread(_otlp_http, receiver)
            if time.monotonic() - down_at > 5 and "readyz" not in checked:
                checked["readyz"] = await asyncio.to_thread(receiver.readyz, True)
                checked["topic_up"] = await asyncio.to_thread(receiver.metric, "meshaudit_hops_topic_up")
            rss.append((time.monotonic() - down_at, await asyncio.to_thread(receiver.rss_mib)))
            await asyncio.sleep(0.5)
        dropped = receiver.metric("meshaudit_dropped_total", receiver="envoy_als", reason="queue_full")
        in_flight = receiver.metric("meshaudit_hop_in_flight_bytes")
        queued = receiver.metric("meshaudit_ingest_queue_entries")
        figures = ", ".join(f"{t:.0f} s {m:.0f} MiB" for t, m in rss)
        print(f"\nreceiver RSS over the outage: {figures}; {sent} entries sent, {dropped:.0f} dropped")

        assert 0 < dropped < sent, (dropped, sent)
        assert checked["otlp_grpc"] == grpc.StatusCode.RESOURCE_EXHAUSTED
        status, retry_after = checked["otlp_http"]
        assert status == 429 and retry_after, checked["otlp_http"]
        assert checked["topic_up"] == 0
        ready, body = checked["readyz"]
        assert ready == 200 and body["sinks"]["hops_topic"].startswith("cannot produce for"), body
        assert 0 < in_flight <= IN_FLIGHT and queued <= QUEUE_ENTRIES, (in_flight, queued)
        peak = max(m for _, m in rss)
        assert peak <= rss[0][1] + RSS_GROWTH_MIB, f"RSS {figures}: over {rss[0][1]:.0f} + {RSS_GROWTH_MIB:.0f} MiB"
        # Bounded, not growing: the last ten seconds hold no more than the first twenty reached.
        first = max(m for t, m in rss if t <= 20)
        last = max(m for t, m in rss if t > 20)
        assert last <= first + 4, f"RSS still growing late in the outage: {figures}"
        # The log says the broker is away, without a line for every retry of every connection.
        for d in (receiver, evaluator):
            lines = d.stderr().splitlines()[logged[d] :]
            print(f"{d.alerts_path.name.split('-')[0]} wrote {len(lines)} log lines over the outage")
            assert len(lines) <= LOG_LINES, "\n".join(lines[-40:])

        # --- back: the same port, an empty broker, the topics created again -------------------
        tansu.start()
        await create_topic(tansu.port, TOPIC, PARTITIONS)
        await create_topic(tansu.port, f"{TOPIC}-edges", PARTITIONS)  # stage 2's
        broker.start()
        back_at = time.monotonic()
        await _wait("the receiver to produce again", lambda: receiver.metric("meshaudit_hops_topic_up") == 1, 30)
        print(f"receiver producing again {time.monotonic() - back_at:.1f} s after the broker came back")
        # Ready again once what it held is produced (a queue saturated while producing works is
        # a receiver behind, not ready).
        await _wait("the receiver to be ready", lambda: receiver.readyz(verbose=True)[0] == 200, 20)
        assert receiver.readyz(verbose=True)[1]["sinks"]["hops_topic"] == "ok"
        print(f"receiver ready {time.monotonic() - back_at:.1f} s after the broker came back")
        produced = receiver.metric("meshaudit_hops_produced_total")
        assert await als.stream(receiver.grpc, [_intruders("after", 5)]) == grpc.StatusCode.OK
        await _wait("every violation sent after recovery alerted", lambda: len(_sources(evaluator, "after")) == 5, 40)
        # And those the receiver accepted during the outage, produced once the broker was back.
        await _wait("the violations accepted during the outage", lambda: len(_sources(evaluator, "during")) == 5, 10)
        print(f"alerts after recovery {time.monotonic() - back_at:.1f} s after the broker came back")
        assert receiver.metric("meshaudit_hops_produced_total") >= produced + 5
        status, body = evaluator.readyz()
        assert status == 200, body
        assert (receiver.proc and receiver.proc.pid, evaluator.proc and evaluator.proc.pid) == pids
        assert receiver.proc is not None and receiver.proc.poll() is None
        assert evaluator.proc is not None and evaluator.proc.poll() is None
        assert receiver.metric("meshaudit_hops_unproduced_total") == 0
        assert evaluator.metric("meshaudit_engine_errors_total") == 0
    finally:
        for d in (receiver, evaluator):
            if d.proc is not None:
                d.stop()
