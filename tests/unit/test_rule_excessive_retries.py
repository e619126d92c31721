"""excessive_retries on a fake clock: hops in, alerts out. Retries are counted per edge per window
from the source sidecar's outbound entries (attempts - 1, plus one per URX), once per request;
the traps: a few single retries, the destination sidecar's entry per attempt, inbound-only
edges, exemptions, windows that each stay below the threshold."""

from __future__ import annotations

from typing import Any

from meshaudit.config import Config, Policy
from meshaudit.engine.core import Engine
from meshaudit.engine.rules.excessive_retries import ExcessiveRetries
from meshaudit.engine.setup import build_engine
from meshaudit.model import ALS_HTTP, ALS_TCP, INBOUND, OTEL_LOG, OUTBOUND, Alert, Hop
from test_engine import FRONTEND, FRONTEND_SA, NODE_FRONTEND, NODE_REVIEWS, RATINGS, REVIEWS, T0

RULE = "excessive_retries"


def engine(policy: Policy | None = None, **opts: Any) -> Engine:
    cfg = Config.model_validate(
        {"engine": {"suppress_secs": 300, "store_max_items": 1000}, "rules": {RULE: {"window_secs": 60, **opts}}}
    )
    return build_engine(cfg, policy or Policy())


def out(
    rid: str, attempts: int = 1, status: int = 200, flags: str = "", dst: Any = REVIEWS, start: float = T0, **kw: Any
) -> Hop:
    """The source (frontend) sidecar's entry: one per request, after its retries."""
    return Hop(
        ALS_HTTP,
        NODE_FRONTEND,
        FRONTEND,
        OUTBOUND,
        FRONTEND,
        dst,
        start,
        method="GET",
        path=kw.pop("path", "/reviews/1"),
        status=status,
        attempts=attempts,
        response_flags=flags,
        response_code_details="via_upstream",
        request_id=rid,
        upstream_cluster=f"outbound|9080||{dst.service}.default.svc.cluster.local",
        **kw,
    )


def inb(rid: str, status: int = 200, start: float = T0) -> Hop:
    """The destination (reviews) sidecar's entry: one per attempt, same request id."""
    return Hop(
        ALS_HTTP,
        NODE_REVIEWS,
        REVIEWS,
        INBOUND,
        FRONTEND_SA,
        REVIEWS,
        start,
        tls_version="TLSv1.3",
        peer_principal=FRONTEND_SA.principal,
        method="GET",
        path="/reviews/1",
        status=status,
        attempts=1,
        response_code_details="via_upstream",
        request_id=rid,
        upstream_cluster="inbound|9080||",
    )


def mine(alerts: list[Alert]) -> list[Alert]:
    return [a for a in alerts if a.rule == RULE]


def test_many_retried_requests_alert_once_with_the_evidence() -> None:
    e = engine()
    # 30 requests, 12 of them needed 2 attempts: 12 retries, ratio 0.4 (>= 10 and >= 0.2).
    hops = [out(f"r{i}", attempts=2 if i < 12 else 1, start=T0 + i * 0.1) for i in range(30)]
    assert e.evaluate(hops, T0) == []  # judged on the tick, per edge
    got = e.tick(T0 + 0.2)
    assert [a.rule for a in got] == [RULE]
    a = got[0].to_json()
    assert a["severity"] == "warning"
    assert a["source"]["service"] == "frontend" and a["destination"]["service"] == "reviews"
    ev = a["evidence"]
    assert ev["count"] == 1
    assert ev["detail"] == (
        "12 retries over 30 requests (ratio 0.40) in a 60 s window, from the source sidecar's outbound entries"
    )
    # Examples are requests that retried (engine.examples, 3).
    assert [x["request_id"] for x in ev["examples"]] == ["r0", "r1", "r2"]
    assert ev["first_seen"] == "2027-01-15T08:00:00.000Z"  # the first retried request's time
    assert "excessive retries" in a["summary"] and "frontend.default" in a["summary"]
    # The rest of the window raises nothing more: one violation per window.
    e.evaluate([out(f"s{i}", attempts=3) for i in range(20)], T0 + 1)
    assert e.tick(T0 + 2) == []
    assert e.tick(T0 + 61) == []
    assert e.agg.violations == {RULE: 1}


