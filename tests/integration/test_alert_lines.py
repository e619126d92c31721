"""Alerts a person can read: on a terminal the daemon prints one readable line per alert
(severity, rule, source -> destination, count, an example); for pipes and files it keeps the
JSON record; ``--alerts-format`` / ``sinks.jsonl.format`` choose either."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import time
from pathlib import Path

import orjson
from infra import als
from infra.daemon import Daemon

from integration.conftest import CONFIG


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            out += os.read(fd, 65536)
    return out


async def test_on_a_terminal_alerts_are_readable_lines(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    d = Daemon(tmp_path, {**CONFIG, "sinks": {"jsonl": {"path": "-"}}})
    try:
        d.start(stdout=slave)
        entry = als.inbound_http(None, path="/reviews/1", remote="10.7.7.7:7000", request_id="tty-1")
        await als.stream(d.grpc, [als.http_message([entry], als.identifier("reviews"))])
        out = await asyncio.to_thread(_read_until, master, b"plaintext_hop", 8.0)
    finally:
        d.stop()
        os.close(slave)
        os.close(master)
    [line] = [x for x in out.decode(errors="replace").splitlines() if "plaintext_hop" in x]
    assert "10.7.7.7 -> reviews.default  x1  e.g. GET /reviews/1" in line and "high" in line
    assert not line.lstrip().startswith("{")


async def test_text_format_to_a_file_and_json_by_default(tmp_path: Path) -> None:
    text = Daemon(tmp_path, {**CONFIG, "sinks": {"jsonl": {"format": "text"}}}, name="text")
    plain = Daemon(tmp_path, CONFIG, name="json")
    for d in (text, plain):
        d.start()
    try:
        entry = als.inbound_http(None, path="/reviews/1", remote="10.7.7.8:7000", request_id="file-1")
        for d in (text, plain):
            await als.stream(d.grpc, [als.http_message([entry], als.identifier("reviews"))])
        for _ in range(80):
            if text.alerts_path.exists() and plain.alerts() and text.alerts_path.read_text().strip():
                break
            await asyncio.sleep(0.1)
        assert "plaintext_hop" in text.alerts_path.read_text() and "{" not in text.alerts_path.read_text()
        assert orjson.loads(plain.alerts_path.read_bytes().splitlines()[0])["rule"] == "plaintext_hop"
    finally:
        for d in (text, plain):
            d.stop()
