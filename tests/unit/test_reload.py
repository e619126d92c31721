"""A reload keeps the engine's state: a pending missing_access_log grace, an aggregation window,
per-edge windows and waits survive it, and the change itself applies at once (policy, rule
options, a rule switched on or off). Restart-only keys are named, not applied."""

from __future__ import annotations

from typing import Any

from meshaudit.config import Config, Policy, for_reload
from meshaudit.engine.core import Engine
from meshaudit.engine.setup import build_engine
from test_engine import FRONTEND_SA, POLICY, REVIEWS, T0, app_span, inbound, rules

BASE: dict[str, Any] = {
    "engine": {"suppress_secs": 60, "store_max_items": 1000},
    "rules": {"missing_access_log": {"grace_ms": 2000, "silent_secs": 10}},
}


def cfg(**over: Any) -> Config:
    data = {**BASE, **over}
    return Config.model_validate(data)


def engine() -> Engine:
    e = build_engine(cfg(), POLICY)
    e.corr.saw_spans(T0 - 5)
    return e


def test_a_pending_grace_survives_a_reload_and_alerts_once_on_time() -> None:
    e = engine()
    e.evaluate([inbound(rid="seen")], T0)
    e.evaluate([app_span()], T0 + 1)  # waits up to the grace (2 s) for its access log
    e.reconfigure(cfg(rules={**BASE["rules"], "plaintext_hop": {"severity": "critical"}}), POLICY)
    assert e.tick(T0 + 2.5) == []
    got = e.tick(T0 + 3.1)
    assert rules(got) == ["missing_access_log"] and got[0].destination is REVIEWS
    assert e.tick(T0 + 10) == []


def test_an_aggregation_window_survives_a_reload_and_its_summary_counts_both_sides() -> None:
    e = engine()
    first = e.evaluate([inbound(tls=None, rid="p0")], T0)
    assert rules(first) == ["plaintext_hop"]
    e.evaluate([inbound(tls=None, rid=f"p{i}") for i in range(1, 4)], T0 + 1)
    e.reconfigure(cfg(), POLICY)
    e.evaluate([inbound(tls=None, rid=f"p{i}") for i in range(4, 8)], T0 + 2)
    assert e.tick(T0 + 59) == []
    [summary] = e.tick(T0 + 61)
    assert summary.rule == "plaintext_hop" and summary.count == 8  # all 8, one window across the reload


def test_the_new_policy_and_options_apply_at_once() -> None:
    e = engine()
    other = inbound(src=FRONTEND_SA, path="/admin", rid="a1")  # GET /admin: not a route of reviews
    assert rules(e.evaluate([other], T0)) == ["unexpected_path"]
    looser = Policy.model_validate(
        {**POLICY.model_dump(by_alias=True), "routes": [{"to": ["reviews.default"], "allow": [{"paths": ["*"]}]}]}
    )
    e.reconfigure(cfg(), looser)
    assert e.evaluate([inbound(src=FRONTEND_SA, path="/admin", rid="a2")], T0 + 100) == []
    e.reconfigure(cfg(rules={**BASE["rules"], "plaintext_hop": {"enabled": False}}), looser)
    assert [r.name for r in e.rules if r.name == "plaintext_hop"] == []
    assert e.evaluate([inbound(tls=None, rid="p9")], T0 + 200) == []


def test_restart_only_keys_are_named_and_keep_their_running_values() -> None:
    running = cfg()
    new = Config.model_validate(
        {**BASE, "listen": {"grpc": "127.0.0.1:5555"}, "mesh": {"trust_domain": "example.org"},
         "engine": {"suppress_secs": 30, "store_max_items": 5000}, "log_level": "debug"}
    )  # fmt: skip
    applied, waiting = for_reload(running, new)
    assert waiting == ["listen.grpc", "mesh.trust_domain", "engine.store_max_items"]
    assert applied.listen == running.listen and applied.mesh == running.mesh
    assert applied.engine.store_max_items == 1000 and applied.engine.suppress_secs == 30
    assert applied.log_level == "debug"


def test_learn_mode_and_its_state_file_are_restart_only() -> None:
    running = cfg()
    edge = {"mode": "learn", "state_file": "/tmp/b.json", "severity": "warning"}
    new = cfg(rules={**BASE["rules"], "unexpected_edge": edge})
    applied, waiting = for_reload(running, new)
    assert waiting == ["rules.unexpected_edge.mode", "rules.unexpected_edge.state_file"]
    section = applied.rules.unexpected_edge
    assert (section.mode, section.state_file, section.severity) == ("policy", None, "warning")
