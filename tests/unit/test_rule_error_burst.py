"""error_burst on a fake clock: hops in, alerts out. The share of an edge's requests that failed
upstream, per window, each request once with its final outcome at the source sidecar; the traps:
a 503 a retry fixed, a few 503s among many retried requests, 404s, RBAC denials and the mesh's
other refusals, both sidecars' entries, too few requests."""

from __future__ import annotations

from typing import Any

from meshaudit.config import Config, Policy
from meshaudit.engine.core import Engine
from meshaudit.engine.outcome import failed
from meshaudit.engine.rules.error_burst import ErrorBurst
from meshaudit.engine.setup import build_engine
from meshaudit.model import ALS_HTTP, INBOUND, OTEL_LOG, OUTBOUND, Alert, Hop, identity
from test_engine import FRONTEND, FRONTEND_SA, NODE_FRONTEND, NODE_REVIEWS, RATINGS, REVIEWS, T0

RULE = "error_burst"
RESET = "upstream_reset_before_response_started{connection_failure}"


def engine(policy: Policy | None = None, **opts: Any) -> Engine:
    cfg = Config.model_validate(
        {"engine": {"suppress_secs": 300, "store_max_items": 1000}, "rules": {RULE: {"window_secs": 60, **opts}}}
    )
    return build_engine(cfg, policy or Policy())


def out(
    rid: str,
    status: int = 200,
    details: str = "via_upstream",
    flags: str = "",
    attempts: int = 1,
    dst: Any = REVIEWS,
    **kw: Any,
) -> Hop:
    """The source (frontend) sidecar's entry: one per request, its final outcome."""
    return Hop(
        ALS_HTTP,
        NODE_FRONTEND,
        FRONTEND,
        OUTBOUND,
        FRONTEND,
        dst,
        kw.pop("start", T0),
        method="GET",
        path=kw.pop("path", "/reviews/1"),
        status=status,
        attempts=attempts,
        response_flags=flags,
        response_code_details=details,
        request_id=rid,
        upstream_cluster=kw.pop("cluster", f"outbound|9080||{dst.service}.default.svc.cluster.local"),
        **kw,
    )


def inb(rid: str, status: int = 200, details: str = "via_upstream", src: Any = FRONTEND_SA, **kw: Any) -> Hop:
    """The destination (reviews) sidecar's entry; mTLS from frontend's sidecar unless ``src`` is
    an address (a client without a sidecar: plaintext)."""
    mtls = src.principal is not None
    return Hop(
        ALS_HTTP,
        NODE_REVIEWS,
        REVIEWS,
        INBOUND,
        src,
        REVIEWS,
        T0,
        tls_version="TLSv1.3" if mtls else None,
        peer_principal=src.principal,
        method="GET",
        path="/reviews/1",
        status=status,
        attempts=1,
        response_code_details=details,
        request_id=rid,
        upstream_cluster="inbound|9080||",
        **kw,
    )


def mine(alerts: list[Alert]) -> list[Alert]:
    return [a for a in alerts if a.rule == RULE]


def test_a_burst_of_upstream_5xx_alerts_once_with_the_evidence() -> None:
    e = engine()
    hops = [out(f"r{i}", status=503 if i % 4 else 200, start=T0 + i) for i in range(40)]  # 30 of 40 fail
    assert e.evaluate(hops, T0) == []
    got = e.tick(T0 + 0.2)
    assert [a.rule for a in got] == [RULE]
    a = got[0].to_json()
    assert a["severity"] == "warning"
    assert a["source"]["service"] == "frontend" and a["destination"]["service"] == "reviews"
    assert a["summary"] == "A burst of failed requests from frontend.default to reviews.default."
    ev = a["evidence"]
    assert ev["detail"] == (
        "30 of 40 requests failed (75%) in a 60 s window: 5xx from the upstream or upstream failure flags"
    )
    assert [x["request_id"] for x in ev["examples"]] == ["r1", "r2", "r3"]  # failed requests
    assert ev["first_seen"] == "2027-01-15T08:00:01.000Z"
    e.evaluate([out(f"s{i}", status=500) for i in range(50)], T0 + 1)
    assert e.tick(T0 + 2) == [] and e.tick(T0 + 61) == []  # one violation per window
    assert e.agg.violations == {RULE: 1}


