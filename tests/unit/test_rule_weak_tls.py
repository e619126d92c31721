"""weak_tls on a fake clock: inbound hops in, alerts out. What a mesh negotiates (TLS 1.3 with
TLS_AES_128_GCM_SHA256, TLS 1.2 ECDHE AEAD) is silent; CBC, old versions and legacy suites alert,
naming the suite; plaintext is left to plaintext_hop; configuration names are checked."""

from __future__ import annotations

from typing import Any

import pytest
from meshaudit.config import Config, ConfigError, Policy
from meshaudit.engine.core import Engine
from meshaudit.engine.setup import build_engine
from meshaudit.loading import load
from meshaudit.model import ALS_HTTP, ALS_TCP, INBOUND, OTEL_LOG, OUTBOUND, Alert, Hop, identity

T0 = 1_800_000_000.0
REVIEWS = identity("reviews", "default")
FRONTEND = identity("frontend", "default")
FRONTEND_SA = identity("frontend", "default", None, "spiffe://cluster.local/ns/default/sa/frontend")
ADDR = identity(None, None, None, None, "10.0.0.9")
NODE = "sidecar~10.0.0.2~reviews-v1-1.default~default.svc.cluster.local"

# only weak_tls: the other rules' alerts are not this file's business
ONLY = {r: {"enabled": False} for r in ("plaintext_hop", "unexpected_edge", "unexpected_path", "missing_access_log")}


def engine(policy: Policy | None = None, **weak: Any) -> Engine:
    cfg = Config.model_validate({"engine": {"suppress_secs": 60}, "rules": {**ONLY, "weak_tls": weak}})
    return build_engine(cfg, policy or Policy())


def hop(
    tls: str | None = "TLSv1.3",
    cipher: int | None = 0x1301,
    src: Any = FRONTEND_SA,
    rid: str = "r1",
    origin: int = ALS_HTTP,
    direction: int = INBOUND,
) -> Hop:
    return Hop(
        origin,
        NODE,
        REVIEWS,
        direction,
        src,
        REVIEWS,
        T0,
        tls_version=tls,
        tls_cipher=cipher,
        peer_principal=src.principal,
        method=None if origin == ALS_TCP else "GET",
        path=None if origin == ALS_TCP else "/reviews/1",
        request_id=rid,
        upstream_cluster="inbound|9080||",
    )


def alerts(e: Engine, *hops: Hop) -> list[Alert]:
    return e.evaluate(list(hops), T0) + e.tick(T0 + 61)


def test_what_istio_negotiates_raises_nothing() -> None:
    e = engine()
    assert alerts(e, hop("TLSv1.3", 0x1301), hop("TLSv1.3", 0x1302, rid="r2"), hop("TLSv1.3", 0x1303, rid="r3")) == []


def test_tls12_ecdhe_aead_raises_nothing() -> None:
    e = engine()
    ok = [hop("TLSv1.2", c, rid=f"r{c}") for c in (0xC02F, 0xC030, 0xC02B, 0xC02C, 0xCCA8, 0xCCA9)]
    assert alerts(e, *ok) == []


def test_tls12_cbc_alerts_naming_the_suite() -> None:
    got = alerts(engine(), hop("TLSv1.2", 0xC013))
    assert [a.rule for a in got] == ["weak_tls"]
    a = got[0]
    assert a.severity == "high" and a.source is FRONTEND_SA and a.destination is REVIEWS
    assert "ECDHE-RSA-AES128-SHA (TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA, 0xC013)" in (a.detail or "")
    assert "not in allowed_ciphers" in (a.detail or "")


def test_old_version_alerts_whatever_the_cipher() -> None:
    got = alerts(engine(), hop("TLSv1.1", 0xC02F))
    assert [a.rule for a in got] == ["weak_tls"]
    assert "TLSv1.1 is older than min_version TLSv1.2" in (got[0].detail or "")


