"""Clients that hold connections (issue 10, defect 6): slow-loris heads and bodies that never
complete are closed after their timeouts, connections over the limit are closed at once, all
counted, while /healthz and Envoy's access logs keep answering. Every loop below is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from infra import als
from infra.daemon import Daemon, deep_merge, running

from integration.conftest import CONFIG

LIMITS = {"receivers": {"http_header_timeout_ms": 1000, "http_body_timeout_ms": 1000, "http_max_connections": 300}}
SLACK = 1.5


@pytest.fixture
def d(tmp_path: Path) -> Iterator[Daemon]:
    with running(tmp_path, deep_merge(CONFIG, LIMITS)) as dd:
        yield dd


def _healthz(d: Daemon) -> int:
    with urllib.request.urlopen(d.metrics_url + "/healthz", timeout=2) as r:
        return int(r.status)


async def _open(d: Daemon) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = d.http.rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def test_slow_loris_heads_are_closed_after_the_header_timeout(d: Daemon) -> None:
    n = 200
    conns = [await _open(d) for _ in range(n)]
    t0 = time.monotonic()
    closed_after: list[float] = []
    head = b"POST /v1/traces HTTP/1.1\r\nHost: meshaudit\r\nX-Slow: " + b"a" * 64

    async def loris(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for i in range(len(head)):  # one byte every 0.25 s: 16 s at most, far past the 1 s timeout
            if r.at_eof():
                closed_after.append(time.monotonic() - t0)
                break
            with contextlib.suppress(ConnectionError):
                w.write(head[i : i + 1])
            await asyncio.sleep(0.25)
        w.close()

    async def meanwhile() -> None:
        await asyncio.sleep(0.5)
        assert await asyncio.to_thread(_healthz, d) == 200
        ok = als.http_message([als.inbound_http("frontend", path="/reviews/1")], als.identifier("reviews"))
        assert await als.stream(d.grpc, [ok]) == grpc.StatusCode.OK

    await asyncio.gather(meanwhile(), *(loris(r, w) for r, w in conns))
    assert len(closed_after) == n, f"{n - len(closed_after)} slow connections still open after 16 s"
    assert max(closed_after) < 1.0 + SLACK, max(closed_after)
    assert d.metric("meshaudit_rejected_total", receiver="otlp_http", reason="timeout") == n
    assert d.metric("meshaudit_received_total", receiver="envoy_als", kind="http") == 1


async def test_a_body_shorter_than_its_content_length_gets_408_after_the_body_timeout(d: Daemon) -> None:
    r, w = await _open(d)
    w.write(
        b"POST /v1/traces HTTP/1.1\r\nHost: meshaudit\r\nContent-Type: application/x-protobuf\r\n"
        b"Content-Length: 1000\r\n\r\n" + b"\x00" * 10
    )
    t0 = time.monotonic()
    answer = await asyncio.wait_for(r.read(), 1.0 + SLACK + 5)  # read() returns at EOF: the connection closed
    elapsed = time.monotonic() - t0
    w.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert 0.9 < elapsed < 1.0 + SLACK, elapsed
    assert d.metric("meshaudit_rejected_total", receiver="otlp_http", reason="timeout") == 1


async def test_connections_over_the_limit_are_closed_at_once_and_counted(tmp_path: Path) -> None:
    cfg = deep_merge(CONFIG, {"receivers": {"http_max_connections": 20, "http_header_timeout_ms": 5000}})
    with running(tmp_path, cfg) as d:
        conns = [await _open(d) for _ in range(30)]
        await asyncio.sleep(0.5)
        closed = 0
        for r, _ in conns:
            with contextlib.suppress(TimeoutError, ConnectionError):
                if await asyncio.wait_for(r.read(1), 0.05) == b"":
                    closed += 1
        for _, w in conns:
            w.close()
        assert closed == 10
        assert d.metric("meshaudit_rejected_total", receiver="otlp_http", reason="too_many_connections") == 10
        # Once they are gone, requests are served again.
        await asyncio.sleep(0.3)
        req = urllib.request.Request(
            f"http://{d.http}/v1/traces", data=b"{}", headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: ASYNC210 - one short request
            assert resp.status == 200


def test_the_open_file_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"hard RLIMIT_NOFILE is {hard}: nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # the daemon inherits 1024
    try:
        cm = running(tmp_path, CONFIG)
        d = cm.__enter__()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert d.proc is not None
        limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)], line
        assert f"Open-file limit raised from 1024 to {hard}" in d.stderr()
    finally:
        cm.__exit__(None, None, None)