def test_upstream_failure_flags_count_whatever_the_details() -> None:
    e = engine()
    flags = ["UF", "UH", "UO", "UT", "UC", "UR", "URX", "UF,URX"]
    hops = [out(f"f{i}", status=503, details=RESET, flags=flags[i % len(flags)]) for i in range(16)]
    hops += [out(f"ok{i}") for i in range(4)]
    e.evaluate(hops, T0)
    got = mine(e.tick(T0 + 1))
    assert len(got) == 1 and got[0].detail is not None and got[0].detail.startswith("16 of 20 requests failed (80%)")


def test_too_few_requests_raise_nothing_even_if_all_failed() -> None:
    e = engine()
    e.evaluate([out(f"r{i}", status=503) for i in range(19)], T0)
    assert e.tick(T0 + 1) == [] and e.tick(T0 + 61) == []


def test_a_503_that_a_retry_fixed_is_not_a_failure() -> None:
    e = engine()
    # 30 requests; each first attempt got a 503 from reviews, the retry a 200. Reviews' sidecar
    # logs both attempts; frontend's sidecar logs the request once: 200, 2 attempts.
    hops: list[Hop] = []
    for i in range(30):
        hops += [inb(f"r{i}", 503), inb(f"r{i}", 200), out(f"r{i}", 200, attempts=2)]
    e.evaluate(hops, T0)
    assert mine(e.tick(T0 + 1)) == [] and mine(e.tick(T0 + 61)) == []


def test_a_few_final_503s_among_many_retried_requests_raise_nothing() -> None:
    e = engine()
    hops = [out(f"ok{i}", 200, attempts=2) for i in range(40)]
    hops += [out(f"bad{i}", 503, attempts=3, flags="URX") for i in range(10)]  # 10 of 50: 20 %
    e.evaluate(hops, T0)
    assert mine(e.tick(T0 + 1)) == [] and mine(e.tick(T0 + 61)) == []


def test_4xx_rbac_denials_and_the_meshs_own_refusals_are_not_failures() -> None:
    e = engine()
    refusals = [
        dict(status=404, details="via_upstream"),  # the app's 404s
        dict(status=403, details="rbac_access_denied_matched_policy[none]"),  # AuthorizationPolicy
        dict(status=403, details="ext_authz_denied", flags="UAEX"),
        dict(status=404, details="route_not_found", flags="NR"),
        dict(status=503, details="cluster_not_found", flags="NC"),
        dict(status=503, details="direct_response"),
        dict(status=502, details="direct_response", cluster="BlackHoleCluster"),
        dict(status=0, details="downstream_remote_disconnect", flags="DC"),
        dict(status=429, details="via_upstream"),
    ]
    for i, r in enumerate(refusals):
        e.evaluate([out(f"x{i}-{n}", **r) for n in range(30)], T0)  # type: ignore[arg-type]
    assert mine(e.tick(T0 + 1)) == [] and mine(e.tick(T0 + 61)) == []
    # The same requests at the destination sidecar (RBAC denies there) count nowhere either.
    e.evaluate([inb(f"d{n}", 403, "rbac_access_denied_matched_policy[none]") for n in range(30)], T0 + 62)
    assert mine(e.tick(T0 + 63)) == [] and mine(e.tick(T0 + 125)) == []


def test_both_sidecars_entries_of_a_request_count_once() -> None:
    e = engine()
    hops: list[Hop] = []
    for i in range(20):
        hops += [inb(f"r{i}", 503), out(f"r{i}", 503)]
    for i in range(20):
        hops += [inb(f"s{i}", 200), out(f"s{i}", 200)]
    e.evaluate(hops, T0)
    got = mine(e.tick(T0 + 1))
    assert len(got) == 1 and got[0].detail is not None and got[0].detail.startswith("20 of 40 requests failed (50%)")


