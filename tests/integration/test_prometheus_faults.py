"""Every Prometheus alert rule with a `for` delay or a long range, shown firing under the real
fault it describes: a real Prometheus scrapes a live daemon and evaluates a copy of
deploy/prometheus/meshaudit-rules.yaml made fast (derived mechanically below: every `for` is
0s, every range a minute -> MINUTE seconds, every threshold kept). For each fault the test
asserts the set of firing alerts is exactly that alert, with its labels, and (where the fault
can end) that it resolves once the fault is gone, which also makes the next fault's "exactly"
meaningful.

- MeshauditIngestStopped: an access-log stream stays open after its first entries.
- MeshauditDropping: a burst of access-log messages into a small ingest queue.
- MeshauditCorrelationIncomplete: more distinct request ids than engine.store_max_items.
- MeshauditEventLoopLag: the daemon frozen (SIGSTOP) for 0.7 s between two scrapes.
- MeshauditDown: the daemon killed (SIGKILL).
- MeshauditSinkNotReady, MeshauditSpoolGrowing: the MQTT broker stopped while alerts keep coming.

The two rules without a delay that fire on their first event (MeshauditCriticalViolation,
MeshauditRejecting) are shown with the shipped file in test_prometheus_live.py."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from infra import als
from infra.brokers import Mosquitto
from infra.daemon import Daemon, deep_merge, running
from infra.prometheus import Prometheus, prometheus

from integration.conftest import CONFIG

pytestmark = pytest.mark.integration

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "meshaudit-rules.yaml"
# A shipped minute of range becomes this many seconds: [5m] -> 2.5 s, [10m] -> 5 s, [15m] ->
# 7.5 s. The shortest range still holds two 1 s scrapes, which rate() and delta() need.
MINUTE = 0.5
RANGE = re.compile(r"\[(\d+)([smh])\]")
UNIT_SECS = {"s": 1, "m": 60, "h": 3600}
# The correlation indexes CorrelationIncomplete watches (its expression's store=~"...").
INDEXES = {"outbound_by_request_id", "outbound_by_conn", "logged_request_ids", "logged_trace_ids"}


def fast_rules(workdir: Path) -> Path:
    """The shipped rules with every `for` set to 0s and every range scaled by MINUTE / 60, in a
    file of their own. Thresholds are all kept: each is reachable in a test (SpoolGrowing's 100
    spooled alerts by 150 distinct violations, EventLoopLag's 0.25 s p99 by one 0.7 s stall
    among fewer than 100 ticks in the range)."""
    doc = yaml.safe_load(RULES.read_text())

    def scaled(m: re.Match[str]) -> str:
        ms = round(int(m.group(1)) * UNIT_SECS[m.group(2)] * MINUTE / 60 * 1000)
        return f"[{ms}ms]"

    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "0s"
            rule["expr"] = RANGE.sub(scaled, rule["expr"])
            # Any other bracket (a subquery, an offset, a unit the pattern missed) fails here.
            leftover = re.findall(r"\[[^\]]*\]", rule["expr"])
            assert all(re.fullmatch(r"\[\d+ms\]", b) for b in leftover), (rule["alert"], leftover)
    out = workdir / "meshaudit-rules-fast.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def shipped_alerts() -> set[str]:
    return {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def firing(prom: Prometheus) -> dict[str, list[dict[str, str]]]:
    """Firing alerts: name -> the label sets it fires with."""
    out: dict[str, list[dict[str, str]]] = {}
    for a in prom.firing():
        labels = dict(a["labels"])
        out.setdefault(labels.pop("alertname"), []).append(labels)
    return out


async def fires(prom: Prometheus, *names: str, timeout: float = 20.0) -> dict[str, list[dict[str, str]]]:
    """Once every alert in ``names`` fires: what fires then (more names included)."""
    await asyncio.to_thread(prom.wait, lambda: set(names) <= set(firing(prom)), timeout)
    got = firing(prom)
    assert set(names) <= set(got), f"{names} did not fire in {timeout}s; firing: {got}"
    return got


async def resolves(prom: Prometheus, timeout: float = 20.0) -> float:
    """Wait until nothing fires (each fast range is at most 7.5 s); returns the time then."""
    await asyncio.to_thread(prom.wait, lambda: not prom.firing(), timeout)
    assert prom.firing() == [], "still firing"
    return time.time()


def fired_since(prom: Prometheus, t0: float) -> set[str]:
    """Every alert that fired since ``t0``, even for one evaluation (Prometheus's own ALERTS
    series): "exactly this alert" holds over the whole fault, not only when it was looked at."""
    now = time.time()
    window = f"{int((now - t0) * 1000)}ms"  # not a millisecond before t0
    expr = f'group by (alertname) (count_over_time(ALERTS{{alertstate="firing"}}[{window}]))'
    return {r["metric"]["alertname"] for r in prom.api("query", query=expr, time=f"{now:.3f}")["result"]}


async def watching(prom: Prometheus, d: Daemon) -> float:
    """Prometheus scrapes the daemon, has loaded every rule of the fast copy and evaluated each
    healthily (valid PromQL over the live series) at least twice, and nothing fires; returns the
    time then."""
    assert await asyncio.to_thread(prom.wait, lambda: prom.query('up{job="meshaudit"} == 1'))

    def rules() -> list[dict[str, Any]]:
        return [r for g in prom.api("rules")["groups"] for r in g["rules"]]

    loaded = {r["name"] for r in rules()}
    assert loaded == shipped_alerts(), loaded
    start = time.time()

    def evaluated_twice() -> bool:
        return all(datetime.fromisoformat(r["lastEvaluation"]).timestamp() > start + 1 for r in rules())

    assert await asyncio.to_thread(prom.wait, evaluated_twice), rules()
    bad = [(r["name"], r["health"], r.get("lastError")) for r in rules() if r["health"] != "ok"]
    assert bad == [], bad
    assert firing(prom) == {}, d.stderr()[-2000:]
    return time.time()


def instance(d: Daemon) -> dict[str, str]:
    return {"instance": d.metrics_addr, "job": "meshaudit"}


def allowed(n: int, request_id: str | None = None) -> Any:
    """n entries of reviews' sidecar: frontend -> reviews over mTLS, inside policy (no alert)."""
    entries = [als.inbound_http("frontend", path="/reviews/1", request_id=request_id) for _ in range(n)]
    return als.http_message(entries, als.identifier("reviews"))


