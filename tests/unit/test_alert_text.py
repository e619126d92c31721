"""The readable alert line: the rule column fits every rule's name, so the parties line up."""

from __future__ import annotations

from meshaudit.engine.rules import REGISTRY
from meshaudit.sinks.text import readable

A = {"service": "a", "namespace": "ns"}
B = {"service": "b", "namespace": "ns"}


def test_the_parties_line_up_whatever_the_rule() -> None:
    when = "2026-11-29T07:55:52.000Z"
    alerts = [{"rule": r.name, "severity": "critical", "emitted_at": when, "source": A, "destination": B,
               "evidence": {"count": 1}} for r in REGISTRY]  # fmt: skip
    lines = [readable(a) for a in alerts]
    assert "log_source_mismatch" in "".join(lines)
    assert len({line.index(" a.ns -> ") for line in lines}) == 1, lines
