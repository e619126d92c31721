"""Stage 2 split across processes (the evaluator role), on a fake clock: each member's engine
counts its own hops into per-tick window deltas and collects its violations (``Engine.split``,
``take_stage2``); the one member that owns a (rule, source, destination) sums every member's
deltas, judges them with the rule's own judge and aggregates every member's violations
(``absorb_stage2``). The rules are the registry's, unchanged: they know nothing of the split."""

from __future__ import annotations

from typing import Any

from meshaudit.config import Config, Policy
from meshaudit.engine.api import Violation, WindowDelta
from meshaudit.engine.core import Engine
from meshaudit.engine.setup import build_engine
from meshaudit.model import Alert, Hop, identity
from meshaudit.wire import edges
from test_engine import POLICY, T0, inbound
from test_rule_error_burst import out

INTRUDER = identity("intruder", "default", None, "spiffe://cluster.local/ns/default/sa/intruder")


def intruder(rid: str) -> Hop:
    """An mTLS request from a service the policy does not allow to call reviews."""
    return inbound(src=INTRUDER, rid=rid)


def member(**rules: Any) -> Engine:
    cfg = Config.model_validate(
        {
            "engine": {"suppress_secs": 300, "store_max_items": 1000, "tick_ms": 200},
            "rules": {"error_burst": {"window_secs": 60}, "excessive_retries": {"window_secs": 60}, **rules},
        }
    )
    e = build_engine(cfg, POLICY)
    e.agg.align()
    e.split(lateness=2.0)
    return e


def exchange(members: list[Engine], owner: Engine, now: float, replay: bool = False) -> list[Alert]:
    """Every member's deltas and violations to the owner, through the edges topic's encoding."""
    deltas: list[WindowDelta] = []
    violations: list[Violation] = []
    for m in members:
        for _, value in edges.encode(*m.take_stage2()):
            d, v = edges.decode(value)
            deltas += d
            violations += v
    return owner.absorb_stage2(deltas, violations, now, replay=replay)


def step(members: list[Engine], owner: Engine, now: float) -> list[Alert]:
    """One tick everywhere, then two exchanges (a judged window's violation goes to its owner
    through the topic too)."""
    alerts: list[Alert] = []
    for m in members:
        alerts += m.tick(now)
    alerts += exchange(members, owner, now)
    alerts += owner.tick(now)
    alerts += exchange(members, owner, now)
    return alerts


def test_each_member_under_min_requests_but_the_sum_bursts_alerts_once_with_the_sums() -> None:
    a, b = member(), member()
    # 15 requests each (min_requests is 20), 12 of each member's failed: 24 of 30 in all.
    assert a.evaluate([out(f"a{i}", status=503 if i < 12 else 200, start=T0 + i) for i in range(15)], T0 + 1) == []
    assert b.evaluate([out(f"b{i}", status=503 if i < 12 else 200, start=T0 + 20 + i) for i in range(15)], T0 + 2) == []
    got = step([a, b], a, T0 + 3)
    assert [x.rule for x in got] == ["error_burst"]
    assert got[0].detail is not None and got[0].detail.startswith("24 of 30 requests failed (80%)")
    assert [x.request_id for x in got[0].examples] == ["a0", "a1", "a2"]
    assert got[0].first_seen == T0
    # More failures of the window, from either member: the window was judged, no second alert.
    b.evaluate([out(f"c{i}", status=503) for i in range(30)], T0 + 4)
    assert step([a, b], a, T0 + 5) == []
    assert step([a, b], a, T0 + 70) == []  # the window closes: no summary (one violation)
    assert a.agg.violations == {"error_burst": 1} and b.agg.violations == {}


def test_alone_each_member_would_raise_nothing() -> None:
    """The same traffic as above, each member judging only its own counts: no alert (today's
    per-member windows), which is what the split fixes."""
    for name in ("a", "b"):
        e = build_engine(
            Config.model_validate({"engine": {"suppress_secs": 300}, "rules": {"error_burst": {"window_secs": 60}}}),
            Policy(),
        )
        e.evaluate([out(f"{name}{i}", status=503 if i < 12 else 200) for i in range(15)], T0 + 1)
        assert e.tick(T0 + 3) == [] and e.tick(T0 + 70) == []