QUEUE = 10  # receivers.ingest_queue_entries (and max_entries_per_message): a burst overflows it
STORE = 100  # engine.store_max_items, its minimum
RECEIVE = deep_merge(
    CONFIG,
    {
        "engine": {"store_max_items": STORE},
        "receivers": {"ingest_queue_entries": QUEUE, "max_entries_per_message": QUEUE},
    },
)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Daemon, Prometheus]]:
    """A daemon with a small ingest queue and small stores, scraped by a Prometheus evaluating
    the fast rules."""
    with running(tmp_path, RECEIVE) as d, prometheus(tmp_path, d.metrics_addr, [fast_rules(tmp_path)]) as prom:
        yield d, prom


async def test_ingest_stopped_dropping_and_correlation_incomplete_fire_and_resolve(
    watched: tuple[Daemon, Prometheus],
) -> None:
    d, prom = watched
    t0 = await watching(prom, d)

    # An open stream that went quiet after 5 entries: IngestStopped once a (fast) 10 minutes
    # have passed without an entry; not while the entries are recent.
    async with als.held_stream(d.grpc, [allowed(5)]):
        assert await asyncio.to_thread(
            prom.wait,
            lambda: (
                prom.query("meshaudit_als_streams_active == 1") and prom.query("sum(meshaudit_received_total) == 5")
            ),
        )
        assert "MeshauditIngestStopped" not in firing(prom)
        got = await fires(prom, "MeshauditIngestStopped")
        assert got == {"MeshauditIngestStopped": [{**instance(d), "severity": "critical"}]}, got
        assert d.metric("meshaudit_received_total") == 5
    t1 = await resolves(prom)  # the stream closed: no open stream is quiet
    assert fired_since(prom, t0) == {"MeshauditIngestStopped"}

    # 8 senders at once, 20 messages of 10 entries each, into a queue of 10 entries: most are
    # dropped (Envoy never resends them). One request id for all: the indexes hold one item.
    burst = [allowed(QUEUE, request_id="burst") for _ in range(20)]
    for _ in range(5):  # one burst is plenty; a few more if this machine served it slowly
        await asyncio.gather(*(als.stream(d.grpc, burst) for _ in range(8)))
        if d.metric("meshaudit_dropped_total", receiver="envoy_als", reason="queue_full") > 0:
            break
    got = await fires(prom, "MeshauditDropping")
    assert got == {
        "MeshauditDropping": [
            {"instance": d.metrics_addr, "receiver": "envoy_als", "reason": "queue_full", "severity": "warning"}
        ]
    }, got
    assert d.metric("meshaudit_store_evictions_total", reason="capacity") == 0
    t2 = await resolves(prom)
    assert fired_since(prom, t1) == {"MeshauditDropping"}

    # frontend's sidecar logs 3 * STORE requests to reviews, each with its own request id (no
    # reviews entry pairs them): the request-id index evicts for capacity.
    for k in range(3 * STORE // QUEUE):
        entries = [als.outbound_http("reviews", request_id=f"rid-{k}-{i}", path="/reviews/1") for i in range(QUEUE)]
        await als.stream(d.grpc, [als.http_message(entries, als.identifier("frontend"))])
    got = await fires(prom, "MeshauditCorrelationIncomplete")
    assert set(got) == {"MeshauditCorrelationIncomplete"}, got
    labels = got["MeshauditCorrelationIncomplete"]
    stores = {a["store"] for a in labels}
    assert all(a == {"instance": d.metrics_addr, "store": a["store"], "severity": "warning"} for a in labels), labels
    # exactly the indexes the daemon says evicted for capacity, the request-id index among them
    evicting = {s for s in INDEXES if d.metric("meshaudit_store_evictions_total", store=s, reason="capacity") > 0}
    assert "outbound_by_request_id" in stores and stores == evicting, (stores, evicting)
    await resolves(prom)
    assert fired_since(prom, t2) == {"MeshauditCorrelationIncomplete"}
    assert d.alerts() == []  # none of this traffic was a violation: only the auditor's health


async def test_event_loop_lag_then_down(watched: tuple[Daemon, Prometheus]) -> None:
    d, prom = watched
    assert d.proc is not None
    t0 = await watching(prom, d)

    # Freeze the daemon for 0.7 s right after a scrape: the tick timer (200 ms) fires 0.5-0.7 s
    # late, while every scrape is still answered within its 1 s timeout, so the daemon is never
    # seen down. One such tick among the few of the fast 5 minutes is past the 99th percentile.
    def scraped_at() -> float:
        target = prom.api("targets")["activeTargets"][0]
        return datetime.fromisoformat(target["lastScrape"]).timestamp() + float(target["lastScrapeDuration"])

    before = scraped_at()
    assert await asyncio.to_thread(prom.wait, lambda: scraped_at() > before, 5)
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(0.7)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    got = await fires(prom, "MeshauditEventLoopLag")
    assert got == {"MeshauditEventLoopLag": [{"instance": d.metrics_addr, "severity": "warning"}]}, got
    # the daemon measured it: a tick later than the rule's 0.25 s (0.5 s itself on a loaded machine)
    assert d.loop_lag_over("0.25") > 0
    t1 = await resolves(prom)
    assert fired_since(prom, t0) == {"MeshauditEventLoopLag"}

    d.kill()  # SIGKILL, to our daemon's PID
    got = await fires(prom, "MeshauditDown")
    assert got == {"MeshauditDown": [{**instance(d), "severity": "critical"}]}, got
    await asyncio.sleep(1.5)  # a few more evaluations: nothing else comes of it
    assert fired_since(prom, t1) == {"MeshauditDown"}


FAST_SINK = {"retry_initial_ms": 100, "retry_max_ms": 500, "attempt_timeout_ms": 500, "health_check_secs": 0.5}


async def violate(d: Daemon, n: int, first: int) -> None:
    """n plaintext requests into reviews, each from its own address: n distinct plaintext_hop
    alerts (severity high: no critical alert besides)."""
    entries = [
        als.inbound_http(None, path="/reviews/1", remote=f"10.7.{i // 200}.{i % 200 + 1}:5555")
        for i in range(first, first + n)
    ]
    await als.stream(d.grpc, [als.http_message(entries, als.identifier("reviews"))])


async def test_sink_not_ready_and_spool_growing_while_the_mqtt_broker_is_down(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    broker = mosquitto_factory()
    cfg = deep_merge(CONFIG, {"sinks": {"mqtt": {"port": broker.port, **FAST_SINK}}})
    with running(tmp_path, cfg) as d, prometheus(tmp_path, d.metrics_addr, [fast_rules(tmp_path)]) as prom:
        assert await asyncio.to_thread(prom.wait, lambda: prom.query('meshaudit_sink_ready{sink="mqtt"} == 1'))
        t0 = await watching(prom, d)

        broker.stop()  # our broker, by its PID
        got = await fires(prom, "MeshauditSinkNotReady")
        assert got == {"MeshauditSinkNotReady": [{**instance(d), "sink": "mqtt", "severity": "warning"}]}, got

        # Alerts keep coming, 3 batches of 50 distinct violations a second apart: they pile up
        # in the spool, past 100.
        for batch in range(3):
            await violate(d, 50, first=50 * batch)
            await asyncio.sleep(1)
        got = await fires(prom, "MeshauditSpoolGrowing")
        assert set(got) == {"MeshauditSinkNotReady", "MeshauditSpoolGrowing"}, got
        assert got["MeshauditSpoolGrowing"] == [{**instance(d), "sink": "mqtt", "severity": "warning"}]
        assert await asyncio.to_thread(d.wait_metric, "meshaudit_sink_spool_alerts", 150, sink="mqtt") == 150
        alerts = await asyncio.to_thread(d.wait_alerts, lambda a: len(a) >= 150)
        assert len(alerts) == 150 and {a["rule"] for a in alerts} == {"plaintext_hop"}

        assert fired_since(prom, t0) == {"MeshauditSinkNotReady", "MeshauditSpoolGrowing"}

        # The broker is back: the spool drains, both resolve.
        broker.start()
        await resolves(prom)
        assert await asyncio.to_thread(d.wait_metric, "meshaudit_sink_spool_alerts", 0, 10, sink="mqtt") == 0
        assert d.metric("meshaudit_sink_sent_total", sink="mqtt") >= 150
