"""``workers: 2``: two worker processes share the ports. Every message below goes on its own
connection, so the kernel spreads them over both workers, and a span and its access log, or
the two sidecars' entries of one request, often reach different workers. Correlation must not
notice: no false missing-access-log alerts, plaintext hops named after their client, one
request counted once, and /metrics summing both workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from infra import als
from infra.daemon import MESHAUDIT, Daemon, deep_merge, running
from infra.otlp import server_span
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

from integration.conftest import CONFIG

WORKERS_CONFIG = deep_merge(CONFIG, {"workers": 2})


@pytest.fixture
def workers2(tmp_path: Path) -> Iterator[Daemon]:
    with running(tmp_path, WORKERS_CONFIG) as d:
        yield d


def _span(d: Daemon, path: str) -> tuple[str, str]:
    # A new exporter per span: its own HTTP connection, so its own pick of worker.
    return server_span(OTLPSpanExporter(endpoint=f"http://{d.http}/v1/traces"), "reviews", path)


def _by_rule(alerts: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    return [a for a in alerts if a["rule"] == rule]


async def test_correlation_holds_across_workers(workers2: Daemon) -> None:
    d = workers2
    reviews, frontend = als.identifier("reviews"), als.identifier("frontend")
    await als.stream(d.grpc, [als.http_message([als.inbound_http("frontend", path="/reviews/0")], reviews)])
    await asyncio.sleep(1.2)  # the coordinator shares "reviews has a sidecar" with every worker
    sent = 1
    # 8 traced requests whose access logs come after their spans, each on its own connection.
    for i in range(8):
        _trace, tp = _span(d, f"/reviews/{i}")
        entry = als.inbound_http("frontend", path=f"/reviews/{i}", traceparent=tp)
        await als.stream(d.grpc, [als.http_message([entry], reviews)])
        sent += 2
    # 2 requests that bypassed the sidecar: traced, never logged.
    bypassed = {_span(d, "/reviews/bypass-1")[0], _span(d, "/reviews/bypass-2")[0]}
    sent += 2
    # 6 plaintext requests: the server sidecar's entry first, then the client sidecar's.
    for i in range(6):
        rid = f"plain-{i}"
        server = als.inbound_http(None, request_id=rid, path="/reviews/1", remote=f"10.1.1.{i}:5000")
        await als.stream(d.grpc, [als.http_message([server], reviews)])
        client = als.outbound_http("reviews", request_id=rid, path="/reviews/1")
        await als.stream(d.grpc, [als.http_message([client], frontend)])
        sent += 2

    assert d.wait_metric("meshaudit_hops_evaluated_total", sent) == sent  # summed over both workers
    assert d.wait_metric("meshaudit_violations_total", 6, rule="plaintext_hop") == 6
    assert d.wait_metric("meshaudit_violations_total", 2, rule="missing_access_log") == 2
    alerts = d.wait_alerts(lambda a: bool(_by_rule(a, "missing_access_log")), timeout=5)
    missing = _by_rule(alerts, "missing_access_log")
    assert len(missing) == 1 and missing[0]["evidence"]["examples"][0]["trace_id"] in bypassed
    plain = _by_rule(alerts, "plaintext_hop")
    # Named after the client sidecar's entry wherever it landed, never after the bare address.
    assert [(a["source"]["service"], a["source"]["address"]) for a in plain] == [("frontend", None)]
    assert {a["rule"] for a in alerts} == {"plaintext_hop", "missing_access_log"}
    assert d.metric("meshaudit_workers_ready") == 2
    # process metrics cover the coordinator and both workers (each worker holds ~100 MiB of code)
    assert d.metric("process_resident_memory_bytes") > 3 * 40 * 2**20
    assert d.metric("meshaudit_peer_queries_total", result="timeout") == 0
    assert d.metric("meshaudit_peer_queries_total", result="answered") >= 2


def _worker_pids(d: Daemon) -> list[int]:
    assert d.proc is not None
    children = Path(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children").read_text().split()
    pids = []
    for pid in map(int, children):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            pids.append(pid)
    return pids


async def test_a_worker_that_dies_is_started_again(workers2: Daemon) -> None:
    d = workers2
    pids = _worker_pids(d)
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)  # a process this test started (through the daemon)
    assert d.wait_metric("meshaudit_worker_restarts_total", 1, timeout=10) == 1
    assert d.wait_metric("meshaudit_workers_ready", 2, timeout=15) == 2
    status, body = d.readyz()
    assert status == 200, body
    assert len(_worker_pids(d)) == 2 and pids[0] not in _worker_pids(d)
    # And it receives: entries sent on fresh connections are all evaluated.
    reviews = als.identifier("reviews")
    for i in range(6):
        await als.stream(d.grpc, [als.http_message([als.inbound_http("frontend", path=f"/reviews/{i}")], reviews)])
    assert d.wait_metric("meshaudit_hops_evaluated_total", 6) >= 6
    assert d.alerts() == []


def test_sigterm_stops_coordinator_and_workers(tmp_path: Path) -> None:
    d = Daemon(tmp_path, WORKERS_CONFIG).start()
    pids = _worker_pids(d)
    assert d.stop() == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or b"Z" in Path(f"/proc/{pid}/stat").read_bytes().split()[2]


async def test_sighup_reloads_the_policy_in_every_worker(tmp_path: Path) -> None:
    allow_ratings = {"from": ["frontend.default"], "to": ["ratings.default"]}
    cfg = deep_merge(WORKERS_CONFIG, {"policy": {"edges": [*WORKERS_CONFIG["policy"]["edges"], allow_ratings]}})
    with running(tmp_path, cfg) as d:
        frontend = als.identifier("frontend")

        async def call_ratings(n: int) -> None:
            for i in range(n):  # fresh connections: both workers get some
                entry = als.outbound_http("ratings", path=f"/ratings/{i}")
                await als.stream(d.grpc, [als.http_message([entry], frontend)])

        await call_ratings(4)
        assert d.wait_metric("meshaudit_hops_evaluated_total", 4) == 4
        assert d.alerts() == []
        strict = {**d.config, "policy": {**d.config["policy"], "edges": WORKERS_CONFIG["policy"]["edges"]}}
        d.config_path.write_text(yaml.safe_dump(strict))
        d.signal(signal.SIGHUP)
        assert d.wait_metric("meshaudit_config_reloads_total", 1, result="ok") == 1
        await asyncio.sleep(0.5)  # the workers reload on the coordinator's signal
        await call_ratings(8)
        assert d.wait_metric("meshaudit_violations_total", 8, rule="unexpected_edge") == 8
        got = d.wait_alerts(bool)
        assert [(a["rule"], a["destination"]["service"]) for a in got] == [("unexpected_edge", "ratings")]


def test_port_in_use_exits_one_with_no_worker_left(workers2: Daemon, tmp_path: Path) -> None:
    cfg = tmp_path / "w.yaml"
    cfg.write_text("workers: 2\n")
    tag = f"MESHAUDIT_TEST_TAG={uuid.uuid4()}".encode()  # inherited by every process it starts
    res = subprocess.run(
        [MESHAUDIT, "run", "--config", str(cfg), "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0",
         "--metrics", workers2.metrics_addr],
        capture_output=True, text=True, timeout=60, env={**os.environ, tag.decode().split("=")[0]: tag.decode()},
    )  # fmt: skip
    assert res.returncode == 1 and "Cannot start" in res.stderr, res.stderr

    def left() -> list[str]:
        found = []
        for env in Path("/proc").glob("[0-9]*/environ"):
            with contextlib.suppress(OSError):
                if tag in env.read_bytes():
                    found.append(env.parent.name)
        return found

    deadline = time.monotonic() + 5  # multiprocessing's resource tracker ends just after its parent
    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left() == []  # its workers stopped with it
    assert len(_worker_pids(workers2)) == 2  # the running daemon's workers, untouched


async def test_the_alert_budget_holds_with_workers(tmp_path: Path) -> None:
    """The coordinator's one aggregator applies ``engine.alert_budget_per_window``: ten distinct
    violating pairs with a budget of three give three alerts, then one budget summary."""
    cfg = deep_merge(WORKERS_CONFIG, {"engine": {"alert_budget_per_window": 3, "suppress_secs": 2}})
    with running(tmp_path, cfg) as d:
        for i in range(10):
            entry = als.inbound_http(f"intruder-{i}", path="/reviews/1")
            await als.stream(d.grpc, [als.http_message([entry], als.identifier("reviews"))])
        got = await asyncio.to_thread(d.wait_alerts, lambda a: any(x["rule"] == "alert_budget_exceeded" for x in a), 10)
        edges = _by_rule(got, "unexpected_edge")
        assert len(edges) == 3, got
        [summary] = _by_rule(got, "alert_budget_exceeded")
        assert summary["evidence"]["count"] == 7, summary
        assert d.metric("meshaudit_alerts_suppressed_total") == 7


async def test_an_edge_whose_requests_reach_both_workers_is_judged_on_all_of_them(tmp_path: Path) -> None:
    """Eight pods of frontend, each with its own stream (so the kernel spreads them over both
    workers), each log 4 requests to reviews that needed a retry: 32 retries over 32 requests,
    the threshold. No worker alone sees them all (unless all eight streams reach one worker: a
    chance of 1 in 128); the coordinator sums the workers' window counts and judges the edge once."""
    cfg = deep_merge(WORKERS_CONFIG, {"rules": {"excessive_retries": {"enabled": True, "min_retries": 32}}})
    with running(tmp_path, cfg) as d:
        for pod in range(8):
            calls = [
                als.outbound_http("reviews", request_id=f"r-{pod}-{i}", path="/reviews/1", attempts=2) for i in range(4)
            ]
            frontend = als.identifier("frontend", ip=f"10.0.1.{pod + 1}")
            await als.stream(d.grpc, [als.http_message(calls, frontend)])
        got = await asyncio.to_thread(d.wait_alerts, lambda a: bool(_by_rule(a, "excessive_retries")), 10)
        [retries] = _by_rule(got, "excessive_retries")
        assert retries["source"]["service"] == "frontend" and retries["destination"]["service"] == "reviews"
        assert retries["evidence"]["detail"].startswith("32 retries over 32 requests (ratio 1.00)"), retries
        assert d.wait_metric("meshaudit_hops_evaluated_total", 32) == 32
        assert d.metric("meshaudit_worker_window_deltas_late_total") == 0
