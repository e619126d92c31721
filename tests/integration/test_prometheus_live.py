"""A real Prometheus server scrapes a live daemon and evaluates deploy/prometheus's alert rules:
every rule's expression evaluates against the daemon's real series, and the rules without a
`for` delay fire under the fault they describe: a critical violation, a flood of rejected input.
Both fire on their very first event, which needs the counters' series to exist at 0 from the
start (they did not: the first burst was invisible to increase())."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml
from infra.daemon import Daemon
from infra.faults import post_garbage, stolen_certificate
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
        await stolen_certificate(daemon.grpc, "stolen-1")
        await asyncio.to_thread(post_garbage, daemon.http, 150)
        want = {"MeshauditCriticalViolation", "MeshauditRejecting"}

        def firing_names() -> set[str]:
            return {a["labels"]["alertname"] for a in prom.firing()}

        def critical_rules() -> set[str]:
            return {
                a["labels"]["rule"] for a in prom.firing() if a["labels"]["alertname"] == "MeshauditCriticalViolation"
            }

        # The stolen certificate is also an edge outside the policy (payments -> reviews): two
        # critical rules, each alerting on its own series, in no fixed order.
        want_rules = {"identity_mismatch", "unexpected_edge"}
        prom.wait(lambda: firing_names() >= want and critical_rules() == want_rules)
        assert firing_names() >= want, firing_names()
        assert critical_rules() == want_rules
        assert {a["rule"] for a in daemon.alerts() if a["severity"] == "critical"} == want_rules
