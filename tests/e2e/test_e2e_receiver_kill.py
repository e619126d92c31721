"""Kill a receiver (issue 15): real Envoy sidecars stream their access logs to a collector cluster
of two receivers (``meshaudit run --role receiver``), health-checked over grpc.health.v1 with
outlier detection, as a Service of receivers is; one evaluator judges the hops. While traffic
flows, the receiver that holds both sidecars' access-log streams is SIGKILLed. Envoy moves its
streams to the other receiver (its admin ``/clusters`` shows the dead one failed and ejected,
the live one connected). Every violation sent after Envoy reconnected is alerted; what was in
flight to the dead receiver is lost, uncounted by Envoy (its ``logs_dropped`` counts entries it
could not buffer, not those written to a connection that died), and bounded: everything sent a
second before the kill is alerted. The figures are printed.

The traffic: frontend calls details, an edge the policy does not allow, every 0.1 s: each request
is one unexpected_edge violation with its own request id. Alert windows of one second and up to
20 examples an alert put every request id judged in some alert's evidence.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from infra.brokers import Tansu, create_topic  # type: ignore[import-not-found,unused-ignore]
from infra.daemon import Daemon, deep_merge  # type: ignore[import-not-found,unused-ignore]
from meshlab.mesh import Collector, Mesh, Peer, ServiceSpec
from meshlab.procs import wait_until
from meshlab.scenarios import daemon_config

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

TOPIC = "meshaudit.hops.receiver-kill"
PARTITIONS = 4
# frontend -> details is not an edge of the policy: every request is a violation.
TOPOLOGY = [ServiceSpec("frontend", peers=(Peer("details"),)), ServiceSpec("details")]
CALL_EVERY = 0.1
MAX_CALLS = 300  # the traffic loop's bound (30 s)
AFTER_SECS = 3.0  # traffic after Envoy reconnected


def _collector(d: Daemon) -> Collector:
    return Collector(int(d.grpc.rsplit(":", 1)[1]), int(d.http.rsplit(":", 1)[1]))


def _port(d: Daemon) -> int:
    return int(d.grpc.rsplit(":", 1)[1])


@pytest.fixture
def tiers(tansu: Tansu, tmp_path: Path) -> Iterator[dict[str, Daemon]]:
    """Receivers ``a`` and ``b`` and evaluator ``e`` on the session's Tansu, ``b`` not started yet
    (its ports chosen); all stopped at teardown."""
    asyncio.run(create_topic(tansu.port, TOPIC, PARTITIONS))
    distributed = {"bootstrap_servers": [tansu.bootstrap], "hops_topic": TOPIC, "linger_ms": 1}
    group = {"group_id": "receiver-kill", "session_timeout_ms": 3000, "commit_interval_ms": 500}
    group |= {"edges_topic": f"{TOPIC}-edges", "edges_partitions": PARTITIONS, "create_topic": True}  # stage 2
    evaluator = deep_merge(
        daemon_config(suppress_secs=1), {"engine": {"examples": 20}, "distributed": {**distributed, **group}}
    )
    tiers = {n: Daemon(tmp_path, {"distributed": distributed}, f"receiver-{n}", ["--role", "receiver"]) for n in "ab"}
    tiers["e"] = Daemon(tmp_path, evaluator, "evaluator", ["--role", "evaluator"])
    try:
        tiers["a"].start()
        tiers["e"].start()
        assert wait_until(lambda: tiers["e"].metric("meshaudit_evaluator_partitions") == PARTITIONS, 20, 0.2)
        yield tiers
    finally:
        for d in tiers.values():
            if d.proc is not None:
                d.stop()


@pytest.fixture
def mesh(tiers: dict[str, Daemon], tmp_path: Path) -> Iterator[Mesh]:
    """frontend and details, each sidecar's collector cluster listing both receivers."""
    a, b = _collector(tiers["a"]), _collector(tiers["b"])
    m = Mesh(tmp_path / "mesh", a.grpc_port, a.http_port, topology=TOPOLOGY, collector_pool=(a, b)).start()
    try:
        yield m
    except BaseException:
        m.dump_logs()
        raise
    finally:
        m.stop()


def _examples(alerts: list[dict[str, Any]]) -> set[str]:
    """Request ids in the evidence of frontend -> details unexpected_edge alerts."""
    return {
        ex["request_id"]
        for a in alerts
        if a["rule"] == "unexpected_edge" and a["destination"]["service"] == "details"
        for ex in a["evidence"]["examples"]
    }


