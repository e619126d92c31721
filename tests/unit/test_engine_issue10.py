"""Issue 10 ("An auditor that cannot be silenced"), the engine's part, on a fake clock: hops in,
alerts out. Alert ids unique per window (4), one alert per unnamed client IP and a global alert
budget (9), a sparse tracer judged (12), a sidecar silent under steady traffic reported (13), one
party one identity across an intern-table reset (14), and timestamps that never raise."""

from __future__ import annotations

from typing import Any

import pytest
from meshaudit import model
from meshaudit.config import Config, MeshConfig, Policy
from meshaudit.engine.core import Engine
from meshaudit.model import (
    ALS_HTTP,
    INBOUND,
    SPAN,
    SPAN_KIND_CLIENT,
    SPAN_KIND_SERVER,
    Hop,
    Identity,
    identity,
)
from meshaudit.naming import Namer

T0 = 1_800_000_000.0
REVIEWS = identity("reviews", "default")
NODE_REVIEWS = "sidecar~10.0.0.2~reviews-v1-1.default~default.svc.cluster.local"
POLICY = Policy.model_validate({"edges": [{"from": ["*"], "to": ["*"]}]})


def engine(policy: Policy = POLICY, engine_cfg: dict[str, Any] | None = None, **rules: Any) -> Engine:
    cfg = Config.model_validate(
        {
            "engine": {"suppress_secs": 60, "store_max_items": 10_000, **(engine_cfg or {})},
            "rules": {"missing_access_log": {"grace_ms": 2000, "silent_secs": 10}, **rules},
        }
    )
    return Engine(cfg, policy)


def plaintext(src: Identity, start: float, rid: str, dst: Identity = REVIEWS, conn: str | None = None) -> Hop:
    """An inbound entry at ``dst``'s sidecar without TLS."""
    return Hop(
        ALS_HTTP,
        NODE_REVIEWS,
        dst,
        INBOUND,
        src,
        dst,
        start,
        method="GET",
        path="/reviews/1",
        request_id=rid,
        upstream_cluster="inbound|9080||",
        conn=conn,
    )


def logged(start: float, rid: str, trace: str | None = None) -> Hop:
    """reviews' sidecar logs a request over mTLS."""
    peer = identity("frontend", "default", None, "spiffe://cluster.local/ns/default/sa/frontend")
    return Hop(
        ALS_HTTP,
        NODE_REVIEWS,
        REVIEWS,
        INBOUND,
        peer,
        REVIEWS,
        start,
        tls_version="TLSv1.3",
        method="GET",
        path="/reviews/1",
        request_id=rid,
        trace_id=trace,
        upstream_cluster="inbound|9080||",
    )


def app_span(trace: str, start: float, service: Identity = REVIEWS, parent: str | None = None) -> Hop:
    """reviews' application (OpenTelemetry SDK) traced a request it served."""
    return Hop(
        SPAN,
        "span:" + service.key,
        service,
        INBOUND,
        identity(),
        service,
        start,
        method="GET",
        path="/reviews/1",
        trace_id=trace,
        parent_span_id=parent,
        span_kind=SPAN_KIND_SERVER,
    )


# --- 14: one party, one identity, across an intern-table reset -------------------------------------
def test_identities_are_equal_by_value_across_an_intern_table_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    before = identity("reviews", "default")
    monkeypatch.setattr(model, "_IDENTITY_LIMIT", len(model._IDENTITIES) + 5)
    namer = Namer(MeshConfig())
    for i in range(10):  # addresses from the wire fill the table: it is cleared
        namer.address(f"10.9.{i}.1:5000")
    after = identity("reviews", "default")
    assert after is not before  # two objects for one party...
    assert after == before and hash(after) == hash(before) and (after != before) is False  # ...equal
    assert {before: 1}[after] == 1
    assert after != identity("reviews", "prod") and after != "reviews.default"


def test_bypass_source_is_not_the_destination_itself_across_an_intern_table_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """reviews' app made the CLIENT span that is the parent of the SERVER span on reviews (a call
    to itself that skipped its sidecar): the source must not be named reviews -> reviews, even
    when the client span's identity was interned before the table was cleared."""
    e = engine(unexpected_path={"enabled": False})
    e.evaluate([logged(T0, "seen")], T0)
    client = Hop(
        SPAN,
        "span:reviews.default",
        REVIEWS,
        INBOUND,
        REVIEWS,
        identity(),
        T0 + 1,
        span_id="1" * 16,
        trace_id="ab" * 16,
        span_kind=SPAN_KIND_CLIENT,
    )
    e.evaluate([client], T0 + 1)
    monkeypatch.setattr(model, "_IDENTITY_LIMIT", len(model._IDENTITIES) + 5)
    namer = Namer(MeshConfig())
    for i in range(10):
        namer.address(f"10.8.{i}.1:5000")
    fresh = identity("reviews", "default")  # what a decoder names reviews by now
    assert fresh is not REVIEWS
    e.evaluate([app_span("ab" * 16, T0 + 1, service=fresh, parent="1" * 16)], T0 + 1.2)
    got = e.tick(T0 + 3.5)
    assert [a.rule for a in got] == ["missing_access_log"]
    assert got[0].destination == REVIEWS and got[0].source.key == "unknown"
