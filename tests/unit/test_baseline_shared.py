"""Learn mode with the baseline shared by the distributed mode's evaluators, on the engine and a
fake clock: the engine learns and hands its edges out, takes in what the others learned, stops
learning when told, and for ``HOLD_SECS`` after that holds requests on edges it does not know,
judging them once the others' last edges had time to arrive. And the topic's records: what an
evaluator accepts from the baseline topic, and what it skips."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshaudit.config import Config, Policy
from meshaudit.engine.core import Engine, Facts
from meshaudit.engine.rules import REGISTRY
from meshaudit.engine.rules.unexpected_edge import HOLD_SECS
from meshaudit.runtime.baseline_topic import edge_record, parse, route_record
from test_baseline_engine import DETAILS, PRODUCTPAGE, served
from test_engine import FRONTEND_SA, RATINGS, REVIEWS, T0, rules


def member(state: Path | None = None) -> Engine:
    """An evaluator's engine in learn mode: the baseline is shared (a topic decides the window)."""
    learn = {"mode": "learn", "learn_secs": 60, **({"state_file": str(state)} if state else {})}
    cfg = Config.model_validate({"engine": {"store_max_items": 1000}, "rules": {"unexpected_edge": learn}})
    return Engine(cfg, Policy(), REGISTRY, baseline_shared=True)


def test_a_member_learns_until_told_and_hands_its_edges_out() -> None:
    e = member()
    assert e.evaluate([served(FRONTEND_SA, REVIEWS, "r1")], T0) == []
    # Its own clock does not end the window: the members decide it together.
    assert e.evaluate([served(FRONTEND_SA, RATINGS, "r2")], T0 + 600) == []
    e.tick(T0 + 601)
    edges, _ = e.take_learned()
    assert [(s, d) for s, d, _ in edges] == [(FRONTEND_SA.key, "reviews.default"), (FRONTEND_SA.key, "ratings.default")]
    assert e.take_learned() == ([], [])


def test_a_request_on_an_unknown_edge_just_after_the_window_is_judged_after_the_others_spoke() -> None:
    e = member()
    e.seed([(FRONTEND_SA.key, "reviews.default", T0)], False)
    e.evaluate([served(FRONTEND_SA, REVIEWS, "r0")], T0)
    e.seed((), True)  # the window is over
    t = T0 + 61
    # Two edges this member never saw: another member learned the first just before the end.
    assert e.evaluate([served(FRONTEND_SA, DETAILS, "r1"), served(FRONTEND_SA, PRODUCTPAGE, "r2")], t) == []
    assert e.tick(t + 1) == []  # held
    other = Facts()
    other.learned = [(FRONTEND_SA.key, "details.default", T0 + 59)]
    e.absorb(other, t + 1.5)
    got = e.tick(t + HOLD_SECS + 0.1)
    assert rules(got) == ["unexpected_edge"] and got[0].destination is PRODUCTPAGE
    assert e.tick(t + 30) == []
    # Past the hold, an unknown edge alerts at once, as in one process.
    assert rules(e.evaluate([served(FRONTEND_SA, RATINGS, "r3")], t + 30)) == ["unexpected_edge"]


def test_a_baseline_read_at_start_with_learning_over_alerts_new_edges_after_the_hold_only() -> None:
    e = member()
    e.seed([(FRONTEND_SA.key, "reviews.default", T0)], True)  # a restart: the topic's baseline, over
    assert e.evaluate([served(FRONTEND_SA, REVIEWS, "r1")], T0 + 900) == []
    assert e.evaluate([served(FRONTEND_SA, DETAILS, "r2")], T0 + 900) == []
    assert rules(e.tick(T0 + 900 + HOLD_SECS + 0.1)) == ["unexpected_edge"]


def test_a_member_writes_no_state_file_of_its_own(tmp_path: Path) -> None:
    """The file is the shared baseline's (runtime/baseline_topic.py), not one member's."""
    f = tmp_path / "baseline.json"
    e = member(f)
    e.evaluate([served(FRONTEND_SA, REVIEWS, "r1")], T0)
    e.seed((), True)
    e.tick(T0 + 120)
    assert not f.exists()


def test_one_process_is_unchanged_no_hold() -> None:
    cfg = Config.model_validate({"rules": {"unexpected_edge": {"mode": "learn", "learn_secs": 60}}})
    e = Engine(cfg, Policy(), REGISTRY)
    e.evaluate([served(FRONTEND_SA, REVIEWS, "r1")], T0)
    e.tick(T0 + 61)
    assert rules(e.evaluate([served(FRONTEND_SA, DETAILS, "r2")], T0 + 62)) == ["unexpected_edge"]


def test_baseline_records_round_trip_and_strangers_are_refused() -> None:
    edge = ("frontend.default", "reviews.default", T0)
    assert parse(*edge_record(edge)) == edge
    route = ("reviews.default", "GET", "/reviews/1")
    assert parse(*route_record(route)) == route
    for key, value in (
        (None, b"{}"),
        (b"not json", b"{}"),
        (b'["edge", "a"]', b'{"first_seen": 1}'),
        (b'["edge", "a", "b"]', b'{"first_seen": "yesterday"}'),
        (b'["edge", "a", "b"]', b'{"first_seen": NaN}'),
        (b'["edge", "a", "b"]', None),
        (b'["edge", "", "b"]', b'{"first_seen": 1}'),
        (b'["window", "a", "b"]', b"{}"),
        (b'{"edge": 1}', b"{}"),
        (b'["edge", "a", "b"]', b"x" * 2000),
    ):
        with pytest.raises(ValueError):
            parse(key, value)
