"""``meshaudit rules`` and ``meshaudit policy explain``: golden output on small configuration and
policy files, and the explanation checked against the real engine judging the same request."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest
from meshaudit.cli import main
from meshaudit.engine.rules import REGISTRY
from meshaudit.engine.setup import build_engine
from meshaudit.introspect import Request, explain, synthetic_hop
from meshaudit.loading import load_explained

MESHAUDIT = str(Path(sys.executable).with_name("meshaudit"))
NOW = datetime.datetime(2026, 11, 29, 12, tzinfo=datetime.UTC).timestamp()

CONFIG = """rules:
  plaintext_hop:
    enabled: false
  error_burst:
    severity: high
    window_secs: 90
  weak_tls: {min_version: TLSv1}
policy_file: p.yaml
"""
POLICY = """apiVersion: meshaudit/v1
tls:
  min_version: TLSv1.2
edges:
  - from: [frontend.shop]
    to: [cart.shop, "payments.*"]
  - from: [api.shop]
    to: [db.data]
    protocol: tcp
    ports: [5432]
routes:
  - to: [cart.shop]
    allow:
      - methods: [GET, POST]
        paths: ["/cart/*"]
overrides:
  - rule: error_burst
    window_secs: 30
  - {rule: unexpected_edge, to: ["payments.*"], severity_when_served: warning, severity: info}
  - {rule: error_burst, to: ["payments.*"], min_ratio: 0.1, severity: critical}
exceptions:
  - name: probes
    rules: [unexpected_path]
    reason: kubelet probes
    to: [cart.shop]
    paths: [/healthz]
    user_agent: "kube-probe/*"
  - name: old-batch
    rules: [unexpected_edge]
    reason: the nightly batch, until it moves
    from: [batch.shop]
    expires: 2026-01-01
