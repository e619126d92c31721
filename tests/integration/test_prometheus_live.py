"""A real Prometheus server scrapes a live daemon and evaluates deploy/prometheus's alert rules:
every rule's expression evaluates against the daemon's real series, and the rules without a
`for` delay fire under the fault they describe: a critical violation, a flood of rejected input.
Both fire on their very first event, which needs the counters' series to exist at 0 from the
start (they did not: the first burst was invisible to increase())."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from infra import als
from infra.daemon import Daemon
from infra.prometheus import prometheus

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "meshaudit-rules.yaml"


async def test_the_alert_rules_on_a_live_daemon(daemon: Daemon, tmp_path: Path) -> None:
    with prometheus(tmp_path, daemon.metrics_addr, [RULES]) as prom:
        assert prom.wait(lambda: prom.query('up{job="meshaudit"} == 1'))
        # Every rule's expression is valid PromQL over the daemon's series (empty while healthy).
        for group in yaml.safe_load(RULES.read_text())["groups"]:
            for rule in group["rules"]:
                prom.query(rule["expr"])
        assert prom.firing() == []
        # Faults: a critical violation (a stolen certificate), and 150 undecodable OTLP bodies.
        stolen = als.inbound_http("payments", path="/reviews/1", request_id="stolen-1")
        client = als.outbound_http("reviews", request_id="stolen-1", path="/reviews/1")
        await als.stream(daemon.grpc, [als.http_message([stolen], als.identifier("reviews"))])
        await als.stream(daemon.grpc, [als.http_message([client], als.identifier("ratings"))])
        await asyncio.to_thread(_post_garbage, daemon, 150)
        want = {"MeshauditCriticalViolation", "MeshauditRejecting"}

        def firing_names() -> set[str]:
            return {a["labels"]["alertname"] for a in prom.firing()}

        prom.wait(lambda: firing_names() >= want)
        assert firing_names() >= want, firing_names()
        critical = [a for a in prom.firing() if a["labels"]["alertname"] == "MeshauditCriticalViolation"]
        assert critical[0]["labels"]["rule"] == "identity_mismatch"


def _post_garbage(daemon: Daemon, n: int) -> None:
    """``n`` undecodable OTLP/HTTP bodies (each answered 400 and counted as rejected)."""
    for _ in range(n):
        req = urllib.request.Request(
            f"http://{daemon.http}/v1/traces", data=b"\xff\x00garbage", method="POST",
            headers={"Content-Type": "application/x-protobuf"},
        )  # fmt: skip
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(req, timeout=5).read()
