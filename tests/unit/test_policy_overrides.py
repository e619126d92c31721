"""The policy's rule settings: ``overrides`` for all traffic or for a destination, and ``tls``
(weak_tls). They stand over the configuration's ``rules.<name>``; a destination's override sets
what a rule reads when it judges that destination's traffic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from meshaudit.config import Config, ConfigError, Policy
from meshaudit.engine.core import Engine
from meshaudit.engine.setup import build_engine
from meshaudit.loading import load
from meshaudit.model import ALS_HTTP, INBOUND, Alert, Hop, identity
from test_engine import NODE_REVIEWS, T0
from test_rule_weak_tls import ONLY, hop

RATINGS = identity("ratings", "default")
REVIEWS = identity("reviews", "default")


def engine(policy: dict[str, Any], **rules: Any) -> Engine:
    cfg = Config.model_validate({"engine": {"suppress_secs": 60}, "rules": {**ONLY, **rules}})
    return build_engine(cfg, Policy.model_validate(policy))


def plain(dst: Any = REVIEWS, addr: str = "10.9.0.1:1") -> Hop:
    src = identity(None, None, None, None, addr)
    return Hop(
        ALS_HTTP, NODE_REVIEWS, dst, INBOUND, src, dst, T0, method="GET", path="/x", request_id=addr,
        upstream_cluster="inbound|9080||",
    )  # fmt: skip


def alerts(e: Engine, *hops: Hop) -> list[Alert]:
    return e.evaluate(list(hops), T0) + e.tick(T0 + 61)


def test_tls_in_the_policy_stands_over_the_rule_section() -> None:
    assert alerts(engine({}), hop("TLSv1.2", 0xC02F)) == []
    got = alerts(
        engine({"tls": {"min_version": "TLSv1.3"}}, weak_tls={"min_version": "TLSv1.2"}), hop("TLSv1.2", 0xC02F)
    )
    assert [a.rule for a in got] == ["weak_tls"] and "older than min_version TLSv1.3" in (got[0].detail or "")
    e = engine({"tls": {"allowed_ciphers": ["TLS_AES_256_GCM_SHA384"]}})
    assert [a.rule for a in alerts(e, hop("TLSv1.3", 0x1301))] == ["weak_tls"]


def test_an_override_for_all_traffic_and_one_for_a_destination() -> None:
    policy = {
        "overrides": [
            {"rule": "plaintext_hop", "severity": "warning"},
            {"rule": "plaintext_hop", "to": ["ratings.*"], "severity": "critical"},
        ]
    }
    e = engine(policy, plaintext_hop={"enabled": True, "attribution_wait_ms": 0, "severity": "high"})
    got = {a.destination.key: a.severity for a in alerts(e, plain(REVIEWS), plain(RATINGS, "10.9.0.2:1"))}
    assert got == {"reviews.default": "warning", "ratings.default": "critical"}


def test_a_destination_threshold_is_what_its_windows_are_judged_by() -> None:
    policy = {"overrides": [{"rule": "error_burst", "to": "ratings.default", "min_requests": 2, "min_ratio": 0.5}]}
    e = engine(policy, error_burst={"enabled": True})
    frontend = identity("frontend", "default")

    def failed(dst: Any, i: int) -> Hop:
        return Hop(
            ALS_HTTP, "sidecar~10.0.0.1~frontend-1.default~default.svc.cluster.local", frontend, 2, frontend, dst,
            T0, method="GET", path="/x", request_id=f"{dst.key}{i}", status=503, response_code_details="via_upstream",
            upstream_cluster=f"outbound|9080||{dst.service}.default.svc.cluster.local", attempts=1,
        )  # fmt: skip

    got = alerts(e, *(failed(d, i) for d in (REVIEWS, RATINGS) for i in range(3)))
    assert [a.destination.key for a in got if a.rule == "error_burst"] == ["ratings.default"]  # reviews: 3 < 20


@pytest.mark.parametrize(
    ("override", "code", "words"),
    [
        ("{rule: error_burst, min_ratoi: 0.1}", "P003", "error_burst has no option 'min_ratoi'"),
        ("{rule: error_burst, to: [a], window_secs: 5}", "P005", "'window_secs' is set for all traffic only"),
        ("{rule: weak_tls, min_version: SSLv3}", "P005", "Input should be"),
        ("{rule: nope, severity: high}", "P002", "unknown rule"),
    ],
)
def test_override_errors_name_the_line(tmp_path: Path, override: str, code: str, words: str) -> None:
    (tmp_path / "p.yaml").write_text(f"apiVersion: meshaudit/v1\noverrides:\n  - {override}\n")
    (tmp_path / "c.yaml").write_text("policy_file: p.yaml\n")
    with pytest.raises(ConfigError) as exc:
        load(tmp_path / "c.yaml")
    [line] = [x for x in str(exc.value).splitlines() if f" {code} " in x]
    assert line.startswith(f"{tmp_path / 'p.yaml'}:3: error {code} overrides[0]") and words in line, line


def test_a_tls_cipher_the_rule_does_not_know_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("apiVersion: meshaudit/v1\ntls:\n  allowed_ciphers: [NOT-A-CIPHER]\n")
    (tmp_path / "c.yaml").write_text("policy_file: p.yaml\n")
    with pytest.raises(ConfigError) as exc:
        load(tmp_path / "c.yaml")
    assert "p.yaml:3: error P005 tls.allowed_ciphers: unknown cipher" in str(exc.value), str(exc.value)


def test_a_tcp_edge_with_ports_allows_only_those_connections() -> None:
    """``{from: [api.*], to: [db.*], protocol: tcp, ports: [5432]}``: api's TCP connections to
    db's port 5432 are allowed; an HTTP request, or another port, is an unexpected edge."""
    api, db = identity("api", "default"), identity("db", "data")
    policy = {"edges": [{"from": ["api.*"], "to": ["db.*"], "protocol": "tcp", "ports": [5432]}]}
    e = engine(policy, unexpected_edge={"enabled": True, "denial_wait_ms": 0})

    def out(port: int, http: bool = False, rid: str = "c") -> Hop:
        return Hop(
            ALS_HTTP if http else 2, "sidecar~10.0.0.5~api-1.default~default.svc.cluster.local", api, 2, api, db, T0,
            method="GET" if http else None, path="/" if http else None, request_id=rid if http else None,
            conn=f"10.0.0.5:{port}{rid}", upstream_cluster=f"outbound|{port}||db.data.svc.cluster.local",
        )  # fmt: skip

    assert alerts(e, out(5432)) == []
    assert [a.rule for a in alerts(engine(policy, unexpected_edge={"enabled": True}), out(6379))] == ["unexpected_edge"]
    assert [a.rule for a in alerts(engine(policy, unexpected_edge={"enabled": True}), out(5432, http=True))] == [
        "unexpected_edge"
    ]


