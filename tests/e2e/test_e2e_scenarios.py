"""End to end: the meshaudit daemon audits a loopback mesh of real Envoy 1.40 sidecars and
OpenTelemetry SDK apps. Each scenario drives real traffic and must raise exactly its expected
alerts (read from the daemon's JSON-lines sink, as a user would) and no others; at the end
every Envoy's own stats must show no access log dropped, and the daemon's metrics must agree.

One daemon and one mesh serve the whole module (wall time); scenarios use disjoint
(rule, source, destination) keys, and each waits until the daemon has settled before the next.
A scenario whose rules the daemon does not have yet is skipped, saying which (see
``Scenario.rules_needed``); it runs as soon as they are merged.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from infra.chromium import Elements, dump_dom, screenshot  # type: ignore[import-not-found,unused-ignore]
from infra.daemon import Daemon  # type: ignore[import-not-found,unused-ignore]  # see meshlab.envoy
from infra.pki import CertificateAuthority  # type: ignore[import-not-found,unused-ignore]  # see meshlab.envoy
from meshlab.check import is_silence, run_scenario
from meshlab.mesh import DAEMON_SPIFFE, Mesh, daemon_tls
from meshlab.procs import wait_until
from meshlab.scenarios import SCENARIOS, Scenario, daemon_config, one_line, party_key

pytestmark = pytest.mark.e2e

# The scenarios run once, over mutual TLS: every sidecar (Envoy's gRPC cluster with a TLS transport
# socket) and SDK app sends with its own workload certificate from the mesh CA, which the daemon
# trusts as its client CA (as with Istio's root CA), and each stream's sender is checked against
# its node (log_source_mismatch raised only for the forged sidecar, and nothing refused).
FORGER = "spiffe://cluster.local/ns/default/sa/forger"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority) -> Iterator[Daemon]:
    config = {**daemon_config(), "receivers": {"tls": daemon_tls(ca)}}
    d = Daemon(tmp_path_factory.mktemp("meshaudit"), config).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def mesh(daemon: Daemon, ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    grpc_port = int(daemon.grpc.rsplit(":", 1)[1])
    http_port = int(daemon.http.rsplit(":", 1)[1])
    run_dir: Path = tmp_path_factory.mktemp("mesh")
    m = Mesh(run_dir, grpc_port, http_port, ca=ca, collector_spiffe=DAEMON_SPIFFE).start()
    yield m
    m.stop()


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, mesh: Mesh, daemon: Daemon) -> Iterator[None]:
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        print("\n===== alerts so far =====", file=sys.stderr)
        for a in daemon.alerts():
            print(one_line(a), file=sys.stderr)
        print(f"\n===== meshaudit stderr ({daemon.stderr_path}) =====", file=sys.stderr)
        print(daemon.stderr()[-8000:], file=sys.stderr)
        mesh.dump_logs()


def alerts_of(daemon: Daemon, rule: str) -> list[dict[str, Any]]:
    return [a for a in daemon.alerts() if a["rule"] == rule]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(scenario: Scenario, mesh: Mesh, daemon: Daemon) -> None:
    run_scenario(scenario, mesh, daemon.alerts)


def test_idle_sidecar_is_not_reported_silent(daemon: Daemon) -> None:
    # inventory's sidecar is silenced on purpose; reviews serves a request that bypasses its
    # sidecar (sidecar_bypass), which may legitimately read as silence. Every other sidecar
    # only went idle between scenarios, and idleness is not silence.
    legit = {"inventory.default", "reviews.default"}
    idle = [one_line(a) for a in daemon.alerts() if is_silence(a) and party_key(a["destination"]) not in legit]
    assert not idle, "\n".join(idle)


def test_envoy_stats_and_daemon_metrics_agree(mesh: Mesh, daemon: Daemon) -> None:
    stats = mesh.wait_access_logs_stable()
    # Envoy's own word: nothing dropped, nothing failed, and every sidecar that carried traffic
    # wrote access logs (the sidecars of skipped scenarios carried none).
    for service, s in stats.items():
        assert s.dropped == 0, (service, s)
        assert s.flush_failed == 0, (service, s)
        if service not in mesh.touched:
            continue
        assert s.flushed > 0, (service, s)
        if service != "db":  # a TCP-only sidecar: Envoy counts TCP entries as flushed, not written
            assert s.written > 0, (service, s)
    # ... and the daemon received every entry the sidecars flushed.
    flushed = sum(s.flushed for s in stats.values())

    def received() -> float:
        return float(daemon.metric("meshaudit_received_total", receiver="envoy_als"))

    wait_until(lambda: received() >= flushed, 5.0, 0.1)
    assert received() == flushed
    assert daemon.metric("meshaudit_received_total", receiver="otlp_grpc", kind="span") > 0
    assert daemon.metric("meshaudit_received_total", receiver="otlp_http", kind="span") > 0
    assert daemon.metric("meshaudit_dropped_total") == 0
    # Over mTLS: every stream and export came with its workload's identity, each claimed only its
    # own node or resource but the forged sidecar's (raised, not enforced: nothing refused).
    assert "sender=spiffe://cluster.local/ns/default/sa/frontend" in daemon.stderr()
    assert daemon.metric("meshaudit_rejected_total", reason="source_mismatch") == 0
    assert daemon.metric("meshaudit_rejected_total", reason="unauthenticated") == 0
    others = [a for a in alerts_of(daemon, "log_source_mismatch") if a["source"].get("principal") != FORGER]
    assert not [one_line(a) for a in others]
    # Every alert line the user read was counted on /metrics under its rule.
    alerts = daemon.alerts()
    for rule in ("plaintext_hop", "unexpected_edge", "unexpected_path", "missing_access_log"):
        lines = sum(1 for a in alerts if a["rule"] == rule)
        assert lines > 0, rule
        assert daemon.metric("meshaudit_alerts_total", rule=rule) == lines, rule
    assert not mesh.dead(), f"processes exited early: {mesh.dead()}"


def test_graph_page_and_report_render_in_chromium(mesh: Mesh, daemon: Daemon, tmp_path: Path) -> None:
    """What the scenarios sent, as an on-call engineer and a reviewer see it: /graph and the HTML
    report in real headless Chromium. The drawn edges and their mTLS state are those of
    /graph.json; the page refreshes itself; screenshots go to the test's output directory."""
    url = daemon.metrics_url

    def edges_json() -> dict[tuple[str, str], str]:
        with urllib.request.urlopen(f"{url}/graph.json?window=300", timeout=5) as r:
            view = json.loads(r.read())
        return {(e["source"], e["destination"]): e["mtls"] for e in view["edges"]}

    before = edges_json()
    dom = Elements(dump_dom(f"{url}/graph?window=300", wait_ms=7000))  # past one refresh
    after = edges_json()
    drawn = {(a["data-src"], a["data-dst"]): a["data-mtls"] for a in dom.all("g", class_="edge")}
    assert drawn in (before, after), (drawn, before)
    states = set(drawn.values())
    assert {"mtls", "plaintext"} <= states, states  # the scenarios sent both
    assert dom.all("g", class_="edge", data_violating="true"), "policy violations stand out"
    assert "updated " in "".join(dump_dom(f"{url}/graph?window=300", wait_ms=6000).split('id="status"')[1:2])
    shot = screenshot(f"{url}/graph?window=300", tmp_path / "graph.png")

    report = tmp_path / "report.html"
    cmd = [sys.executable, "-m", "meshaudit", "report", "--url", url, "--format", "html", "--since", "1h"]
    r = subprocess.run([*cmd, "-o", str(report)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    rdom = Elements(dump_dom(report.as_uri()))
    assert rdom.all("svg", id="coverage-chart") and rdom.all("polyline")
    rules = {a["data-rule"] for a in rdom.all("g", class_="bar")}
    assert {"plaintext_hop", "unexpected_edge", "missing_access_log"} <= rules, rules
    screenshot(report.as_uri(), tmp_path / "report.png", size="1200,1600")
    print(f"\nscreenshots: {shot} {tmp_path / 'report.png'}")
