"""The pure engine with a fake clock: hops in, alerts out, for every rule, including the
aggregation window, suppression, pairing of both sidecars' entries and bounded stores."""

from __future__ import annotations

from typing import Any

from meshaudit.config import Config, Policy
from meshaudit.engine.core import Engine
from meshaudit.engine.rules.plaintext_hop import PlaintextHop
from meshaudit.engine.setup import build_engine
from meshaudit.model import (
    ALS_HTTP,
    ALS_TCP,
    INBOUND,
    OUTBOUND,
    SPAN,
    SPAN_KIND_CLIENT,
    SPAN_KIND_SERVER,
    Alert,
    Hop,
    identity,
)

T0 = 1_800_000_000.0
FRONTEND = identity("frontend", "default")
REVIEWS = identity("reviews", "default")
RATINGS = identity("ratings", "default")
FRONTEND_SA = identity("frontend", "default", None, "spiffe://cluster.local/ns/default/sa/frontend")
ADDR = identity(None, None, None, None, "10.0.0.9:4000")
NODE_REVIEWS = "sidecar~10.0.0.2~reviews-v1-1.default~default.svc.cluster.local"
NODE_FRONTEND = "sidecar~10.0.0.1~frontend-1.default~default.svc.cluster.local"

POLICY = Policy.model_validate(
    {
        "edges": [{"from": ["frontend.default"], "to": ["reviews.default"]}],
        "routes": [{"to": ["reviews.default"], "allow": [{"methods": ["GET"], "paths": ["/reviews/*"]}]}],
        "exemptions": [{"rules": ["plaintext_hop", "unexpected_path"], "paths": ["/healthz"]}],
    }
)


def engine(policy: Policy = POLICY, **over: Any) -> Engine:
    cfg = Config.model_validate(
        {
            "engine": {"suppress_secs": 60, "store_max_items": 1000},
            "rules": {"missing_access_log": {"grace_ms": 2000, "silent_secs": 10}, **over},
        }
    )
    return build_engine(cfg, policy)


def inbound(
    src: Any = FRONTEND_SA, tls: str | None = "TLSv1.3", path: str = "/reviews/1", rid: str | None = "r1", **kw: Any
) -> Hop:
    return Hop(
        ALS_HTTP,
        NODE_REVIEWS,
        REVIEWS,
        INBOUND,
        src,
        REVIEWS,
        T0,
        tls_version=tls,
        method=kw.pop("method", "GET"),
        path=path,
        request_id=rid,
        upstream_cluster="inbound|9080||",
        **kw,
    )


def outbound(dst: Any = REVIEWS, rid: str | None = "r1", **kw: Any) -> Hop:
    return Hop(
        ALS_HTTP,
        NODE_FRONTEND,
        FRONTEND,
        OUTBOUND,
        FRONTEND,
        dst,
        T0,
        method="GET",
        path="/reviews/1",
        request_id=rid,
        upstream_cluster="outbound|9080||reviews.default.svc.cluster.local",
        **kw,
    )


def app_span(service: Any = REVIEWS, trace: str = "ab" * 16, start: float = T0, parent: str | None = None) -> Hop:
    return Hop(
        SPAN,
        "span:" + service.key,
        service,
        INBOUND,
        identity(),
        service,
        start,
        parent_span_id=parent,
        method="GET",
        path="/reviews/1",
        trace_id=trace,
        span_kind=SPAN_KIND_SERVER,
    )


def rules(alerts: list[Alert]) -> list[str]:
    return [a.rule for a in alerts]


def test_mtls_inside_policy_is_silent() -> None:
    e = engine()
    assert e.evaluate([outbound(), inbound()], T0) == []
    assert e.tick(T0 + 120) == []


def test_plaintext_inbound_named_by_client_sidecar_entry_in_same_batch() -> None:
    e = engine()
    alerts = e.evaluate([inbound(src=ADDR, tls=None), outbound()], T0)
    assert rules(alerts) == ["plaintext_hop"]
    assert alerts[0].source is FRONTEND and alerts[0].destination is REVIEWS
    assert alerts[0].to_json()["evidence"]["count"] == 1


def test_plaintext_waits_for_attribution_then_alerts_with_address() -> None:
    e = engine()
    assert e.evaluate([inbound(src=ADDR, tls=None, rid="x")], T0) == []
    assert e.tick(T0 + 1.0) == []
    late = e.tick(T0 + 1.6)  # attribution_wait_ms = 1500
    assert rules(late) == ["plaintext_hop"] and late[0].source is ADDR


