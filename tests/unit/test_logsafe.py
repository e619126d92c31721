"""Wire values in logs are escaped and truncated; bad input is logged once per reason per interval."""

from __future__ import annotations

import logging

import pytest
from meshaudit.logsafe import LibraryLogLimit, RateLimited, wire


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


def test_a_librarys_log_is_sampled_per_kind_and_says_what_it_held_back() -> None:
    now = [0.0]
    limit = LibraryLogLimit(("aiokafka",), interval=10, clock=lambda: now[0])

    def record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, args, None)

    connect = "Unable connect to node with id %s: %s"
    passed = [r for r in (record("aiokafka", connect, 111, "refused") for _ in range(300)) if limit.filter(r)]
    assert [r.getMessage() for r in passed] == ["Unable connect to node with id 111: refused"]
    # Another kind, another logger of the library, another level: each its own line.
    assert limit.filter(record("aiokafka.producer.sender", "Got error produce response: %s", "NodeNotReady"))
    assert limit.filter(record("aiokafka", connect, 111, "refused", level=logging.WARNING))
    # Not the library's: never held back.
    assert all(limit.filter(record("meshaudit.producer", "Producing hops failed")) for _ in range(50))
    assert all(limit.filter(record("aiokafkaesque", connect, 1, "x")) for _ in range(5))
    now[0] = 10.5
    again = record("aiokafka", connect, 111, "refused")
    assert limit.filter(again)
    assert again.getMessage() == (
        "Unable connect to node with id 111: refused (299 more like this in the last 10 s not logged)"
    )
