"""Is policy enforced? unexpected_edge and unexpected_path say of each alert whether the mesh
blocked every request it counts (``evidence.blocked``), on a fake clock: the first alert says
what the first request showed, a served request after denied ones alerts at once, the window's
summary says the whole window's verdict, and when both sidecars log one request the denying
sidecar's entry decides whichever arrives first."""

from __future__ import annotations

from typing import Any

import orjson
from google.protobuf import json_format
from meshaudit._proto.meshaudit.alert.v1 import alert_pb2
from meshaudit.engine.aggregate import Aggregator
from meshaudit.engine.api import Violation
from meshaudit.engine.rules import SUMMARIES
from meshaudit.model import ALS_HTTP, ALS_TCP, INBOUND, OUTBOUND, Hop
from meshaudit.runtime.messages import violation_from_wire, violation_to_wire
from test_engine import FRONTEND, FRONTEND_SA, NODE_FRONTEND, RATINGS, REVIEWS, T0, engine, rules

NODE_RATINGS = "sidecar~10.0.0.3~ratings-v1-1.default~default.svc.cluster.local"
RBAC = "rbac_access_denied_matched_policy[ns[default]-policy[deny-frontend]-rule[0]]"


def inb(rid: str, status: int = 200, details: str = "via_upstream", flags: str = "", **kw: Any) -> Hop:
    """The destination (ratings) sidecar's entry: frontend -> ratings is not a policy edge."""
    return Hop(
        ALS_HTTP,
        NODE_RATINGS,
        RATINGS,
        INBOUND,
        FRONTEND_SA,
        RATINGS,
        T0,
        tls_version="TLSv1.3",
        method=kw.pop("method", "GET"),
        path=kw.pop("path", "/ratings/1"),
        request_id=rid,
        status=status,
        response_code_details=details,
        response_flags=flags,
        upstream_cluster="inbound|9080||",
        **kw,
    )


def out(rid: str, status: int = 200, details: str = "via_upstream", **kw: Any) -> Hop:
    """The source (frontend) sidecar's entry of the same request."""
    return Hop(
        ALS_HTTP,
        NODE_FRONTEND,
        FRONTEND,
        OUTBOUND,
        FRONTEND,
        RATINGS,
        T0,
        method=kw.pop("method", "GET"),
        path=kw.pop("path", "/ratings/1"),
        request_id=rid,
        status=status,
        response_code_details=details,
        upstream_cluster="outbound|9080||ratings.default.svc.cluster.local",
        **kw,
    )


def denied(rid: str) -> Hop:
    return inb(rid, 403, RBAC)


def edge(alerts: list[Any]) -> list[Any]:
    return [a for a in alerts if a.rule == "unexpected_edge"]


def test_a_denied_forbidden_request_is_blocked_with_its_policy_in_the_detail() -> None:
    e = engine()
    got = edge(e.evaluate([denied("d1")], T0))
    assert len(got) == 1
    a = got[0].to_json()
    assert a["severity"] == "high" and a["evidence"]["blocked"] is True
    assert "RBAC policy ns[default]-policy[deny-frontend]-rule[0]" in a["evidence"]["detail"]


def test_a_served_forbidden_request_is_critical() -> None:
    e = engine()
    got = edge(e.evaluate([inb("s1")], T0))
    assert [(a.severity, a.blocked) for a in got] == [("critical", False)]


def test_ext_authz_denial_is_blocked() -> None:
    e = engine()
    got = edge(e.evaluate([inb("x1", 403, "ext_authz_denied", "UAEX")], T0))
    assert [(a.severity, a.blocked) for a in got] == [("high", True)]
    assert "denied by ext_authz" in (got[0].detail or "")


def test_trap_an_applications_own_403_is_served_not_blocked() -> None:
    e = engine()
    got = edge(e.evaluate([inb("a1", 403, "via_upstream")], T0))
    assert [(a.severity, a.blocked) for a in got] == [("critical", False)]


def test_a_window_that_started_blocked_alerts_at_once_when_a_request_is_served() -> None:
    e = engine()
    first = edge(e.evaluate([denied("b1"), denied("b2")], T0))
    assert [(a.count, a.blocked, a.severity) for a in first] == [(1, True, "high")]
    assert edge(e.evaluate([denied("b3")], T0 + 5)) == []  # still all denied: counted
    served = edge(e.evaluate([inb("b4")], T0 + 10))
    assert [(a.count, a.blocked, a.severity) for a in served] == [(4, False, "critical")]
    assert edge(e.evaluate([inb("b5"), denied("b6")], T0 + 20)) == []  # already said: counted
    summary = edge(e.tick(T0 + 61))
    assert [(a.count, a.blocked, a.severity) for a in summary] == [(6, False, "critical")]
    assert len({first[0].id, served[0].id, summary[0].id}) == 3


def test_a_window_all_denied_says_so_in_its_summary() -> None:
    e = engine()
    e.evaluate([denied("c1")], T0)
    e.evaluate([denied("c2"), denied("c3")], T0 + 1)
    summary = edge(e.tick(T0 + 61))
    assert [(a.count, a.blocked, a.severity) for a in summary] == [(3, True, "high")]


def test_source_entry_first_waits_and_the_denying_sidecars_entry_decides() -> None:
    e = engine()
    assert edge(e.evaluate([out("w1", 403)], T0)) == []  # 403 via_upstream: cannot tell; waits
    got = edge(e.evaluate([denied("w1")], T0 + 0.8))
    assert [(a.count, a.blocked) for a in got] == [(1, True)]
    assert got[0].examples[0].observer == NODE_RATINGS  # the denying sidecar's entry
    assert edge(e.tick(T0 + 61)) == []  # one request, counted once