def test_excessive_retries_sums_every_members_retries() -> None:
    a, b = member(), member()
    # 6 retries each (min_retries is 10) over 8 requests each: 12 over 16 in all.
    a.evaluate([out(f"a{i}", attempts=3 if i < 3 else 1) for i in range(8)], T0 + 1)
    b.evaluate([out(f"b{i}", attempts=2) for i in range(6)] + [out("b6"), out("b7")], T0 + 1.5)
    got = step([a, b], b, T0 + 2)
    assert [x.rule for x in got] == ["excessive_retries"]
    assert got[0].detail is not None and got[0].detail.startswith("12 retries over 16 requests (ratio 0.75)")


def test_deltas_of_one_window_land_in_it_whichever_member_counted_them_and_when() -> None:
    a, b = member(), member()
    a.evaluate([out(f"a{i}", status=503) for i in range(12)], T0 + 59)  # the window [T0, T0 + 60)
    b.evaluate([out(f"b{i}", status=503) for i in range(12)], T0 + 61)  # the next one
    assert step([a, b], a, T0 + 61.5) == []  # 12 and 12: neither window has 20
    b.evaluate([out(f"c{i}", status=503) for i in range(8)], T0 + 62)
    got = step([a, b], a, T0 + 62.5)
    assert len(got) == 1 and got[0].detail is not None and got[0].detail.startswith("20 of 20")


def test_a_delta_for_a_window_closed_already_is_dropped_and_counted() -> None:
    a, b = member(), member()
    a.evaluate([out(f"a{i}", status=503) for i in range(12)], T0 + 1)
    assert step([a, b], a, T0 + 2) == []
    b.evaluate([out(f"b{i}", status=503) for i in range(12)], T0 + 30)
    b.tick(T0 + 30.2)
    a.tick(T0 + 63)  # the owner's window closed (60 s and 2 s of lateness): judged on 12
    late = [d for d in b.take_stage2()[0] if d.rule == "error_burst"]
    assert [d.total for d in late] == [12]
    assert a.absorb_stage2(late, [], T0 + 63) == [] and a.tick(T0 + 64) == []
    assert [w.late for r in a.rules for w in r.edge_counters() if r.name == "error_burst"] == [1]


def test_an_alert_windows_summary_counts_every_members_violations() -> None:
    a, b = member(), member()
    a.evaluate([intruder("x1")], T0 + 1)
    got = step([a, b], a, T0 + 1.5)
    assert [(x.rule, x.count) for x in got] == [("unexpected_edge", 1)]
    b.evaluate([intruder("x2"), intruder("x3")], T0 + 2)
    a.evaluate([intruder("x4")], T0 + 3)
    assert step([a, b], a, T0 + 3.5) == []  # counted in the window
    got = step([a, b], a, T0 + 302)
    assert [(x.rule, x.count) for x in got] == [("unexpected_edge", 4)]
    assert b.agg.violations == {}  # b owns nothing here: it only counted and forwarded


def test_a_replay_rebuilds_windows_and_alert_windows_and_raises_nothing() -> None:
    """A member that gains the key replays what its previous owner handled: the window it judged
    and its alert window come back without an alert, and live deltas after them raise nothing
    twice (the same window), while the alert window's summary counts them all."""
    old, other, new = member(), member(), member()
    old.evaluate([out(f"a{i}", status=503) for i in range(25)], T0 + 1)
    old.tick(T0 + 1.2)
    deltas, _ = old.take_stage2()
    first = old.absorb_stage2(deltas, [], T0 + 1.2)
    old.tick(T0 + 1.4)
    _, judged = old.take_stage2()
    raised = old.absorb_stage2([], judged, T0 + 1.4)
    assert [x.rule for x in first + raised] == ["error_burst"]
    # The new owner replays both records (deltas, then the violation): nothing raised.
    assert new.absorb_stage2(deltas, judged, T0 + 5, replay=True) == []
    assert new.take_stage2() == ([], [])
    # Live: the other member's deltas of the same window; no second violation, no alert.
    other.evaluate([out(f"b{i}", status=503) for i in range(10)], T0 + 6)
    assert step([other, new], new, T0 + 6.5) == []
    # violations_total: the previous owner counted the replayed violation, not this member.
    assert new.agg.violations == {}