def test_overrides_and_tls_of_every_policy_file_are_merged(tmp_path: Path) -> None:
    """Several files: overrides add up in file order; tls takes each key from the last file that
    sets it (before, a second file made the first one's overrides and tls vanish)."""
    (tmp_path / "a.yaml").write_text(
        "apiVersion: meshaudit/v1\ntls: {min_version: TLSv1.3, allowed_ciphers: [TLS_AES_128_GCM_SHA256]}\n"
        "overrides:\n  - {rule: error_burst, window_secs: 30}\n"
    )
    (tmp_path / "b.yaml").write_text(
        "apiVersion: meshaudit/v1\ntls: {min_version: TLSv1.2}\n"
        "overrides:\n  - {rule: error_burst, to: [ratings.*], min_ratio: 0.1}\n"
    )
    (tmp_path / "c.yaml").write_text("policy_files: [a.yaml, b.yaml]\n")
    _, policy = load(tmp_path / "c.yaml")
    assert [(o.rule, o.to, o.options()) for o in policy.overrides] == [
        ("error_burst", None, {"window_secs": 30}),
        ("error_burst", ["ratings.*"], {"min_ratio": 0.1}),
    ]
    assert policy.tls is not None
    assert (policy.tls.min_version, policy.tls.allowed_ciphers) == ("TLSv1.2", ["TLS_AES_128_GCM_SHA256"])