def test_a_killed_receivers_envoys_move_to_the_other_and_no_alert_is_lost_after_they_reconnect(
    tiers: dict[str, Daemon], mesh: Mesh
) -> None:
    sent: list[tuple[float, str]] = []  # (monotonic time of the call, its request id)
    stop = threading.Event()

    def traffic() -> None:
        for i in range(MAX_CALLS):
            if stop.is_set():
                return
            at = time.monotonic()
            for r in mesh.call("frontend", "details", f"/details/{i}"):
                assert r["status"] == 200 and r["request_id"], r
                sent.append((at, r["request_id"]))
            time.sleep(CALL_EVERY)

    a, b = tiers["a"], tiers["b"]
    sidecars = [mesh.envoy(s) for s in ("frontend", "details")]
    driver = threading.Thread(target=traffic, daemon=True)
    driver.start()
    try:
        # With b not started yet, both sidecars stream to a (one access-log stream each); then b
        # starts, and Envoy's health check finds it serving. The streams stay where they are.
        assert wait_until(lambda: a.metric("meshaudit_als_streams_active") == 2, 15, 0.2)
        assert wait_until(lambda: len(_examples(tiers["e"].alerts())) >= 5, 15, 0.2)
        b.start()
        assert wait_until(lambda: all(e.cluster_hosts()[_port(b)].healthy for e in sidecars), 10, 0.1)
        assert b.metric("meshaudit_als_streams_active") == 0
        envoy_before = {e.spec.service: e.access_log_stats() for e in sidecars}

        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)  # the receiver this test started, by its PID
        a.proc.wait()
        killed_at = time.monotonic()

        # Envoy reconnects: both streams on b, a failed in Envoy's eyes and b connected, for both
        # sidecars.
        def moved_over() -> bool:
            if b.metric("meshaudit_als_streams_active") < 2:
                return False
            hosts = [e.cluster_hosts() for e in sidecars]
            return all(not h[_port(a)].healthy and h[_port(b)].cx_active > 0 for h in hosts)

        assert wait_until(moved_over, 15, 0.1), [e.cluster_hosts() for e in sidecars]
        reconnected_at = time.monotonic()
        time.sleep(AFTER_SECS)
    finally:
        stop.set()
        driver.join(10)
    assert not driver.is_alive()

    after = {rid for at, rid in sent if at > reconnected_at}
    assert len(after) >= AFTER_SECS / CALL_EVERY / 2, f"only {len(after)} requests after reconnection"
    ev = tiers["e"]
    assert wait_until(lambda: after <= _examples(ev.alerts()), 15, 0.2), sorted(after - _examples(ev.alerts()))

    # What was lost: requests of the last moments before the reconnection whose two entries
    # were both in flight to the killed receiver (accepted by it and not produced yet, or written
    # by Envoy to the dead connection). Everything sent a second before the kill was produced.
    alerted = _examples(ev.alerts())
    assert {rid for at, rid in sent if at < killed_at - 1} <= alerted
    gap = [rid for at, rid in sent if killed_at - 1 <= at <= reconnected_at]
    lost = [rid for rid in gap if rid not in alerted]
    # Envoy counts none of them: logs_dropped counts entries it could not buffer (a stream over
    # its buffer), grpc_entries_flush_failed those it could not write; these it wrote.
    envoy_after = {e.spec.service: e.access_log_stats() for e in sidecars}
    dropped = {s: envoy_after[s].dropped - envoy_before[s].dropped for s in envoy_after}
    failed = {s: envoy_after[s].flush_failed - envoy_before[s].flush_failed for s in envoy_after}
    hosts = {e.spec.service: e.cluster_hosts() for e in sidecars}
    print(
        f"\nreceiver a killed holding both streams; Envoy on b in "
        f"{reconnected_at - killed_at:.2f} s; requests around the kill {len(gap)}, not alerted {len(lost)}; "
        f"Envoy logs_dropped {dropped}, grpc_entries_flush_failed {failed}; {len(after)} requests after, all alerted"
    )
    assert ev.metric("meshaudit_engine_errors_total") == 0
    assert b.metric("meshaudit_hops_unproduced_total") == 0
    print(f"Envoy's view of the collector cluster: {hosts}")
    assert not mesh.dead(), mesh.dead()