def test_the_rules_know_nothing_of_the_split() -> None:
    """The split is the core's: a rule module has no word of it."""
    from pathlib import Path

    import meshaudit.engine.rules as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert not any(w in text for w in ("absorb", "WindowDelta", "stage2", "edge_counters")), path.name


def test_edges_records_are_keyed_by_rule_source_and_destination_and_reject_what_is_not_ours() -> None:
    import pytest

    a = member()
    a.evaluate([out(f"a{i}", status=503) for i in range(25)] + [intruder("x1")], T0 + 1)
    a.tick(T0 + 1.2)
    records = edges.encode(*a.take_stage2())
    keys = [k.decode() for k, _ in records]
    assert len(keys) == len(set(keys))  # one record per key
    assert {
        "error_burst|frontend.default|reviews.default",
        "excessive_retries|frontend.default|reviews.default",
        "unexpected_edge|intruder.default|reviews.default",
    } <= set(keys)
    d, v = edges.decode(dict(records)[b"unexpected_edge|intruder.default|reviews.default"])
    assert d == [] and [(x.rule, x.src, x.hop.request_id if x.hop else None) for x in v] == [
        ("unexpected_edge", INTRUDER, "x1")
    ]
    for bad in (b"", b"{}", b"[1]", b'{"schema": "meshaudit.edges.v1"}', b'{"schema": "meshaudit.edges.v1", '
                b'"windows": [{"counter": 1}], "violations": []}', b"\xff" * 10):  # fmt: skip
        with pytest.raises(edges.EdgesError):
            edges.decode(bad)


def test_keys_that_moved_away_are_forgotten_without_a_verdict_or_a_summary() -> None:
    """A key's new owner rebuilds it: the old one must not close its windows with part of it."""
    a = member()
    a.evaluate([out(f"a{i}", status=503) for i in range(12)] + [intruder("x1")], T0 + 1)
    assert [x.rule for x in step([a], a, T0 + 1.5)] == ["unexpected_edge"]
    a.evaluate([intruder("x2")], T0 + 2)
    step([a], a, T0 + 2.5)
    moved = {"error_burst", "unexpected_edge"}
    # Two judged windows (frontend's requests; the intruder's, counted at reviews: no client
    # sidecar logged it) and one alert window.
    assert a.release_stage2(lambda rule, src, dst: rule in moved) == 3
    a.evaluate([out(f"b{i}", status=503) for i in range(12)], T0 + 3)  # counted here, judged elsewhere
    a.tick(T0 + 3.5)
    deltas, _ = a.take_stage2()
    assert sorted({d.rule for d in deltas}) == ["error_burst", "excessive_retries"]
    assert a.tick(T0 + 400) == []  # no summary of the moved alert window, no verdict on 12 + 12


def test_a_gained_edges_partition_is_skipped_replayed_then_judged_live() -> None:
    from meshaudit.runtime.stage2 import Plan

    since = 1_000_000
    plan = Plan(since, committed=50)
    assert plan.phase(10, since - 1) == "skip"  # older than the horizon
    assert plan.phase(11, since) == "replay"  # the previous owner handled it
    assert plan.phase(50, since - 5) == "live"  # from the committed offset, whatever its time
    fresh = Plan(since, committed=None)  # nobody committed: everything within the horizon is live
    assert fresh.phase(0, since - 1) == "skip" and fresh.phase(1, since) == "live"
