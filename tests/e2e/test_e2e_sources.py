"""End to end: a real Envoy sidecar whose node claims to be reviews' but which sends its access
logs with frontend's workload certificate (Envoy's gRPC cluster with a TLS transport socket).
The daemon names the sender from the certificate and raises log_source_mismatch; with
enforce_sources the sidecar's entries are rejected (counted) and not evaluated."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from infra.daemon import Daemon, running  # type: ignore[import-not-found,unused-ignore]  # see meshlab.envoy
from infra.pki import CertificateAuthority  # type: ignore[import-not-found,unused-ignore]  # see meshlab.envoy
from meshlab.envoy import Envoy, SidecarSpec
from meshlab.mesh import DAEMON_SPIFFE, daemon_tls
from meshlab.procs import ProcGroup, free_ports, wait_until

pytestmark = pytest.mark.e2e

FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"


def config(ca: CertificateAuthority, enforce: bool) -> dict[str, object]:
    return {"engine": {"tick_ms": 100}, "receivers": {"tls": daemon_tls(ca), "enforce_sources": enforce}}


@pytest.fixture
def forged(tmp_path: Path) -> Iterator[tuple[CertificateAuthority, Path, ProcGroup]]:
    group = ProcGroup()
    yield CertificateAuthority(tmp_path / "pki"), tmp_path, group
    group.stop_all()


def start_forged_sidecar(ca: CertificateAuthority, run_dir: Path, group: ProcGroup, daemon: Daemon) -> int:
    """reviews' node, frontend's certificate towards the daemon; returns its outbound port."""
    admin, app, inbound, outbound = free_ports(4)
    spec = SidecarSpec(
        service="reviews",
        namespace="default",
        pod="reviews-v1-00001",
        certs=ca.issue("default", "reviews"),
        ca_cert=ca.cert_path,
        admin_port=admin,
        collector_port=int(daemon.grpc.rsplit(":", 1)[1]),
        app_port=app,
        inbound_port=inbound,
        outbound_port=outbound,
        collector_certs=ca.issue("default", "frontend"),
        collector_spiffe=DAEMON_SPIFFE,
    )
    envoy = Envoy.start(spec, run_dir, group, base_id=int(daemon.grpc.rsplit(":", 1)[1]) % 5000 * 10 + 7)
    envoy.wait_ready()
    return outbound


def call_outside_the_registry(outbound: int, n: int) -> None:
    """Requests for a host the sidecar has no route for: each is logged (block_all, BlackHoleCluster)."""
    for i in range(n):
        req = urllib.request.Request(f"http://127.0.0.1:{outbound}/x/{i}", headers={"Host": "nowhere.example"})
        try:
            urllib.request.urlopen(req, timeout=5).read()
        except urllib.error.HTTPError as exc:
            exc.read()


def test_a_sidecar_claiming_another_node_raises_log_source_mismatch(
    forged: tuple[CertificateAuthority, Path, ProcGroup],
) -> None:
    ca, tmp, group = forged
    (tmp / "d").mkdir()
    with running(tmp / "d", config(ca, enforce=False)) as d:
        outbound = start_forged_sidecar(ca, tmp, group, d)
        call_outside_the_registry(outbound, 3)
        got = d.wait_alerts(lambda a: any(x["rule"] == "log_source_mismatch" for x in a), timeout=10)
        [a] = [x for x in got if x["rule"] == "log_source_mismatch"]
        assert a["source"]["principal"] == FRONTEND
        assert (a["destination"]["service"], a["destination"]["namespace"]) == ("reviews", "default")
        # Its access-log stream claims reviews' node and its tracer's spans reviews' service: both
        # are violations of one (rule, sender, workload), alerted once and counted.
        assert "claimed node sidecar~127.0.0.1~reviews-v1-00001" in a["evidence"]["detail"] or (
            "claimed resource service.name reviews.default" in a["evidence"]["detail"]
        )
        node = "sidecar~127.0.0.1~reviews-v1-00001.default~default.svc.cluster.local"
        opened = f"Access-log stream opened: node={node} log_name=http_envoy_accesslog"
        assert wait_until(lambda: opened in d.stderr(), 5.0, 0.1)
        assert f"sender={FRONTEND}" in d.stderr()
        # ... and its claim was judged: the node is not frontend's
        assert wait_until(lambda: f"{FRONTEND} sent envoy_als as node {node}" in d.stderr(), 5.0, 0.1)
        assert wait_until(lambda: d.metric("meshaudit_violations_total", rule="log_source_mismatch") >= 2, 5.0, 0.1)
        # Not enforced: the entries were evaluated.
        assert wait_until(lambda: d.metric("meshaudit_received_total", receiver="envoy_als") >= 3, 5.0, 0.1)
        assert wait_until(lambda: d.metric("meshaudit_hops_evaluated_total") >= 3, 5.0, 0.1)
        assert d.wait_metric("meshaudit_rejected_total", 0, reason="source_mismatch") == 0


def test_with_enforce_sources_its_entries_are_rejected_not_evaluated(
    forged: tuple[CertificateAuthority, Path, ProcGroup],
) -> None:
    ca, tmp, group = forged
    (tmp / "d").mkdir()
    with running(tmp / "d", config(ca, enforce=True)) as d:
        outbound = start_forged_sidecar(ca, tmp, group, d)
        call_outside_the_registry(outbound, 3)
        got = d.wait_alerts(lambda a: any(x["rule"] == "log_source_mismatch" for x in a), timeout=10)
        [a] = [x for x in got if x["rule"] == "log_source_mismatch"]
        assert "rejected (enforce_sources)" in a["evidence"]["detail"]
        assert wait_until(
            lambda: d.metric("meshaudit_rejected_total", receiver="envoy_als", reason="source_mismatch") >= 3, 5.0, 0.1
        )
        assert d.metric("meshaudit_hops_evaluated_total") == 0
        assert [x["rule"] for x in d.alerts()] == ["log_source_mismatch"]