def test_a_few_requests_that_each_needed_one_retry_raise_nothing() -> None:
    e = engine()
    # 9 retries among 20 requests: the ratio is high, but too few retries.
    e.evaluate([out(f"a{i}", attempts=2 if i < 9 else 1) for i in range(20)], T0)
    # Another edge: 15 retries among 200 requests: enough retries, ratio 0.075.
    e.evaluate([out(f"b{i}", attempts=2 if i < 15 else 1, dst=RATINGS) for i in range(200)], T0)
    assert e.tick(T0 + 1) == []
    assert e.tick(T0 + 61) == []  # nor when the windows close
    assert e.agg.violations == {}


def test_the_destination_sidecars_entry_per_attempt_is_not_counted() -> None:
    e = engine()
    # 10 requests, each retried twice by frontend's sidecar: reviews' sidecar logs 3 entries per
    # request with one request id (two 503s and the 200). Only the outbound entries count.
    hops: list[Hop] = []
    for i in range(10):
        hops += [inb(f"r{i}", 503), inb(f"r{i}", 503), inb(f"r{i}", 200), out(f"r{i}", attempts=3)]
    e.evaluate(hops, T0)
    got = mine(e.tick(T0 + 1))
    assert len(got) == 1
    assert got[0].detail is not None and got[0].detail.startswith("20 retries over 10 requests (ratio 2.00)")


def test_an_edge_seen_only_by_the_destination_sidecar_is_not_judged() -> None:
    """The documented choice: no guessing retries from request ids repeated at the inbound side."""
    e = engine()
    e.evaluate([inb(f"r{i // 3}", 503 if i % 3 else 200) for i in range(90)], T0)
    assert e.tick(T0 + 1) == [] and e.tick(T0 + 61) == []
    assert e.agg.violations == {}


def test_retry_limit_exceeded_counts_one_retry_more() -> None:
    e = engine(min_retries=10, min_ratio=0.2)
    # 3 requests gave up after 3 attempts (URX): 3 x (2 + 1) = 9 retries, below 10 ...
    e.evaluate([out(f"x{i}", attempts=3, status=503, flags="URX") for i in range(3)], T0)
    assert e.tick(T0 + 1) == []
    # ... one more with a single retry makes 10. UR is no URX (a reset, not a retry).
    e.evaluate([out("y", attempts=2, status=503, flags="UR")], T0 + 2)
    got = e.tick(T0 + 3)
    assert [a.rule for a in got] == [RULE]
    assert got[0].detail is not None and got[0].detail.startswith("10 retries over 4 requests")


def test_urx_without_an_attempt_count_still_counts() -> None:
    """An OpenTelemetry access log that does not carry the attempt count (0): URX still shows a
    retry wanted; an entry without either counts as a request without retries."""
    e = engine(min_retries=2, min_ratio=0.5)
    hops = [
        Hop(
            OTEL_LOG,
            NODE_FRONTEND,
            FRONTEND,
            OUTBOUND,
            FRONTEND,
            REVIEWS,
            T0,
            method="GET",
            path="/",
            status=503 if i < 2 else 200,
            response_flags="URX" if i < 2 else "-",
            request_id=f"o{i}",
        )
        for i in range(4)
    ]
    e.evaluate(hops, T0)
    got = e.tick(T0 + 1)
    assert [a.rule for a in got] == [RULE]
    assert got[0].detail is not None and got[0].detail.startswith("2 retries over 4 requests (ratio 0.50)")


