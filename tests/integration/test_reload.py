"""Reloading the real daemon keeps its state: a span waiting out its grace across a SIGHUP
alerts once, on time; a changed file reloads by itself (no SIGHUP); a restart-only key is named
in the log; reloading again and again under load loses and duplicates no alert."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import yaml
from infra import als
from infra.daemon import Daemon, running
from infra.otlp import server_span
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

from integration.conftest import CONFIG


def _rules(alerts: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    return [a for a in alerts if a["rule"] == rule]


async def test_a_pending_grace_survives_sighup_and_alerts_once_on_time(daemon: Daemon) -> None:
    await als.stream(
        daemon.grpc, [als.http_message([als.inbound_http("frontend", path="/reviews/1")], als.identifier("reviews"))]
    )
    t0 = time.monotonic()
    server_span(OTLPSpanExporter(endpoint=daemon.grpc, insecure=True), "reviews", "/reviews/bypass")
    cfg = yaml.safe_load(daemon.config_path.read_text())
    cfg["rules"]["plaintext_hop"]["severity"] = "critical"  # a real change, applied at once
    daemon.config_path.write_text(yaml.safe_dump(cfg))
    daemon.signal(signal.SIGHUP)  # within the 1 s grace
    got = daemon.wait_alerts(lambda a: bool(_rules(a, "missing_access_log")), timeout=5)
    elapsed = time.monotonic() - t0
    assert len(_rules(got, "missing_access_log")) == 1 and elapsed < 2.5  # grace 1 s, ticks of 50 ms
    assert daemon.wait_metric("meshaudit_config_reloads_total", 1, result="ok") == 1
    await asyncio.sleep(1.5)
    assert len(_rules(daemon.alerts(), "missing_access_log")) == 1


async def test_a_changed_file_reloads_by_itself_and_restart_only_keys_are_named(tmp_path: Path) -> None:
    with running(tmp_path, {**CONFIG, "reload_watch_ms": 200}) as d:
        cfg = yaml.safe_load(d.config_path.read_text())
        cfg["rules"]["plaintext_hop"]["severity"] = "critical"
        cfg["mesh"] = {"trust_domain": "example.org"}
        d.config_path.write_text(yaml.safe_dump(cfg))
        assert d.wait_metric("meshaudit_config_reloads_total", 1, result="ok") == 1
        entry = als.inbound_http(None, path="/reviews/1", remote="10.5.5.5:5555", request_id="after-reload")
        await als.stream(d.grpc, [als.http_message([entry], als.identifier("reviews"))])
        got = d.wait_alerts(lambda a: bool(_rules(a, "plaintext_hop")), timeout=5)
        assert [a["severity"] for a in _rules(got, "plaintext_hop")] == ["critical"]
        log = d.stderr_path.read_text()
        assert "apply only on restart" in log and "mesh.trust_domain" in log
        await asyncio.sleep(1.0)
        assert d.metric("meshaudit_config_reloads_total", result="ok") == 1  # once, not again


async def test_reloads_under_load_drop_and_duplicate_no_alert(daemon: Daemon) -> None:
    """200 plaintext requests from 200 distinct sources (one alert each), sent in 20 messages
    while the daemon reloads 10 times: exactly 200 alerts, one per source."""
    sources = [f"10.9.{i // 250}.{i % 250 + 1}:4000" for i in range(200)]
    reviews = als.identifier("reviews")
    for n, chunk in enumerate(range(0, 200, 10)):
        entries = [
            als.inbound_http(None, path="/reviews/1", remote=src, request_id=f"load-{i}")
            for i, src in enumerate(sources[chunk : chunk + 10], start=chunk)
        ]
        await als.stream(daemon.grpc, [als.http_message(entries, reviews)])
        if n % 2 == 0:
            daemon.signal(signal.SIGHUP)
        await asyncio.sleep(0.05)
    assert daemon.wait_metric("meshaudit_config_reloads_total", 10, result="ok") == 10
    got = daemon.wait_alerts(lambda a: len(_rules(a, "plaintext_hop")) >= 200, timeout=10)
    await asyncio.sleep(1.0)
    plain = _rules(daemon.alerts(), "plaintext_hop")
    assert len(plain) == 200 and len(got) >= 200
    assert sorted(a["source"]["address"] for a in plain) == sorted(s.rsplit(":", 1)[0] for s in sources)