def test_a_source_without_a_sidecar_is_counted_at_the_destination_once_per_request() -> None:
    e = engine()
    kubelet = identity(None, None, None, None, "10.0.0.9")
    # Plaintext from an address, no client entry: the inbound entries count, once per request id
    # (a request logged twice at the destination is one request with its first outcome).
    hops = [inb(f"r{i}", 503 if i < 15 else 200, src=kubelet) for i in range(20)]
    hops += [inb(f"r{i}", 503, src=kubelet) for i in range(15, 20)]
    e.evaluate(hops, T0)
    got = mine(e.tick(T0 + 1))
    assert len(got) == 1
    assert got[0].source is kubelet and got[0].destination is REVIEWS
    assert got[0].detail is not None and got[0].detail.startswith("15 of 20 requests failed (75%)")


def test_a_plaintext_entry_whose_client_sidecar_logged_it_counts_at_the_client() -> None:
    e = engine()
    addr = identity(None, None, None, None, "10.0.0.1")
    hops: list[Hop] = []
    for i in range(20):
        hops += [out(f"r{i}", 503), inb(f"r{i}", 503, src=addr)]
    e.evaluate(hops, T0)
    got = mine(e.tick(T0 + 1))
    assert [(a.source, a.destination) for a in got] == [(FRONTEND, REVIEWS)]
    assert got[0].detail is not None and got[0].detail.startswith("20 of 20")


def test_the_ratio_is_per_edge_and_per_window() -> None:
    e = engine()
    # reviews fails half of 40, ratings none of 40: one alert, for reviews.
    e.evaluate([out(f"a{i}", 503 if i % 2 else 200) for i in range(40)], T0)
    e.evaluate([out(f"b{i}", dst=RATINGS) for i in range(40)], T0)
    assert [a.destination for a in mine(e.tick(T0 + 1))] == [REVIEWS]
    # Next windows: 10 failures of 40 in each; no alert.
    e.evaluate([out(f"c{i}", 503 if i < 10 else 200, start=T0 + 61) for i in range(40)], T0 + 61)
    assert mine(e.tick(T0 + 62)) == [] and mine(e.tick(T0 + 125)) == []


def test_an_early_burst_is_judged_on_the_tick_the_later_successes_do_not_undo_it() -> None:
    e = engine()
    e.evaluate([out(f"a{i}", 503) for i in range(20)], T0)
    assert [a.rule for a in e.tick(T0 + 1)] == [RULE]
    e.evaluate([out(f"b{i}") for i in range(500)], T0 + 2)
    assert e.tick(T0 + 3) == [] and e.tick(T0 + 61) == []


def test_exemptions_apply() -> None:
    policy = Policy.model_validate(
        {
            "exemptions": [
                {"rules": [RULE], "to": ["ratings.default"], "reason": "chaos testing"},
                {"rules": [RULE], "paths": ["/healthz"], "reason": "probes"},
            ]
        }
    )
    e = engine(policy)
    e.evaluate([out(f"a{i}", 503, dst=RATINGS) for i in range(30)], T0)
    e.evaluate([out(f"b{i}", 503, path="/healthz") for i in range(30)], T0)
    assert e.tick(T0 + 1) == [] and e.tick(T0 + 61) == []


def test_opentelemetry_access_logs_without_details_or_flags() -> None:
    def otel(i: int, status: int, flags: str) -> Hop:
        return Hop(
            OTEL_LOG, NODE_FRONTEND, FRONTEND, OUTBOUND, FRONTEND, REVIEWS, T0, method="GET", path="/",
            status=status, response_flags=flags, request_id=f"o{i}",
        )  # fmt: skip

    assert failed(otel(0, 503, "-")) and failed(otel(0, 503, "UF")) and not failed(otel(0, 200, "-"))
    assert not failed(otel(0, 503, "NC")) and not failed(otel(0, 0, "-"))
    e = engine()
    e.evaluate([otel(i, 503 if i < 10 else 200, "-") for i in range(20)], T0)
    assert [a.rule for a in e.tick(T0 + 1)] == [RULE]


def test_the_rule_is_registered_with_its_options() -> None:
    cfg = Config().rules.error_burst
    assert (cfg.enabled, cfg.severity, cfg.window_secs, cfg.min_ratio, cfg.min_requests) == (
        True,
        "warning",
        60,
        0.5,
        20,
    )
    assert ErrorBurst.name == RULE
