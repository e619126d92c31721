"""log_source_mismatch in the distributed mode, against a real Tansu broker: an authenticated
sender (a client certificate) that claims another workload is found by the receiver it streams
to (``--role receiver``, mutual TLS), which produces the claim to the hops topic in the partition
of the sender's principal; the evaluator (``--role evaluator``) that owns it raises the alert
one process raises on the same traffic, field for field. A claim judged before a failover is not
judged again by the partition's next owner (replayed records of claims are skipped)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from infra import als
from infra.brokers import Tansu
from infra.daemon import Daemon, deep_merge, running
from meshaudit.engine.sources import Claim, claimed_by_node
from meshaudit.wire.hops import claim_key, decode_claims, encode_claims
from meshaudit.wire.partition import partition

from integration.conftest import CONFIG
from integration.test_receivers_tls import (
    COLLECTOR,
    Pki,
    grpc_creds,
    https_context,
    outbound,
    post_traces,
    tls_config,
    trace_export,
)
from integration.test_role_evaluator import PARTITIONS, create_topic, partitions, wait_until

pytestmark = pytest.mark.distributed

FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"
RULE = "log_source_mismatch"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons started by the test; every one stopped at teardown."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def start(started: list[Daemon], workdir: Path, config: dict[str, Any], name: str, role: str) -> Daemon:
    d = Daemon(workdir, config, name, args=["--role", role])
    started.append(d)
    return d.start()


def distributed(tansu: Tansu, topic: str) -> dict[str, Any]:
    return {
        "distributed": {
            "bootstrap_servers": [tansu.bootstrap],
            "hops_topic": topic,
            "group_id": f"{topic}-evaluators",
            "session_timeout_ms": 3000,
            "commit_interval_ms": 500,
            "linger_ms": 1,
        }
    }


def evaluator_config(pki: Pki, tansu: Tansu, topic: str) -> dict[str, Any]:
    """One process's rules and policy (``sources`` included), as an evaluator (the edges topic of
    stage 2 created by the first one)."""
    stage2 = {"distributed": {"edges_topic": f"{topic}-edges", "edges_partitions": PARTITIONS, "create_topic": True}}
    return deep_merge(deep_merge({**CONFIG, "policy": tls_config(pki)["policy"]}, distributed(tansu, topic)), stage2)


def what_a_user_sees(alert: dict[str, Any]) -> dict[str, Any]:
    """An alert but for its id (windows named by data time in an evaluator, by receive time in one
    process: tests/unit/test_wire_claims.py checks that the id survives the wire), its emission
    time, and for log_source_mismatch the time its receiver judged the claim (its data time)."""
    out = {k: v for k, v in alert.items() if k not in ("id", "emitted_at")}
    if alert["rule"] == RULE:
        out["evidence"] = {k: v for k, v in alert["evidence"].items() if k not in ("first_seen", "last_seen")}
    return out


def by_destination(alert: dict[str, Any]) -> tuple[str, str, str]:
    return alert["destination"]["service"] or "", alert["destination"]["namespace"] or "", alert["rule"]


async def send_forged(d: Daemon, pki: Pki, msg: Any) -> None:
    """frontend's certificate on an access-log stream (``msg``) whose node is reviews'; the
    collector's on OTLP/HTTP exports for shop (its ``sources`` entry allows it) and payments (no)."""
    target = f"localhost:{d.grpc.rsplit(':')[1]}"
    assert await als.stream(target, [msg], credentials=grpc_creds(pki, pki.frontend)) == grpc.StatusCode.OK
    ctx = https_context(pki.ca.cert_path, pki.collector)
    assert await asyncio.to_thread(post_traces, d, ctx, trace_export("cart", "shop")) == 200
    assert await asyncio.to_thread(post_traces, d, ctx, trace_export("ledger", k8s_namespace="payments")) == 200


