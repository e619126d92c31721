"""The engine under hostile or unusual input, on a fake clock: hops in, alerts out. Alert ids
unique per window and stable on replay, one alert per unnamed client IP, a global alert budget
that bounds the output, a sparse tracer judged, a sidecar silent under steady traffic reported,
one party one identity across an intern-table reset, and timestamps that never raise."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshaudit import metrics, model
from meshaudit.config import Config, MeshConfig, Policy
from meshaudit.engine.core import Engine
from meshaudit.engine.setup import build_engine
from meshaudit.model import (
    ALS_HTTP,
    INBOUND,
    SPAN,
    SPAN_KIND_CLIENT,
    SPAN_KIND_SERVER,
    Alert,
    Hop,
    Identity,
    identity,
    rfc3339,
)
from meshaudit.naming import Namer

T0 = 1_800_000_000.0
REVIEWS = identity("reviews", "default")
NODE_REVIEWS = "sidecar~10.0.0.2~reviews-v1-1.default~default.svc.cluster.local"
POLICY = Policy.model_validate({"edges": [{"from": ["*"], "to": ["*"]}]})


def engine(policy: Policy = POLICY, engine_cfg: dict[str, Any] | None = None, **rules: Any) -> Engine:
    cfg = Config.model_validate(
        {
            "engine": {"suppress_secs": 60, "store_max_items": 10_000, **(engine_cfg or {})},
            "rules": {"missing_access_log": {"grace_ms": 2000, "silent_secs": 10}, **rules},
        }
    )
    return build_engine(cfg, policy)


def plaintext(src: Identity, start: float, rid: str, dst: Identity = REVIEWS, conn: str | None = None) -> Hop:
    """An inbound entry at ``dst``'s sidecar without TLS."""
    return Hop(
        ALS_HTTP,
        NODE_REVIEWS,
        dst,
        INBOUND,
        src,
        dst,
        start,
        method="GET",
        path="/reviews/1",
        request_id=rid,
        upstream_cluster="inbound|9080||",
        conn=conn,
    )


def logged(start: float, rid: str, trace: str | None = None) -> Hop:
    """reviews' sidecar logs a request over mTLS."""
    peer = identity("frontend", "default", None, "spiffe://cluster.local/ns/default/sa/frontend")
    return Hop(
        ALS_HTTP,
        NODE_REVIEWS,
        REVIEWS,
        INBOUND,
        peer,
        REVIEWS,
        start,
        tls_version="TLSv1.3",
        method="GET",
        path="/reviews/1",
        request_id=rid,
        trace_id=trace,
        upstream_cluster="inbound|9080||",
    )


def app_span(trace: str, start: float, service: Identity = REVIEWS, parent: str | None = None) -> Hop:
    """reviews' application (OpenTelemetry SDK) traced a request it served."""
    return Hop(
        SPAN,
        "span:" + service.key,
        service,
        INBOUND,
        identity(),
        service,
        start,
        method="GET",
        path="/reviews/1",
        trace_id=trace,
        parent_span_id=parent,
        span_kind=SPAN_KIND_SERVER,
    )


def suppressed(rule: str) -> float:
    return metrics.REGISTRY.get_sample_value("meshaudit_alerts_suppressed_total", {"rule": rule}) or 0.0


# --- 4: alert ids ---------------------------------------------------------------------------------
def test_two_windows_with_the_same_first_seen_time_have_different_ids() -> None:
    """Two incidents of one key, a window apart, whose first violations carry the same data time
    (a sender's clock stuck, or a replayed timestamp): two alerts a consumer must both keep."""
    e = engine()
    src = identity("frontend", "default")
    first = e.evaluate([plaintext(src, T0, "a")], T0)
    assert e.tick(T0 + 61) == []  # the window closes; nothing more to summarize
    second = e.evaluate([plaintext(src, T0, "b")], T0 + 120)
    assert [a.rule for a in first + second] == ["plaintext_hop", "plaintext_hop"]
    assert first[0].first_seen == second[0].first_seen
    assert first[0].id != second[0].id


# One step of traffic: (key index, data time offset, seconds since the previous step). Few keys and
# few data times, so that windows of one key often share their first data time.
STEP = st.tuples(st.integers(0, 2), st.sampled_from([0.0, 0.5, 7.0]), st.sampled_from([0.0, 1.0, 30.0, 61.0, 200.0]))


