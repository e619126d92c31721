"""How an end-to-end test runs one scenario and judges the alerts it raised, whatever runs the
audit (one daemon, or receivers and evaluators): the scenario's traffic is driven, its expected
alerts must come, and after a quiet spell nothing else may have come.

The alerts are read through a callable returning every alert so far, in arrival order, an
append-only list (a JSON-lines file, or several merged and deduplicated by id).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from meshlab.mesh import Mesh
from meshlab.procs import wait_until
from meshlab.scenarios import ATTRIBUTION_WAIT_MS, GRACE_MS, Scenario, known_rules, one_line, party_key

# After the expected alerts are in, this long without another one means the scenario raised
# nothing else: the missing-access-log grace and the plaintext attribution wait, two Envoy
# flushes (0.2 s) and engine ticks, with margin.
QUIET_SECS = max(GRACE_MS, ATTRIBUTION_WAIT_MS) / 1000 + 1.2
EXPECT_TIMEOUT = 15.0

Alerts = Callable[[], list[dict[str, Any]]]


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def skip_unless_rules(scenario: Scenario) -> None:
    """Skip a scenario whose rules the daemon does not have yet, saying which."""
    missing = [r for r in scenario.rules_needed if r not in known_rules()]
    if missing:
        pytest.skip(f"{scenario.title}: this daemon has no rule {', '.join(missing)} yet; runs once it is merged")


def run_scenario(scenario: Scenario, mesh: Mesh, alerts: Alerts, quiet_secs: float = QUIET_SECS) -> None:
    """Drive ``scenario`` on ``mesh`` and check that exactly its expected alerts came (and with
    the evidence and severity it expects), each (rule, source, destination) once."""
    skip_unless_rules(scenario)
    before = len(alerts())
    scenario.drive(mesh)
    driven_at = time.time()

    def new() -> list[dict[str, Any]]:
        return alerts()[before:]

    def all_expected_in() -> bool:
        got = new()
        return all(any(e.matches(a) for a in got) for e in scenario.expected if e.required)

    assert wait_until(all_expected_in, EXPECT_TIMEOUT, 0.1), (
        f"{scenario.title}: expected {scenario.expected}, got:\n" + "\n".join(one_line(a) for a in new())
    )
    # Some alerts must come while the traffic goes on (a silent sidecar under steady traffic),
    # not only once it stopped.
    for e in scenario.expected:
        if e.during_traffic:
            when = [_epoch(a["emitted_at"]) for a in new() if e.matches(a)]
            assert when and min(when) <= driven_at, f"{scenario.title}: {e} came {min(when) - driven_at:.1f} s late"
    time.sleep(quiet_secs)
    got = new()
    unexpected = [a for a in got if not any(e.matches(a) for e in scenario.expected)]
    assert not unexpected, f"{scenario.title}: unexpected alerts:\n" + "\n".join(one_line(a) for a in unexpected)
    # Evidence that a feature adds to an existing rule's alerts: a daemon without the feature
    # raised the alerts but not the evidence (the traffic ran; its keys are the scenario's own).
    for key in scenario.evidence_needed:
        carrying = [a for a in got if any(e.matches(a) and key in dict(e.evidence) for e in scenario.expected)]
        if carrying and not any(key in (a.get("evidence") or {}) for a in carrying):
            pytest.skip(f"{scenario.title}: this daemon's alerts carry no evidence.{key} yet; runs once it is merged")
    wrong = [f"{one_line(a)}: {w}" for e in scenario.expected for a in got if e.matches(a) and (w := e.mismatch(a))]
    assert not wrong, f"{scenario.title}:\n" + "\n".join(wrong)
    for a in got:
        assert a["schema"] == "meshaudit.alert.v1"
        assert a["evidence"]["count"] >= 1
    # One alert per (rule, source, destination): repeats are counted, not re-sent.
    keys = [(a["rule"], party_key(a["source"]), party_key(a["destination"])) for a in got]
    assert len(keys) == len(set(keys)), keys


def is_silence(alert: dict[str, Any]) -> bool:
    """A "silent sidecar" alert (about a sidecar, not a request: it has no examples)."""
    return alert["rule"] == "missing_access_log" and not alert["evidence"].get("examples")