def test_plaintext_pairing_after_the_fact_names_the_source() -> None:
    e = engine()
    assert e.evaluate([inbound(src=ADDR, tls=None, rid="late")], T0) == []
    got = e.evaluate([outbound(rid="late")], T0 + 0.5)
    assert rules(got) == ["plaintext_hop"] and got[0].source is FRONTEND
    assert e.tick(T0 + 5) == []  # no second alert when the wait expires


def test_a_forwarded_request_id_pairs_each_call_with_its_own_destination() -> None:
    """Applications forward x-request-id (bookinfo's do): a page's calls share it. Only the
    client's entry of the call to this destination names the source: frontend's call to ratings,
    sent with the id of its own call to reviews, must not name reviews' plaintext client."""
    e = engine()
    to_ratings = Hop(ALS_HTTP, "sidecar~10.0.0.3~ratings-1.default~default.svc.cluster.local", RATINGS, INBOUND,
                     ADDR, RATINGS, T0, method="GET", path="/ratings/1", request_id="page-1",
                     upstream_cluster="inbound|9080||")  # fmt: skip
    # frontend's entry of its call to reviews, with the same id, comes first: not ratings' client
    assert e.evaluate([outbound(rid="page-1"), to_ratings], T0) == []
    late = e.tick(T0 + 1.6)  # attribution_wait_ms: still unnamed, so the address
    assert rules(late) == ["plaintext_hop"] and late[0].source is ADDR
    assert e.corr.outbound_by_rid.get(("page-1", "reviews.default")) is FRONTEND
    assert e.corr.outbound_by_rid.get(("page-1", "ratings.default")) is None


def test_a_plaintext_hops_wait_leaves_nothing_behind() -> None:
    # A waiting hop is found by its request id or its client socket; every way its wait ends
    # (paired by either key, expired, evicted) forgets both keys: nothing is kept past the wait.
    e = engine()
    rule = next(r for r in e.rules if isinstance(r, PlaintextHop))
    paired = Hop(ALS_HTTP, NODE_REVIEWS, REVIEWS, INBOUND, ADDR, REVIEWS, T0, method="GET", path="/reviews/1",
                 request_id="by-rid", conn="10.0.0.9:4000", upstream_cluster="inbound|9080||")  # fmt: skip
    expiring = Hop(ALS_TCP, NODE_REVIEWS, REVIEWS, INBOUND, ADDR, REVIEWS, T0, conn="10.0.0.9:4001")
    assert e.evaluate([paired, expiring], T0) == []
    assert (len(rule.by_rid), len(rule.by_conn)) == (1, 2)
    got = e.evaluate([outbound(rid="by-rid")], T0 + 0.5)
    assert rules(got) == ["plaintext_hop"] and got[0].source is FRONTEND
    assert (len(rule.by_rid), len(rule.by_conn)) == (0, 1)  # the paired hop's socket went with it
    assert rules(e.tick(T0 + 1.6)) == ["plaintext_hop"]  # the other waited its 1.5 s
    assert (len(rule.by_rid), len(rule.by_conn), len(rule.pending)) == (0, 0, 0)
    cfg = Config.model_validate({"engine": {"store_max_items": 100}})  # a share of 12 per observer
    small = build_engine(cfg, POLICY)  # a 13th waiting hop of one observer evicts its first
    rule = next(r for r in small.rules if isinstance(r, PlaintextHop))
    flood = [Hop(ALS_TCP, NODE_REVIEWS, REVIEWS, INBOUND, ADDR, REVIEWS, T0, conn=f"10.0.0.9:{p}") for p in range(13)]
    small.evaluate(flood, T0)
    assert len(rule.pending) == len(rule.by_conn) == 12 and "10.0.0.9:0" not in rule.by_conn


def test_plaintext_tcp_paired_by_connection() -> None:
    e = engine()
    inb = Hop(ALS_TCP, NODE_REVIEWS, REVIEWS, INBOUND, ADDR, REVIEWS, T0, conn="10.0.0.1:5000")
    out = Hop(ALS_TCP, NODE_FRONTEND, FRONTEND, OUTBOUND, FRONTEND, REVIEWS, T0, tls_version=None, conn="10.0.0.1:5000")
    got = e.evaluate([inb], T0) + e.evaluate([out], T0 + 0.1)
    assert rules(got) == ["plaintext_hop"] and got[0].source is FRONTEND