def test_both_entries_in_one_batch_either_order_count_once_as_denied() -> None:
    for batch in ([out("o1", 403), denied("o1")], [denied("o1"), out("o1", 403)]):
        e = engine()
        got = edge(e.evaluate(batch, T0))
        assert [(a.count, a.blocked) for a in got] == [(1, True)], batch
        assert edge(e.tick(T0 + 61)) == []


def test_destination_entry_first_then_source_entry_counts_once() -> None:
    e = engine()
    assert [a.blocked for a in edge(e.evaluate([denied("f1")], T0))] == [True]
    assert edge(e.evaluate([out("f1", 403)], T0 + 0.5)) == []
    assert edge(e.tick(T0 + 61)) == []


def test_source_entry_alone_after_the_wait_is_served() -> None:
    """No destination sidecar logged it (none there, or its log was lost): nothing denied it."""
    e = engine()
    assert edge(e.evaluate([out("n1", 403)], T0)) == []
    assert edge(e.tick(T0 + 1.0)) == []
    got = edge(e.tick(T0 + 1.6))  # denial_wait_ms = 1500
    assert [(a.blocked, a.severity) for a in got] == [(False, "critical")]


def test_a_served_source_entry_does_not_wait() -> None:
    e = engine()
    got = edge(e.evaluate([out("ok1", 200)], T0))
    assert [(a.blocked, a.severity) for a in got] == [(False, "critical")]


def test_a_denying_entry_after_the_wait_corrects_the_windows_verdict() -> None:
    e = engine(unexpected_edge={"denial_wait_ms": 0})
    first = edge(e.evaluate([out("l1", 403)], T0))
    assert [(a.blocked, a.severity) for a in first] == [(False, "critical")]
    assert edge(e.evaluate([denied("l1")], T0 + 3)) == []  # the same request: not counted again
    summary = edge(e.tick(T0 + 61))
    assert [(a.count, a.blocked, a.severity) for a in summary] == [(1, True, "high")]


def test_tcp_connection_denied_by_rbac_at_the_destination() -> None:
    e = engine()
    conn = "10.0.0.1:5000"
    o = Hop(
        ALS_TCP, NODE_FRONTEND, FRONTEND, OUTBOUND, FRONTEND, RATINGS, T0, conn=conn,
        upstream_cluster="outbound|5432||ratings.default.svc.cluster.local",
    )  # fmt: skip
    i = Hop(
        ALS_TCP, NODE_RATINGS, RATINGS, INBOUND, FRONTEND_SA, RATINGS, T0, conn=conn, tls_version="TLSv1.3",
        upstream_cluster="inbound|5432||", connection_termination_details=RBAC,
    )  # fmt: skip
    assert edge(e.evaluate([o], T0)) == []
    got = edge(e.evaluate([i], T0 + 0.5))
    assert [(a.count, a.blocked) for a in got] == [(1, True)]
    assert edge(e.tick(T0 + 61)) == []  # the outbound entry was not counted as a second connection


def test_unexpected_path_blocked_and_served() -> None:
    e = engine()
    bad = dict(method="DELETE", path="/reviews/1")
    h = Hop(
        ALS_HTTP, "n", REVIEWS, INBOUND, FRONTEND_SA, REVIEWS, T0, tls_version="TLSv1.3", request_id="p1",
        status=403, response_code_details="rbac_access_denied_matched_policy[ns[default]-policy[ro]-rule[0]]",
        upstream_cluster="inbound|9080||", **bad,  # type: ignore[arg-type]
    )  # fmt: skip
    got = [a for a in e.evaluate([h], T0) if a.rule == "unexpected_path"]
    assert [(a.blocked, a.severity) for a in got] == [(True, "warning")]
    h2 = Hop(
        ALS_HTTP, "n", REVIEWS, INBOUND, FRONTEND_SA, REVIEWS, T0, tls_version="TLSv1.3", request_id="p2",
        status=404, response_code_details="via_upstream", upstream_cluster="inbound|9080||", **bad,  # type: ignore[arg-type]
    )  # fmt: skip
    got = [a for a in e.evaluate([h2], T0 + 1) if a.rule == "unexpected_path"]
    assert [(a.blocked, a.severity) for a in got] == [(False, "critical")]


def test_rules_without_enforcement_say_null() -> None:
    e = engine()
    plain = Hop(ALS_HTTP, "n", REVIEWS, INBOUND, FRONTEND, REVIEWS, T0, method="GET", path="/reviews/1")
    got = e.evaluate([plain], T0)
    assert rules(got) == ["plaintext_hop"] and got[0].to_json()["evidence"]["blocked"] is None


def test_blocked_is_in_the_published_schema_and_crosses_between_workers() -> None:
    e = engine()
    alerts = e.evaluate([denied("s1")], T0) + e.evaluate([inb("s2")], T0 + 1) + e.tick(T0 + 61)
    assert {a.blocked for a in edge(alerts)} == {True, False}
    for a in alerts:
        json_format.ParseDict(orjson.loads(a.encode()), alert_pb2.Alert(), ignore_unknown_fields=False)
    v = Violation("unexpected_edge", "high", FRONTEND, RATINGS, denied("s3"), "d", T0, None, True)
    back = violation_from_wire(violation_to_wire(v))
    assert back.blocked is True
    agg = Aggregator(60, 3, 1000, summaries=SUMMARIES)
    agg.add(back, T0)
    assert [a.blocked for a in agg.drain()] == [True]
