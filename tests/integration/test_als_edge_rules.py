"""The per-edge rules (excessive_retries, error_burst) through a real gRPC client stream into a
subprocess daemon: Envoy's attempt counts, response flags and details on the wire -> alerts."""

from __future__ import annotations

from typing import Any

import grpc
from infra import als
from infra.daemon import Daemon

RESET = "upstream_reset_before_response_started{connection_failure}"


def by_rule(alerts: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    return [a for a in alerts if a["rule"] == rule]


async def test_retried_requests_alert_excessive_retries_once_and_no_error_burst(daemon: Daemon) -> None:
    client: list[Any] = []
    server: list[Any] = []
    for i in range(30):  # each fixed by one retry: reviews logs the 503 and the 200, frontend one 200
        rid = f"fixed-{i}"
        client.append(als.outbound_http("reviews", request_id=rid, path="/reviews/1", attempts=2))
        server += [
            als.inbound_http("frontend", request_id=rid, path="/reviews/1", status=503, details="via_upstream"),
            als.inbound_http("frontend", request_id=rid, path="/reviews/1", status=200, details="via_upstream"),
        ]
    for i in range(5):  # gave up after 3 attempts
        client.append(
            als.outbound_http(
                "reviews",
                request_id=f"gaveup-{i}",
                path="/reviews/2",
                status=503,
                attempts=3,
                flags=["URX"],
                details="via_upstream",
            )
        )
    assert await als.stream(daemon.grpc, [als.http_message(server, als.identifier("reviews"))]) == grpc.StatusCode.OK
    assert await als.stream(daemon.grpc, [als.http_message(client, als.identifier("frontend"))]) == grpc.StatusCode.OK
    got = daemon.wait_alerts(lambda a: bool(by_rule(a, "excessive_retries")), timeout=5)
    retries = by_rule(got, "excessive_retries")
    assert len(retries) == 1, got
    a = retries[0]
    assert a["severity"] == "warning"
    assert a["source"]["service"] == "frontend" and a["destination"]["service"] == "reviews"
    # 30 x 1 + 5 x (2 + 1 for URX), over the 35 requests frontend's sidecar logged (not the 60
    # attempts reviews' sidecar logged).
    assert a["evidence"]["detail"].startswith("45 retries over 35 requests (ratio 1.29) in a 60 s window")
    assert [x["request_id"] for x in a["evidence"]["examples"]] == ["fixed-0", "fixed-1", "fixed-2"]
    # 5 failures of 35: no error burst, whatever reviews' sidecar saw per attempt.
    assert daemon.wait_alerts(lambda a: len(a) > 1, timeout=1.0) == got
    assert daemon.metric("meshaudit_alerts_total", rule="excessive_retries", severity="warning") == 1


async def test_upstream_failures_alert_error_burst_and_refusals_raise_nothing(daemon: Daemon) -> None:
    # reviews -> ratings: 24 of 30 requests failed upstream (5xx from ratings, connection failures).
    calls = []
    for i in range(30):
        if i < 12:
            calls.append(als.outbound_http("ratings", request_id=f"f{i}", status=503, details="via_upstream"))
        elif i < 24:
            calls.append(als.outbound_http("ratings", request_id=f"f{i}", status=503, details=RESET, flags=["UF"]))
        else:
            calls.append(als.outbound_http("ratings", request_id=f"f{i}"))
    # frontend -> reviews: 404s, RBAC denials, no route: the mesh and the app answered; no failure.
    refused = [als.outbound_http("reviews", path="/reviews/404", status=404, details="via_upstream") for _ in range(25)]
    refused += [
        als.outbound_http("reviews", path="/reviews/1", status=403, details="rbac_access_denied_matched_policy[none]")
        for _ in range(25)
    ]
    refused += [
        als.outbound_http("reviews", path="/reviews/1", status=404, details="route_not_found", flags=["NR"])
        for _ in range(25)
    ]
    await als.stream(daemon.grpc, [als.http_message(refused, als.identifier("frontend"))])
    await als.stream(daemon.grpc, [als.http_message(calls, als.identifier("reviews", ip="10.0.0.2"))])
    got = daemon.wait_alerts(lambda a: bool(by_rule(a, "error_burst")), timeout=5)
    burst = by_rule(got, "error_burst")
    assert len(burst) == 1, got
    a = burst[0]
    assert a["source"]["service"] == "reviews" and a["destination"]["service"] == "ratings"
    assert a["evidence"]["detail"].startswith("24 of 30 requests failed (80%) in a 60 s window")
    assert [x["request_id"] for x in a["evidence"]["examples"]] == ["f0", "f1", "f2"]
    assert daemon.wait_alerts(lambda a: len(a) > 1, timeout=1.0) == got  # nothing for frontend -> reviews