def test_exempt_health_check() -> None:
    e = engine()
    assert e.evaluate([inbound(src=FRONTEND, tls=None, path="/healthz")], T0) == []


def test_aggregation_one_alert_then_summary_when_window_closes() -> None:
    e = engine()
    first = e.evaluate([inbound(src=FRONTEND, tls=None, rid=f"r{i}") for i in range(5)], T0)
    assert rules(first) == ["plaintext_hop"] and first[0].count == 1
    more = e.evaluate([inbound(src=FRONTEND, tls=None, rid=f"s{i}") for i in range(3)], T0 + 30)
    assert more == []  # suppressed, counted
    assert e.tick(T0 + 59) == []
    summary = e.tick(T0 + 61)
    assert rules(summary) == ["plaintext_hop"]
    assert summary[0].count == 8 and summary[0].id != first[0].id
    assert len(summary[0].examples) == 3
    # A new window alerts at once again.
    again = e.evaluate([inbound(src=FRONTEND, tls=None, rid="t")], T0 + 62)
    assert rules(again) == ["plaintext_hop"]


def test_alert_ids_are_deterministic() -> None:
    a = engine().evaluate([inbound(src=FRONTEND, tls=None)], T0)[0]
    b = engine().evaluate([inbound(src=FRONTEND, tls=None)], T0)[0]
    assert a.id == b.id  # same data on the same clock: a replay deduplicates


def test_both_sidecars_of_one_request_count_once() -> None:
    e = engine()
    got = e.evaluate(
        [
            outbound(dst=RATINGS, rid="q"),
            Hop(
                ALS_HTTP,
                "n",
                RATINGS,
                INBOUND,
                FRONTEND,
                RATINGS,
                T0,
                tls_version="TLSv1.3",
                method="GET",
                path="/",
                request_id="q",
            ),
        ],
        T0,
    )
    assert rules(got) == ["unexpected_edge"]
    assert e.tick(T0 + 61) == []  # no summary: the second entry was the same request


def test_unexpected_path() -> None:
    e = engine()
    got = e.evaluate([inbound(method="DELETE", rid="d"), inbound(path="/admin", rid="a"), inbound(rid="ok")], T0)
    assert rules(got) == ["unexpected_path"]
    assert got[0].examples[0].method == "DELETE"


def test_learn_mode_alerts_on_new_edges_only_after_learning() -> None:
    e = engine(Policy(), unexpected_edge={"mode": "learn", "learn_secs": 60})
    assert e.evaluate([outbound()], T0) == []
    assert e.evaluate([outbound(dst=RATINGS, rid="z")], T0 + 61) != []
    assert e.evaluate([outbound(rid="y")], T0 + 62) == []


def test_no_edge_policy_means_no_edge_alerts() -> None:
    assert engine(Policy()).evaluate([outbound(dst=RATINGS)], T0) == []


def test_an_app_server_span_is_not_satisfied_by_its_services_outbound_entry_of_the_same_trace() -> None:
    """frontend's own server span (trace T) was never logged by frontend's inbound side (the
    request bypassed its sidecar); frontend's sidecar did log its outbound call to reviews, which
    carries the same trace id. That entry is another request: the span still alerts."""
    e = engine()
    e.evaluate([inbound(rid="seen")], T0)  # a logging mesh
    e.evaluate([outbound(rid="call", trace_id="ab" * 16)], T0 + 0.2)
    assert e.evaluate([app_span(service=FRONTEND)], T0 + 0.5) == []
    got = e.tick(T0 + 3)
    assert rules(got) == ["missing_access_log"] and got[0].destination is FRONTEND


def test_missing_access_log_after_grace() -> None:
    e = engine()
    e.evaluate([inbound(rid="seen")], T0)  # reviews' sidecar is known to log
    assert e.evaluate([app_span()], T0 + 1) == []
    assert e.tick(T0 + 2.5) == []
    got = e.tick(T0 + 3.1)
    assert rules(got) == ["missing_access_log"] and got[0].destination is REVIEWS


def test_access_log_after_span_satisfies_it() -> None:
    e = engine()
    e.evaluate([inbound(rid="seen")], T0)
    e.evaluate([app_span(trace="cd" * 16)], T0 + 1)
    e.evaluate([inbound(rid="r2", trace_id="cd" * 16)], T0 + 1.5)
    assert e.tick(T0 + 10) == []