def _run(steps: list[tuple[int, float, float]]) -> list[Alert]:
    e = engine()
    now = T0
    out: list[Alert] = []
    for i, (k, data, gap) in enumerate(steps):
        now += gap
        out += e.tick(now)
        out += e.evaluate([plaintext(identity(f"client{k}", "default"), T0 + data, f"r{i}")], now)
    out += e.tick(now + 1000)  # every window closes
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(STEP, min_size=1, max_size=40))
def test_alert_ids_are_unique_per_window_and_stable_on_replay(steps: list[tuple[int, float, float]]) -> None:
    alerts = _run(steps)
    ids = [a.id for a in alerts]
    # Every alert is one (window, sequence) of one key: no two share an id, in any window.
    assert len(ids) == len(set(ids)), [(a.source.key, a.first_seen, a.emitted_at) for a in alerts]
    # The same hops in the same order on the same clock: the same ids (consumers dedupe replays).
    assert [a.id for a in _run(steps)] == ids


# --- 9: one alert per client, whatever its ports; a global alert budget -------------------------------
def test_an_unnamed_client_is_one_source_whatever_its_ports() -> None:
    """30 plaintext requests from one pod nobody can name, each from its own ephemeral port."""
    e = engine()
    namer = Namer(MeshConfig())
    hops = []
    for i in range(30):
        addr = f"10.0.0.9:{40000 + i}"
        hops.append(plaintext(namer.address(addr), T0, f"p{i}", conn=addr))
    assert e.evaluate(hops, T0) == []  # waiting for a client sidecar's entry to name them
    got = e.tick(T0 + 1.6)  # attribution_wait_ms = 1500
    assert [a.rule for a in got] == ["plaintext_hop"]
    assert got[0].source.key == "10.0.0.9" and got[0].source.address == "10.0.0.9"
    assert "from 10.0.0.9:40000" in (got[0].detail or "")  # the socket stays in the evidence
    summary = e.tick(T0 + 62)
    assert [(a.rule, a.count) for a in summary] == [("plaintext_hop", 30)]


def test_bracketed_ipv6_client_is_named_by_its_address() -> None:
    namer = Namer(MeshConfig())
    assert namer.address("[fd00::9]:40001") == namer.address("[fd00::9]:40002") == identity(address="fd00::9")


def test_alert_budget_bounds_the_output_and_reports_the_excess() -> None:
    """100 k distinct plaintext pairs would be 100 k alert lines: at most the budget per window,
    plus one alert that says how many were held back, counted on /metrics by rule."""
    e = engine(engine_cfg={"alert_budget_per_window": 10})
    before = suppressed("plaintext_hop")
    hops = [plaintext(identity(f"c{i}", "default"), T0, f"q{i}") for i in range(100)]
    first = e.evaluate(hops, T0)
    assert len(first) == 10 and {a.rule for a in first} == {"plaintext_hop"}
    assert e.evaluate([plaintext(identity("late", "default"), T0 + 30, "late")], T0 + 30) == []
    assert e.tick(T0 + 59) == []
    closing = e.tick(T0 + 60.2)
    assert [a.rule for a in closing] == ["alert_budget_exceeded"]
    budget = closing[0]
    assert budget.count == 91 and budget.severity == "high"
    assert "91 alerts (91 source/destination pairs) were held back" in budget.summary
    assert "plaintext_hop 91" in budget.summary
    assert budget.to_json()["source"]["service"] == "meshaudit"
    assert suppressed("plaintext_hop") - before == 91
    # The next window has room again, and a held-back pair's window does not alert twice.
    assert e.tick(T0 + 200) == []
    again = e.evaluate([plaintext(identity("c50", "default"), T0 + 201, "n")], T0 + 201)
    assert [a.rule for a in again] == ["plaintext_hop"]


def test_within_the_budget_nothing_is_held_back() -> None:
    e = engine(engine_cfg={"alert_budget_per_window": 10})
    before = suppressed("plaintext_hop")
    got = e.evaluate([plaintext(identity(f"w{i}", "default"), T0, f"w{i}") for i in range(10)], T0)
    assert len(got) == 10
    assert e.tick(T0 + 120) == []
    assert suppressed("plaintext_hop") == before


