"""The rule API: a rule is one class the core knows only through ``engine.api.Rule``. The core
hands it the hops it asks for, sets its ``emit``, detaches and expires what it parks, ticks its
per-edge windows, and the configuration and exemptions know it by the registry."""

from __future__ import annotations

from typing import Any

import pytest
from meshaudit.config import Config, ConfigError, Policy
from meshaudit.engine.api import Rule, RuleConfig, Window
from meshaudit.engine.core import Engine
from meshaudit.engine.rules import REGISTRY, RULE_NAMES
from meshaudit.loading import load
from meshaudit.model import ALS_HTTP, INBOUND, SPAN, Hop, identity
from pydantic import Field

T0 = 1_800_000_000.0
SVC = identity("reviews", "default")
CLIENT = identity("frontend", "default")


class ToyConfig(RuleConfig):
    wait_ms: int = Field(500, ge=0)
    min_hits: int = 3


class Toy(Rule[ToyConfig]):
    """Parks every span until its wait ends; counts every logged hop with status >= 500 per edge."""

    name = "toy"
    Config = ToyConfig
    summary = "Toy trouble from {src} to {dst}"
    hops = "all"

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.seen: list[int] = []
        self.parked = self.parking("toy_parked", self.cfg.wait_ms / 1000, self._waited)
        self.edges = self.edge_windows(10, self._judge)
        self.judged: list[tuple[int, int, bool]] = []

    def on_hops(self, hops: list[Hop], now: float) -> None:
        for h in hops:
            self.seen.append(h.origin)
            if h.origin == SPAN:
                self.parked.park(h.request_id, h, now)
            else:
                self.edges.add(h.src, h.dst, h, now, 1, 1 if h.status >= 500 else 0)

    def _waited(self, key: Any, h: Hop, now: float) -> None:
        self.violation(h.src, h.dst, h, "a span waited in vain", h.start)

    def _judge(self, w: Window, final: bool) -> None:
        self.judged.append((w.total, w.hits, final))
        if w.hits >= self.cfg.min_hits:
            w.judged = True
            self.violation(w.src, w.dst, w.examples[0], f"{w.hits} of {w.total}", w.seen_first)

    def on_tick(self, now: float) -> None:
        super().on_tick(now)
        self.parked.expire(now)


class Spans(Rule[RuleConfig]):
    name = "spans_only"
    Config = RuleConfig
    summary = "{src} {dst}"
    hops = "spans"

    def on_hops(self, hops: list[Hop], now: float) -> None:
        assert all(h.origin == SPAN for h in hops)
        self.violation(hops[0].src, hops[0].dst, hops[0], "a span", hops[0].start)


def logged(status: int, rid: str) -> Hop:
    return Hop(ALS_HTTP, "node", SVC, INBOUND, CLIENT, SVC, T0, method="GET", path="/", status=status, request_id=rid)


def span(rid: str) -> Hop:
    return Hop(SPAN, "span:reviews.default", SVC, INBOUND, CLIENT, SVC, T0, request_id=rid)


def test_the_core_runs_a_rule_it_knows_only_through_the_api() -> None:
    e = Engine(Config(), Policy(), [Toy, Spans])
    toy = e.rules[0]
    assert isinstance(toy, Toy)
    got = e.evaluate([logged(200, "a"), span("s1"), logged(503, "b")], T0)
    assert [a.rule for a in got] == ["spans_only"]  # the span-only rule saw the span alone
    assert sorted(toy.seen) == sorted([ALS_HTTP, SPAN, ALS_HTTP])
    parked = toy.parked.get("s1")
    assert parked is not None
    # Two more failures: the edge's window is judged on the next tick, once, as a violation.
    e.evaluate([logged(500, "c"), logged(502, "d")], T0 + 0.1)
    got = e.tick(T0 + 0.2)
    assert [(a.rule, a.summary, a.detail) for a in got] == [
        ("toy", "Toy trouble from frontend.default to reviews.default.", "3 of 4")
    ]
    assert toy.judged == [(4, 3, False)]
    # The parked span's wait ends: the rule's hook emits through the emit the core set (into
    # the open window of that edge: counted, not alerted again).
    assert e.tick(T0 + 1.0) == []
    assert e.agg.violations == {"spans_only": 1, "toy": 2}
    # The rule's stores are the engine's (gauges, evictions).
    names = {s.name for s in e.stores()}
    assert {"toy_parked", "toy_windows"} <= names


