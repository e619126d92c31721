"""plaintext_hop with Istio's peer metadata: an inbound plaintext entry that carries
``downstream_peer`` is named by it at once, without waiting for the client sidecar's entry."""

from __future__ import annotations

from meshaudit.config import Config, Policy
from meshaudit.engine.setup import build_engine
from meshaudit.model import ALS_HTTP, INBOUND, Hop, identity

T0 = 1_800_000_000.0
REVIEWS = identity("reviews", "default", "reviews-v1-1")


def test_plaintext_hop_is_named_by_downstream_peer_at_once() -> None:
    e = build_engine(Config.model_validate({"engine": {"suppress_secs": 60}}), Policy())
    real = identity("ratings", "default", "ratings")
    h = Hop(
        ALS_HTTP,
        "sidecar~10.0.0.2~reviews-v1-1.default~default.svc.cluster.local",
        REVIEWS,
        INBOUND,
        identity(None, None, None, None, "10.0.0.9"),
        REVIEWS,
        T0,
        method="GET",
        path="/reviews/1",
        request_id="pt",
        downstream_peer=real,
    )
    got = e.evaluate([h], T0)
    assert [(a.rule, a.source) for a in got] == [("plaintext_hop", real)]


def test_without_peer_metadata_it_still_waits_for_the_client_entry() -> None:
    e = build_engine(Config.model_validate({"engine": {"suppress_secs": 60}}), Policy())
    h = Hop(ALS_HTTP, "n", REVIEWS, INBOUND, identity(None, None, None, None, "10.0.0.9"), REVIEWS, T0, request_id="w")
    assert e.evaluate([h], T0) == []
    assert [a.rule for a in e.tick(T0 + 2)] == ["plaintext_hop"]
