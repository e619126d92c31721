"""Stage 2 exact across evaluators (README "Distributed mode"), against a real Kafka-protocol
broker (Tansu): two evaluators, each owning half of the hops topic's partitions, and the traffic of
one edge spread evenly over all of them, so that each evaluator alone sees too little to judge.
Their per-edge window deltas and violations meet, through the edges topic, at the one evaluator
that owns each (rule, source, destination):

- error_burst: each member counts 16 requests (12 failed), under ``min_requests`` (20); the sum,
  24 of 32, bursts: alerted exactly once (one id, one line), with the summed counts;
- excessive_retries: each member counts 8 retries, under ``min_retries`` (10); the sum, 16 over
  16 requests, alerts exactly once;
- an alert window: an edge outside policy, half its requests judged by each member: the first
  alert at once, then the window's closing summary counting every member's violations.

Then failover: the evaluator that owns the burst is killed (SIGKILL); the survivor, gaining its
edges partitions, replays them and rebuilds the judged window and the alert windows: more
failures in the same window raise no second error_burst (one id, duplicates by id allowed), and
the alert window's summary counts the violations from before the kill and after.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from infra import als
from infra.brokers import Tansu
from infra.daemon import Daemon, deep_merge
from meshaudit.wire.partition import partition

from integration.test_role_evaluator import (
    FRONTEND,
    PARTITIONS,
    PATH,
    REVIEWS,
    create_topic,
    evaluator_config,
    logged_by,
    partitions,
    produce,
    records_of,
    start_evaluator,
    wait_until,
)

pytestmark = pytest.mark.distributed

WINDOW_SECS, SUPPRESS_SECS = 10, 6


def per_partition(prefix: str, n: int) -> dict[int, list[str]]:
    """``n`` request ids per partition of the hops topic (an entry with no trace is keyed by its
    request id): whichever two partitions an evaluator owns, it sees 2n of them."""
    out: dict[int, list[str]] = {p: [] for p in range(PARTITIONS)}
    i = 0
    while any(len(v) < n for v in out.values()):
        rid = f"{prefix}-{i}"
        i += 1
        p = partition(rid.encode(), PARTITIONS)
        if len(out[p]) < n:
            out[p].append(rid)
    return out


def traffic(t: float, round_: str = "", failing: int = 6) -> list[tuple[float, int, bytes, bytes]]:
    """Per partition: 8 requests frontend -> reviews (``failing`` of them 503), 4 requests reviews
    -> ratings retried once, 2 requests ratings -> reviews (outside policy)."""
    steps = []
    for rids in per_partition(f"burst{round_}", 8).values():
        for j, rid in enumerate(rids):
            failed = j < failing
            entry = als.outbound_http(
                "reviews", request_id=rid, path=PATH, start=t, status=503 if failed else 200, details="via_upstream"
            )
            steps.append(logged_by(FRONTEND, entry))
    for rids in per_partition(f"retry{round_}", 4).values():  # one retry each
        for rid in rids:
            entry = als.outbound_http("ratings", request_id=rid, path="/ratings/1", start=t, attempts=2)
            steps.append(logged_by(REVIEWS, entry))  # reviews -> ratings
    for rids in per_partition(f"edge{round_}", 2).values():  # an edge outside policy: ratings -> reviews
        for rid in rids:
            steps.append(logged_by(REVIEWS, als.inbound_http("ratings", request_id=rid, path=PATH, start=t)))
    records = [r for step in steps for r in records_of(step)]
    for p, key, _ in records:  # each record where a receiver would have put it
        assert partition(key, PARTITIONS) == p
    return [(0.0, p, k, v) for p, k, v in records]


def early_in_both_windows(now: float, window: float = WINDOW_SECS, suppress: float = SUPPRESS_SECS) -> float:
    """Seconds from ``now`` to the next time in the first half of both a per-edge window and an
    alert window (at most their least common multiple away)."""
    wait = 0.0
    while (now + wait) % window > window / 2 or (now + wait) % suppress > suppress / 2:
        wait += 0.05
    return wait


def of(alerts: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    return [a for a in alerts if a["rule"] == rule]


def owned(d: Daemon) -> tuple[float, float]:
    """Partitions of the hops topic and of the edges topic ``d`` owns."""
    return partitions(d), d.metric("meshaudit_evaluator_edges_partitions")


async def pair(
    tansu: Tansu, workdir: Path, started: list[Daemon], topic: str, window: int, suppress: int
) -> tuple[Daemon, Daemon]:
    """Two evaluators on a fresh topic and group, each owning half of both topics."""
    await create_topic(tansu, topic)
    cfg = deep_merge(
        evaluator_config(tansu, topic),
        {
            "engine": {"suppress_secs": suppress},
            "rules": {"error_burst": {"window_secs": window}, "excessive_retries": {"window_secs": window}},
        },
    )
    first = start_evaluator(started, workdir, cfg, "first")
    await asyncio.to_thread(wait_until, "the first evaluator to join", lambda: partitions(first) == 4, 20)
    second = start_evaluator(started, workdir, cfg, "second")

    def split() -> bool:
        return owned(first) == owned(second) == (2, 2)

    await asyncio.to_thread(wait_until, "the group to split both topics", split, 30)
    return first, second


async def test_per_edge_and_alert_windows_are_judged_on_every_members_counts(
    tansu: Tansu,
    tmp_path: Path,
    evaluators: list[Daemon],
) -> None:
    first, second = await pair(tansu, tmp_path, evaluators, "hops-stage2", WINDOW_SECS, SUPPRESS_SECS)
    # Every record in one per-edge window (by the records' time) and one alert window (by the
    # entries' data time): start early in both.
    await asyncio.sleep(early_in_both_windows(time.time()))
    t = time.time()
    await produce(tansu, "hops-stage2", traffic(t))

    def done(alerts: list[dict[str, Any]]) -> bool:
        return len(of(alerts, "unexpected_edge")) >= 2 and bool(of(alerts, "error_burst"))

    await asyncio.to_thread(wait_until, "the alerts", lambda: done(first.alerts() + second.alerts()), 20)
    await asyncio.sleep(WINDOW_SECS / 2 + 3)  # the per-edge window closes (no second alert comes)
    alerts = first.alerts() + second.alerts()

    # Each member judged half the hops: alone, neither would have had min_requests or min_retries.
    judged = [d.metric("meshaudit_evaluator_hops_total", phase="judge") for d in (first, second)]
    assert judged == [(8 + 4 + 2) * 2] * 2, judged  # per partition, two partitions each

    bursts = of(alerts, "error_burst")
    assert len(bursts) == 1, bursts  # exactly once, by one member: one id
    ev = bursts[0]["evidence"]
    assert ev["detail"].startswith(f"24 of 32 requests failed (75%) in a {WINDOW_SECS} s window"), ev
    assert bursts[0]["source"]["service"] == "frontend" and bursts[0]["destination"]["service"] == "reviews"
    assert len(ev["examples"]) == 3 and all(x["request_id"].startswith("burst-") for x in ev["examples"])

    retries = of(alerts, "excessive_retries")
    assert len(retries) == 1, retries
    assert retries[0]["evidence"]["detail"].startswith("16 retries over 16 requests (ratio 1.00)")
    assert retries[0]["source"]["service"] == "reviews" and retries[0]["destination"]["service"] == "ratings"

    edge = of(alerts, "unexpected_edge")
    assert len({a["id"] for a in edge}) == len(edge) == 2, edge  # the first alert, then the summary
    assert [a["evidence"]["count"] for a in edge] == [1, 8]  # every member's violations
    assert {a["rule"] for a in alerts} == {"error_burst", "excessive_retries", "unexpected_edge"}

    # The records went through the edges topic, and every one was a stage-2 record of ours.
    produced = sum(d.metric("meshaudit_evaluator_edges_records_total", what="produced") for d in (first, second))
    absorbed = sum(d.metric("meshaudit_evaluator_edges_records_total", what="judge") for d in (first, second))
    assert produced >= 6 and absorbed == produced, (produced, absorbed)
    assert sum(d.metric("meshaudit_evaluator_edges_records_total", what="late") for d in (first, second)) == 0
    for d in (first, second):
        status, body = d.readyz(verbose=True)
        assert status == 200 and body["sinks"]["edges_topic"] == "ok", body


async def test_a_killed_owners_windows_are_rebuilt_by_the_survivor(
    tansu: Tansu,
    tmp_path: Path,
    evaluators: list[Daemon],
) -> None:
    window = suppress = 20
    first, second = await pair(tansu, tmp_path, evaluators, "hops-stage2-kill", window, suppress)
    await asyncio.sleep(early_in_both_windows(time.time(), window, suppress))
    t = time.time()
    await produce(tansu, "hops-stage2-kill", traffic(t))

    def both() -> list[dict[str, Any]]:
        return first.alerts() + second.alerts()

    await asyncio.to_thread(wait_until, "the burst", lambda: bool(of(both(), "error_burst")), 20)
    await asyncio.to_thread(wait_until, "the edge's first alert", lambda: bool(of(both(), "unexpected_edge")), 20)
    await asyncio.sleep(2.0)  # what the owners absorbed is committed (commit_interval_ms 500)
    owner = first if of(first.alerts(), "error_burst") else second
    survivor = second if owner is first else first
    assert owner.proc is not None
    owner.proc.send_signal(signal.SIGKILL)  # the evaluator this test started, by its PID
    owner.proc.wait()
    await asyncio.to_thread(wait_until, "the survivor to own everything", lambda: owned(survivor) == (4, 4), 20)
    # The same windows: more failures of the edge (all 32 failed), more requests outside policy
    # (their entries' data time in the same alert window).
    ends = (t // window + 1) * window  # the per-edge window's end, by the records' time
    assert time.time() < ends - 1, "the failover took too long for this test: the window has ended"
    await produce(tansu, "hops-stage2-kill", traffic(t, round_="-after", failing=8))
    await asyncio.to_thread(
        wait_until,
        "the edge's closing summary",
        lambda: any(a["evidence"]["count"] > 1 for a in of(both(), "unexpected_edge")),
        2 * suppress + 10,
    )
    await asyncio.sleep(1.0)
    alerts = both()

    bursts = of(alerts, "error_burst")
    assert len({a["id"] for a in bursts}) == 1, bursts  # no second alert: the window was judged
    assert bursts[0]["evidence"]["detail"].startswith("24 of 32 requests failed")
    edge = of(alerts, "unexpected_edge")
    counts = {a["id"]: a["evidence"]["count"] for a in edge}
    assert sorted(counts.values()) == [1, 16], edge  # the summary: 8 violations before the kill, 8 after
    assert survivor.metric("meshaudit_evaluator_edges_records_total", what="replay") > 0


async def test_no_hop_is_judged_before_the_edges_topic_exists_and_none_is_lost(
    tansu: Tansu, tmp_path: Path, evaluators: list[Daemon]
) -> None:
    """Every violation goes out through the edges topic: an evaluator that cannot produce to it
    (missing, ``create_topic`` off) judges nothing, says why on /readyz, and leaves the hops in
    their topic; once the topic exists it judges them and alerts."""
    topic = "hops-no-edges"
    await create_topic(tansu, topic)
    cfg = evaluator_config(tansu, topic)
    cfg["distributed"]["create_topic"] = False
    ev = start_evaluator(evaluators, tmp_path, cfg, "evaluator")
    await produce(tansu, topic, traffic(time.time()))
    await asyncio.sleep(3.0)
    status, body = ev.readyz()
    assert status == 503 and body["components"]["consumer"].startswith("waiting for the edges topic (stage 2): "), body
    assert ev.metric("meshaudit_evaluator_hops_total", phase="judge") == 0 and ev.alerts() == []
    await create_topic(tansu, cfg["distributed"]["edges_topic"])
    alerts = await asyncio.to_thread(ev.wait_alerts, lambda a: bool(of(a, "unexpected_edge")), 30)
    assert of(alerts, "unexpected_edge")[0]["source"]["service"] == "ratings"
    assert ev.readyz()[0] == 200
