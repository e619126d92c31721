"""Issue 11 rules through a real gRPC client stream into the daemon as a subprocess: route_mismatch,
authz_denied, and whether a forbidden request was blocked (``evidence.blocked``), with one worker
and with ``workers: 2`` (the verdict crosses from worker to coordinator)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from infra import als
from infra.daemon import Daemon, deep_merge, running

from integration.conftest import CONFIG

RBAC = "rbac_access_denied_matched_policy[ns[default]-policy[deny-frontend]-rule[0]]"


def by_rule(alerts: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    return [a for a in alerts if a["rule"] == rule]


async def test_registry_only_block_all_and_no_route(daemon: Daemon) -> None:
    entries = [
        als.http_entry(
            cluster="", authority="api.example.com:443", status=502, details="direct_response", route_name="block_all"
        ),
        als.outbound_http("reviews", authority="reviews:9080", path="/reviews/1", status=404, details="via_upstream"),
    ]
    # block_all has no cluster (so no direction from it): the stream's sidecar is the source
    await als.stream(daemon.grpc, [als.http_message(entries, als.identifier("frontend"))])
    got = daemon.wait_alerts(lambda a: bool(by_rule(a, "route_mismatch")), timeout=5)
    found = by_rule(got, "route_mismatch")
    assert len(found) == 1, got  # the app's own 404 (via_upstream) raises nothing
    a = found[0]
    assert a["source"]["service"] == "frontend"
    assert a["destination"]["service"] == "api.example.com"
    assert "block_all" in a["evidence"]["detail"] and a["evidence"]["blocked"] is None


async def test_rbac_denials_http_and_tcp(daemon: Daemon) -> None:
    http = als.inbound_http("frontend", path="/reviews/1", status=403, details=RBAC)
    tcp = als.tcp_entry(cluster="inbound|5432||", peer=als.spiffe("reviews"), termination=RBAC)
    app_403 = als.inbound_http("frontend", path="/reviews/2", status=403, details="via_upstream")
    await als.stream(daemon.grpc, [als.http_message([http, app_403], als.identifier("reviews"))])
    await als.stream(daemon.grpc, [als.tcp_message([tcp], als.identifier("ratings"))])
    got = daemon.wait_alerts(lambda a: len(by_rule(a, "authz_denied")) >= 2, timeout=5)
    denied = sorted(by_rule(got, "authz_denied"), key=lambda a: a["destination"]["service"])
    assert [a["destination"]["service"] for a in denied] == ["ratings", "reviews"]
    assert all("ns[default]-policy[deny-frontend]-rule[0]" in a["evidence"]["detail"] for a in denied)
    assert denied[1]["evidence"]["count"] == 1  # the app's own 403 is not a denial
    assert {a["rule"] for a in got} == {"authz_denied"}


async def _forbidden_edge(d: Daemon) -> list[dict[str, Any]]:
    """frontend -> ratings is no policy edge. Request b1: the source sidecar's 403 via_upstream
    arrives before the destination sidecar's RBAC denial; then b2 is served."""
    out = als.outbound_http("ratings", request_id="b1", path="/ratings/1", status=403, details="via_upstream")
    await als.stream(d.grpc, [als.http_message([out], als.identifier("frontend"))])
    inb = als.inbound_http("frontend", request_id="b1", path="/ratings/1", status=403, details=RBAC)
    await als.stream(d.grpc, [als.http_message([inb], als.identifier("ratings"))])
    first = d.wait_alerts(lambda a: bool(by_rule(a, "unexpected_edge")), timeout=5)
    served = als.inbound_http("frontend", request_id="b2", path="/ratings/1", status=200, details="via_upstream")
    await als.stream(d.grpc, [als.http_message([served], als.identifier("ratings"))])
    got = d.wait_alerts(lambda a: len(by_rule(a, "unexpected_edge")) >= 2, timeout=5)
    edge = by_rule(got, "unexpected_edge")
    assert by_rule(first, "unexpected_edge")[0] == edge[0]
    return edge


async def test_forbidden_edge_blocked_then_served(daemon: Daemon) -> None:
    edge = await _forbidden_edge(daemon)
    assert [(a["evidence"]["blocked"], a["severity"], a["evidence"]["count"]) for a in edge] == [
        (True, "high", 1),
        (False, "critical", 2),
    ]
    assert "RBAC policy ns[default]-policy[deny-frontend]-rule[0]" in edge[0]["evidence"]["detail"]


async def test_forbidden_edge_verdict_with_two_workers(tmp_path: Path) -> None:
    with running(tmp_path, deep_merge(CONFIG, {"workers": 2})) as d:
        edge = await _forbidden_edge(d)
    assert [(a["evidence"]["blocked"], a["severity"]) for a in edge] == [(True, "high"), (False, "critical")]
