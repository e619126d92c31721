"""Where each setting and policy item came from (``meshaudit.loading.load_explained``): the
rules' effective options as the engine builds them, each with its origin, and the file:line of
every merged edge, route, override, exception and tls key."""

from __future__ import annotations

import datetime
from pathlib import Path

from meshaudit.engine.core import Engine
from meshaudit.engine.rules import REGISTRY
from meshaudit.loading import load_explained, load_with_diagnostics
from meshaudit.policyfile import Origin

TODAY = datetime.date(2026, 11, 29)

CONFIG = """rules:
  error_burst:
    severity: high
    window_secs: 90
    min_requests: 5
  weak_tls: {min_version: TLSv1}
policy_files: [a.yaml, b.yaml]
"""
A = """apiVersion: meshaudit/v1
tls:
  min_version: TLSv1.3
overrides:
  - rule: error_burst
    window_secs: 30
edges:
  - {from: [a], to: [b]}
"""
B = """apiVersion: meshaudit/v1
edges:
  - {from: [b], to: [c], protocol: tcp}
routes:
  - to: [c]
    allow: [{paths: ["/*"]}]
overrides:
  - {rule: error_burst, to: [c], min_ratio: 0.1}
exceptions:
  - name: probes
    rules: [plaintext_hop]
    reason: kubelet probes
"""


def test_each_option_and_item_names_its_origin(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(A)
    (tmp_path / "b.yaml").write_text(B)
    (tmp_path / "c.yaml").write_text(CONFIG)
    x = load_explained(tmp_path / "c.yaml", TODAY)
    a, b, c = (str(tmp_path / n) for n in ("a.yaml", "b.yaml", "c.yaml"))
    eb = {k: str(v) for k, v in x.provenance.options["error_burst"].items()}
    assert eb == {
        "enabled": "default",
        "severity": f"config {c}:3",
        "window_secs": f"policy {a}:5 (override, over config {c}:4)",  # the configuration said 90
        "min_ratio": "default",  # the override for a destination is not the rule's own value
        "min_requests": f"config {c}:5",
    }
    assert x.provenance.sections["error_burst"].model_dump() == {
        "enabled": True, "severity": "high", "window_secs": 30, "min_ratio": 0.5, "min_requests": 5,
    }  # fmt: skip
    assert str(x.provenance.options["weak_tls"]["min_version"]) == f"policy {a}:3 (tls, over config {c}:6)"
    p = x.provenance.policy
    assert p.edges == [Origin(a, 8), Origin(b, 3)]
    assert p.routes == [Origin(b, 5)]
    assert p.overrides == [Origin(a, 5), Origin(b, 8)]
    assert p.exceptions == {"probes": Origin(b, 10)}
    # the same configuration and policy as load_with_diagnostics, and the engine's own sections
    cfg, policy, _ = load_with_diagnostics(tmp_path / "c.yaml", TODAY)
    assert (x.config, x.policy) == (cfg, policy)
    engine = Engine(cfg, policy, REGISTRY)
    assert x.provenance.sections == engine.ctx.sections


def test_inline_policy_and_exemptions_point_into_the_config_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "policy:\n  edges:\n    - {from: [a], to: [b]}\n  exemptions:\n    - {rules: [unexpected_edge], to: [x]}\n"
        "  overrides:\n    - {rule: plaintext_hop, severity: critical}\n"
    )
    x = load_explained(f, TODAY)
    assert x.provenance.policy.edges == [Origin(str(f), 3)]
    assert x.provenance.policy.exceptions == {"exemptions[0]": Origin(str(f), 5)}
    assert str(x.provenance.options["plaintext_hop"]["severity"]) == f"policy {f}:7 (override)"


def test_without_a_file_everything_is_a_default() -> None:
    x = load_explained(None)
    assert x.provenance.config_file is None
    assert {str(o) for opts in x.provenance.options.values() for o in opts.values()} == {"default"}