async def test_a_forged_claim_at_a_receiver_raises_at_the_evaluator_what_one_process_raises(
    pki: Pki, tansu: Tansu, tmp_path: Path, daemons: list[Daemon]
) -> None:
    # The same entry to both. (One: the evaluator gets a message's entries grouped by partition, so
    # the first example of an alert on several could be another one of them.)
    msg = als.http_message(outbound(1), als.identifier("reviews"))
    with running(tmp_path, tls_config(pki), "single") as single:
        await send_forged(single, pki, msg)
        single.wait_alerts(lambda a: len([x for x in a if x["rule"] == RULE]) >= 2, timeout=10)
        await asyncio.sleep(1.0)  # nothing else comes
        expected = single.alerts()
    # The forged entries are evaluated (no enforce_sources) as reviews' own: an edge reviews -> reviews.
    assert sorted((a["source"]["principal"] or "", by_destination(a)) for a in expected) == [
        ("", ("reviews", "default", "unexpected_edge")),
        (FRONTEND, ("reviews", "default", RULE)),
        (COLLECTOR, ("ledger", "payments", RULE)),
    ]

    topic = f"claims-{uuid.uuid4().hex[:8]}"
    receiver_config = deep_merge(tls_config(pki), distributed(tansu, topic))
    receiver_config["distributed"] |= {"create_topic": True, "partitions": PARTITIONS}
    receiver = start(daemons, tmp_path, receiver_config, "receiver", "receiver")
    evaluator = start(daemons, tmp_path, evaluator_config(pki, tansu, topic), "evaluator", "evaluator")
    await asyncio.to_thread(wait_until, "the evaluator to own every partition", lambda: partitions(evaluator) == 4, 30)
    sent = time.time()
    await send_forged(receiver, pki, msg)
    got = await asyncio.to_thread(evaluator.wait_alerts, lambda a: len(a) >= len(expected), 15)
    await asyncio.sleep(1.0)
    got = evaluator.alerts()

    assert sorted(map(what_a_user_sees, got), key=by_destination) == sorted(
        map(what_a_user_sees, expected), key=by_destination
    )
    claim = next(a for a in got if a["source"]["principal"] == FRONTEND)
    judged = datetime.fromisoformat(claim["evidence"]["first_seen"]).timestamp()
    assert sent - 0.01 <= judged <= time.time()  # when the receiver judged it
    detail = claim["evidence"]["detail"]
    assert als.node_id("reviews") in detail and "client certificate" in detail and "1 entries evaluated" in detail
    # The receiver found both claims and produced them (none left unforwarded), judging nothing.
    assert receiver.metric("meshaudit_source_claims_unforwarded_total") == 0
    assert receiver.metric("meshaudit_hops_evaluated_total") == 0
    assert receiver.alerts() == []
    # counted by the key's owner in stage 2, published with its stats once a second
    assert evaluator.wait_metric("meshaudit_violations_total", 2, rule=RULE) == 2
    assert evaluator.metric("meshaudit_evaluator_hops_total", phase="judge") == 1 + 2  # the entry, the spans
    assert evaluator.metric("meshaudit_evaluator_undecodable_total") == 0


def forged(principal: str, service: str, when: float) -> Claim:
    claimed = claimed_by_node(als.node_id(service), f"{service}.default", {})
    why = "the workload is not the sender's service account and no sources entry allows it"
    return Claim(principal, "mtls", claimed, why, "envoy_als", 3, False, when)


async def produce_claims(tansu: Tansu, topic: str, claims: list[Claim]) -> None:
    """As a receiver does: one record per claim, in the partition of its sender's principal."""
    producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        for c in claims:
            p = partition(claim_key(c), PARTITIONS)
            await (await producer.send(topic, encode_claims([c]), partition=p))
    finally:
        await producer.stop()


