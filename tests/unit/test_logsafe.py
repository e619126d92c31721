"""Wire values in logs are escaped and truncated; bad input is logged once per reason per interval."""

from __future__ import annotations

import logging

import pytest
from meshaudit.logsafe import RateLimited, wire


def test_wire_escapes_newlines_and_control_characters() -> None:
    forged = "node-1\n2026-11-29 00:00:00 INFO meshaudit: all good\r\x1b[31m\u2028"
    out = wire(forged)
    assert "\n" not in out and "\r" not in out and "\x1b" not in out and "\u2028" not in out
    assert out.startswith("node-1\\n2026")


def test_wire_truncates_and_says_how_long_it_was() -> None:
    out = wire("x" * (1 << 20))
    assert len(out) < 300
    assert out.endswith(f"...({1 << 20} chars)")


def test_rate_limited_logs_once_per_reason_then_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    rl = RateLimited(logging.getLogger("t.rl"), interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t.rl"):
        for _ in range(1000):
            rl.warning("undecodable", "Rejected %s.", "a message")
        rl.warning("too_large", "Too large.")
        now[0] = 10.5
        rl.warning("undecodable", "Rejected %s.", "a message")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "Rejected a message.",
        "Too large.",
        "Rejected a message. (999 more like this in the last 10 s not logged)",
    ]
    assert all(r.exc_info is None for r in caplog.records)
