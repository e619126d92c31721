"""What an operator sees over the daemon's life: metrics names and labels, readiness, SIGHUP
reload (a bad file keeps the old configuration and raises an alert), SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from infra import als
from infra.daemon import MESHAUDIT, Daemon, free_port
from prometheus_client.parser import text_string_to_metric_families


async def test_metrics_cover_every_component(daemon: Daemon) -> None:
    await als.stream(
        daemon.grpc, [als.http_message([als.inbound_http("frontend", path="/reviews/1")], als.identifier("reviews"))]
    )
    await asyncio.sleep(1.2)  # stores are published once a second
    families = {f.name: f for f in text_string_to_metric_families(daemon.scrape())}
    for name in (
        "meshaudit_received",
        "meshaudit_rejected",
        "meshaudit_dropped",
        "meshaudit_alerts",
        "meshaudit_sink_sent",
        "meshaudit_sink_failed",
        "meshaudit_sink_dropped",
        "meshaudit_store_items",
        "meshaudit_event_loop_lag_seconds",
        "meshaudit_hops_evaluated",
    ):
        assert name in families, name
    stores = {s.labels["store"] for s in families["meshaudit_store_items"].samples}
    assert {"outbound_by_request_id", "spans_awaiting_access_log", "alert_windows"} <= stores
    assert daemon.metric("meshaudit_sink_ready", sink="jsonl") == 1
    status, body = daemon.readyz()
    assert status == 200 and body["ready"] is True


def test_sighup_reload_keeps_old_config_when_new_is_invalid(daemon: Daemon) -> None:
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good + "\nbogus_section: 1\n")
    daemon.signal(signal.SIGHUP)
    got = daemon.wait_alerts(lambda a: any(x["rule"] == "config_invalid" for x in a), timeout=5)
    bad = [a for a in got if a["rule"] == "config_invalid"]
    assert len(bad) == 1 and "bogus_section" in bad[0]["evidence"]["detail"]
    assert daemon.metric("meshaudit_config_reloads_total", result="invalid") == 1
    daemon.config_path.write_text(good)
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while daemon.metric("meshaudit_config_reloads_total", result="ok") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.metric("meshaudit_config_reloads_total", result="ok") == 1


def test_port_in_use_exits_one_and_sigterm_exits_zero(daemon: Daemon) -> None:
    res = subprocess.run(
        [
            MESHAUDIT,
            "run",
            "--grpc",
            f"127.0.0.1:{free_port()}",
            "--http",
            f"127.0.0.1:{free_port()}",
            "--metrics",
            daemon.metrics_addr,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1 and "Cannot listen" in res.stderr, res.stderr
    assert daemon.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_second_daemon_on_a_grpc_port_in_use_exits_one_and_the_first_keeps_the_traffic(
    daemon: Daemon, tmp_path: Path, workers: int
) -> None:
    # Was: the second one joined the port (SO_REUSEPORT with one process) and took half the streams;
    # with workers: 2 its coordinator reserved the port with SO_REUSEPORT and joined it too.
    second = tmp_path / "second.yaml"
    second.write_text(f"workers: {workers}\n")
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, waited for with a timeout
        [MESHAUDIT, "run", "--config", str(second), "--grpc", daemon.grpc, "--http", f"127.0.0.1:{free_port()}",
         "--metrics", f"127.0.0.1:{free_port()}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by its handle
        proc.communicate()
        raise AssertionError("a second daemon started on a gRPC port in use") from None
    assert proc.returncode == 1, err
    lines = [x for x in err.splitlines() if "cannot listen" in x.lower()]
    assert len(lines) == 1 and f"cannot listen on {daemon.grpc}: address in use" in lines[0], err
    assert "Traceback" not in err and "add_port" not in err, err
    ident = als.identifier("reviews")
    for i in range(20):  # each on its own connection
        entry = als.inbound_http("frontend", path=f"/reviews/{i}")
        assert await als.stream(daemon.grpc, [als.http_message([entry], ident)]) == grpc.StatusCode.OK
    assert daemon.metric("meshaudit_received_total", receiver="envoy_als", kind="http") == 20