def test_a_window_below_the_threshold_is_judged_once_more_when_it_closes() -> None:
    e = Engine(Config(), Policy(), [Toy])
    toy = e.rules[0]
    assert isinstance(toy, Toy)
    e.evaluate([logged(500, "a"), logged(200, "b")], T0)
    assert e.tick(T0 + 1) == []
    assert e.tick(T0 + 11) == []
    assert toy.judged == [(2, 1, False), (2, 1, True)]


def test_a_disabled_rule_is_not_built() -> None:
    cfg = Config.model_validate({"rules": {"plaintext_hop": {"enabled": False}}})
    e = Engine(cfg, Policy(), REGISTRY)
    assert "plaintext_hop" not in {r.name for r in e.rules}
    assert len(e.rules) == len(REGISTRY) - 1


def test_the_configuration_has_a_section_for_every_registered_rule() -> None:
    cfg = Config()
    for r in REGISTRY:
        section = getattr(cfg.rules, r.name)
        assert isinstance(section, r.Config) and isinstance(section, RuleConfig)
        assert section.severity in ("info", "warning", "high", "critical")
    assert set(type(cfg.rules).model_fields) == RULE_NAMES


def test_an_exemption_naming_an_unknown_rule_is_a_config_error(tmp_path: Any) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("policy:\n  exemptions:\n    - rules: [plaintext_hops]\n      reason: typo\n")
    with pytest.raises(ConfigError) as exc:
        load(f)
    assert "unknown rule 'plaintext_hops'" in str(exc.value) and ":3" in str(exc.value)


def test_every_rule_declares_its_name_config_summary_and_hops() -> None:
    for r in REGISTRY:
        assert r.name and r.summary and "{src}" in r.summary and "{dst}" in r.summary
        assert r.hops in ("logged", "spans", "all", "none")
        assert issubclass(r.Config, RuleConfig)
        assert r.__module__ == f"meshaudit.engine.rules.{r.name}", "one module per rule, named after it"


def test_a_per_edge_violation_brings_its_windows_examples_and_they_cross_between_workers() -> None:
    from meshaudit.engine.aggregate import Aggregator
    from meshaudit.engine.api import Violation
    from meshaudit.runtime.messages import violation_from_wire, violation_to_wire

    hops = [logged(503, f"x{i}") for i in range(4)]
    v = Violation("toy", "warning", CLIENT, SVC, hops[0], "4 of 4", T0, more=hops[1:])
    agg = Aggregator(60, 3, 1000)
    agg.add(violation_from_wire(violation_to_wire(v)), T0)
    (a,) = agg.drain()
    assert [x.request_id for x in a.examples] == ["x0", "x1", "x2"]  # engine.examples caps them


def test_edge_windows_stay_bounded_and_count_an_evicted_window() -> None:
    e = Engine(Config.model_validate({"engine": {"store_max_items": 100}}), Policy(), [Toy])
    toy = e.rules[0]
    assert isinstance(toy, Toy)
    for i in range(150):
        src = identity(f"client-{i}", "default")
        toy.edges.add(src, SVC, logged(200, f"r{i}"), T0, 1, 0)
    assert len(toy.edges.windows) == 100 and toy.edges.windows.evicted_capacity == 50
    # The oldest went from the lookup too: a later hop of that edge opens a new window.
    toy.edges.add(identity("client-0", "default"), SVC, logged(500, "again"), T0 + 1, 1, 1)
    assert toy.edges.windows.evicted_capacity == 51
    e.tick(T0 + 2)
    assert (1, 1, False) in toy.judged and len(toy.judged) == 100
