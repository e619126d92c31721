"""authz_denied on a fake clock: RBAC 403s, TCP connections RBAC closed, ext_authz (UAEX), the
matched policy in the detail, and the traps: an application's own 403, and the source sidecar's
view of a denial its destination made."""

from __future__ import annotations

from typing import Any

from meshaudit.model import ALS_HTTP, ALS_TCP, INBOUND, OUTBOUND, Hop
from test_engine import FRONTEND, FRONTEND_SA, NODE_FRONTEND, NODE_REVIEWS, REVIEWS, T0, engine

RBAC = "rbac_access_denied_matched_policy[ns[default]-policy[deny-admin]-rule[0]]"


def inb(status: int, details: str, flags: str = "", rid: str = "r1", **kw: Any) -> Hop:
    """reviews' sidecar's entry of a request from frontend (an edge and path the policy allows)."""
    return Hop(
        ALS_HTTP, NODE_REVIEWS, REVIEWS, INBOUND, FRONTEND_SA, REVIEWS, T0, tls_version="TLSv1.3", method="GET",
        path="/reviews/1", request_id=rid, status=status, response_code_details=details, response_flags=flags,
        upstream_cluster="inbound|9080||", **kw,
    )  # fmt: skip


def denied(alerts: list[Any]) -> list[Any]:
    return [a for a in alerts if a.rule == "authz_denied"]


def test_rbac_403_names_the_matched_policy() -> None:
    e = engine()
    got = denied(e.evaluate([inb(403, RBAC)], T0))
    assert len(got) == 1
    a = got[0]
    assert (a.source, a.destination, a.severity) == (FRONTEND_SA, REVIEWS, "warning")
    assert a.detail == "GET /reviews/1 answered 403: denied by RBAC policy ns[default]-policy[deny-admin]-rule[0]"


def test_ext_authz_denial() -> None:
    e = engine()
    got = denied(e.evaluate([inb(403, "ext_authz_denied", "UAEX")], T0))
    assert [a.detail for a in got] == ["GET /reviews/1 answered 403: denied by ext_authz"]


def test_tcp_connection_closed_by_rbac() -> None:
    e = engine()
    h = Hop(
        ALS_TCP, NODE_REVIEWS, REVIEWS, INBOUND, FRONTEND_SA, REVIEWS, T0, tls_version="TLSv1.3",
        conn="10.0.0.1:4000", connection_termination_details=RBAC,
    )  # fmt: skip
    got = denied(e.evaluate([h], T0))
    assert [a.detail for a in got] == [
        "TCP connection closed: denied by RBAC policy ns[default]-policy[deny-admin]-rule[0]"
    ]


def test_denials_aggregate_per_edge() -> None:
    e = engine()
    first = denied(e.evaluate([inb(403, RBAC, rid=f"d{i}") for i in range(4)], T0))
    assert [a.count for a in first] == [1]
    assert [a.count for a in denied(e.tick(T0 + 61))] == [4]


def test_trap_an_applications_own_403_raises_nothing() -> None:
    e = engine()
    assert denied(e.evaluate([inb(403, "via_upstream")], T0)) == []


def test_trap_the_source_sidecars_view_of_a_denial_is_not_counted_again() -> None:
    e = engine()
    o = Hop(
        ALS_HTTP, NODE_FRONTEND, FRONTEND, OUTBOUND, FRONTEND, REVIEWS, T0, method="GET", path="/reviews/1",
        request_id="r1", status=403, response_code_details="via_upstream",
        upstream_cluster="outbound|9080||reviews.default.svc.cluster.local",
    )  # fmt: skip
    got = denied(e.evaluate([o, inb(403, RBAC)], T0))
    assert [a.observer for a in got[0].examples] == [NODE_REVIEWS] and len(got) == 1
    assert denied(e.tick(T0 + 61)) == []


def test_healthy_requests_read_one_lazy_field() -> None:
    e = engine()
    h = inb(200, "via_upstream")
    del h.response_flags, h.response_code_details  # reading either would raise
    assert denied(e.evaluate([h], T0)) == []


def test_decoded_entries_carry_what_the_rule_reads() -> None:
    """Through the ALS decoder: a TCP entry's connection termination details and the UAEX flag are
    read lazily; an HTTP entry's termination details read as ""."""
    from infra import als
    from meshaudit.config import MeshConfig
    from meshaudit.naming import Namer

    namer = Namer(MeshConfig())
    tcp = als.decode(
        als.tcp_message(
            [als.tcp_entry(cluster="inbound|5432||", peer=als.spiffe("frontend"), termination=RBAC)],
            als.identifier("db"),
        ),
        namer,
    )
    http = als.decode(
        als.http_message(
            [als.inbound_http("frontend", status=403, details="ext_authz_denied", flags=["UAEX"])],
            als.identifier("reviews"),
        ),
        namer,
    )
    hop: Any = tcp[0]
    assert hop.response_flags == ""
    entry, hop._e = hop._e, None  # without its entry, only what was read already can be read
    assert hop.connection_termination_details == RBAC  # read together with the flags: one lazy read
    hop._e = entry

    assert http[0].connection_termination_details == "" and http[0].response_flags == "UAEX"
    got = denied(engine().evaluate(tcp + http, T0))
    assert sorted(a.destination.key for a in got) == ["db.default", "reviews.default"]
