"""Who may send telemetry for whom (meshaudit.engine.sources), the sender's identity from a
trusted sidecar's x-forwarded-client-cert, the TLS settings' checks, and log_source_mismatch's
alert from the receivers' claims (on a fake clock)."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest
from infra.certs import CA
from meshaudit.config import Config, MeshConfig, Policy, ReceiversConfig, SourceRule
from meshaudit.engine.setup import build_engine
from meshaudit.engine.sources import Claim, SourceRules, claimed_by_node, claimed_by_resource
from meshaudit.receivers.auth import handshake_reason, is_loopback, warn_plaintext, xfcc_sender
from pydantic import ValidationError

MESH = MeshConfig()
FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"
COLLECTOR = "spiffe://cluster.local/ns/observability/sa/otel-collector"
REVIEWS_NODE = "sidecar~10.0.0.2~reviews-v1-5d8f7c9b6-x2kq4.default~default.svc.cluster.local"
FRONTEND_NODE = "sidecar~10.0.0.1~frontend-v1-5d8f7c9b6-x2kq4.default~default.svc.cluster.local"


def rules(*sources: SourceRule) -> SourceRules:
    return SourceRules(list(sources))


def test_a_workload_speaks_for_its_own_node_and_resource() -> None:
    r = rules()
    assert r.mismatch(FRONTEND, claimed_by_node(FRONTEND_NODE, "frontend.default", {}), MESH) is None
    meta = {"NAMESPACE": "default", "SERVICE_ACCOUNT": "frontend"}
    assert r.mismatch(FRONTEND, claimed_by_node(FRONTEND_NODE, "frontend.default", meta), MESH) is None
    # Envoy's tracer names its service "<svc>.<ns>"; an SDK sets service.name and a namespace.
    assert r.mismatch(FRONTEND, claimed_by_resource("frontend.default", None, None), MESH) is None
    assert r.mismatch(FRONTEND, claimed_by_resource("frontend", "default", "default"), MESH) is None
    assert r.mismatch(FRONTEND, claimed_by_resource(None, None, None), MESH) is None  # claims nothing


def test_another_workloads_node_namespace_or_account_is_a_mismatch() -> None:
    r = rules()
    why = r.mismatch(FRONTEND, claimed_by_node(REVIEWS_NODE, "reviews.default", {}), MESH)
    assert why == "the workload is not the sender's service account and no sources entry allows it"
    meta = {"NAMESPACE": "default", "SERVICE_ACCOUNT": "reviews"}
    assert r.mismatch(FRONTEND, claimed_by_node(FRONTEND_NODE, "frontend.default", meta), MESH) is not None
    why = r.mismatch(FRONTEND, claimed_by_resource("frontend", "payments", None), MESH)
    assert why == "namespace payments is not the sender's (default) and no sources entry allows it"
    other_domain = "spiffe://evil.example/ns/default/sa/frontend"
    why = r.mismatch(other_domain, claimed_by_node(FRONTEND_NODE, "frontend.default", {}), MESH)
    assert why == f"{other_domain} is not a workload identity of trust domain cluster.local"


def test_sources_lets_a_collector_speak_for_its_namespaces_only() -> None:
    r = rules(SourceRule(identities=["spiffe://cluster.local/ns/observability/sa/*"], namespaces=["shop", "team-*"]))
    assert r.mismatch(COLLECTOR, claimed_by_resource("cart", "shop", None), MESH) is None
    assert r.mismatch(COLLECTOR, claimed_by_resource("api", None, "team-a"), MESH) is None
    assert r.mismatch(COLLECTOR, claimed_by_resource("ledger", "payments", None), MESH) is not None
    # a workload of its own namespace and account, without sources
    assert rules().mismatch(COLLECTOR, claimed_by_resource("otel-collector", "observability", None), MESH) is None


def test_claimed_node_reads_the_node_id_metadata_and_cluster() -> None:
    c = claimed_by_node(REVIEWS_NODE, "reviews.default", {"SERVICE_ACCOUNT": "reviews-sa"})
    assert c.key == ("default", "reviews-sa", "reviews")
    assert c.text == f"node {REVIEWS_NODE} (cluster reviews.default, service account reviews-sa)"
    assert claimed_by_node("plain-envoy", "api.team", {}).key == ("team", None, "api")


def test_xfcc_is_trusted_from_loopback_only_and_names_the_nearest_proxys_element() -> None:
    value = 'By=spiffe://cluster.local/ns/x/sa/gw;URI=spiffe://cluster.local/ns/x/sa/outer,By=spiffe://cluster.local/ns/meshaudit/sa/meshaudit;Hash=ab;Subject="O=a,CN=b";URI=spiffe://cluster.local/ns/default/sa/frontend'
    s = xfcc_sender(value, "127.0.0.6", "ipv4:127.0.0.6:4000")
    assert s is not None and (s.principal, s.via) == (FRONTEND, "xfcc")
    assert xfcc_sender(value, "10.0.0.9", "ipv4:10.0.0.9:4000") is None
    assert xfcc_sender("By=a;Hash=b", "127.0.0.1", "") is None
    assert [is_loopback(h) for h in ("127.0.0.6", "::1", "[::1]", "10.1.1.1", "", "localhost")] == [
        True, True, True, False, False, True,
    ]  # fmt: skip


def test_handshake_refusals_are_named_by_what_went_wrong() -> None:
    expired = ssl.SSLCertVerificationError("certificate verify failed")
    expired.verify_code = 10
    other = ssl.SSLCertVerificationError("certificate verify failed")
    other.verify_code = 20
    none = ssl.SSLError(1, "peer did not return a certificate")
    none.reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    plain = ssl.SSLError(1, "http request")
    plain.reason = "HTTP_REQUEST"
    got = [handshake_reason(e) for e in (expired, other, none, plain, ConnectionAbortedError("timeout"))]
    assert got == [
        "expired_certificate", "untrusted_certificate", "no_client_certificate", "tls_handshake_failed",
        "tls_handshake_failed",
    ]  # fmt: skip


def test_plaintext_beyond_loopback_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "meshaudit.receivers.tls"):
        warn_plaintext({"gRPC": "127.0.0.1:4317", "OTLP/HTTP": "0.0.0.0:4318"}, ReceiversConfig())
    assert [r.getMessage() for r in caplog.records] == [
        "The OTLP/HTTP receiver listens on 0.0.0.0:4318 without TLS: anyone who reaches it can read what is sent "
        "and send telemetry as any workload. Set receivers.tls (README, Security)."
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, "meshaudit.receivers.tls"):
        warn_plaintext({"gRPC": "0.0.0.0:4317"}, ReceiversConfig(trust_forwarded_client_cert=True))
    assert "trusts x-forwarded-client-cert from loopback" in caplog.records[0].getMessage()


def test_tls_settings_are_checked_at_load(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    server = ca.server()
    ok: dict[str, str | None] = {
        "cert_file": str(server.cert),
        "key_file": str(server.key),
        "client_ca_file": str(ca.cert_path),
    }
    assert ReceiversConfig.model_validate({"tls": ok}).tls is not None

    def error(tls: dict[str, str | None], **more: object) -> str:
        with pytest.raises(ValidationError) as exc:
            ReceiversConfig.model_validate({"tls": tls, **more})
        return str(exc.value)

    assert f"cannot read '{tmp_path}/nope.pem': No such file or directory" in error(
        {**ok, "cert_file": str(tmp_path / "nope.pem")}
    )
    assert "client_auth require needs client_ca_file" in error({k: v for k, v in ok.items() if k != "client_ca_file"})
    other = ca.server("other")
    assert "do not load as a pair" in error({**ok, "key_file": str(other.key)})
    (tmp_path / "c.yaml").write_text("not a certificate")
    assert "is not a PEM file" in error({**ok, "client_ca_file": str(tmp_path / "c.yaml")})
    assert "enforce_sources needs authenticated senders" in error(
        {**ok, "client_auth": "none", "client_ca_file": None}, enforce_sources=True
    )


def test_log_source_mismatch_alert_from_a_claim() -> None:
    e = build_engine(Config.model_validate({"engine": {"suppress_secs": 60}}), Policy())
    claimed = claimed_by_node(REVIEWS_NODE, "reviews.default", {})
    claim = Claim(
        FRONTEND, "mtls", claimed, "the workload is not the sender's service account", "envoy_als", 4, False, 1000.0
    )
    [a] = e.claims([claim], 1000.5)
    assert a.to_json() | {"id": "-", "emitted_at": "-"} == {
        "schema": "meshaudit.alert.v1",
        "id": "-",
        "rule": "log_source_mismatch",
        "severity": "critical",
        "summary": "frontend.default sent telemetry claiming to be reviews.default, which it may not speak for.",
        "source": {
            "service": "frontend",
            "namespace": "default",
            "workload": None,
            "principal": FRONTEND,
            "address": None,
        },
        "destination": {
            "service": "reviews",
            "namespace": "default",
            "workload": None,
            "principal": None,
            "address": None,
        },
        "evidence": a.to_json()["evidence"],
        "emitted_at": "-",
    }
    ev = a.to_json()["evidence"]
    assert ev["count"] == 1
    assert ev["detail"] == (
        f"envoy_als data from {FRONTEND} (client certificate) claimed node {REVIEWS_NODE} (cluster reviews.default): "
        "the workload is not the sender's service account; 4 entries evaluated"
    )
    # A second claim of the same sender and workload is counted, not alerted again.
    assert e.claims([claim], 1001.0) == []