# --- 12: a sparse tracer is judged ---------------------------------------------------------------
def test_a_tracer_that_sends_every_five_minutes_is_judged() -> None:
    """reviews' sidecar logs steadily; its app's tracer sends one span every 5 minutes. Spans whose
    request was logged raise nothing; spans whose request was not logged alert."""
    e = engine(unexpected_path={"enabled": False})
    alerts: list[Alert] = []
    span_times = [T0 + 300 * k for k in range(1, 7)]
    missing = {f"{k:032x}" for k in range(1, 7) if k % 2 == 0}
    t = T0
    n = 0
    while t <= span_times[-1] + 10:
        n += 1
        alerts += e.evaluate([logged(t, f"bg{n}")], t)  # other requests, logged
        for k, s in enumerate(span_times, 1):
            trace = f"{k:032x}"
            if s == t:
                if trace not in missing:
                    alerts += e.evaluate([logged(s, f"x{k}", trace)], t + 0.5)
                alerts += e.evaluate([app_span(trace, s)], t + 1)
        alerts += e.tick(t + 4)
        t += 5
    alerts += e.tick(t + 5)
    got = sorted(a.examples[0].trace_id or "" for a in alerts if a.rule == "missing_access_log" and a.examples)
    assert got == sorted(missing)
    assert [a for a in alerts if a.source.key == "*"] == []  # the sidecar kept logging: not silent


def _paused(logs_since: bool) -> list[Alert]:
    """Spans flowed at T0, then none for longer than the horizon (900 s): the index is off. The
    first span after the pause cannot be joined to its own log."""
    e = engine(unexpected_path={"enabled": False}, missing_access_log={"grace_ms": 2000, "silent_secs": 1000})
    e.evaluate([logged(T0, "a", "aa" * 16)], T0)
    e.evaluate([app_span("aa" * 16, T0)], T0 + 0.5)
    assert e.tick(T0 + 5) == []
    t = T0 + 1000
    e.evaluate([logged(t, "b")], t)  # the sidecar logs other requests
    assert e.tick(t + 1) == []
    if logs_since:
        e.evaluate([logged(t + 30, "c", "cc" * 16)], t + 30.4)
    e.evaluate([app_span("cc" * 16, t + 30)], t + 30.5)
    return e.tick(t + 34)


def test_the_first_span_after_a_pause_longer_than_the_horizon_is_judged_against_its_sidecar() -> None:
    """If the sidecar logged nothing at all since the span started, its log is missing all the
    same: it alerts."""
    got = _paused(logs_since=False)
    assert [a.rule for a in got] == ["missing_access_log"] and got[0].examples[0].trace_id == "cc" * 16


def test_the_first_span_after_a_pause_is_not_an_alert_when_its_sidecar_logged_since() -> None:
    assert _paused(logs_since=True) == []


# --- 13: a sidecar silent under steady traffic -----------------------------------------------------
def _steady(e: Engine, until: float, stop_logs_at: float, stop_spans_at: float) -> list[tuple[float, Alert]]:
    """A request every 100 ms, its access log and its span each flushed 0.3 s later; a tick
    every 100 ms (times in integer tenths, so the fake clock does not drift)."""
    out: list[tuple[float, Alert]] = []
    for i in range(round(until * 10) + 1):
        t = T0 + i / 10
        s = t - 0.3
        trace = f"{i:032x}"
        if s < T0 + stop_logs_at:
            out += [(t, a) for a in e.evaluate([logged(s, f"s{i}", trace)], t)]
        if s < T0 + stop_spans_at:
            out += [(t, a) for a in e.evaluate([app_span(trace, s)], t)]
        out += [(t, a) for a in e.tick(t)]
    return out


def test_a_sidecar_that_goes_silent_under_steady_traffic_is_reported() -> None:
    e = engine(unexpected_path={"enabled": False})  # grace 2 s, silent_secs 10
    got = _steady(e, until=40, stop_logs_at=5, stop_spans_at=1000)
    silent = [(t, a) for t, a in got if a.source.key == "*"]
    assert len(silent) == 1, [(t - T0, a.summary) for t, a in got]
    t, alert = silent[0]
    last_log = T0 + 5 + 0.3  # the last access log arrived then
    assert t <= last_log + 10 + 2 + 0.1 + 1e-6  # silent_secs + grace + a tick
    assert alert.destination == REVIEWS and "no access log for" in (alert.detail or "")
    # The per-request alerts came too, from the first unlogged span on.
    assert any(a.rule == "missing_access_log" and a.examples for _, a in got)


