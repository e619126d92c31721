"""The loopback mesh itself, checked against a stand-in collector (no daemon needed): real
Envoy sidecars do mTLS with SPIFFE identities, stream HTTP and TCP access logs over gRPC,
send OpenTelemetry spans with the tags the daemon joins on, and so do the OTel SDK apps.
"""

from __future__ import annotations

import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from meshlab.capture import CaptureCollector, CapturedSpan, Entry
from meshlab.mesh import Mesh
from meshlab.procs import wait_until

pytestmark = pytest.mark.e2e

SPAN_WAIT = 5.0  # Envoy's tracer flushes every 0.2 s here (runtime key); the SDK every 0.2 s


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