"""


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    (tmp_path / "p.yaml").write_text(POLICY)
    c = tmp_path / "c.yaml"
    c.write_text(CONFIG)
    return c


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def golden(text: str) -> str:
    """A golden block written indented in the test: the lines between the opening and the
    closing quotes, less the closing quotes' indentation (the block's own indentation stays)."""
    lines = text.split("\n")
    margin = len(lines[-1])
    assert not lines[0] and not lines[-1].strip(), "open and close the block on lines of their own"
    return "\n".join(line[margin:] for line in lines[1:-1])


def block(text: str, name: str) -> str:
    """The paragraph of ``text`` that starts with ``name``."""
    return next(b for b in text.split("\n\n") if b.startswith(name))


# --- meshaudit rules -------------------------------------------------------------------------------
def test_rules_names_every_origin_kind(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "rules", "--config", str(conf))
    assert (rc, err) == (0, "")
    assert out.startswith(f"Rules of {conf} (files relative to its directory).\n\nplaintext_hop\n")
    assert [b.split("\n")[0] for b in out.strip().split("\n\n")[1:]] == [r.name for r in REGISTRY]
    assert block(out, "plaintext_hop") == (
        "plaintext_hop\n"
        "  enabled                  false      config c.yaml:3\n"
        "  severity                 high       default\n"
        "  attribution_wait_ms      1500       default"
    )
    assert block(out, "error_burst") == (
        "error_burst\n"
        "  enabled                  true       default\n"
        "  severity                 high       config c.yaml:5\n"
        "  window_secs              30         policy p.yaml:17 (override, over config c.yaml:6)\n"
        "  min_ratio                0.5        default\n"
        "  min_requests             20         default\n"
        "  to [payments.*]: min_ratio 0.1, severity critical  (p.yaml:20)"
    )
    assert block(out, "weak_tls").split("\n")[:5] == [
        "weak_tls",
        "  enabled                  true       default",
        "  severity                 high       default",
        "  min_version              TLSv1.2    policy p.yaml:3 (tls, over config c.yaml:7)",
        "  allowed_ciphers          9 suites:  default",
    ]
    assert "                             TLS_AES_128_GCM_SHA256" in block(out, "weak_tls")
    assert block(out, "unexpected_edge").endswith(
        "  to [payments.*]: severity_when_served warning, severity info  (p.yaml:19)"
    )


def test_rules_json(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "rules", "--config", str(conf), "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["config"] == str(conf)
    eb = next(r for r in doc["rules"] if r["rule"] == "error_burst")
    p = str(conf.parent / "p.yaml")
    assert eb["options"][2] == {
        "name": "window_secs", "value": 30, "origin": "override", "at": {"file": p, "line": 17},
        "over_config": {"file": str(conf), "line": 6},
    }  # fmt: skip
    assert eb["options"][3] == {"name": "min_ratio", "value": 0.5, "origin": "default", "at": None, "over_config": None}
    assert eb["destinations"] == [
        {"to": ["payments.*"], "options": {"min_ratio": 0.1, "severity": "critical"},
         "at": {"file": str(conf.parent / "p.yaml"), "line": 20}},
    ]  # fmt: skip
    tls = next(r for r in doc["rules"] if r["rule"] == "weak_tls")["options"][3]
    assert tls["name"] == "allowed_ciphers" and tls["value"][0] == "TLS_AES_128_GCM_SHA256"


def test_rules_without_a_configuration_are_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "rules")
    assert rc == 0 and out.startswith("Rules with the built-in defaults (no --config).\n")
    options = [line for line in out.splitlines() if line.startswith("  ") and not line.startswith("    ")]
    assert options and all(line.endswith("  default") for line in options if not line.strip().startswith("TLS_"))


# --- meshaudit policy explain --------------------------------------------------------------------
def explain_out(capsys: pytest.CaptureFixture[str], conf: Path, *args: str) -> str:
    rc, out, err = run(capsys, "policy", "explain", "--config", str(conf), *args)
    assert (rc, err) == (0, ""), err
    return out


def test_explain_an_edge_no_policy_allows(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain_out(capsys, conf, "--source", "frontend.shop", "--destination", "db.data", "--port", "5432")
    assert out == golden(
        f"""
        TCP connection to port 5432 from frontend.shop to db.data
          configuration  {conf} (files below are relative to its directory)
          source         frontend.shop (service frontend, namespace shop)
          destination    db.data (service db, namespace data)

        Decided by the policy:
          plaintext_hop       disabled    enabled: false (c.yaml:3)
          unexpected_edge     ALERT       no edge allows frontend.shop -> db.data (TCP, port 5432)
                                          the source's edge from [frontend.shop] to [cart.shop, payments.*] (p.yaml:5)
                                          severity high if the mesh denies it, critical if served
                                          no exception covers it
          unexpected_path     not judged  a TCP connection: only HTTP requests have paths to check
          excessive_retries   not judged  a TCP connection: only HTTP retries are counted
          error_burst         not judged  a TCP connection: only HTTP requests are counted

        Depending on how it is made and answered:
          missing_access_log  fires if traces show it reaching db.data with no access log from that sidecar within
                                grace_ms 3000
                              severity high; no exception covers it
          route_mismatch      fires if the mesh cannot route it (NR, NC) or the host is outside the service registry
                                (REGISTRY_ONLY)
                              severity warning; no exception covers it
          authz_denied        fires if the mesh denies it: RBAC closing the connection, or ext_authz (UAEX)
                              severity warning; no exception covers it
          weak_tls            fires if db.data's sidecar accepts TLS older than TLSv1.2 or a suite not in
                                allowed_ciphers (9 suites)
                              severity high; no exception covers it
          identity_mismatch   fires if the client presents a certificate frontend.shop may not present (not its own
                                service account, nor one policy.identities lists for it)
                              severity critical; no exception covers it

        """
    ) + (
        "\nverdict: unexpected_edge would alert (high if denied, critical if served); covered by no exception. "
        "5 rules depend on how it is made and answered\n"
    )


def test_explain_names_the_edge_route_and_destination_override(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain_out(
        capsys, conf, "--source", "frontend.shop", "--destination", "payments.pay", "--method", "post", "--path", "/x"
    )
    assert out.startswith("POST /x from frontend.shop to payments.pay\n")
    assert block(out, "Decided by the policy:") == (
        "Decided by the policy:\n"
        "  plaintext_hop       disabled    enabled: false (c.yaml:3)\n"
        "  unexpected_edge     allowed     allowed by the edge from [frontend.shop] to [cart.shop, payments.*]\n"
        "                                    (p.yaml:5)\n"
        "  unexpected_path     not judged  no route covers payments.pay: its paths are not checked"
    )
    assert block(out, "Depending").endswith(
        golden("""
          error_burst         fires if at least 0.1 (for this destination) of at least 20 requests from frontend.shop
                                to payments.pay fail upstream (5xx, UF/UH/UO/UT/UC/UR/URX) in a 30 s window
                              severity critical (override p.yaml:20 for this destination); no exception covers it
        """)
    )
    assert out.endswith(
        "note: no --port given: edges for ports do not match\n"
        "verdict: no rule alerts on it from the policy alone. 7 rules depend on how it is made and answered\n"
    )


def test_explain_a_route_and_the_exception_that_covers_it(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ("--source", "frontend.shop", "--destination", "cart.shop", "--method", "GET")
    ok = explain_out(capsys, conf, *base, "--path", "/cart/1?x=1")
    assert block(ok, "Decided by the policy:").endswith(
        "  unexpected_path     allowed   allowed by the route to [cart.shop]: methods [GET, POST], paths [/cart/*]\n"
        "                                  (p.yaml:12)"
    )
    probe = explain_out(capsys, conf, *base, "--path", "/healthz", "--user-agent", "kube-probe/1.29")
    assert block(probe, "Decided by the policy:").endswith(
        "  unexpected_path     ALERT     GET /healthz is allowed by none of the routes of cart.shop\n"
        "                                the destination's route to [cart.shop]: [GET, POST] [/cart/*] (p.yaml:12)\n"
        "                                severity warning if the mesh denies it, critical if served\n"
        "                                covered by exception probes (p.yaml:22): kubelet probes"
    )
    assert "verdict: unexpected_path would fire but exception probes covers it: no alert. " in probe
    # without the User-Agent the exception cannot match, and the explanation says what to give
    bare = explain_out(capsys, conf, *base, "--path", "/healthz")
    assert block(bare, "Decided by the policy:").endswith(
        "critical if served\n                                no exception covers it"
    )
    assert "note: probes match on user_agent: give --user-agent to check them\n" in bare
    assert (
        "verdict: unexpected_path would alert (warning if denied, critical if served); covered by no exception" in bare
    )


def test_explain_a_protocol_and_port_edge(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--source", "api.shop", "--destination", "db.data")
    tcp = explain_out(capsys, conf, *args, "--port", "5432")
    assert "\n".join(block(tcp, "Decided by the policy:").split("\n")[2:4]) == golden("""
  unexpected_edge     allowed     allowed by the edge from [api.shop] to [db.data], protocol tcp, ports [5432]
                                    (an edge for a protocol or ports decided) (p.yaml:7)
