"""The Prometheus alert rules shipped in deploy/prometheus: valid (promtool check rules), each
firing under the fault it describes and silent on a healthy daemon (promtool test rules), every
metric they read exported by the daemon, and a runbook section for each."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml
from meshaudit import metrics

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = RULES_DIR / "meshaudit-rules.yaml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: `make tools` installs Debian's prometheus package"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, cwd=RULES_DIR)


def test_promtool_checks_and_tests_the_rules() -> None:
    check = promtool("check", "rules", RULES.name)
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    tested = promtool("test", "rules", "meshaudit-rules.test.yaml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_metric_the_rules_read_is_exported() -> None:
    families = {f.name for f in metrics.REGISTRY.collect()}
    text = RULES.read_text()
    used = set(re.findall(r"\b(meshaudit_[a-z_]+)", text))
    assert used, "no meshaudit metric in the rules?"
    for name in used:
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert base in families, f"{name}: not a metric the daemon exports"


def test_every_alert_has_a_runbook_section() -> None:
    alerts = [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    runbook = (RULES_DIR / "RUNBOOK.md").read_text()
    for name in alerts:
        assert f"\n## {name}\n" in runbook, name


def test_the_prometheus_rule_for_the_operator_holds_the_same_rules() -> None:
    manifest = yaml.safe_load((RULES_DIR / "prometheusrule.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert manifest["spec"] == yaml.safe_load(RULES.read_text())