async def committed(tansu: Tansu, group: str, topic: str, p: int) -> int | None:
    """The offset ``group`` committed for partition ``p`` of ``topic``, or None (asked by a
    consumer of the group that subscribes to nothing, so joins nothing)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=tansu.bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        found: int | None = await consumer.committed(TopicPartition(topic, p))
    finally:
        await consumer.stop()
    return found


async def test_a_claim_judged_before_a_failover_is_not_judged_again(
    pki: Pki, tansu: Tansu, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """The first evaluator judges a claim, commits it and leaves (SIGTERM); the next owner of its
    partition replays the last TTL, which holds the claim's record before the committed offset,
    without raising it again, and judges the claims after it."""
    topic = f"claims-{uuid.uuid4().hex[:8]}"
    await create_topic(tansu, topic)
    cfg = evaluator_config(pki, tansu, topic)
    first = start(daemons, tmp_path, cfg, "first", "evaluator")
    await asyncio.to_thread(
        wait_until, "the first evaluator to own every partition", lambda: partitions(first) == 4, 30
    )
    await produce_claims(tansu, topic, [forged(FRONTEND, "reviews", time.time())])
    [a] = await asyncio.to_thread(first.wait_alerts, lambda a: len(a) >= 1, 10)
    assert (a["source"]["principal"], by_destination(a)) == (FRONTEND, ("reviews", "default", RULE))
    p = partition(claim_key(forged(FRONTEND, "reviews", 0.0)), PARTITIONS)
    group = cfg["distributed"]["group_id"]
    deadline = time.monotonic() + 15
    while await committed(tansu, group, topic, p) != 1:  # its verdict is out: committed
        assert time.monotonic() < deadline, "the first evaluator did not commit the claim's record"
        await asyncio.sleep(0.2)
    assert first.stop() == 0  # leaves the group: its partitions move at once

    second = start(daemons, tmp_path, cfg, "second", "evaluator")
    await asyncio.to_thread(
        wait_until, "the second evaluator to own every partition", lambda: partitions(second) == 4, 30
    )
    ratings = "spiffe://cluster.local/ns/default/sa/ratings"
    await produce_claims(tansu, topic, [forged(ratings, "details", time.time())])
    got = await asyncio.to_thread(second.wait_alerts, lambda a: len(a) >= 1, 10)
    await asyncio.sleep(1.0)
    got = second.alerts()
    assert [(a["source"]["principal"], by_destination(a)) for a in got] == [(ratings, ("details", "default", RULE))]
    # The first claim's record (offset 0 of its partition) was read again, before the committed offset.
    assert f"Partition {p} gained: replaying from offset 0 " in second.stderr()
    assert "judging from the committed offset 1." in second.stderr()
    # counted by the key's owner in stage 2, published with its stats once a second
    assert second.wait_metric("meshaudit_violations_total", 1, rule=RULE) == 1


async def test_a_claim_made_while_the_broker_is_frozen_is_produced_once_it_is_back(
    pki: Pki, tmp_path: Path, tansu_factory: Callable[..., Tansu]
) -> None:
    """At least once, as hops: the claim's record times out, is kept (counted in flight) and sent
    again by itself when the broker answers; none is given up."""
    broker = tansu_factory()
    topic = "meshaudit.hops"
    config = deep_merge(tls_config(pki), distributed(broker, topic))
    config["distributed"] |= {"create_topic": True, "partitions": PARTITIONS, "request_timeout_ms": 1500}
    with running(tmp_path, config, "receiver", ["--role", "receiver"]) as d:
        assert d.wait_metric("meshaudit_hops_topic_up", 1, timeout=20) == 1
        broker.pause()
        try:
            target = f"localhost:{d.grpc.rsplit(':')[1]}"
            msg = als.http_message(outbound(2), als.identifier("reviews"))
            assert await als.stream(target, [msg], credentials=grpc_creds(pki, pki.frontend)) == grpc.StatusCode.OK
            assert d.wait_metric("meshaudit_hops_topic_up", 0, timeout=10) == 0
            assert d.metric("meshaudit_hop_in_flight_bytes") > 0  # the claim's record and the hops'
        finally:
            broker.resume()
        assert d.wait_metric("meshaudit_hops_topic_up", 1, timeout=20) == 1
        assert d.wait_metric("meshaudit_hop_in_flight_bytes", 0, timeout=20) == 0
        assert d.metric("meshaudit_hop_produce_errors_total", reason="timeout") > 0
        assert d.metric("meshaudit_source_claims_unforwarded_total") == 0

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    found: list[tuple[int, Claim]] = []
    try:
        deadline = time.monotonic() + 10
        while not found and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=300)).items():
                found += [(tp.partition, c) for r in records if r.value for c in decode_claims(r.value)]
    finally:
        await consumer.stop()
    assert found, "the claim never reached the topic"
    # Once, or twice when the broker took it but its answer was lost (at least once): the same claim.
    assert {(p, c.principal, c.claimed.text, c.receiver, c.entries, c.rejected, c.when) for p, c in found} == {
        (
            partition(FRONTEND.encode(), PARTITIONS),
            FRONTEND,
            found[0][1].claimed.text,
            "envoy_als",
            2,
            False,
            found[0][1].when,
        )
    }
    assert als.node_id("reviews") in found[0][1].claimed.text
