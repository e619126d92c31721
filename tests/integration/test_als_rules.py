"""Envoy access logs through a real gRPC client stream -> alerts in the JSON-lines output."""

from __future__ import annotations

from typing import Any

import grpc
from infra import als
from infra.daemon import Daemon


def by_rule(alerts: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    return [a for a in alerts if a["rule"] == rule]


async def test_mtls_hop_inside_policy_raises_nothing(daemon: Daemon) -> None:
    entries = [als.inbound_http("frontend", path="/reviews/1") for _ in range(20)]
    code = await als.stream(daemon.grpc, [als.http_message(entries, als.identifier("reviews"))])
    assert code == grpc.StatusCode.OK
    got = daemon.wait_alerts(lambda a: False, timeout=1.5)
    assert got == []
    assert daemon.metric("meshaudit_received_total", receiver="envoy_als", kind="http") == 20
    assert daemon.metric("meshaudit_hops_evaluated_total") == 20


async def test_plaintext_inbound_alerts_once_aggregated(daemon: Daemon) -> None:
    ident = als.identifier("reviews")
    # The client sidecar's outbound entries name the source (same x-request-id).
    rids = [f"rid-{i}" for i in range(5)]
    client = [als.outbound_http("reviews", request_id=r, path="/reviews/1") for r in rids]
    server = [als.inbound_http(None, request_id=r, path="/reviews/1") for r in rids]
    await als.stream(daemon.grpc, [als.http_message(client, als.identifier("frontend"))])
    await als.stream(daemon.grpc, [als.http_message(server, ident)])
    got = daemon.wait_alerts(lambda a: bool(by_rule(a, "plaintext_hop")), timeout=5)
    plain = by_rule(got, "plaintext_hop")
    assert len(plain) == 1, got
    a = plain[0]
    assert a["schema"] == "meshaudit.alert.v1"
    assert a["source"]["service"] == "frontend"
    assert a["destination"]["service"] == "reviews"
    assert a["evidence"]["count"] == 1  # the first violation alerts at once; the rest are counted
    assert a["evidence"]["examples"][0]["request_id"] == "rid-0"
    assert a["severity"] == "high"
    assert "Plaintext" in a["summary"]
    # No other rule fires: the edge and path are inside the policy.
    assert {x["rule"] for x in got} == {"plaintext_hop"}
    assert daemon.metric("meshaudit_alerts_total", rule="plaintext_hop", severity="high") == 1


async def test_plaintext_without_pairing_waits_then_names_the_address(daemon: Daemon) -> None:
    e = als.inbound_http(None, path="/reviews/2", remote="10.9.9.9:5555")
    await als.stream(daemon.grpc, [als.http_message([e], als.identifier("reviews"))])
    got = daemon.wait_alerts(bool, timeout=5)
    assert [a["rule"] for a in got] == ["plaintext_hop"]
    # Keyed by IP, not by the ephemeral port (issue 10, defect 9); the socket is in the detail.
    assert got[0]["source"]["address"] == "10.9.9.9"
    assert "from 10.9.9.9:5555" in got[0]["evidence"]["detail"]


async def test_plaintext_tcp_entry_alerts(daemon: Daemon) -> None:
    out = als.tcp_entry(
        cluster="outbound|5432||ratings.default.svc.cluster.local", tls=False, upstream_local="10.0.0.7:4100"
    )
    inb = als.tcp_entry(cluster="inbound|5432||", tls=False, remote="10.0.0.7:4100")
    await als.stream(daemon.grpc, [als.tcp_message([out], als.identifier("reviews"))])
    await als.stream(daemon.grpc, [als.tcp_message([inb], als.identifier("ratings"))])
    got = daemon.wait_alerts(lambda a: bool(by_rule(a, "plaintext_hop")), timeout=5)
    plain = by_rule(got, "plaintext_hop")
    assert len(plain) == 1
    assert plain[0]["source"]["service"] == "reviews"  # paired by the connection's client socket
    assert plain[0]["destination"]["service"] == "ratings"
    assert "TCP" in plain[0]["evidence"]["detail"]


async def test_health_check_path_is_exempt(daemon: Daemon) -> None:
    e = als.inbound_http(None, path="/healthz", remote="10.1.1.1:1")
    await als.stream(daemon.grpc, [als.http_message([e], als.identifier("reviews"))])
    assert daemon.wait_alerts(lambda a: False, timeout=1.5) == []


async def test_edge_outside_policy_alerts_once(daemon: Daemon) -> None:
    entries = [als.inbound_http("frontend", path="/ratings/1") for _ in range(10)]
    await als.stream(daemon.grpc, [als.http_message(entries, als.identifier("ratings"))])
    got = daemon.wait_alerts(lambda a: bool(by_rule(a, "unexpected_edge")), timeout=5)
    edge = by_rule(got, "unexpected_edge")
    assert len(edge) == 1
    assert edge[0]["source"]["principal"] == "spiffe://cluster.local/ns/default/sa/frontend"
    assert edge[0]["destination"]["service"] == "ratings"
    assert {a["rule"] for a in got} == {"unexpected_edge"}


async def test_path_outside_policy_alerts_once(daemon: Daemon) -> None:
    entries = [
        als.inbound_http("frontend", method="DELETE", path="/reviews/1"),
        als.inbound_http("frontend", method="GET", path="/admin/users?x=1"),
        als.inbound_http("frontend", method="GET", path="/reviews/7"),
    ]
    await als.stream(daemon.grpc, [als.http_message(entries, als.identifier("reviews"))])
    got = daemon.wait_alerts(lambda a: bool(by_rule(a, "unexpected_path")), timeout=5)
    path = by_rule(got, "unexpected_path")
    assert len(path) == 1
    assert path[0]["evidence"]["examples"][0]["method"] == "DELETE"
    assert {a["rule"] for a in got} == {"unexpected_path"}
