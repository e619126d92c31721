"""Policy files a security team owns: apiVersion, several files merged in order, @lists, and every
error and warning with its code, file, line and key (``meshaudit validate`` prints them all)."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import pytest
from meshaudit.config import ConfigError
from meshaudit.loading import load_with_diagnostics

MESHAUDIT = str(Path(sys.executable).with_name("meshaudit"))
TODAY = datetime.date(2026, 11, 29)


def write(dir: Path, name: str, text: str) -> Path:
    p = dir / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def config(tmp_path: Path, files: list[str], extra: str = "") -> Path:
    lines = "".join(f"  - {f}\n" for f in files)
    return write(tmp_path, "c.yaml", f"policy_files:\n{lines}{extra}")


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_with_diagnostics(path, TODAY)
    return str(exc.value).splitlines()


BASE = """apiVersion: meshaudit/v1
lists:
  shop: [frontend.shop, cart.shop]
  probes: [/healthz, /readyz]
edges:
  - from: [frontend.shop]
    to: ["@shop"]
"""


def test_files_merge_in_order_and_later_files_add_to_lists(tmp_path: Path) -> None:
    write(tmp_path, "policy/00-base.yaml", BASE)
    write(
        tmp_path,
        "policy/10-team.yaml",
        """apiVersion: meshaudit/v1
lists:
  shop: [checkout.shop]      # adds to the list of 00-base
  everything: ["@shop", payments.pay]
edges:
  - from: [checkout.shop]
    to: ["@everything"]
exceptions:
  - name: probes
    rules: [plaintext_hop]
    reason: kubelet probes
    paths: ["@probes"]
