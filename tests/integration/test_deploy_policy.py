"""The configuration and policy the Kubernetes ConfigMap ships (deploy/kubernetes/base/config),
run by the real daemon: Istio's bookinfo sample browsed through its ingress gateway, as the
gateway's and the sidecars' access logs report it over ALS, raises no alert; traffic the policy
does not allow, reported the same way, does."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from infra import als
from infra.daemon import Daemon, running

CONFIG_DIR = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "base" / "config"
GATEWAY_SA = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
POD_IPS = {"productpage": "10.1.0.11", "details": "10.1.0.12", "reviews": "10.1.0.13", "ratings": "10.1.0.14",
           "curl": "10.1.0.20"}  # fmt: skip
GATEWAY_IP = "10.1.0.5"
_ports = itertools.count(40000)


def sa(service: str) -> str:
    return f"spiffe://cluster.local/ns/default/sa/bookinfo-{service}"


def sidecar(service: str) -> Any:
    """The stream identifier of a bookinfo pod's sidecar (node cluster ``<svc>.default``)."""
    return als.identifier(service, "default", POD_IPS[service])


def gateway() -> Any:
    """The ingress gateway's: a ``router`` node in istio-system."""
    ident = als.identifier("istio-ingressgateway", "istio-system", GATEWAY_IP)
    ident.node.id = (
        f"router~{GATEWAY_IP}~istio-ingressgateway-6d8f9c7b5-q2x7l.istio-system~istio-system.svc.cluster.local"
    )
    return ident


class Mesh:
    """Access-log entries per reporting proxy, written as Istio's sidecars write them: the
    client's outbound entry and the server's inbound entry of each request, one x-request-id
    propagated along the page's calls, mTLS between the proxies."""

    def __init__(self, propagate: bool) -> None:
        """``propagate``: the apps forward the x-request-id they received on the calls they make
        (bookinfo's do), so one id runs through a page's calls; else each call has its own (an
        app that does not forward it: its sidecar makes a new one)."""
        self.logs: dict[str, list[Any]] = {}
        self.propagate = propagate

    def _log(self, who: str, entry: Any) -> None:
        self.logs.setdefault(who, []).append(entry)

    def call(
        self, src: str, dst: str, method: str, path: str, rid: str, peer: str | None = None, client_ip: str = ""
    ) -> None:
        """``src`` (a bookinfo service, or "gateway") calls ``dst`` on port 9080."""
        ip = client_ip or (GATEWAY_IP if src == "gateway" else POD_IPS[src])
        socket = f"{ip}:{next(_ports)}"  # the client sidecar's upstream socket = the server's downstream peer
        self._log(src, als.http_entry(
            cluster=f"outbound|9080||{dst}.default.svc.cluster.local", method=method, path=path,
            authority=f"{dst}:9080", request_id=rid, tls=False,
            remote=f"{ip}:{next(_ports)}" if src != "gateway" else f"198.51.100.7:{next(_ports)}",
            upstream_local=socket, details="via_upstream",
        ))  # fmt: skip
        self._log(dst, als.http_entry(
            cluster="inbound|9080||", method=method, path=path, authority=f"{dst}:9080", request_id=rid,
            peer=peer or (GATEWAY_SA if src == "gateway" else sa(src)), local=sa(dst), tls=True, remote=socket,
            details="via_upstream",
        ))  # fmt: skip

    def page(self, n: int) -> None:
        """A user's page view: the gateway routes it to productpage, which asks details and
        reviews; reviews (v2, v3) asks ratings."""
        first = str(uuid.uuid4())

        def rid() -> str:
            return first if self.propagate else str(uuid.uuid4())

        self.call("gateway", "productpage", "GET", "/productpage", first)
        self.call("productpage", "details", "GET", f"/details/{n}", rid())
        self.call("productpage", "reviews", "GET", f"/reviews/{n}", rid())
        self.call("reviews", "ratings", "GET", f"/ratings/{n}", rid())

    def browse(self, pages: int) -> None:
        for n in range(pages):
            self.page(n)
            # what else bookinfo-gateway.yaml routes: static files, login, logout, the API
            self.call("gateway", "productpage", "GET", "/static/bootstrap/css/bootstrap.min.css", str(uuid.uuid4()))
            self.call("gateway", "productpage", "GET", f"/api/v1/products/{n}/reviews", str(uuid.uuid4()))
        self.call("gateway", "productpage", "POST", "/login", str(uuid.uuid4()))
        self.call("gateway", "productpage", "GET", "/logout", str(uuid.uuid4()))
        # a pod that opted out of Istio's probe rewrite: the kubelet probes it in plaintext
        probe = als.http_entry(cluster="inbound|9080||", path="/health", tls=False, remote="10.128.0.3:51000")
        probe.request.user_agent = "kube-probe/1.30"
        self._log("details", probe)

    async def send(self, daemon: Daemon) -> int:
        sent = 0
        for who, entries in self.logs.items():
            ident = gateway() if who == "gateway" else sidecar(who)
            await als.stream(daemon.grpc, [als.http_message(entries, ident)])
            sent += len(entries)
        self.logs.clear()
        return sent


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """The daemon on the ConfigMap's files, as the pod mounts them; only the alert output is
    moved from stdout to a file the test reads (and the ports to free loopback ones)."""
    config: dict[str, Any] = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())
    assert config["sinks"]["jsonl"].pop("path") == "-"
    (tmp_path / "policy.yaml").write_text((CONFIG_DIR / "policy.yaml").read_text())
    with running(tmp_path, config) as d:
        yield d


async def browse_quietly(daemon: Daemon, mesh: Mesh) -> None:
    """Ten page views and the rest of what bookinfo-gateway.yaml routes: no alert."""
    mesh.browse(pages=10)
    sent = await mesh.send(daemon)
    assert daemon.wait_metric("meshaudit_received_total", sent, receiver="envoy_als") == sent
    assert daemon.wait_metric("meshaudit_hops_evaluated_total", sent) == sent
    # Longer than every wait the rules take for a request's other entry (pairing, denial: 1.5 s).
    assert daemon.wait_alerts(bool, timeout=4.0) == []
    assert daemon.metric("meshaudit_violations_total") == 0
    assert daemon.metric("meshaudit_policy_exception_matches_total", exception="kubelet-probes") > 0


async def test_bookinfo_through_its_ingress_gateway_raises_no_alert(daemon: Daemon) -> None:
    mesh = Mesh(propagate=False)
    await browse_quietly(daemon, mesh)

    # The same daemon does alert on what the policy does not allow: Istio's curl sample in the
    # default namespace calling ratings, and the gateway exposing a path bookinfo does not serve.
    mesh.call("curl", "ratings", "GET", "/ratings/0", str(uuid.uuid4()),
              peer="spiffe://cluster.local/ns/default/sa/curl")  # fmt: skip
    mesh.call("gateway", "productpage", "GET", "/admin", str(uuid.uuid4()))
    await mesh.send(daemon)
    got = daemon.wait_alerts(lambda a: len(a) >= 2, timeout=5.0)
    seen = {(a["rule"], a["source"]["service"], a["destination"]["service"]) for a in got}
    assert seen == {
        ("unexpected_edge", "curl", "ratings"),
        ("unexpected_path", "istio-ingressgateway", "productpage"),
    }, got


async def test_bookinfo_with_the_request_id_forwarded_along_a_page_raises_no_alert(daemon: Daemon) -> None:
    await browse_quietly(daemon, Mesh(propagate=True))