def test_envoy_span_expects_its_own_sidecar_log() -> None:
    e = engine()
    span = Hop(SPAN, NODE_REVIEWS, REVIEWS, INBOUND, identity(), REVIEWS, T0, request_id="abc", span_kind=2)
    e.evaluate([span], T0)
    got = e.tick(T0 + 2.1)
    assert rules(got) == ["missing_access_log"]
    assert "sent no access log" in (got[0].detail or "")


def test_silent_sidecar() -> None:
    e = engine(unexpected_path={"enabled": False})
    e.evaluate([inbound(rid="1")], T0)
    alerts: list[Alert] = []
    for i in range(1, 25):
        if i % 5 == 0:
            e.evaluate([app_span(trace=f"{i:032x}", start=T0 + i - 0.2)], T0 + i)
        alerts += e.tick(T0 + i)
    silent = [a for a in alerts if a.source.key == "*"]
    assert len(silent) == 1 and "no access log for" in (silent[0].detail or "")
    assert silent[0].summary.startswith("The sidecar of reviews.default has sent no access log")


def test_stores_are_bounded_and_count_evictions() -> None:
    e = engine()
    for i in range(5000):
        e.evaluate([outbound(rid=f"r{i}")], T0)
    st = e.corr.outbound_by_rid
    # Bounded by store_max_items; every entry is either kept or counted as evicted; the newest
    # are kept (generational store: it drops its older half when the newer one fills).
    assert len(st) <= 1000 and len(st) + st.evicted_capacity == 5000
    assert all(st.get((f"r{i}", "reviews.default")) is FRONTEND for i in range(4500, 5000))


def test_idle_sidecar_is_not_silent() -> None:
    """Spans of the last requests arrive after their access logs; then traffic stops."""
    e = engine(unexpected_path={"enabled": False})
    e.evaluate([inbound(rid="1", trace_id="ef" * 16)], T0)
    e.evaluate([app_span(trace="ef" * 16, start=T0 - 0.01)], T0 + 0.3)
    alerts: list[Alert] = []
    for i in range(1, 40):
        alerts += e.tick(T0 + i)
    assert alerts == []


def test_bypassed_request_is_named_after_the_parent_span() -> None:
    e = engine()
    e.evaluate([inbound(rid="seen")], T0)
    client = Hop(
        SPAN,
        "span:frontend.default",
        FRONTEND,
        OUTBOUND,
        FRONTEND,
        identity(),
        T0,
        span_id="1" * 16,
        trace_id="ab" * 16,
        span_kind=SPAN_KIND_CLIENT,
    )
    e.evaluate([client, app_span(parent="1" * 16)], T0 + 1)
    got = e.tick(T0 + 3.1)
    assert rules(got) == ["missing_access_log"] and got[0].source is FRONTEND


def test_without_spans_the_logged_index_pauses_and_resumes_without_false_alarms() -> None:
    """No span for the span index horizon: the access-log index used only by span joins stops
    being written. When spans resume, a span of a request logged while the index was off is not
    joined (no false missing_access_log); a later span with no access log still alerts. From
    start-up the index is written for one correlation TTL, for the spans of a tracer that has not
    sent yet; identity_mismatch (on here) keeps nothing in it."""
    e = engine(unexpected_path={"enabled": False})
    e.evaluate([inbound(rid="a", trace_id="11" * 16)], T0)
    assert e.corr.logged_trace.has("reviews.default", "11" * 16)
    e.evaluate([inbound(rid="a2", trace_id="12" * 16)], T0 + e.corr.ttl + 1)  # no span since start-up
    assert not e.corr.logged_trace.has("reviews.default", "12" * 16)
    t = T0 + e.corr.horizon + 1
    e.evaluate([inbound(rid="b", trace_id="22" * 16)], t)
    assert not e.corr.logged_trace.has("reviews.default", "22" * 16)
    # A span of request b (logged while paused) arrives: not judged.
    e.evaluate([app_span(trace="22" * 16, start=t)], t + 0.5)
    assert e.tick(t + 5) == []
    # Indexing is on again: a request logged now satisfies its span; one never logged alerts.
    e.evaluate([inbound(rid="c", trace_id="33" * 16)], t + 6)
    e.evaluate([app_span(trace="33" * 16, start=t + 6), app_span(trace="44" * 16, start=t + 6)], t + 6.5)
    got = e.tick(t + 9)
    assert rules(got) == ["missing_access_log"] and got[0].examples[0].trace_id == "44" * 16
