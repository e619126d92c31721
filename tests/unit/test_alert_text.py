"""The readable alert line: the rule column fits every rule's name, so the parties line up."""

from __future__ import annotations

from meshaudit.engine.rules import REGISTRY
from meshaudit.sinks.text import readable


def test_the_parties_line_up_whatever_the_rule() -> None:
    lines = [
        readable(
            {
                "rule": r.name,
                "severity": "critical",
                "emitted_at": "2026-11-29T07:55:52.000Z",
                "source": {"service": "a", "namespace": "ns"},
                "destination": {"service": "b", "namespace": "ns"},
                "evidence": {"count": 1},
            }
        )  # fmt: skip
        for r in REGISTRY
    ]
    assert "log_source_mismatch" in "".join(lines)
    assert len({line.index(" a.ns -> ") for line in lines}) == 1, lines