def test_a_sidecar_whose_traffic_stops_is_idle_not_silent() -> None:
    e = engine(unexpected_path={"enabled": False})
    got = _steady(e, until=60, stop_logs_at=5, stop_spans_at=5)
    assert [a.summary for _, a in got] == []


# --- 14: one party, one identity, across an intern-table reset -------------------------------------
def test_identities_are_equal_by_value_across_an_intern_table_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    before = identity("reviews", "default")
    monkeypatch.setattr(model, "_IDENTITY_LIMIT", len(model._IDENTITIES) + 5)
    namer = Namer(MeshConfig())
    for i in range(10):  # addresses from the wire fill the table: it is cleared
        namer.address(f"10.9.{i}.1:5000")
    after = identity("reviews", "default")
    assert after is not before  # two objects for one party...
    assert after == before and hash(after) == hash(before) and (after != before) is False  # ...equal
    assert {before: 1}[after] == 1
    assert after != identity("reviews", "prod") and after != "reviews.default"


def test_bypass_source_is_not_the_destination_itself_across_an_intern_table_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """reviews' app made the CLIENT span that is the parent of the SERVER span on reviews (a call
    to itself that skipped its sidecar): the source must not be named reviews -> reviews, even
    when the client span's identity was interned before the table was cleared."""
    e = engine(unexpected_path={"enabled": False})
    e.evaluate([logged(T0, "seen")], T0)
    client = Hop(
        SPAN,
        "span:reviews.default",
        REVIEWS,
        INBOUND,
        REVIEWS,
        identity(),
        T0 + 1,
        span_id="1" * 16,
        trace_id="ab" * 16,
        span_kind=SPAN_KIND_CLIENT,
    )
    e.evaluate([client], T0 + 1)
    monkeypatch.setattr(model, "_IDENTITY_LIMIT", len(model._IDENTITIES) + 5)
    namer = Namer(MeshConfig())
    for i in range(10):
        namer.address(f"10.8.{i}.1:5000")
    fresh = identity("reviews", "default")  # what a decoder names reviews by now
    assert fresh is not REVIEWS
    e.evaluate([app_span("ab" * 16, T0 + 1, service=fresh, parent="1" * 16)], T0 + 1.2)
    got = e.tick(T0 + 3.5)
    assert [a.rule for a in got] == ["missing_access_log"]
    assert got[0].destination == REVIEWS and got[0].source.key == "unknown"


# --- timestamps ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ts", "text"),
    [
        (1e20, "9999-12-31T23:59:59.999Z"),
        (-1e20, "0001-01-01T00:00:00.000Z"),
        (float("inf"), "9999-12-31T23:59:59.999Z"),
        (float("nan"), "1970-01-01T00:00:00.000Z"),
        (-1.5, "1969-12-31T23:59:58.500Z"),
        (T0 + 0.123, "2027-01-15T08:00:00.123Z"),
    ],
)
def test_rfc3339_is_total(ts: float, text: str) -> None:
    assert rfc3339(ts) == text


def test_an_alert_about_a_span_from_a_bogus_clock_encodes() -> None:
    """A span stamped far in the future (a sender's broken clock) alerts like any other."""
    e = engine(unexpected_path={"enabled": False})
    e.evaluate([logged(T0, "seen")], T0)
    e.evaluate([app_span("ee" * 16, T0)], T0 + 0.1)
    far = Hop(SPAN, NODE_REVIEWS, REVIEWS, INBOUND, identity(), REVIEWS, 1e19, request_id="zz", span_kind=2)
    e.evaluate([far], T0 + 0.2)
    got = e.tick(T0 + 3)
    assert len(got) == 1  # one key: the two missing logs in one window, summarized when it closes
    record = got[0].to_json()
    assert record["evidence"]["first_seen"].endswith("Z") and got[0].encode()
    summary = e.tick(T0 + 100)
    assert summary[0].to_json()["evidence"]["last_seen"] == "9999-12-31T23:59:59.999Z"
