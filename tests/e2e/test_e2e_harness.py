"""The loopback mesh itself, checked against a stand-in collector (no daemon needed): real
Envoy sidecars do mTLS with SPIFFE identities, stream HTTP and TCP access logs over gRPC,
send OpenTelemetry spans with the tags the daemon joins on, and so do the OTel SDK apps.
"""

from __future__ import annotations

import time
import urllib.error
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from meshlab.capture import CaptureCollector, CapturedSpan, Entry
from meshlab.mesh import Mesh
from meshlab.procs import wait_until

pytestmark = pytest.mark.e2e

SPAN_WAIT = 5.0  # Envoy's tracer flushes every 0.2 s here (runtime key); the SDK every 0.2 s
TLSv1_2 = 3  # envoy.data.accesslog.v3.TLSProperties.TLSVersion
ECDHE_ECDSA_AES128_SHA = 0xC009  # IANA cipher suite codes, as tls_cipher_suite carries them
ECDHE_ECDSA_AES128_GCM_SHA256 = 0xC02B


@pytest.fixture(scope="module")
def collector() -> Iterator[CaptureCollector]:
    c = CaptureCollector().start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def mesh(collector: CaptureCollector, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    run_dir: Path = tmp_path_factory.mktemp("mesh-harness")
    m = Mesh(run_dir, collector.grpc_port, collector.http_port).start()
    yield m
    m.stop()


@pytest.fixture(autouse=True)
def _envoy_logs_on_failure(request: pytest.FixtureRequest, mesh: Mesh) -> Iterator[None]:
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        mesh.dump_logs()


def _entries_for(collector: CaptureCollector, pred: Callable[[Entry], bool], timeout: float = 5.0) -> list[Entry]:
    found: list[Entry] = []

    def check() -> bool:
        found[:] = [e for e in collector.entries() if pred(e)]
        return bool(found)

    wait_until(check, timeout)
    return found


def _spans_for(
    collector: CaptureCollector, pred: Callable[[CapturedSpan], bool], at_least: int = 1
) -> list[CapturedSpan]:
    found: list[CapturedSpan] = []

    def check() -> bool:
        found[:] = [s for s in collector.spans() if pred(s)]
        return len(found) >= at_least

    wait_until(check, SPAN_WAIT)
    return found


def test_mtls_hop_carries_spiffe_identities(mesh: Mesh, collector: CaptureCollector) -> None:
    [result] = mesh.call("frontend", "reviews", "/reviews/1")
    assert result["status"] == 200
    # The app behind the inbound sidecar sees the client's certificate (XFCC) ...
    assert "URI=spiffe://cluster.local/ns/default/sa/frontend" in result["body"]["xfcc"]
    rid = result["request_id"]
    # ... and the inbound sidecar's access log has the TLS facts the daemon reads.
    [inbound] = _entries_for(
        collector, lambda e: e.kind == "http" and e.message.request.request_id == rid and "reviews-v1" in e.node_id
    )
    common = inbound.message.common_properties
    assert common.upstream_cluster == "inbound|9080||"
    assert common.route_name == "default"
    assert inbound.log_name == "http_envoy_accesslog"
    assert inbound.node_id.startswith("sidecar~127.0.0.1~reviews-v1-") and inbound.node_id.endswith(
        ".default~default.svc.cluster.local"
    )
    tls = common.tls_properties
    assert tls.tls_version != 0
    assert [s.uri for s in tls.peer_certificate_properties.subject_alt_name] == [
        "spiffe://cluster.local/ns/default/sa/frontend"
    ]
    assert [s.uri for s in tls.local_certificate_properties.subject_alt_name] == [
        "spiffe://cluster.local/ns/default/sa/reviews"
    ]
    assert inbound.message.request.request_headers["traceparent"].split("-")[1] == result["trace_id"]
    # The client sidecar logged the same request on its outbound cluster.
    [outbound] = _entries_for(
        collector, lambda e: e.kind == "http" and e.message.request.request_id == rid and "frontend-v1" in e.node_id
    )
    assert outbound.message.common_properties.upstream_cluster == "outbound|9080||reviews.default.svc.cluster.local"


def test_plaintext_hop_has_no_tls(mesh: Mesh, collector: CaptureCollector) -> None:
    [result] = mesh.call("frontend", "ratings", "/ratings/1")
    assert result["status"] == 200
    assert result["body"]["xfcc"] is None
    rid = result["request_id"]
    [inbound] = _entries_for(
        collector, lambda e: e.kind == "http" and e.message.request.request_id == rid and "ratings-v1" in e.node_id
    )
    assert not inbound.message.common_properties.HasField("tls_properties")


def test_strict_inbound_refuses_plaintext(mesh: Mesh) -> None:
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        mesh.probe("details", "/details/1")
    [ok] = mesh.call("frontend", "details", "/details/1")
    assert ok["status"] == 200


def test_unknown_host_goes_to_blackhole(mesh: Mesh, collector: CaptureCollector) -> None:
    [result] = mesh.call("reviews", "details", "/details/1")  # not among reviews' peers
    assert result["status"] == 503
    [entry] = _entries_for(
        collector,
        lambda e: (
            e.kind == "http" and "reviews-v1" in e.node_id and e.message.common_properties.route_name == "block_all"
        ),
    )
    common = entry.message.common_properties
    # Envoy 1.40 leaves upstream_cluster empty when the cluster has no endpoints (as Istio's
    # BlackHoleCluster): the route name and the UH flag are what name it in the access log.
    assert common.response_flags.no_healthy_upstream
    assert common.upstream_cluster in ("", "BlackHoleCluster")
    assert entry.message.request.authority == "details.default.svc.cluster.local:9080"


def test_envoy_and_sdk_spans_carry_join_keys(mesh: Mesh, collector: CaptureCollector) -> None:
    [result] = mesh.call("frontend", "reviews", "/reviews/7")
    rid, trace_id = result["request_id"], result["trace_id"]
    spans = _spans_for(collector, lambda s: f"{s.span.trace_id.hex()}" == trace_id and s.service == "reviews")
    assert spans, "the reviews app's SDK server span (OTLP/gRPC) did not arrive"
    assert _spans_for(collector, lambda s: s.span.trace_id.hex() == trace_id and s.service == "frontend"), (
        "the frontend app's SDK client span (OTLP/HTTP) did not arrive"
    )
    envoy_spans = _spans_for(collector, lambda s: s.attr("guid:x-request-id") == rid, at_least=2)
    by_node = {s.attr("node_id"): s for s in envoy_spans}
    assert len(by_node) == 2, f"expected an egress and an ingress span, got {list(by_node)}"
    ingress = next(s for s in envoy_spans if s.span.kind == 2)  # SERVER
    egress = next(s for s in envoy_spans if s.span.kind == 3)  # CLIENT
    assert ingress.attr("upstream_cluster") == "inbound|9080||"
    assert egress.attr("upstream_cluster") == "outbound|9080||reviews.default.svc.cluster.local"
    assert ingress.service == "reviews.default" and egress.service == "frontend.default"
    assert all(s.span.trace_id.hex() == trace_id for s in envoy_spans)
    assert collector.data.otlp_http_requests > 0 and collector.data.otlp_grpc_requests > 0


def test_tcp_connection_is_logged_by_both_sidecars(mesh: Mesh, collector: CaptureCollector) -> None:
    [result] = mesh.tcp("reviews", "db", "hello")
    assert result["reply"] == "db:hello"
    [server] = _entries_for(collector, lambda e: e.kind == "tcp" and "db-v1" in e.node_id)
    assert server.log_name == "tcp_envoy_accesslog"
    sc = server.message.common_properties
    assert sc.upstream_cluster == "inbound|5432||"
    assert not sc.HasField("tls_properties")
    # The client sidecar's upstream local port is the server sidecar's downstream remote port:
    # how a TCP hop's two halves pair up without a request id.
    [client] = _entries_for(
        collector,
        lambda e: (
            e.kind == "tcp"
            and e.message.common_properties.upstream_local_address.socket_address.port_value
            == sc.downstream_remote_address.socket_address.port_value
        ),
    )
    assert "reviews-v1" in client.node_id
    assert client.message.common_properties.upstream_cluster == "outbound|5432||db.default.svc.cluster.local"


def test_silenced_sidecar_keeps_serving_and_tracing(mesh: Mesh, collector: CaptureCollector) -> None:
    inventory = mesh.envoy("inventory")
    inventory.silence_access_logs()
    try:
        results = mesh.call("frontend", "inventory", "/inventory/1", count=3)
        assert [r["status"] for r in results] == [200, 200, 200]
        rids = {r["request_id"] for r in results}
        ingress = _spans_for(
            collector,
            lambda s: s.attr("guid:x-request-id") in rids and "inventory-v1" in (s.attr("node_id") or ""),
            at_least=3,
        )
        assert len(ingress) == 3, "the silenced sidecar still traces every request"
        assert _entries_for(collector, lambda e: e.kind == "http" and e.message.request.request_id in rids)
        time.sleep(0.5)  # more than one ALS flush interval
        logged_by = {
            e.node_id.split("~")[2].split("-v1-")[0]
            for e in collector.entries()
            if e.kind == "http" and e.message.request.request_id in rids
        }
        assert logged_by == {"frontend"}, "only the client's sidecar logged these requests"
    finally:
        inventory.silence_access_logs(False)


def test_envoy_stats_no_access_log_dropped(mesh: Mesh) -> None:
    stats = mesh.wait_access_logs_stable()
    assert all(s.dropped == 0 for s in stats.values()), stats
    assert all(s.flush_failed == 0 for s in stats.values()), stats
    for service in ("frontend", "reviews", "ratings", "details"):
        assert stats[service].written > 0, (service, stats[service])
    assert stats["db"].flushed > 0, stats["db"]  # TCP entries count as flushed, not written


# --- the signals of the newer rules: what Envoy 1.40 itself logs for each -------------------------
def _call_with_id(mesh: Mesh, src: str, dst: str, path: str) -> tuple[dict[str, Any], str]:
    """One call whose entries are easy to find: responses Envoy makes itself (403, 404, 502) carry
    no app body to read the request id from, and an id the app sends is replaced by the sidecar
    (loopback is not an internal address by Envoy 1.40's defaults), so the path carries a tag."""
    tag = f"t={uuid.uuid4().hex}"
    [result] = mesh.call(src, dst, f"{path}?{tag}")
    return result, tag


def _http_entry(collector: CaptureCollector, tag: str, service: str) -> Entry:
    [entry] = _entries_for(
        collector, lambda e: e.kind == "http" and tag in e.message.request.path and f"~{service}-v1-" in e.node_id
    )
    return entry


def _flags(entry: Entry) -> set[str]:
    flags = entry.message.common_properties.response_flags
    return {fd.name for fd, v in flags.ListFields() if v}


def test_rbac_denial_names_the_istio_policy(mesh: Mesh, collector: CaptureCollector) -> None:
    result, tag = _call_with_id(mesh, "checkout", "catalog", "/catalog/internal/keys")
    assert result["status"] == 403
    inbound = _http_entry(collector, tag, "catalog")
    assert inbound.message.response.response_code.value == 403
    details = inbound.message.response.response_code_details
    assert details == "rbac_access_denied_matched_policy[ns[default]-policy[deny-internal]-rule[0]]"
    assert details.startswith("rbac_access_denied_matched_policy[")
    common = inbound.message.common_properties
    # Denied before the router: Envoy 1.40 names the route but no cluster, and made no attempt.
    assert (common.route_name, common.upstream_cluster, common.upstream_request_attempt_count) == ("default", "", 0)
    assert [s.uri for s in common.tls_properties.peer_certificate_properties.subject_alt_name] == [
        "spiffe://cluster.local/ns/default/sa/checkout"
    ]
    # The client's sidecar relays the 403 as the upstream's answer.
    outbound = _http_entry(collector, tag, "checkout")
    assert outbound.message.response.response_code.value == 403
    assert outbound.message.response.response_code_details == "via_upstream"
    assert outbound.message.common_properties.upstream_cluster == "outbound|9080||catalog.default.svc.cluster.local"
    # Paths the policy does not name are served.
    assert mesh.call("checkout", "catalog", "/catalog/1")[0]["status"] == 200


def test_rbac_blocks_one_forbidden_edge_and_not_another(mesh: Mesh, collector: CaptureCollector) -> None:
    blocked, tag = _call_with_id(mesh, "checkout", "details", "/details/1")
    assert blocked["status"] == 403
    inbound = _http_entry(collector, tag, "details")
    assert (
        inbound.message.response.response_code_details
        == "rbac_access_denied_matched_policy[ns[default]-policy[deny-checkout]-rule[0]]"
    )
    assert _http_entry(collector, tag, "checkout").message.response.response_code.value == 403
    # deny-checkout names checkout's SPIFFE id only: frontend is served, and so is checkout elsewhere.
    assert mesh.call("frontend", "details", "/details/2")[0]["status"] == 200
    served, tag = _call_with_id(mesh, "checkout", "ratings", "/ratings/3")
    assert served["status"] == 200
    assert _http_entry(collector, tag, "ratings").message.response.response_code_details == "via_upstream"


def test_retry_policy_counts_attempts(mesh: Mesh, collector: CaptureCollector) -> None:
    result, tag = _call_with_id(mesh, "checkout", "orders", "/orders/status/503")
    assert result["status"] == 503
    outbound = _http_entry(collector, tag, "checkout")
    common = outbound.message.common_properties
    assert common.upstream_request_attempt_count == 4  # num_retries 3
    assert _flags(outbound) == {"upstream_retry_limit_exceeded"}  # URX
    assert outbound.message.response.response_code.value == 503
    assert outbound.message.response.response_code_details == "via_upstream"
    # The destination's sidecar logs each attempt under the same request id. An attempt the
    # client abandoned as soon as it read the 503 may be logged as a downstream disconnect (DC).
    attempts: list[Entry] = []

    def all_attempts_in() -> bool:
        attempts[:] = [e for e in collector.entries() if e.kind == "http" and tag in e.message.request.path]
        attempts[:] = [e for e in attempts if "~orders-v1-" in e.node_id]
        return len(attempts) >= 4

    wait_until(all_attempts_in, 5.0)
    assert len(attempts) == 4
    assert {e.message.response.response_code.value for e in attempts} == {503}
    assert {e.message.response.response_code_details for e in attempts} <= {
        "via_upstream",
        "downstream_remote_disconnect",
    }
    # Without a retry policy, one attempt.
    ok, tag = _call_with_id(mesh, "checkout", "orders", "/orders/1")
    assert ok["status"] == 200
    assert _http_entry(collector, tag, "checkout").message.common_properties.upstream_request_attempt_count == 1


def test_upstream_5xx_is_via_upstream(mesh: Mesh, collector: CaptureCollector) -> None:
    result, tag = _call_with_id(mesh, "frontend", "orders", "/orders/status/500")
    assert result["status"] == 500
    for service in ("frontend", "orders"):
        entry = _http_entry(collector, tag, service)
        assert entry.message.response.response_code.value == 500
        assert entry.message.response.response_code_details == "via_upstream"
        assert not _flags(entry)
        assert entry.message.common_properties.upstream_request_attempt_count == 1


def test_path_without_route_is_nr(mesh: Mesh, collector: CaptureCollector) -> None:
    result, tag = _call_with_id(mesh, "checkout", "catalog", "/admin/debug")
    assert result["status"] == 404
    entry = _http_entry(collector, tag, "checkout")
    common = entry.message.common_properties
    assert _flags(entry) == {"no_route_found"}  # NR
    assert entry.message.response.response_code_details == "route_not_found"
    assert (common.route_name, common.upstream_cluster, common.upstream_request_attempt_count) == ("", "", 0)
    assert entry.message.request.authority == "catalog.default.svc.cluster.local:9080"
    # Nothing reached catalog.
    time.sleep(0.5)
    assert not [
        e
        for e in collector.entries()
        if e.kind == "http" and tag in e.message.request.path and "~catalog-v1-" in e.node_id
    ]


def test_host_outside_registry_gets_block_all_502(mesh: Mesh, collector: CaptureCollector) -> None:
    result, tag = _call_with_id(mesh, "checkout", "billing", "/billing/1")
    assert result["status"] == 502
    entry = _http_entry(collector, tag, "checkout")
    common = entry.message.common_properties
    assert entry.message.response.response_code.value == 502
    assert entry.message.response.response_code_details == "direct_response"
    assert (common.route_name, common.upstream_cluster) == ("block_all", "")
    assert not _flags(entry)
    assert entry.message.request.authority == "billing.default.svc.cluster.local:9080"


def test_weak_tls_pair_negotiates_tls12_cbc(mesh: Mesh, collector: CaptureCollector) -> None:
    result, tag = _call_with_id(mesh, "checkout", "payments", "/payments/1")
    assert result["status"] == 200
    tls = _http_entry(collector, tag, "payments").message.common_properties.tls_properties
    assert tls.tls_version == TLSv1_2
    assert tls.tls_cipher_suite.value == ECDHE_ECDSA_AES128_SHA  # a CBC suite
    assert [s.uri for s in tls.peer_certificate_properties.subject_alt_name] == [
        "spiffe://cluster.local/ns/default/sa/checkout"
    ]
    # A default hop for comparison: Envoy's upstream TLS goes up to 1.2, with an AEAD suite.
    result, tag = _call_with_id(mesh, "frontend", "reviews", "/reviews/3")
    tls = _http_entry(collector, tag, "reviews").message.common_properties.tls_properties
    assert (tls.tls_version, tls.tls_cipher_suite.value) == (TLSv1_2, ECDHE_ECDSA_AES128_GCM_SHA256)


def test_impostor_presents_another_workloads_certificate(mesh: Mesh, collector: CaptureCollector) -> None:
    result, tag = _call_with_id(mesh, "impostor", "ratings", "/ratings/9")
    assert result["status"] == 200
    assert "URI=spiffe://cluster.local/ns/default/sa/reviews" in result["body"]["xfcc"]
    # The destination sees reviews' SPIFFE id ...
    inbound = _http_entry(collector, tag, "ratings")
    tls = inbound.message.common_properties.tls_properties
    assert [s.uri for s in tls.peer_certificate_properties.subject_alt_name] == [
        "spiffe://cluster.local/ns/default/sa/reviews"
    ]
    # ... while the same request left from the impostor workload's sidecar.
    outbound = _http_entry(collector, tag, "impostor")
    assert outbound.node_id.startswith("sidecar~127.0.0.1~impostor-v1-")
    assert outbound.message.common_properties.upstream_cluster == "outbound|9080||ratings.default.svc.cluster.local"
    assert mesh.services["impostor"].sidecar.spec.certs == mesh.certs("default", "reviews")


def test_network_rbac_closes_the_connection_and_says_why(mesh: Mesh, collector: CaptureCollector) -> None:
    [denied] = mesh.tcp("checkout", "db", "SELECT 2")
    assert denied["reply"] == ""  # closed unanswered
    # db's sidecar logs the connection with the policy that closed it; its peer is checkout.
    [entry] = _entries_for(
        collector,
        lambda e: (
            e.kind == "tcp" and "~db-v1-" in e.node_id and e.message.common_properties.connection_termination_details
        ),
    )
    common = entry.message.common_properties
    assert (
        common.connection_termination_details
        == "rbac_access_denied_matched_policy[ns[default]-policy[db-deny-checkout]-rule[0]]"
    )
    assert common.upstream_cluster == "inbound|5432||"
    assert [s.uri for s in common.tls_properties.peer_certificate_properties.subject_alt_name] == [
        "spiffe://cluster.local/ns/default/sa/checkout"
    ]
    # The client's half, paired by port as for any TCP hop.
    [client] = _entries_for(
        collector,
        lambda e: (
            e.kind == "tcp"
            and e.message.common_properties.upstream_local_address.socket_address.port_value
            == common.downstream_remote_address.socket_address.port_value
        ),
    )
    assert "~checkout-v1-" in client.node_id
    assert client.message.common_properties.upstream_cluster == "outbound|5432||db.default.svc.cluster.local"
    assert not client.message.common_properties.connection_termination_details
    # The policy names checkout only: reviews (plaintext, no principal) is served.
    assert mesh.tcp("reviews", "db", "SELECT 1")[0]["reply"] == "db:SELECT 1"