""")
    for port, proto in (("6379", []), ("5432", ["--path", "/"])):
        out = explain_out(capsys, conf, *args, "--port", port, *proto)
        lines = block(out, "Decided by the policy:").split("\n")
        on = f"{'HTTP' if proto else 'TCP'}, port {port}"
        assert lines[2] == f"  unexpected_edge     ALERT       no edge allows api.shop -> db.data ({on})"
        assert "\n".join(lines[3:7]) == golden("""
                                  the source's edge from [api.shop] to [db.data], protocol tcp, ports [5432]
                                    (p.yaml:7)
                                  severity high if the mesh denies it, critical if served
                                  no exception covers it
""")
    no_port = explain_out(capsys, conf, *args)
    assert "no edge allows api.shop -> db.data (TCP, no port)" in no_port
    assert "note: no --port given: edges for ports do not match\n" in no_port


def test_explain_decides_tls_when_given(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf.write_text(CONFIG.replace("    enabled: false\n", "    enabled: true\n"))
    args = ("--source", "frontend.shop", "--destination", "cart.shop", "--path", "/cart/1")
    old = explain_out(capsys, conf, *args, "--tls-version", "TLSv1.1")
    # min_version: the policy's tls (TLSv1.2) over the configuration's TLSv1
    assert block(old, "Decided by the policy:") == golden("""
        Decided by the policy:
          plaintext_hop       allowed  it arrives over TLSv1.1
          unexpected_edge     allowed  allowed by the edge from [frontend.shop] to [cart.shop, payments.*] (p.yaml:5)
          unexpected_path     allowed  allowed by the route to [cart.shop]: methods [GET, POST], paths [/cart/*]
                                         (p.yaml:12)
          weak_tls            ALERT    TLSv1.1 is older than min_version TLSv1.2
                                       severity high
                                       no exception covers it
        """)
    plain = explain_out(capsys, conf, *args, "--tls-version", "plaintext")
    assert block(plain, "Decided by the policy:").split("\n")[1:4] == [
        "  plaintext_hop       ALERT       it arrives at cart.shop's sidecar without TLS",
        "                                  severity high",
        "                                  no exception covers it",
    ]
    assert "  weak_tls            not judged  no TLS at all: plaintext_hop's case\n" in plain
    ok = explain_out(capsys, conf, *args, "--tls-version", "TLSv1.3")
    assert (
        "  weak_tls            TLSv1.3 meets min_version TLSv1.2; fires if its suite is not in allowed_ciphers (9\n"
        "                        suites)\n"
        "                      severity high; no exception covers it\n"
    ) in ok


def test_explain_a_severity_set_for_the_destination(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain_out(capsys, conf, "--source", "api.shop", "--destination", "payments.pay", "--path", "/")
    assert block(out, "Decided by the policy:").split("\n")[2:7] == [
        "  unexpected_edge     ALERT       no edge allows api.shop -> payments.pay (HTTP, no port)",
        "                                  the source's edge from [api.shop] to [db.data], protocol tcp, ports [5432]",
        "                                    (p.yaml:7)",
        "                                  severity info if the mesh denies it, warning if served (override p.yaml:19",
        "                                    for this destination)",
    ]
    assert "verdict: unexpected_edge would alert (info if denied, warning if served); covered by no exception" in out


def test_explain_an_expired_exception(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain_out(capsys, conf, "--source", "batch.shop", "--destination", "cart.shop")
    assert block(out, "Decided by the policy:").split("\n")[2:6] == [
        "  unexpected_edge     ALERT       no edge allows batch.shop -> cart.shop (TCP, no port)",
        "                                  severity high if the mesh denies it, critical if served",
        "                                  no exception covers it: old-batch (p.yaml:28) would, but it expired on",
        "                                    2026-01-01",
    ]


def test_explain_learn_mode_and_no_edges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = tmp_path / "c.yaml"
    c.write_text("rules:\n  unexpected_edge: {mode: learn, state_file: /var/lib/b.json}\n")
    out = explain_out(capsys, c, "--source", "a.x", "--destination", "b.x")
    assert (
        "  unexpected_edge     learn mode: the learned baseline decides (the edges seen in the first 600 s, kept in\n"
        "                        /var/lib/b.json); a.x -> b.x alerts if it is not among them\n"
        "                      severity high if the mesh denies it, critical if served; no exception covers it\n"
    ) in out
    c.write_text("policy:\n  routes: [{to: [b.x], allow: [{paths: [/]}]}]\n")
    out = explain_out(capsys, c, "--source", "a.x", "--destination", "b.x")
    assert "  unexpected_edge     not judged  the policy has no edges: the rule has nothing to check\n" in out


def test_explain_parties_as_the_policy_names_them(tmp_path: Path) -> None:
    c = tmp_path / "c.yaml"
    c.write_text(
        "mesh:\n  addresses:\n    10.0.0.7: {service: legacy, namespace: shop}\n"
        "policy:\n  edges:\n    - {from: [legacy.shop, 'spiffe://cluster.local/ns/shop/sa/api'], to: [db.data]}\n"
    )
    x = load_explained(c)
    for source in ("spiffe://cluster.local/ns/shop/sa/api", "legacy.shop", "10.0.0.7", "10.0.0.7:5555"):
        e = explain(x, Request(source, "db.data"), NOW)
        assert e.answers[1].decision == "allow", source
    # the service alone is not its certificate, and a service without its namespace is not legacy.shop
    for source in ("api.shop", "legacy"):
        assert explain(x, Request(source, "db.data"), NOW).answers[1].decision == "alert", source
    spiffe = explain(x, Request("spiffe://cluster.local/ns/shop/sa/api", "db.data.svc.cluster.local"), NOW)
    assert (spiffe.source.key, spiffe.destination.key) == ("api.shop", "db.data")


@pytest.mark.parametrize(
    "argv",
    [
        ["--source", "a*", "--destination", "b"],
        ["--source", "a", "--destination", "b", "--protocol", "tcp", "--path", "/"],
        ["--source", "a", "--destination", "b", "--tls-version", "SSLv3"],
        ["--source", "a", "--destination", "b", "--source-address", "somewhere"],
    ],
)
def test_explain_refuses_a_request_it_cannot_build(
    conf: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    rc, out, err = run(capsys, "policy", "explain", "--config", str(conf), *argv)
    assert (rc, out) == (2, "") and err.startswith("meshaudit policy explain: ")


def test_an_invalid_configuration_exits_2_with_the_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.yaml").write_text("apiVersion: meshaudit/v1\nedges:\n  - {from: ['@nope'], to: [b]}\n")
    c = tmp_path / "c.yaml"
    c.write_text("rules:\n  error_burst:\n    min_ratoi: 1\npolicy_file: p.yaml\n")
    for argv in (
        ["rules", "--config", str(c)],
        ["policy", "explain", "-c", str(c), "--source", "a", "--destination", "b"],
    ):
        rc, out, err = run(capsys, *argv)
        assert (rc, out, err) == (2, "", f"{c}:3: unknown key 'rules.error_burst.min_ratoi'\n")
    c.write_text("policy_file: p.yaml\n")
    rc, out, err = run(capsys, "rules", "--config", str(c))
    assert (rc, out) == (2, "")
    assert err == f"{tmp_path / 'p.yaml'}:3: error P001 edges[0].from[0]: unknown list @nope (lists: none defined)\n"


# --- the explanation against the engine ----------------------------------------------------------
@pytest.mark.parametrize(
    "req",
    [
        Request("frontend.shop", "cart.shop", "GET", "/cart/1", tls_version="TLSv1.3"),
        Request("frontend.shop", "cart.shop", "DELETE", "/cart/1", tls_version="TLSv1.3"),
        Request("frontend.shop", "cart.shop", "GET", "/healthz", user_agent="kube-probe/1", tls_version="TLSv1.3"),
        Request("frontend.shop", "db.data", port=5432, tls_version="TLSv1.3"),
        Request("api.shop", "db.data", port=5432, tls_version="TLSv1.3"),
        Request("api.shop", "db.data", port=6379, tls_version="TLSv1.1"),
        Request("frontend.shop", "payments.pay", "GET", "/", tls_version="TLSv1.2"),
        Request("api.shop", "payments.pay", "GET", "/", tls_version="TLSv1.3"),  # the destination's severities
        Request("batch.shop", "cart.shop", "GET", "/cart/2", tls_version="plaintext"),
    ],
    ids=repr,
)
def test_what_explain_says_alerts_is_what_the_engine_alerts(conf: Path, req: Request) -> None:
    """The engine judging the same synthetic request raises exactly the alerts the explanation
    says would (rule and severity), and nothing the explanation says an exception covers."""
    conf.write_text(CONFIG.replace("    enabled: false\n", "    enabled: true\n    attribution_wait_ms: 0\n"))
    x = load_explained(conf)
    e = explain(x, req, NOW)
    expected = {
        (a.rule, (a.severity_when_served or a.severity).value if a.severity else None)
        for a in e.answers
        if a.decision == "alert" and a.exception is None
    }
    engine = build_engine(x.config, x.policy)
    hop = synthetic_hop(req, e.source, e.destination, NOW)
    alerts = engine.evaluate([hop], NOW) + engine.tick(NOW + 600)
    assert {(a.rule, a.severity) for a in alerts} == expected


# --- through the installed entry point ------------------------------------------------------------
def test_the_commands_through_the_installed_entry_point(conf: Path) -> None:
    rules = subprocess.run([MESHAUDIT, "rules", "--config", str(conf)], capture_output=True, text=True)
    assert rules.returncode == 0 and "window_secs              30         policy p.yaml:17 (override" in rules.stdout
    ex = subprocess.run(
        [MESHAUDIT, "policy", "explain", "--config", str(conf), "--source", "frontend.shop", "--destination",
         "db.data", "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert ex.returncode == 0, ex.stderr
    doc = json.loads(ex.stdout)
    edge = next(r for r in doc["rules"] if r["rule"] == "unexpected_edge")
    assert edge["decision"] == "alert" and edge["severity_when_served"]["value"] == "critical"
    assert edge["related"] == [
        {"what": "the source's edge from [frontend.shop] to [cart.shop, payments.*]",
         "at": {"file": str(conf.parent / "p.yaml"), "line": 5}},
    ]  # fmt: skip
    assert doc["verdict"].startswith("unexpected_edge would alert (high if denied, critical if served)")
