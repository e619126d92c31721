"""What the mesh is allowed to do (the policy given to the daemon) and the traffic scenarios
that the end-to-end tests check one by one and ``make demo`` mixes: good traffic and each
kind of violation, each with the alerts it must raise.

Every scenario uses its own (rule, source, destination) keys, so the alerts of one cannot
hide (by suppression) or stand in for another's when they share one daemon and one mesh.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshlab.mesh import Mesh

SERVICES = ("frontend", "reviews", "ratings", "details", "inventory", "db")

POLICY: dict[str, Any] = {
    "mesh_services": [f"{s}.default" for s in SERVICES],
    "edges": [
        {"from": ["frontend.default"], "to": ["reviews.default", "ratings.default", "inventory.default"]},
        {"from": ["reviews.default"], "to": ["ratings.default", "db.default"]},
    ],
    "routes": [
        {"to": ["reviews.default"], "allow": [{"methods": ["GET"], "paths": ["/reviews/*"]}]},
        {"to": ["ratings.default"], "allow": [{"methods": ["GET"], "paths": ["/ratings/*"]}]},
    ],
    "exemptions": [
        {
            "rules": ["plaintext_hop", "unexpected_edge", "unexpected_path"],
            "paths": ["/healthz"],
            "reason": "kubelet probes: plaintext, from outside the mesh",
        }
    ],
}

# Short windows so a scenario settles in seconds: Envoy flushes access logs and spans every
# 0.2 s here, the SDK apps every 0.2 s.
GRACE_MS = 1500
SILENT_SECS = 3
ATTRIBUTION_WAIT_MS = 1000


def daemon_config(suppress_secs: int = 3600, silent_secs: int = SILENT_SECS) -> dict[str, Any]:
    return {
        "engine": {"suppress_secs": suppress_secs, "tick_ms": 100},
        "rules": {
            "missing_access_log": {"grace_ms": GRACE_MS, "silent_secs": silent_secs},
            "plaintext_hop": {"attribution_wait_ms": ATTRIBUTION_WAIT_MS},
        },
        "policy": POLICY,
    }


@dataclass(frozen=True)
class Expected:
    """An alert a scenario must raise: rule and destination service; ``sources`` are the
    acceptable source keys (``service.namespace``, or an address when the daemon can name
    nothing better), None when any source is acceptable."""

    rule: str
    dst: str
    sources: tuple[str, ...] | None
    required: bool = True  # False: may appear (timing decides), must not be anything else
    during_traffic: bool = False  # True: must be emitted before the scenario's traffic ended

    def matches(self, alert: dict[str, Any]) -> bool:
        return (
            alert["rule"] == self.rule
            and party_key(alert["destination"]) == self.dst
            and (self.sources is None or party_key(alert["source"]) in self.sources)
        )


def party_key(party: dict[str, Any]) -> str:
    if party.get("service"):
        return f"{party['service']}.{party['namespace']}" if party.get("namespace") else str(party["service"])
    return str(party.get("principal") or party.get("address") or "unknown")


# --- traffic ----------------------------------------------------------------------------------
def mtls_inside_policy(mesh: Mesh) -> None:
    """frontend -> reviews and reviews -> ratings over mTLS, allowed edges, allowed paths."""
    for r in mesh.call("frontend", "reviews", "/reviews/1", count=3):
        assert r["status"] == 200, r
    for r in mesh.call("reviews", "ratings", "/ratings/1", count=2):
        assert r["status"] == 200, r


def plaintext_http(mesh: Mesh) -> None:
    """frontend's sidecar talks plaintext to ratings (TLS disabled for that destination)."""
    for r in mesh.call("frontend", "ratings", "/ratings/2", count=2):
        assert r["status"] == 200, r


def edge_not_in_policy(mesh: Mesh) -> None:
    """frontend -> details over mTLS: no policy edge allows it."""
    for r in mesh.call("frontend", "details", "/details/1", count=2):
        assert r["status"] == 200, r


def path_not_allowed(mesh: Mesh) -> None:
    """reviews -> ratings is an allowed edge, but only GET /ratings/* is."""
    for r in mesh.call("reviews", "ratings", "/admin/reset", method="DELETE", count=2):
        assert r["status"] == 200, r


