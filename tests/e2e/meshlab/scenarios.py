"""What the mesh is allowed to do (the policy given to the daemon) and the traffic scenarios
that the end-to-end tests check one by one and ``make demo`` mixes: good traffic and each
kind of violation, each with the alerts it must raise.

Every scenario uses its own (rule, source, destination) keys, so the alerts of one cannot
hide (by suppression) or stand in for another's when they share one daemon and one mesh.

Some scenarios need rules (or alert evidence) that a given daemon may not have yet:
``Scenario.rules_needed`` names them, and the tests skip such a scenario, saying why, until the
daemon knows them (:func:`known_rules`); ``make demo`` drives their traffic anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshaudit.sinks.text import party, readable

from meshlab.mesh import Mesh

SERVICES = (
    "frontend",
    "reviews",
    "ratings",
    "details",
    "inventory",
    "db",
    "checkout",
    "payments",
    "orders",
    "catalog",
    "impostor",
    "forger",
)

POLICY: dict[str, Any] = {
    "mesh_services": [f"{s}.default" for s in SERVICES],
    "edges": [
        {
            "from": ["frontend.default"],
            "to": ["reviews.default", "ratings.default", "inventory.default", "orders.default"],
        },
        {"from": ["reviews.default"], "to": ["ratings.default", "db.default"]},
        # checkout may call these; not details, not ratings (forbidden_edges_enforced).
        {"from": ["checkout.default"], "to": ["payments.default", "orders.default", "catalog.default", "db.default"]},
        # impostor may call ratings: in identity_mismatch only its certificate is wrong.
        {"from": ["impostor.default"], "to": ["ratings.default"]},
    ],
    "routes": [
        {"to": ["reviews.default"], "allow": [{"methods": ["GET"], "paths": ["/reviews/*"]}]},
        {"to": ["ratings.default"], "allow": [{"methods": ["GET"], "paths": ["/ratings/*"]}]},
    ],
    "lists": {"health": ["/healthz"]},
    "exceptions": [
        {
            "name": "kubelet-probes",
            "rules": ["plaintext_hop", "unexpected_edge", "unexpected_path"],
            "reason": "kubelet probes: plaintext, from outside the mesh",
            "methods": ["GET"],
            "paths": ["@health"],
        }
    ],
}

# Short windows so a scenario settles in seconds: Envoy flushes access logs and spans every
# 0.2 s here, the SDK apps every 0.2 s.
GRACE_MS = 1500
SILENT_SECS = 3
ATTRIBUTION_WAIT_MS = 1000


# The audit rules' options for the mesh: thresholds low enough that a few seconds of scenario
# traffic cross them, and the suites the mesh's good hops negotiate allowed (Envoy's upstream TLS
# defaults to at most TLS 1.2). daemon_config() passes a rule's entry only when the daemon has that
# rule, so a scenario waits (skipped, saying why) for a rule that is not there.
NEW_RULE_OPTIONS: dict[str, dict[str, Any]] = {
    "weak_tls": {
        "min_version": "TLSv1.2",
        # What the mesh's good hops negotiate must stay allowed: Envoy's upstream TLS defaults to at
        # most TLS 1.2, so every mTLS hop here is TLSv1.2 with ECDHE-ECDSA-AES128-GCM-SHA256.
        "allowed_ciphers": [
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-RSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-RSA-AES256-GCM-SHA384",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
            "ECDHE-RSA-CHACHA20-POLY1305",
            "TLS_AES_128_GCM_SHA256",
            "TLS_AES_256_GCM_SHA384",
            "TLS_CHACHA20_POLY1305_SHA256",
        ],
    },
    "identity_mismatch": {},
    "excessive_retries": {"window_secs": 10, "min_retries": 3, "min_ratio": 0.2},
    "error_burst": {"window_secs": 10, "min_requests": 3, "min_ratio": 0.5},
    "route_mismatch": {"allow_passthrough": False},
    "authz_denied": {},
}


def known_rules() -> frozenset[str]:
    """The rules this daemon has: the registry of the installed meshaudit, which the daemon the
    tests and the demo start runs (its config accepts a ``rules.<name>`` section for exactly these)."""
    from meshaudit.engine.rules import RULE_NAMES

    return frozenset(RULE_NAMES)


def daemon_config(suppress_secs: int = 3600, silent_secs: int = SILENT_SECS) -> dict[str, Any]:
    known = known_rules()
    return {
        "engine": {"suppress_secs": suppress_secs, "tick_ms": 100},
        "rules": {
            "missing_access_log": {"grace_ms": GRACE_MS, "silent_secs": silent_secs},
            "plaintext_hop": {"attribution_wait_ms": ATTRIBUTION_WAIT_MS},
            **{rule: dict(opts) for rule, opts in NEW_RULE_OPTIONS.items() if rule in known},
        },
        "policy": POLICY,
    }


@dataclass(frozen=True)
class Expected:
    """An alert a scenario must raise: rule and destination service (or the acceptable
    destination keys); ``sources`` are the acceptable source keys (``service.namespace``, or an
    address when the daemon can name nothing better), None when any source is acceptable.
    ``evidence`` and ``severity``, when given, are what the matching alert must carry (checked
    apart from matching: see :meth:`mismatch`)."""

    rule: str
    dst: str | tuple[str, ...]
    sources: tuple[str, ...] | None
    required: bool = True  # False: may appear (timing decides), must not be anything else
    during_traffic: bool = False  # True: must be emitted before the scenario's traffic ended
    evidence: tuple[tuple[str, Any], ...] = ()  # (key, value) pairs of the alert's evidence
    severity: str | None = None

    def matches(self, alert: dict[str, Any]) -> bool:
        dsts = (self.dst,) if isinstance(self.dst, str) else self.dst
        return (
            alert["rule"] == self.rule
            and party_key(alert["destination"]) in dsts
            and (self.sources is None or party_key(alert["source"]) in self.sources)
        )

    def mismatch(self, alert: dict[str, Any]) -> str | None:
        """What a matching alert gets wrong in its evidence or severity, None when nothing."""
        ev = alert.get("evidence") or {}
        for key, value in self.evidence:
            if ev.get(key) != value:
                return f"evidence.{key} is {ev.get(key)!r}, expected {value!r}"
        if self.severity is not None and alert.get("severity") != self.severity:
            return f"severity is {alert.get('severity')!r}, expected {self.severity!r}"
        return None


def party_key(p: dict[str, Any]) -> str:
    return party(p)


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


def weak_tls_hop(mesh: Mesh) -> None:
    """checkout's sidecar offers payments only TLS 1.2 with a CBC suite; payments still accepts it."""
    for r in mesh.call("checkout", "payments", "/payments/1", count=3):
        assert r["status"] == 200, r