""",
    )
    write(tmp_path, "policy/README.md", "not a policy")
    write(tmp_path, "extra.yml", "apiVersion: meshaudit/v1\nmesh_services: ['@shop']\n")
    cfg, policy, warnings = load_with_diagnostics(config(tmp_path, ["policy", "extra.yml"]), TODAY)
    assert warnings == []
    assert [(e.from_, e.to) for e in policy.edges or []] == [
        (["frontend.shop"], ["frontend.shop", "cart.shop", "checkout.shop"]),
        (["checkout.shop"], ["frontend.shop", "cart.shop", "checkout.shop", "payments.pay"]),
    ]
    assert policy.exceptions[0].paths == ["/healthz", "/readyz"]
    assert policy.mesh_services == ["frontend.shop", "cart.shop", "checkout.shop"]
    assert cfg.policy_files == ["policy", "extra.yml"]


ERRORS = {
    "P001": ("edges:\n  - from: ['@nope']\n    to: [a]\n", 3, "edges[0].from[0]", "unknown list @nope"),
    "P002": (
        "exceptions:\n  - name: x\n    rules: [plaintext]\n    reason: r\n",
        4,
        "exceptions[0].rules",
        "unknown rule",
    ),
    "P003": ("edges:\n  - from: [a]\n    to: [b]\n    unless: c\n", 5, "edges[0].unless", "unknown key 'unless'"),
    "P004": ("exceptions:\n  - name: x\n    rules: [plaintext_hop]\n", 3, "exceptions[0].reason", "missing key"),
    "P005": ("routes:\n  - to: [a]\n    allow: nope\n", 4, "routes[0].allow", "valid list"),
    "P006": (
        "exceptions:\n  - name: x\n    rules: [plaintext_hop]\n    reason: r\n    source_cidr: [10.0.0.0/33]\n",
        6,
        "exceptions[0].source_cidr[0]",
        "not an IP network",
    ),
    "P007": (
        "exceptions:\n  - name: x\n    rules: [plaintext_hop]\n    reason: r\n    expires: someday\n",
        6,
        "exceptions[0].expires",
        "date",
    ),
    "P008": ("lists:\n  a: ['@b']\n  b: ['@a']\nmesh_services: ['@a']\n", 5, "mesh_services[0]", "contains itself"),
    "P012": (
        "exceptions:\n  - name: x\n    rules: [plaintext_hop]\n    reason: r\n    response_codes: [6xx]\n",
        6,
        "exceptions[0].response_codes[0]",
        "not a status",
    ),
    "P013": (
        "sources:\n  - identities: [otel-collector.observability]\n    namespaces: ['*']\n",
        3,
        "sources[0].identities[0]",
        "not a SPIFFE id pattern",
    ),
}


@pytest.mark.parametrize("code", sorted(ERRORS))
def test_each_error_has_its_code_file_line_and_key(tmp_path: Path, code: str) -> None:
    body, line, key, words = ERRORS[code]
    f = write(tmp_path, "p.yaml", "apiVersion: meshaudit/v1\n" + body)
    [err] = [e for e in errors_of(config(tmp_path, ["p.yaml"])) if f" {code} " in e]
    assert err.startswith(f"{f}:{line}: error {code} {key}:"), err
    assert words in err, err


def test_duplicate_exception_names_across_files(tmp_path: Path) -> None:
    x = "apiVersion: meshaudit/v1\nexceptions:\n  - name: probes\n    rules: [plaintext_hop]\n    reason: r\n"
    a, b = write(tmp_path, "a.yaml", x), write(tmp_path, "b.yaml", x)
    [err] = errors_of(config(tmp_path, ["a.yaml", "b.yaml"]))
    assert err == f"{b}:3: error P009 exceptions[0].name: 'probes' is used already ({a}:3)"


def test_api_version_is_required_and_checked(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", "edges: []\n")
    newer = write(tmp_path, "new.yaml", "apiVersion: meshaudit/v2\n")
    errs = errors_of(config(tmp_path, ["old.yaml", "new.yaml"]))
    assert errs[0].startswith(f"{old}:1: error P010 apiVersion: missing")
    assert errs[1] == f"{newer}:1: error P010 apiVersion: unsupported 'meshaudit/v2'; this meshaudit reads meshaudit/v1"


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", "apiVersion: meshaudit/v1\nedges: [oops\n")
    errs = errors_of(config(tmp_path, ["bad.yaml", "missing.yaml"]))
    assert any(e.startswith(f"{bad}:3: error P011") and "invalid YAML" in e for e in errs), errs
    assert any(f"{tmp_path / 'missing.yaml'}: error P011" in e and "cannot read" in e for e in errs), errs


def test_every_error_of_every_file_is_reported_not_only_the_first(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "apiVersion: meshaudit/v1\nedges:\n  - from: ['@x']\n    to: ['@y']\n")
    write(tmp_path, "b.yaml", "apiVersion: meshaudit/v1\nroutes:\n  - to: [a]\n    alow: []\n")
    errs = errors_of(config(tmp_path, ["a.yaml", "b.yaml"]))
    assert [e.split(" ")[2] for e in errs] == ["P001", "P001", "P004", "P003"], errs  # by file, then line


WARNINGS = {
    "W001": ("lists:\n  spare: [a]\n", 3, "lists.spare", "list @spare is not used"),
    "W002": (
        "exceptions:\n  - name: old\n    rules: [plaintext_hop]\n    reason: r\n    expires: 2026-01-31\n",
        6,
        "exceptions[0].expires",
        "expired on 2026-01-31",
    ),
    "W003": (
        "exceptions:\n  - name: tcp\n    rules: [plaintext_hop]\n    reason: r\n    protocol: tcp\n    paths: [/x]\n",
        3,
        "exceptions[0]",
        "can never match: protocol is tcp, but paths only match HTTP requests",
    ),
    "W004": (
        "exceptions:\n  - name: s\n    rules: [plaintext_hop]\n    reason: r\n    paths: [/api/v1/x, '/api/*']\n",
        6,
        "exceptions[0].paths",
        "'/api/v1/x' is already covered by '/api/*'",
    ),
}


@pytest.mark.parametrize("code", sorted(WARNINGS))
def test_each_warning_has_its_code_file_line_and_key(tmp_path: Path, code: str) -> None:
    body, line, key, words = WARNINGS[code]
    f = write(tmp_path, "p.yaml", "apiVersion: meshaudit/v1\n" + body)
    _, _, warnings = load_with_diagnostics(config(tmp_path, ["p.yaml"]), TODAY)
    [w] = [str(w) for w in warnings if w.code == code]
    assert w == f"{f}:{line}: warning {code} {key}: {words}" or (
        w.startswith(f"{f}:{line}: warning {code} {key}:") and words in w
    ), w


def test_an_exception_for_disabled_rules_only_can_never_match(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", "apiVersion: meshaudit/v1\nexceptions:\n  - {name: x, rules: [weak_tls], reason: r}\n")
    c = config(tmp_path, ["p.yaml"], "rules:\n  weak_tls:\n    enabled: false\n")
    _, _, [w] = load_with_diagnostics(c, TODAY)
    assert w.code == "W003" and "all disabled (weak_tls)" in w.message


def test_inline_policy_takes_lists_and_exceptions_too(tmp_path: Path) -> None:
    c = write(
        tmp_path,
        "c.yaml",
        "policy:\n  lists:\n    probes: [/healthz]\n  exceptions:\n"
        "    - {name: probes, rules: [plaintext_hop], reason: r, paths: ['@probes', '@nope']}\n",
    )
    [err] = errors_of(c)
    assert err.startswith(f"{c}:5: error P001 policy.exceptions[0].paths[1]: unknown list @nope")


def test_validate_prints_every_finding_and_exits_2_on_an_error(tmp_path: Path) -> None:
    write(
        tmp_path, "a.yaml", "apiVersion: meshaudit/v1\nlists:\n  spare: [x]\nedges:\n  - {from: ['@x'], to: ['@y']}\n"
    )
    res = subprocess.run([MESHAUDIT, "validate", str(config(tmp_path, ["a.yaml"]))], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    codes = [line.split(" ")[2] for line in res.stderr.splitlines()]
    assert codes == ["P001", "P001", "W001"], res.stderr
    write(tmp_path, "ok.yaml", "apiVersion: meshaudit/v1\nlists:\n  spare: [x]\n")
    res = subprocess.run([MESHAUDIT, "validate", str(config(tmp_path, ["ok.yaml"]))], capture_output=True, text=True)
    assert res.returncode == 0 and "valid with 1 warning(s)" in res.stdout and " W001 " in res.stderr