def test_legacy_suites_alert() -> None:
    for code, name in ((0x000A, "DES-CBC3-SHA"), (0x0005, "RC4-SHA"), (0x0002, "NULL-SHA")):
        got = alerts(engine(), hop("TLSv1.2", code))
        assert [a.rule for a in got] == ["weak_tls"] and f"with {name} (" in (got[0].detail or "")


def test_plaintext_and_outbound_hops_are_not_this_rules_job() -> None:
    e = engine()
    assert alerts(e, hop(None, None, src=ADDR), hop("TLSv1", 0x0004, direction=OUTBOUND, rid="o")) == []


def test_tcp_and_otlp_log_hops_are_judged_too() -> None:
    got = alerts(engine(), hop("TLSv1.2", 0x002F, origin=ALS_TCP))
    assert [a.rule for a in got] == ["weak_tls"] and "TCP connection" in (got[0].detail or "")
    # an OTLP log's cipher comes from its attributes: a TLS 1.3 suite outside the allowed set alerts
    got = alerts(engine(allowed_ciphers=["TLS_AES_256_GCM_SHA384"]), hop("TLSv1.3", 0x1301, origin=OTEL_LOG))
    assert [a.rule for a in got] == ["weak_tls"]


def test_tls13_cipher_outside_a_narrowed_allow_list_alerts() -> None:
    e = engine(allowed_ciphers=["TLS_AES_256_GCM_SHA384", "0xC030"])
    got = alerts(e, hop("TLSv1.3", 0x1301), hop("TLSv1.2", 0xC030, rid="r2"))
    assert len(got) == 1 and "TLS_AES_128_GCM_SHA256 (0x1301)" in (got[0].detail or "")


def test_cipher_not_logged_is_not_judged() -> None:
    assert alerts(engine(), hop("TLSv1.2", None), hop("unknown", None, rid="r2")) == []


def test_min_version_13_alerts_on_12() -> None:
    got = alerts(engine(min_version="TLSv1.3"), hop("TLSv1.2", 0xC02F))
    assert [a.rule for a in got] == ["weak_tls"]


def test_source_without_client_certificate_is_named_by_the_client_entry() -> None:
    e = engine()
    out = Hop(ALS_HTTP, "n", FRONTEND, OUTBOUND, FRONTEND, REVIEWS, T0, method="GET", request_id="q")
    got = e.evaluate([out, hop("TLSv1.2", 0xC013, src=ADDR, rid="q")], T0)
    assert [a.source for a in got] == [FRONTEND]


def test_exemption() -> None:
    policy = Policy.model_validate({"exemptions": [{"rules": ["weak_tls"], "from": ["frontend.default"]}]})
    assert alerts(engine(policy), hop("TLSv1", 0x000A)) == []


def test_config_accepts_names_and_codes_and_names_the_key_of_an_unknown_one(tmp_path: Any) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "rules:\n  weak_tls:\n    allowed_ciphers:\n"
        "      - ECDHE-ECDSA-AES128-GCM-SHA256\n      - TLS_AES_128_GCM_SHA256\n      - 0xC030\n      - 49199\n"
    )
    cfg, _ = load(f)
    assert cfg.rules.weak_tls.allowed_ciphers == frozenset({0xC02B, 0x1301, 0xC030, 0xC02F})
    f.write_text("rules:\n  weak_tls:\n    allowed_ciphers: [ECDHE-RSA-AES128-GCM-SHA256, AES-999-FAKE]\n")
    with pytest.raises(ConfigError) as exc:
        load(f)
    assert "rules.weak_tls.allowed_ciphers" in str(exc.value) and "AES-999-FAKE" in str(exc.value)
    assert f"{f}:3" in str(exc.value)
    f.write_text("rules:\n  weak_tls:\n    min_version: TLSv1.4\n")
    with pytest.raises(ConfigError, match=r"rules\.weak_tls\.min_version"):
        load(f)