def stolen_certificate(mesh: Mesh) -> None:
    """impostor's sidecar presents reviews' certificate (and key) to ratings."""
    for r in mesh.call("impostor", "ratings", "/ratings/9", count=3):
        assert r["status"] == 200, r
        assert "URI=spiffe://cluster.local/ns/default/sa/reviews" in r["body"]["xfcc"], r


def retries_on_failing_upstream(mesh: Mesh) -> None:
    """orders answers 503; checkout's route retries each request 3 times (4 attempts, then URX)."""
    for r in mesh.call("checkout", "orders", "/orders/status/503", count=3):
        assert r["status"] == 503, r


def burst_of_500s(mesh: Mesh) -> None:
    """frontend -> orders: 6 of 8 requests fail with 500 from the app (no retry policy here)."""
    for r in mesh.call("frontend", "orders", "/orders/status/500", count=6):
        assert r["status"] == 500, r
    for r in mesh.call("frontend", "orders", "/orders/1", count=2):
        assert r["status"] == 200, r


def no_route(mesh: Mesh) -> None:
    """checkout asks catalog for a path its route does not serve (NR, 404 from its own sidecar),
    and calls billing, a host outside the registry (block_all: direct_response 502)."""
    for r in mesh.call("checkout", "catalog", "/admin/debug", count=2):
        assert r["status"] == 404, r
    for r in mesh.call("checkout", "billing", "/billing/1", count=2):
        assert r["status"] == 502, r


def rbac_denial(mesh: Mesh) -> None:
    """catalog's AuthorizationPolicy deny-internal refuses /catalog/internal/ to every caller (403);
    db's db-deny-checkout closes checkout's TCP connections. Both edges are inside policy."""
    for r in mesh.call("checkout", "catalog", "/catalog/internal/keys", count=2):
        assert r["status"] == 403, r
    assert mesh.call("checkout", "catalog", "/catalog/1")[0]["status"] == 200
    for r in mesh.tcp("checkout", "db", "SELECT 2", count=2):
        assert r["reply"] == "", r


