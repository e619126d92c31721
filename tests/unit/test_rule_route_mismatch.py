"""route_mismatch on a fake clock: NR, NC, Istio's REGISTRY_ONLY answers (HTTP block_all route,
TCP BlackHoleCluster), PassthroughCluster when not allowed, and the traps: an application's own
404, and an allowed passthrough."""

from __future__ import annotations

from typing import Any

from meshaudit.config import MeshConfig
from meshaudit.model import ALS_HTTP, ALS_TCP, INBOUND, OUTBOUND, Hop, identity
from meshaudit.naming import Namer
from test_engine import FRONTEND, FRONTEND_SA, NODE_FRONTEND, NODE_REVIEWS, REVIEWS, T0, engine

NOWHERE = identity()


def out(status: int, details: str = "via_upstream", flags: str = "", cluster: str = "", **kw: Any) -> Hop:
    """frontend's sidecar's entry of a request it sent."""
    return Hop(
        ALS_HTTP, NODE_FRONTEND, FRONTEND, kw.pop("direction", OUTBOUND), FRONTEND, kw.pop("dst", NOWHERE), T0,
        method="GET", path=kw.pop("path", "/x"), authority=kw.pop("authority", "reviews:9080"),
        request_id=kw.pop("rid", "r1"), status=status, response_code_details=details, response_flags=flags,
        upstream_cluster=cluster, **kw,
    )  # fmt: skip


def found(alerts: list[Any]) -> list[Any]:
    return [a for a in alerts if a.rule == "route_mismatch"]


def test_no_route_found_names_the_requested_mesh_service() -> None:
    e = engine()
    got = found(e.evaluate([out(404, "route_not_found", "NR", authority="reviews.default.svc.cluster.local:9080")], T0))
    assert len(got) == 1
    a = got[0]
    assert a.source is FRONTEND and a.destination == identity("reviews", "default")
    assert a.severity == "warning" and a.blocked is None
    assert "no route found (NR)" in (a.detail or "")


def test_no_cluster_found() -> None:
    e = engine()
    got = found(e.evaluate([out(503, "cluster_not_found", "NC", authority="reviews")], T0))
    assert [(a.destination, "NC" in (a.detail or "")) for a in got] == [(identity("reviews", "default"), True)]


def test_registry_only_block_all_names_the_external_host_without_port() -> None:
    e = engine()
    h = out(502, "direct_response", authority="api.example.com:443", route_name="block_all")
    got = found(e.evaluate([h], T0))
    assert [a.destination.key for a in got] == ["api.example.com"]
    assert "block_all" in (got[0].detail or "") and "outside the service registry" in (got[0].detail or "")


def test_tcp_to_blackhole_cluster() -> None:
    e = engine()
    dst = identity("203.0.113.9:5432", None, "BlackHoleCluster", None, "203.0.113.9:5432")
    h = Hop(ALS_TCP, NODE_FRONTEND, FRONTEND, OUTBOUND, FRONTEND, dst, T0, upstream_cluster="BlackHoleCluster")
    got = found(e.evaluate([h], T0))
    assert [(a.destination, "BlackHoleCluster" in (a.detail or "")) for a in got] == [(dst, True)]


def test_tcp_no_route_flag() -> None:
    e = engine()
    h = Hop(ALS_TCP, NODE_FRONTEND, FRONTEND, OUTBOUND, FRONTEND, REVIEWS, T0, response_flags="NR", conn="1.1.1.1:1")
    assert [a.destination for a in found(e.evaluate([h], T0))] == [REVIEWS]


def test_passthrough_only_when_not_allowed() -> None:
    h = out(200, authority="api.example.com", cluster="PassthroughCluster")
    assert found(engine().evaluate([h], T0)) == []  # allow_passthrough: true by default
    got = found(engine(route_mismatch={"allow_passthrough": False}).evaluate([h], T0))
    assert [a.destination.key for a in got] == ["api.example.com"]
    assert "PassthroughCluster" in (got[0].detail or "")


def test_inbound_no_route_at_the_destination_sidecar() -> None:
    e = engine()
    h = Hop(
        ALS_HTTP, NODE_REVIEWS, REVIEWS, INBOUND, FRONTEND_SA, REVIEWS, T0, tls_version="TLSv1.3", method="GET",
        path="/nowhere", authority="reviews:9080", request_id="i1", status=404, response_code_details="route_not_found",
        response_flags="NR", upstream_cluster="",
    )  # fmt: skip
    got = found(e.evaluate([h], T0))
    assert [(a.source, a.destination) for a in got] == [(FRONTEND_SA, REVIEWS)]


def test_trap_an_applications_own_404_raises_nothing() -> None:
    e = engine()
    cluster = "outbound|9080||reviews.default.svc.cluster.local"
    assert found(e.evaluate([out(404, "via_upstream", cluster=cluster, dst=REVIEWS)], T0)) == []
    assert found(e.evaluate([out(502, "via_upstream", cluster=cluster, dst=REVIEWS, rid="r2")], T0)) == []


def test_healthy_requests_read_one_lazy_field() -> None:
    """The hot path: a 200 answer is passed over after reading its status alone."""
    e = engine()
    # One attempt, as Envoy logs a request that reached its upstream (the retry rule reads the
    # flags only of a request with another count).
    h = out(200, cluster="outbound|9080||reviews.default.svc.cluster.local", dst=REVIEWS, attempts=1)
    del h.response_flags, h.response_code_details, h.authority  # reading any of these would raise
    assert found(e.evaluate([h], T0)) == []


def test_requested_names_mesh_hosts_and_external_hosts() -> None:
    n = Namer(MeshConfig())
    n.node("sidecar~10.0.0.1~a-1.shop~shop.svc.cluster.local", "a.shop")
    assert n.requested("cart.shop.svc.cluster.local:80", "x") == identity("cart", "shop")
    assert n.requested("cart.shop.svc", "x") == identity("cart", "shop")
    assert n.requested("cart.shop", "x") == identity("cart", "shop")  # a namespace a sidecar showed
    assert n.requested("cart:8080", "shop") == identity("cart", "shop")
    assert n.requested("example.com", "shop") == identity("example.com")
    assert n.requested("API.Example.com:443", "shop") == identity("api.example.com")
    assert n.requested("[2001:db8::1]:443", "shop") == identity("2001:db8::1")
