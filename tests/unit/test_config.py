"""Strict configuration: one typo per section is an error naming the file, line and key;
`meshaudit validate` and `meshaudit run` report it with exit code 2 and no traceback."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from meshaudit.config import Config, ConfigError
from meshaudit.loading import load
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[2]
MESHAUDIT = str(Path(sys.executable).with_name("meshaudit"))

SECTION_KEYS = [
    "listen",
    "grpc",
    "engine",
    "tick_ms",
    "rules",
    "plaintext_hop",
    "policy",
    "edges",
    "from",
    "to",
    "sinks",
    "jsonl",
    "path",
    "mesh",
    "addresses",
    "policy_file",
    "enabled",
    "severity",
]

TYPOS = {
    "listen": "listen:\n  grcp: 127.0.0.1:1\n",
    "receivers": "receivers:\n  max_mesage_bytes: 10\n",
    "mesh": "mesh:\n  trust_domian: x\n",
    "engine": "engine:\n  supress_secs: 5\n",
    "rules": "rules:\n  plaintext_hop:\n    severty: high\n",
    "policy": "policy:\n  edges:\n    - {from: [a], too: [b]}\n",
    "sinks": "sinks:\n  jsonl:\n    paht: x\n",
    "top": "log_levle: info\n",
}


@pytest.mark.parametrize("section", sorted(TYPOS))
def test_typo_in_each_section_names_file_line_and_key(tmp_path: Path, section: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("# comment\n" + TYPOS[section])
    with pytest.raises(ConfigError) as exc:
        load(f)
    msg = str(exc.value)
    assert str(f) in msg
    assert "unknown key" in msg
    bad_line = 1 + len(TYPOS[section].splitlines())
    assert f":{bad_line}:" in msg or f":{bad_line - 1}:" in msg, msg


def test_shipped_config_and_policy_are_valid() -> None:
    _, example = load(REPO / "config" / "example.yaml")
    assert example.edges, "the example points at the example policy"


def test_default_yaml_is_exactly_the_built_in_defaults() -> None:
    """config/default.yaml documents every default: loading it must give Config() itself, so a
    default changed in code but not in the file (or the reverse) fails here."""
    cfg, policy = load(REPO / "config" / "default.yaml")
    assert cfg == Config()
    assert policy == Config().policy


def _leaf_keys(model: BaseModel, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = prefix + name
        out |= _leaf_keys(value, key + ".") if isinstance(value, BaseModel) else {key}
    return out


def test_default_yaml_writes_out_every_option() -> None:
    """Every option the daemon has appears in config/default.yaml, where it is explained (the
    policy and the optional sinks, kafka and mqtt, are shown there as comments)."""
    data = yaml.safe_load((REPO / "config" / "default.yaml").read_text())

    def keys(node: object, prefix: str = "") -> set[str]:
        if isinstance(node, dict) and node:
            return set().union(*(keys(v, f"{prefix}{k}.") for k, v in node.items()))
        return {prefix.rstrip(".")}

    documented = keys(data)
    expected = {k for k in _leaf_keys(Config()) if not k.startswith(("policy", "sinks.kafka", "sinks.mqtt"))}
    assert expected - documented == set()


def test_wrong_value_is_explained(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("listen:\n  grpc: nowhere\nrules:\n  plaintext_hop:\n    severity: urgent\n")
    with pytest.raises(ConfigError) as exc:
        load(f)
    msg = str(exc.value)
    assert "listen.grpc" in msg and "HOST:PORT" in msg
    assert "rules.plaintext_hop.severity" in msg


def test_policy_file_errors_name_the_policy_file(tmp_path: Path) -> None:
    policy = "apiVersion: meshaudit/v1\nedges:\n  - from: [a]\n    to: [b]\n    unless: x\n"
    (tmp_path / "policy.yaml").write_text(policy)
    (tmp_path / "c.yaml").write_text("policy_file: policy.yaml\n")
    with pytest.raises(ConfigError) as exc:
        load(tmp_path / "c.yaml")
    assert f"{tmp_path / 'policy.yaml'}:5: error P003 edges[0].unless: unknown key 'unless'" in str(exc.value)


def test_validate_command(tmp_path: Path) -> None:
    ok = subprocess.run([MESHAUDIT, "validate", str(REPO / "config" / "example.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  tick_ms: 1\n")
    res = subprocess.run([MESHAUDIT, "validate", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "engine.tick_ms" in res.stderr and "Traceback" not in res.stderr


def test_run_with_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [oops\n")
    res = subprocess.run([MESHAUDIT, "run", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "invalid YAML" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([MESHAUDIT, "run", "--grpc", "nohost"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "HOST:PORT" in res.stderr


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.sampled_from(SECTION_KEYS), kids, max_size=4),
        max_leaves=12,
    )
)
def test_fuzzed_configs_fail_only_with_config_error(data: object) -> None:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "c.yaml"
        f.write_text(yaml.safe_dump(data))
        with contextlib.suppress(ConfigError):
            load(f)


def test_the_kubernetes_manifest_config_and_policy_are_valid() -> None:
    """The files the kustomize base generates its ConfigMap from (tests/unit/test_manifests.py
    checks the rendered ConfigMap holds exactly these)."""
    cfg, policy = load(REPO / "deploy" / "kubernetes" / "base" / "config" / "config.yaml")
    assert cfg.policy_file == "policy.yaml" and policy.exceptions[0].name == "kubelet-probes"


def test_the_example_and_the_configmap_ship_one_bookinfo_policy() -> None:
    """config/example.yaml is what the ConfigMap ships (deploy/kubernetes/base/config/): the same
    policy file, the same mesh settings (kustomize cannot read files outside its directory)."""
    deploy = REPO / "deploy" / "kubernetes" / "base" / "config"
    assert (REPO / "config" / "policy.example.yaml").read_bytes() == (deploy / "policy.yaml").read_bytes()
    example, example_policy = load(REPO / "config" / "example.yaml")
    shipped, shipped_policy = load(deploy / "config.yaml")
    assert example_policy == shipped_policy
    assert example.mesh == shipped.mesh and example.listen == shipped.listen