def forged_sidecar(mesh: Mesh) -> None:
    """forger's sidecar claims ratings' node (and its spans ratings' service) while it streams them
    with forger's own certificate; kubelet-style probes of its pod (exempted) are what it logs."""
    for _ in range(2):
        assert mesh.probe("forger", "/healthz") == 200


def forbidden_edges(mesh: Mesh) -> None:
    """checkout -> details and checkout -> ratings are both outside policy: details' RBAC
    (deny-checkout) refuses every request, ratings serves them."""
    for r in mesh.call("checkout", "details", "/details/1", count=2):
        assert r["status"] == 403, r
    for r in mesh.call("checkout", "ratings", "/ratings/3", count=2):
        assert r["status"] == 200, r


@dataclass(frozen=True)
class Scenario:
    name: str
    drive: Callable[[Mesh], None]
    expected: tuple[Expected, ...]
    title: str
    # Rules the daemon must have for this scenario to mean anything; without them it is skipped.
    rules_needed: tuple[str, ...] = ()
    # Evidence keys the daemon's alerts must carry (a feature of an existing rule); a daemon whose
    # matching alerts lack them predates the feature, and the scenario is skipped after its traffic.
    evidence_needed: tuple[str, ...] = ()


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
    # --- scenarios for rules being written in other branches (skipped until the daemon has them)
    Scenario(
        "weak_tls",
        weak_tls_hop,
        (Expected("weak_tls", "payments.default", ("checkout.default",)),),
        "TLS 1.2 with a CBC cipher suite",
        rules_needed=("weak_tls",),
    ),
    Scenario(
        "identity_mismatch",
        stolen_certificate,
        # Named after the real client (its sidecar's outbound entry), not the certificate.
        (Expected("identity_mismatch", "ratings.default", ("impostor.default",)),),
        "a workload presenting another workload's certificate",
        rules_needed=("identity_mismatch",),
    ),
    Scenario(
        "excessive_retries",
        retries_on_failing_upstream,
        (
            Expected("excessive_retries", "orders.default", ("checkout.default",)),
            # Every request failed too: error_burst may count this edge as well.
            Expected("error_burst", "orders.default", ("checkout.default",), required=False),
        ),
        "retries against a failing upstream",
        rules_needed=("excessive_retries",),
    ),
    Scenario(
        "error_burst",
        burst_of_500s,
        (Expected("error_burst", "orders.default", ("frontend.default",)),),
        "a burst of 500s",
        rules_needed=("error_burst",),
    ),
    Scenario(
        "route_mismatch",
        no_route,
        # Neither request reaches a cluster: the destination is named by the request's authority.
        (
            Expected("route_mismatch", ("catalog.default", "catalog.default.svc.cluster.local"), ("checkout.default",)),
            Expected("route_mismatch", ("billing.default", "billing.default.svc.cluster.local"), ("checkout.default",)),
        ),
        "a path with no route, and a host outside the registry",
        rules_needed=("route_mismatch",),
    ),
    Scenario(
        "authz_denied",
        rbac_denial,
        (
            Expected("authz_denied", "catalog.default", ("checkout.default",)),
            Expected("authz_denied", "db.default", ("checkout.default",)),
        ),
        "HTTP requests and TCP connections denied by RBAC policies",
        rules_needed=("authz_denied",),
    ),
    Scenario(
        "forbidden_edges_enforced",
        forbidden_edges,
        (
            Expected("unexpected_edge", "details.default", ("checkout.default",), evidence=(("blocked", True),)),
            Expected(
                "unexpected_edge",
                "ratings.default",
                ("checkout.default",),
                evidence=(("blocked", False),),
                severity="critical",
            ),
            # The denials themselves, where authz_denied exists (and reports forbidden edges too).
            Expected("authz_denied", "details.default", ("checkout.default",), required=False),
        ),
        "forbidden edges: one blocked by the mesh's RBAC, one served",
        evidence_needed=("blocked",),
    ),
    Scenario(
        "log_source_mismatch",
        forged_sidecar,
        # Named after the authenticated sender (its certificate) and the workload it claimed; its
        # access-log stream and its span exports are one (rule, sender, workload), alerted once.
        (Expected("log_source_mismatch", "ratings.default", ("forger.default",), severity="critical"),),
        "a sidecar claiming another service's node, with its own certificate",
        rules_needed=("log_source_mismatch",),
    ),
)


def one_line(alert: dict[str, Any]) -> str:
    """An alert as one readable line, as the daemon prints it on a terminal."""
    return readable(alert)
