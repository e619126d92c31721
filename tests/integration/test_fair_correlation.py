"""Fair bounds per source in the correlation index (issue 14): one sidecar flooding the index of
outbound entries with requests nothing ever pairs does not evict another sidecar's entry, so a
true violation that needs it (a plaintext hop whose only evidence of its sender is the client
sidecar's entry, and the forbidden edge that names) still alerts, with the sender named. The
flooding sidecar is named in a metric and a log line."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from infra import als
from infra.daemon import running

STORE_MAX_ITEMS = 1000  # the index holds 500 entries per generation; each sidecar's share is 125
FLOOD_MESSAGES = 20  # x 1000 entries: 20 x the whole index

CONFIG: dict[str, Any] = {
    "engine": {"tick_ms": 50, "store_max_items": STORE_MAX_ITEMS},
    "rules": {"plaintext_hop": {"attribution_wait_ms": 300}},
    "policy": {
        "mesh_services": ["frontend.default", "reviews.default", "ratings.default"],
        "edges": [{"from": ["frontend.default"], "to": ["reviews.default"]}],
        "routes": [{"to": ["reviews.default"], "allow": [{"methods": ["GET"], "paths": ["/reviews/*"]}]}],
    },
}


async def test_a_flood_of_unpaired_entries_from_one_sidecar_does_not_hide_another_sidecars_violation(
    tmp_path: Path,
) -> None:
    with running(tmp_path, CONFIG) as daemon:
        # ratings' sidecar logs a request to reviews, an edge the policy does not allow.
        sent = als.outbound_http("reviews", request_id="rid-true-violation", path="/reviews/7")
        await als.stream(daemon.grpc, [als.http_message([sent], als.identifier("ratings", ip="10.0.0.3"))])
        # One frontend pod floods the index with allowed requests whose server entries never come.
        flood_id = als.identifier("frontend", ip="10.66.6.6")
        messages = [
            als.http_message(
                [als.outbound_http("reviews", request_id=f"flood-{m}-{i}", path="/reviews/1") for i in range(1000)],
                flood_id if m == 0 else None,
            )
            for m in range(FLOOD_MESSAGES)
        ]
        await als.stream(daemon.grpc, messages, timeout=60)
        # reviews' sidecar then logs the same request, received without TLS from an address only
        # ratings' entry can name.
        received = als.inbound_http(None, request_id="rid-true-violation", path="/reviews/7", remote="10.0.9.77:41000")
        await als.stream(daemon.grpc, [als.http_message([received], als.identifier("reviews", ip="10.0.0.2"))])

        def named(alerts: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
            return [a for a in alerts if a["rule"] == rule and a["source"].get("service") == "ratings"]

        got = daemon.wait_alerts(lambda a: bool(named(a, "plaintext_hop") and named(a, "unexpected_edge")), 10)
        for rule in ("plaintext_hop", "unexpected_edge"):
            [alert] = named(got, rule)
            assert alert["destination"]["service"] == "reviews"
            assert alert["evidence"]["examples"][0]["request_id"] == "rid-true-violation"
        assert not [a for a in got if a["source"].get("address") == "10.0.9.77"]  # never the bare address

        # The flood went, and its sender is named (metrics and the log line come every second).
        assert daemon.metric("meshaudit_received_total", receiver="envoy_als", kind="http") == 2 + 1000 * FLOOD_MESSAGES
        flooder = "frontend-v1-5d8f7c9b6-x2kq4.default"
        line = f"Store outbound_by_request_id: observer {flooder} sends more than its share (125 entries)"
        for _ in range(50):  # up to 5 s
            if line in daemon.stderr():
                break
            await asyncio.sleep(0.1)
        assert line in daemon.stderr()
        evicted = daemon.metric("meshaudit_store_evictions_total", store="outbound_by_request_id", reason="capacity")
        assert evicted >= 1000 * FLOOD_MESSAGES - STORE_MAX_ITEMS
        top = daemon.metric("meshaudit_store_flood_top_observer", store="outbound_by_request_id", observer=flooder)
        assert 0 < top <= evicted
