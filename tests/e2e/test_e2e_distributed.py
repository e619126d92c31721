"""End to end in the distributed mode: the loopback mesh of real Envoy sidecars and OTel SDK apps
streams, over mutual TLS, to two receivers (``meshaudit run --role receiver``), which produce
their hops to one Tansu topic of several partitions; two evaluators (``--role evaluator``, one
consumer group) judge them. Each scenario of the one-process e2e suite must raise exactly its
alerts across the two evaluators' JSON-lines sinks (merged, an id seen twice is one alert:
at-least-once), nothing else.

Every workload is pinned to one receiver: each sidecar's collector cluster (its access logs and
Envoy's spans) goes to receiver A or B so that a request's client and server sidecars stream to
different receivers, and each SDK app exports its spans to the receiver its own sidecar does not
use. Correlation then only works because receivers key hops by correlation key into partitions.

Per-edge windows (error_burst, excessive_retries) and alert windows are judged across the
evaluators through the edges topic (stage 2, keyed by rule|source|destination). A sender's
mismatched claim (log_source_mismatch) travels on the hops topic to the evaluator of its sender's
partition, which raises it as one process does. Every scenario runs.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from infra.brokers import Tansu  # type: ignore[import-not-found,unused-ignore]
from infra.daemon import Daemon, deep_merge  # type: ignore[import-not-found,unused-ignore]
from infra.pki import CertificateAuthority  # type: ignore[import-not-found,unused-ignore]
from meshlab.check import is_silence, run_scenario, skip_unless_rules
from meshlab.mesh import DAEMON_SPIFFE, Collector, Mesh, daemon_tls, default_topology
from meshlab.procs import wait_until
from meshlab.scenarios import SCENARIOS, Scenario, daemon_config, one_line, party_key

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

TOPIC = "meshaudit.hops.e2e"
EDGES_TOPIC = "meshaudit.edges.e2e"
PARTITIONS = 6

# Receiver A takes these sidecars, B the others. The mesh's calls form odd cycles
# (frontend-reviews-ratings, frontend-orders-checkout-db-reviews), so no two-way pinning separates
# every pair; frontend -> reviews is on both, and is the one pair pinned together (its scenario,
# mtls_inside_policy, raises nothing, and its other request, reviews -> ratings, crosses).
ON_A = frozenset({"frontend", "reviews", "checkout", "impostor", "forger"})
SAME_RECEIVER = frozenset({("frontend", "reviews")})


OTHER = {"a": "b", "b": "a"}


def receiver_of(service: str) -> str:
    return "a" if service in ON_A else "b"


def calls() -> list[tuple[str, str]]:
    """(client, server) of every HTTP and TCP call the mesh is wired for: the scenarios' requests."""
    return [(s.name, p.service) for s in default_topology() for p in (*s.peers, *s.tcp_peers)]