def sidecar_bypass(mesh: Mesh) -> None:
    """frontend's app calls reviews' app port directly; both apps trace (OTel SDK)."""
    for r in mesh.call("frontend", "reviews", "/reviews/2", via="direct", count=2):
        assert r["status"] == 200, r


def plaintext_tcp(mesh: Mesh) -> None:
    """reviews -> db over a plaintext TCP proxy pair."""
    for r in mesh.tcp("reviews", "db", "SELECT 1", count=2):
        assert r["reply"] == "db:SELECT 1", r


def health_probe(mesh: Mesh) -> None:
    """A kubelet-style plaintext probe of /healthz on two sidecars: exempted by policy."""
    for svc in ("reviews", "ratings"):
        for _ in range(2):
            assert mesh.probe(svc, "/healthz") == 200


def silent_sidecar(mesh: Mesh, serve_secs: float = SILENT_SECS + 2.5) -> None:
    """inventory's sidecar stops sending access logs while frontend keeps calling it."""
    assert mesh.call("frontend", "inventory", "/inventory/0")[0]["status"] == 200
    time.sleep(0.6)  # the sidecar's last access log reaches the daemon
    mesh.envoy("inventory").silence_access_logs()
    deadline = time.monotonic() + serve_secs
    while time.monotonic() < deadline:
        assert mesh.call("frontend", "inventory", "/inventory/1")[0]["status"] == 200
        time.sleep(0.3)


@dataclass(frozen=True)
class Scenario:
    name: str
    drive: Callable[[Mesh], None]
    expected: tuple[Expected, ...]
    title: str


# The daemon can name the caller of a bypassed or silent sidecar only from traces; on loopback
# every address is 127.0.0.1, so an address source is accepted beside the calling service.
SCENARIOS: tuple[Scenario, ...] = (
    Scenario("mtls_inside_policy", mtls_inside_policy, (), "mTLS hop inside policy"),
    Scenario(
        "plaintext_http",
        plaintext_http,
        (Expected("plaintext_hop", "ratings.default", ("frontend.default",)),),
        "plaintext HTTP hop",
    ),
    Scenario(
        "edge_not_in_policy",
        edge_not_in_policy,
        (Expected("unexpected_edge", "details.default", ("frontend.default",)),),
        "edge not in policy",
    ),
    Scenario(
        "path_not_allowed",
        path_not_allowed,
        (Expected("unexpected_path", "ratings.default", ("reviews.default",)),),
        "path not allowed",
    ),
    Scenario(
        "sidecar_bypass",
        sidecar_bypass,
        (
            Expected("missing_access_log", "reviews.default", ("frontend.default", "127.0.0.1")),
            # reviews serves (its SDK spans say so) while its sidecar logs nothing: when its
            # sidecar had been idle for silent_secs, that is a silent sidecar too.
            Expected("missing_access_log", "reviews.default", ("*",), required=False),
        ),
        "app port called directly, skipping the sidecars",
    ),
    Scenario(
        "plaintext_tcp",
        plaintext_tcp,
        (Expected("plaintext_hop", "db.default", ("reviews.default",)),),
        "plaintext TCP connection",
    ),
    Scenario("health_probe", health_probe, (), "health-check path exempted by policy"),
    Scenario(
        "silent_sidecar",
        silent_sidecar,
        (
            # Per request (a span with no access log), named by whatever traces show ...
            Expected("missing_access_log", "inventory.default", None),
            # ... and as a silent sidecar, about all of its traffic, while the traffic goes on.
            Expected("missing_access_log", "inventory.default", ("*",), during_traffic=True),
        ),
        "sidecar stops sending access logs while its service serves",
    ),
)


def one_line(alert: dict[str, Any]) -> str:
    """An alert as one readable line: rule, source -> destination, count, an example."""
    ev = alert.get("evidence") or {}
    examples = ev.get("examples") or []
    example = ""
    if examples:
        ex = examples[0]
        what = " ".join(x for x in (ex.get("method"), ex.get("path")) if x) or "a TCP connection"
        ids = ex.get("trace_id") or ex.get("request_id") or ""
        example = f"  e.g. {what}" + (f" (trace {ids[:16]})" if ids else "")
    elif ev.get("detail"):
        example = f"  ({ev['detail']})"
    return (
        f"[{alert.get('severity', '?'):>8}] {alert['rule']:<18} "
        f"{party_key(alert['source'])} -> {party_key(alert['destination'])}  x{ev.get('count', 1)}{example}"
    )