def test_windows_that_each_stay_below_the_threshold_raise_nothing() -> None:
    e = engine()
    e.evaluate([out(f"a{i}", attempts=2 if i < 6 else 1) for i in range(20)], T0)
    assert e.tick(T0 + 30) == []
    assert e.tick(T0 + 60) == []  # the first window closes with 6 retries
    e.evaluate([out(f"b{i}", attempts=2 if i < 6 else 1) for i in range(20)], T0 + 61)
    assert e.tick(T0 + 62) == [] and e.tick(T0 + 125) == []
    assert e.agg.violations == {}


def test_a_window_over_the_threshold_only_when_it_closes_is_judged_then() -> None:
    e = engine(min_retries=5, min_ratio=0.5)
    e.evaluate([out(f"a{i}", attempts=2) for i in range(4)], T0)
    assert e.tick(T0 + 1) == []  # 4 retries: not yet
    e.evaluate([out("b", attempts=2)], T0 + 59.5)
    got = e.tick(T0 + 60)  # judged as it changed and closed in the same tick: once
    assert [a.rule for a in got] == [RULE]
    assert e.agg.violations == {RULE: 1}


def test_each_violating_window_is_one_violation_counted_by_the_aggregator() -> None:
    e = engine()
    alerts: list[Alert] = []
    for w in range(3):  # three windows of 60 s, each with 20 retried requests of 40
        t = T0 + w * 60
        alerts += e.evaluate([out(f"w{w}-{i}", attempts=2 if i < 20 else 1, start=t) for i in range(40)], t)
        alerts += e.tick(t + 1)
        alerts += e.tick(t + 60)
    alerts += e.tick(T0 + 301)  # the aggregation window (suppress_secs 300) closes
    got = mine(alerts)
    assert [a.count for a in got] == [1, 3]  # the first at once, the summary with the total
    assert len({a.id for a in got}) == 2


def test_exemptions_apply_to_the_edge_and_to_paths() -> None:
    policy = Policy.model_validate(
        {
            "exemptions": [
                {"rules": [RULE], "from": ["frontend.default"], "to": ["ratings.default"], "reason": "batch job"},
                {"rules": [RULE], "paths": ["/flaky/*"], "reason": "known flaky"},
            ]
        }
    )
    e = engine(policy)
    e.evaluate([out(f"a{i}", attempts=3, dst=RATINGS) for i in range(30)], T0)
    # Retried requests on an exempt path count as requests, not as retries.
    e.evaluate([out(f"b{i}", attempts=3, path="/flaky/x") for i in range(30)], T0)
    e.evaluate([out(f"c{i}", attempts=2) for i in range(9)], T0)
    assert e.tick(T0 + 1) == [] and e.tick(T0 + 61) == []
    e.evaluate([out(f"d{i}", attempts=2) for i in range(10)], T0 + 62)
    assert [a.rule for a in e.tick(T0 + 63)] == [RULE]


def test_tcp_entries_and_other_sources_are_their_own_business() -> None:
    e = engine()
    tcp = [
        Hop(ALS_TCP, NODE_FRONTEND, FRONTEND, OUTBOUND, FRONTEND, REVIEWS, T0, attempts=3, conn=f"10.0.0.1:{i}")
        for i in range(30)
    ]
    e.evaluate(tcp, T0)
    # Two edges, each below the threshold on its own (9 retries each).
    e.evaluate([out(f"a{i}", attempts=2) for i in range(9)], T0)
    e.evaluate([out(f"b{i}", attempts=2, dst=RATINGS) for i in range(9)], T0)
    assert e.tick(T0 + 1) == [] and e.tick(T0 + 61) == []


def test_the_rule_is_registered_with_its_options() -> None:
    cfg = Config().rules.excessive_retries
    assert (cfg.enabled, cfg.severity, cfg.window_secs, cfg.min_retries, cfg.min_ratio) == (
        True,
        "warning",
        60,
        10,
        0.2,
    )
    assert ExcessiveRetries.name == RULE
