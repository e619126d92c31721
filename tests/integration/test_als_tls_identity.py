"""weak_tls and identity_mismatch through the real gRPC receiver of a daemon subprocess: real ALS
bytes in (TLS version and cipher suite, peer certificates, Istio's peer metadata as filter state),
alerts out in the JSON-lines output."""

from __future__ import annotations

from typing import Any

from infra import als
from infra.daemon import Daemon


def by_rule(alerts: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    return [a for a in alerts if a["rule"] == rule]


async def test_weak_tls_alerts_on_cbc_and_old_versions_not_on_what_the_mesh_negotiates(daemon: Daemon) -> None:
    ok = [als.inbound_http("frontend", path="/reviews/1") for _ in range(5)]  # TLS 1.3, 0x1301
    ok.append(als.weaken_tls(als.inbound_http("frontend", path="/reviews/2"), als.TLSProperties.TLSv1_2, 0xC02F))
    weak = als.weaken_tls(als.inbound_http("frontend", path="/reviews/3"), als.TLSProperties.TLSv1_2, 0xC013)
    old = als.weaken_tls(
        als.tcp_entry(cluster="inbound|5432||", peer=als.spiffe("reviews")), als.TLSProperties.TLSv1_1, 0xC02F
    )
    await als.stream(daemon.grpc, [als.http_message([*ok, weak], als.identifier("reviews"))])
    await als.stream(daemon.grpc, [als.tcp_message([old], als.identifier("ratings"))])
    got = daemon.wait_alerts(lambda a: len(by_rule(a, "weak_tls")) >= 2, timeout=5)
    weak_alerts = {a["destination"]["service"]: a for a in by_rule(got, "weak_tls")}
    assert set(weak_alerts) == {"reviews", "ratings"}
    http = weak_alerts["reviews"]
    assert http["severity"] == "high" and http["source"]["service"] == "frontend"
    assert "ECDHE-RSA-AES128-SHA (TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA, 0xC013)" in http["evidence"]["detail"]
    assert http["evidence"]["examples"][0]["path"] == "/reviews/3"
    assert "TLSv1.1 is older than min_version TLSv1.2" in weak_alerts["ratings"]["evidence"]["detail"]
    assert daemon.metric("meshaudit_alerts_total", rule="weak_tls", severity="high") == 2


async def test_identity_mismatch_inbound_first_then_the_client_entry(daemon: Daemon) -> None:
    # reviews' sidecar sees frontend's certificate; ratings' sidecar sent that request
    agree = [als.inbound_http("frontend", request_id=f"ok-{i}", path="/reviews/1") for i in range(3)]
    stolen = als.inbound_http("frontend", request_id="stolen-1", path="/reviews/9")
    await als.stream(daemon.grpc, [als.http_message([*agree, stolen], als.identifier("reviews"))])
    client_ok = [als.outbound_http("reviews", request_id=f"ok-{i}", path="/reviews/1") for i in range(3)]
    await als.stream(daemon.grpc, [als.http_message(client_ok, als.identifier("frontend"))])
    client = als.outbound_http("reviews", request_id="stolen-1", path="/reviews/9")
    await als.stream(daemon.grpc, [als.http_message([client], als.identifier("ratings"))])
    got = daemon.wait_alerts(lambda a: bool(by_rule(a, "identity_mismatch")), timeout=5)
    [a] = by_rule(got, "identity_mismatch")
    assert a["severity"] == "critical"
    assert a["source"]["service"] == "ratings" and a["destination"]["service"] == "reviews"
    assert als.spiffe("frontend") in a["evidence"]["detail"]
    assert a["evidence"]["examples"][0]["request_id"] == "stolen-1"
    assert a["evidence"]["examples"][0]["path"] == "/reviews/9"
    # the agreeing requests raised nothing more, after the pairing wait too
    assert by_rule(daemon.wait_alerts(lambda a: False, timeout=2.0), "identity_mismatch") == [a]


async def test_identity_mismatch_from_istio_peer_metadata_without_a_client_entry(daemon: Daemon) -> None:
    e = als.inbound_http("frontend", path="/reviews/4")
    als.peer_metadata(e, workload="ratings-v1", namespace="default", service="ratings", name="ratings-v1-abc")
    own = als.peer_metadata(
        als.inbound_http("frontend", path="/reviews/5"), workload="frontend", namespace="default", service="frontend"
    )
    await als.stream(daemon.grpc, [als.http_message([e, own], als.identifier("reviews"))])
    got = daemon.wait_alerts(lambda a: bool(by_rule(a, "identity_mismatch")), timeout=5)
    [a] = by_rule(got, "identity_mismatch")
    assert a["source"]["service"] == "ratings" and a["source"]["workload"] == "ratings-v1"
    assert "peer metadata" in a["evidence"]["detail"]


async def test_old_istio_peer_metadata_is_counted_and_skipped(daemon: Daemon) -> None:
    entries = [als.wasm_peer_metadata(als.inbound_http(None, path="/reviews/1", remote="10.8.8.8:1"))]
    await als.stream(daemon.grpc, [als.http_message(entries, als.identifier("reviews"))])
    got = daemon.wait_alerts(lambda a: bool(by_rule(a, "plaintext_hop")), timeout=5)
    assert by_rule(got, "plaintext_hop")[0]["source"]["address"] == "10.8.8.8"
    assert daemon.metric("meshaudit_rejected_total", receiver="envoy_als", reason="unsupported_peer_metadata") == 1
