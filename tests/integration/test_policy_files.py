"""The real daemon on policy files with @lists and exceptions: the kubelet-probe exception keeps
probes from the node's network quiet, anything else plaintext still alerts, and
meshaudit_policy_exception_matches_total shows which exceptions carry traffic (and which are
dead, at 0)."""

from __future__ import annotations

from pathlib import Path

from infra import als
from infra.daemon import running

POLICY = """apiVersion: meshaudit/v1
lists:
  node-cidrs: [10.128.0.0/16]
  health: [/healthz, /readyz]
exceptions:
  - name: kubelet-probes
    rules: [plaintext_hop]
    reason: kubelet probes arrive in plaintext from the node
    methods: [GET]
    paths: ["@health"]
    user_agent: "kube-probe/*"
    source_cidr: ["@node-cidrs"]
  - name: never-used
    rules: [plaintext_hop]
    reason: kept to show a dead exception
    paths: [/nothing]
"""


async def test_a_probe_exception_from_policy_files(tmp_path: Path) -> None:
    (tmp_path / "policy.d").mkdir()
    (tmp_path / "policy.d" / "10-probes.yaml").write_text(POLICY)
    config = {
        "engine": {"tick_ms": 50},
        "rules": {"plaintext_hop": {"attribution_wait_ms": 0}},
        "policy_files": [str(tmp_path / "policy.d")],
    }
    with running(tmp_path, config) as d:
        probes = []
        for i in range(3):
            e = als.inbound_http(None, path="/healthz", remote=f"10.128.0.{i + 1}:5{i}000", request_id=f"p{i}")
            e.request.user_agent = "kube-probe/1.29"
            probes.append(e)
        sneaky = als.inbound_http(None, path="/healthz", remote="10.7.0.9:40000", request_id="s1")
        sneaky.request.user_agent = "kube-probe/1.29"  # the right user agent, from outside the node network
        await als.stream(d.grpc, [als.http_message([*probes, sneaky], als.identifier("reviews"))])
        got = d.wait_alerts(lambda a: any(x["rule"] == "plaintext_hop" for x in a), timeout=5)
        plaintext = [a for a in got if a["rule"] == "plaintext_hop"]
        assert len(plaintext) == 1 and plaintext[0]["source"]["address"] == "10.7.0.9"
        assert d.wait_metric("meshaudit_policy_exception_matches_total", 3, exception="kubelet-probes") == 3
        assert 'meshaudit_policy_exception_matches_total{exception="never-used"} 0.0' in d.scrape()