class MergedAlerts:
    """The alerts of several evaluators' JSON-lines sinks as one append-only list in the order
    they were read, each id once (a consumer deduplicating by id); ``duplicates`` counts the
    repeats."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.offsets = [0] * len(paths)
        self.seen: set[str] = set()
        self.alerts: list[dict[str, Any]] = []
        self.duplicates = 0

    def __call__(self) -> list[dict[str, Any]]:
        for i, path in enumerate(self.paths):
            try:
                data = path.read_bytes()[self.offsets[i] :]
            except FileNotFoundError:
                continue
            complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
            self.offsets[i] += len(complete)
            for line in complete.splitlines():
                if not line.strip():
                    continue
                alert = orjson.loads(line)
                if alert["id"] in self.seen:
                    self.duplicates += 1
                    continue
                self.seen.add(alert["id"])
                self.alerts.append(alert)
        return list(self.alerts)


async def _create_topic(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1), NewTopic(EDGES_TOPIC, PARTITIONS, 1)])
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tiers(
    tansu: Tansu, ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Daemon]]:
    """Receivers ``a`` and ``b`` (mTLS, as the one-process daemon of the e2e suite) and
    evaluators ``e1`` and ``e2`` in one group, every partition owned; all stopped at teardown."""
    asyncio.run(_create_topic(tansu.bootstrap))
    workdir = tmp_path_factory.mktemp("distributed")
    distributed = {
        "bootstrap_servers": [tansu.bootstrap],
        "hops_topic": TOPIC,
        "edges_topic": EDGES_TOPIC,
        "group_id": "e2e-evaluators",
        "session_timeout_ms": 3000,
        "commit_interval_ms": 500,
        "linger_ms": 1,
    }
    receiver = {"distributed": distributed, "receivers": {"tls": daemon_tls(ca)}}
    evaluator = deep_merge(daemon_config(), {"distributed": distributed})
    started: dict[str, Daemon] = {}
    try:
        for name in ("a", "b"):
            started[name] = Daemon(workdir, receiver, f"receiver-{name}", ["--role", "receiver"]).start()
        for name in ("e1", "e2"):
            started[name] = Daemon(workdir, evaluator, f"evaluator-{name}", ["--role", "evaluator"]).start()
        owned = [started["e1"], started["e2"]]

        def shared() -> bool:
            for metric in ("meshaudit_evaluator_partitions", "meshaudit_evaluator_edges_partitions"):
                counts = [d.metric(metric) for d in owned]
                if sum(counts) != PARTITIONS or min(counts) == 0:
                    return False
            return True

        assert wait_until(shared, 30.0, 0.2), "the evaluators did not share the partitions"
        yield started
    finally:
        for d in started.values():
            d.stop()


@pytest.fixture(scope="module")
def alerts(tiers: dict[str, Daemon]) -> MergedAlerts:
    return MergedAlerts([tiers["e1"].alerts_path, tiers["e2"].alerts_path])


@pytest.fixture(scope="module")
def mesh(
    tiers: dict[str, Daemon], ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    def collector(d: Daemon) -> Collector:
        return Collector(int(d.grpc.rsplit(":", 1)[1]), int(d.http.rsplit(":", 1)[1]))

    services = [s.name for s in default_topology()]
    sidecars = {s: collector(tiers[receiver_of(s)]) for s in services}
    apps = {s: collector(tiers[OTHER[receiver_of(s)]]) for s in services}
    a = collector(tiers["a"])
    m = Mesh(
        tmp_path_factory.mktemp("mesh"),
        a.grpc_port,
        a.http_port,
        ca=ca,
        collector_spiffe=DAEMON_SPIFFE,
        sidecar_collectors=sidecars,
        app_collectors=apps,
    ).start()
    yield m
    m.stop()


@pytest.fixture(autouse=True)
def _logs_on_failure(
    request: pytest.FixtureRequest, mesh: Mesh, tiers: dict[str, Daemon], alerts: MergedAlerts
) -> Iterator[None]:
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        print("\n===== alerts so far (both evaluators, by id) =====", file=sys.stderr)
        for a in alerts():
            print(one_line(a), file=sys.stderr)
        for name, d in tiers.items():
            print(f"\n===== {name} stderr ({d.stderr_path}) =====", file=sys.stderr)
            print(d.stderr()[-5000:], file=sys.stderr)
        mesh.dump_logs()


def test_each_request_crosses_receivers() -> None:
    """The pinning itself: every call's two sidecars stream to different receivers but the one
    pair named, and each SDK app to the receiver its sidecar does not use (fixture ``mesh``)."""
    together = [(c, s) for c, s in calls() if receiver_of(c) == receiver_of(s)]
    assert set(together) == SAME_RECEIVER, together
    assert {receiver_of(s.name) for s in default_topology()} == {"a", "b"}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(scenario: Scenario, mesh: Mesh, alerts: MergedAlerts) -> None:
    skip_unless_rules(scenario)
    run_scenario(scenario, mesh, alerts)


def test_idle_sidecar_is_not_reported_silent(alerts: MergedAlerts) -> None:
    # As in the one-process suite: inventory is silenced on purpose, reviews served a request
    # that bypassed its sidecar; every other sidecar was only idle between scenarios.
    legit = {"inventory.default", "reviews.default"}
    idle = [one_line(a) for a in alerts() if is_silence(a) and party_key(a["destination"]) not in legit]
    assert not idle, "\n".join(idle)


def test_each_receiver_got_the_streams_pinned_to_it_and_every_entry(
    mesh: Mesh, tiers: dict[str, Daemon], alerts: MergedAlerts
) -> None:
    stats = mesh.wait_access_logs_stable()
    for service, s in stats.items():
        assert s.dropped == 0, (service, s)
        assert s.flush_failed == 0, (service, s)
    # Each receiver's access-log streams came from exactly the sidecars pinned to it that logged
    # anything, each sender named by its certificate (mTLS).
    logging = {s for s, st in stats.items() if st.flushed > 0}
    for name in ("a", "b"):
        d = tiers[name]
        pinned = {s for s in logging if receiver_of(s) == name}
        senders = set(
            re.findall(r"Access-log stream opened: .* sender=spiffe://cluster.local/ns/default/sa/(\S+)", d.stderr())
        )
        assert senders == pinned, (name, senders, pinned)
        assert d.metric("meshaudit_als_streams_active") >= len(pinned) > 0, name
        assert d.metric("meshaudit_rejected_total", reason="unauthenticated") == 0
        assert d.metric("meshaudit_hops_evaluated_total") == 0  # receivers judge nothing
    # SDK apps export to the receiver their sidecar does not use: frontend's (OTLP/HTTP) to B.
    sidecar, app = tiers[receiver_of("frontend")], tiers[OTHER[receiver_of("frontend")]]
    assert app.metric("meshaudit_received_total", receiver="otlp_http", kind="span") > 0
    assert sidecar.metric("meshaudit_received_total", receiver="otlp_http", kind="span") == 0
    # The receivers got every entry the sidecars flushed, and produced every hop they decoded.
    flushed = sum(s.flushed for s in stats.values())

    def received() -> float:
        return sum(tiers[n].metric("meshaudit_received_total", receiver="envoy_als") for n in ("a", "b"))

    wait_until(lambda: received() >= flushed, 5.0, 0.1)
    assert received() == flushed
    for n in ("a", "b"):
        assert tiers[n].metric("meshaudit_dropped_total") == 0
        assert tiers[n].metric("meshaudit_hops_unproduced_total") == 0
        assert tiers[n].metric("meshaudit_source_claims_unforwarded_total") == 0  # forger's: produced
        assert tiers[n].metric("meshaudit_received_total", receiver="otlp_grpc", kind="span") > 0
    produced = sum(tiers[n].metric("meshaudit_hops_produced_total") for n in ("a", "b"))
    assert produced > 0

    def judged() -> float:
        return sum(tiers[n].metric("meshaudit_evaluator_hops_total", phase="judge") for n in ("e1", "e2"))

    assert wait_until(lambda: judged() >= produced, 10.0, 0.2), (produced, judged())
    # Both evaluators judged, and each alert line was counted by the evaluator that wrote it.
    for n in ("e1", "e2"):
        assert tiers[n].metric("meshaudit_evaluator_hops_total", phase="judge") > 0, n
        lines = tiers[n].alerts()
        assert tiers[n].metric("meshaudit_alerts_total") == len(lines), n
    print(f"\nalerts: {len(alerts())} by id, {alerts.duplicates} repeated ids")
    assert not mesh.dead(), f"processes exited early: {mesh.dead()}"
