"""identity_mismatch on a fake clock: the destination sidecar's entry shows the certificate, the
client sidecar's entry of the same request (or Istio's peer metadata) shows who really sent it.
Entries agree on every mTLS-OK hop (silent); they may arrive in either order, seconds apart; no
client entry means no evidence (silent); the policy may let a service present more identities."""

from __future__ import annotations

from typing import Any

from meshaudit.config import Config, Policy
from meshaudit.engine.api import PeerAnswer
from meshaudit.engine.core import Engine
from meshaudit.engine.rules import REGISTRY
from meshaudit.model import ALS_HTTP, ALS_TCP, INBOUND, OUTBOUND, SPAN, SPAN_KIND_CLIENT, Alert, Hop, Identity, identity
from test_engine import NODE_FRONTEND, NODE_REVIEWS, T0

TD = "spiffe://cluster.local"
REVIEWS = identity("reviews", "default", "reviews-v1-1")
FRONTEND = identity("frontend", "default", "frontend-1")  # the client sidecar's workload
RATINGS = identity("ratings", "default", "ratings-1")

ONLY = {
    r: {"enabled": False}
    for r in ("plaintext_hop", "unexpected_edge", "unexpected_path", "missing_access_log", "weak_tls")
}


def engine(policy: Policy | None = None, peers: bool = False, mesh: dict[str, Any] | None = None) -> Engine:
    cfg = Config.model_validate(
        {"engine": {"suppress_secs": 60}, "rules": {**ONLY, "identity_mismatch": {}}, "mesh": mesh or {}}
    )
    return Engine(cfg, policy or Policy(), REGISTRY, peers)


def sa(name: str, ns: str = "default") -> str:
    return f"{TD}/ns/{ns}/sa/{name}"


def inbound(
    presented: str | None = sa("frontend"),
    rid: str | None = "r1",
    tls: str | None = "TLSv1.3",
    origin: int = ALS_HTTP,
    conn: str | None = None,
    **kw: Any,
) -> Hop:
    src = identity(presented.rsplit("/", 1)[-1], "default", None, presented) if presented else identity()
    return Hop(
        origin,
        NODE_REVIEWS,
        REVIEWS,
        INBOUND,
        src,
        REVIEWS,
        T0,
        tls_version=tls,
        peer_principal=presented,
        method=None if origin == ALS_TCP else "GET",
        path=None if origin == ALS_TCP else "/reviews/1",
        request_id=rid,
        conn=conn,
        upstream_cluster="inbound|9080||",
        **kw,
    )


def outbound(
    client: Identity = FRONTEND, rid: str | None = "r1", origin: int = ALS_HTTP, conn: str | None = None
) -> Hop:
    return Hop(
        origin,
        NODE_FRONTEND,
        client,
        OUTBOUND,
        client,
        identity("reviews", "default"),
        T0 - 0.01,
        method=None if origin == ALS_TCP else "GET",
        path=None if origin == ALS_TCP else "/reviews/1",
        trace_id="ab" * 16,
        request_id=rid,
        conn=conn,
        upstream_cluster="outbound|9080||reviews.default.svc.cluster.local",
    )


def run(e: Engine, *batches: tuple[float, list[Hop]]) -> list[Alert]:
    out: list[Alert] = []
    for at, hops in batches:
        out += e.tick(T0 + at)
        out += e.evaluate(hops, T0 + at)
    return out + e.tick(T0 + 120)


def test_both_entries_agree_raises_nothing_in_either_order() -> None:
    e = engine()
    assert run(e, (0, [outbound(rid="a"), inbound(rid="a")]), (1, [inbound(rid="b")]), (2, [outbound(rid="b")])) == []


def test_stolen_certificate_client_entry_first() -> None:
    got = run(engine(), (0, [outbound(client=RATINGS)]), (0.5, [inbound(sa("frontend"))]))
    assert [a.rule for a in got] == ["identity_mismatch"]
    a = got[0]
    assert a.severity == "critical" and a.source is RATINGS and a.destination is REVIEWS
    assert sa("frontend") in (a.detail or "") and "ratings.default may not present" in (a.detail or "")
    assert a.examples[0].request_id == "r1" and a.examples[0].observer == NODE_REVIEWS


def test_stolen_certificate_inbound_first_waits_for_the_client_entry() -> None:
    e = engine()
    assert e.evaluate([inbound(sa("frontend"), rid="late")], T0) == []
    got = e.evaluate([outbound(client=RATINGS, rid="late")], T0 + 1.2)  # up to ~1-2 s apart
    assert [a.rule for a in got] == ["identity_mismatch"] and got[0].source is RATINGS
    ex = got[0].examples[0]  # the request, from the client's entry that completed the pair
    assert (ex.method, ex.path, ex.trace_id) == ("GET", "/reviews/1", "ab" * 16)
    assert "spiffe://cluster.local/ns/default/sa/frontend" in (got[0].detail or "")


def test_tcp_paired_by_client_socket() -> None:
    got = run(
        engine(),
        (0, [inbound(sa("frontend"), rid=None, origin=ALS_TCP, conn="10.0.0.7:4100")]),
        (0.3, [outbound(client=RATINGS, rid=None, origin=ALS_TCP, conn="10.0.0.7:4100")]),
    )
    assert [a.rule for a in got] == ["identity_mismatch"] and "TCP connection" in (got[0].detail or "")


def test_no_client_entry_ever_means_no_evidence() -> None:
    e = engine()
    assert run(e, (0, [inbound(sa("frontend"), rid="lonely")])) == []
    e.tick(T0 + 240)  # a generational store drops a record within two waits
    [rule] = [r for r in e.rules if r.name == "identity_mismatch"]
    assert [len(s) for s in rule.stores()] == [0, 0, 0]


def test_a_request_id_passed_along_a_chain_pairs_each_hop_with_its_own_client() -> None:
    """The application forwards x-request-id: frontend -> reviews -> ratings share one request
    id. Both destinations' entries come first; each client's entry pairs with the certificate its
    own destination saw (frontend's at reviews, reviews' at ratings), never the other's."""
    at_ratings = Hop(
        ALS_HTTP, "sidecar~10.0.0.9~ratings-1.default~default.svc.cluster.local", RATINGS, INBOUND,
        identity("reviews", "default", None, sa("reviews")), RATINGS, T0, tls_version="TLSv1.3",
        peer_principal=sa("reviews"), method="GET", path="/ratings/1", request_id="chain",
        upstream_cluster="inbound|9080||",
    )  # fmt: skip
    reviews_out = Hop(
        ALS_HTTP, NODE_REVIEWS, REVIEWS, OUTBOUND, REVIEWS, identity("ratings", "default"), T0,
        method="GET", path="/ratings/1", request_id="chain",
        upstream_cluster="outbound|9080||ratings.default.svc.cluster.local",
    )  # fmt: skip
    got = run(
        engine(), (0, [inbound(sa("frontend"), rid="chain"), at_ratings]), (1, [outbound(rid="chain"), reviews_out])
    )
    assert got == []


def test_a_late_client_entry_of_an_http_request_is_still_paired() -> None:
    """One process: an HTTP request pairs by request id for the correlation TTL (at least 60 s),
    however late the client's sidecar flushes; the same request id is the evidence."""
    e = engine()
    got = run(e, (0, [inbound(rid="x")]), (1.0, []), (2.0, []), (3.1, []), (4.0, [outbound(RATINGS, rid="x")]))
    assert [a.rule for a in got] == ["identity_mismatch"] and got[0].source is RATINGS


def test_plaintext_hop_raises_nothing_here() -> None:
    assert run(engine(), (0, [outbound(RATINGS, rid="p"), inbound(None, rid="p", tls=None)])) == []


def test_policy_lets_frontend_present_its_canary_identity() -> None:
    policy = Policy.model_validate({"identities": {"frontend": [sa("frontend-canary")]}})
    e = engine(policy)
    ok = [
        outbound(rid="c"),
        inbound(sa("frontend-canary"), rid="c"),
        outbound(rid="d"),
        inbound(sa("frontend"), rid="d"),
    ]
    assert run(e, (0, ok)) == []
    # the override is per service: ratings may not present frontend-canary's identity
    got = run(engine(policy), (0, [outbound(RATINGS, rid="e"), inbound(sa("frontend-canary"), rid="e")]))
    assert [a.rule for a in got] == ["identity_mismatch"]


def test_other_namespace_or_trust_domain_is_a_mismatch() -> None:
    for presented in (
        sa("frontend", "prod"),
        "spiffe://evil.example/ns/default/sa/frontend",
        "spiffe://cluster.local/x",
    ):
        got = run(engine(), (0, [outbound(rid="n"), inbound(presented, rid="n")]))
        assert [a.rule for a in got] == ["identity_mismatch"], presented


def test_without_service_account_is_service_the_namespace_is_compared() -> None:
    e = engine(mesh={"service_account_is_service": False})
    assert run(e, (0, [outbound(rid="a"), inbound(sa("bookinfo-frontend"), rid="a")])) == []
    got = run(
        engine(mesh={"service_account_is_service": False}), (0, [outbound(rid="b"), inbound(sa("x", "prod"), rid="b")])
    )
    assert [a.rule for a in got] == ["identity_mismatch"]


def test_downstream_peer_names_the_sender_without_the_client_entry() -> None:
    real = identity("ratings", "default", "ratings", sa("ratings"))
    got = run(engine(), (0, [inbound(sa("frontend"), downstream_peer=real)]))
    assert [a.rule for a in got] == ["identity_mismatch"] and got[0].source is real
    assert "peer metadata" in (got[0].detail or "")
    own = identity("frontend", "default", "frontend", sa("frontend"))
    assert run(engine(), (0, [inbound(sa("frontend"), rid="o", downstream_peer=own)])) == []


def test_forwarded_client_cert_is_the_evidence_when_no_certificate_field_was_logged() -> None:
    h = inbound(None, rid="x", xfcc_uri=sa("frontend"), xfcc_by=sa("reviews"))
    got = run(engine(), (0, [outbound(RATINGS, rid="x"), h]))
    assert [a.rule for a in got] == ["identity_mismatch"] and sa("frontend") in (got[0].detail or "")


def test_exemption() -> None:
    policy = Policy.model_validate({"exemptions": [{"rules": ["identity_mismatch"], "from": ["ratings.default"]}]})
    assert run(engine(policy), (0, [outbound(RATINGS), inbound(sa("frontend"))])) == []


def test_with_workers_the_end_of_a_wait_asks_the_others() -> None:
    """The client's entry reached another worker: the wait ends in a question, and the answer
    decides; no answer (no evidence) invents nothing."""
    e = engine(peers=True)
    assert e.evaluate([inbound(sa("frontend"), rid="w1"), inbound(sa("frontend"), rid="w2")], T0) == []
    assert e.tick(T0 + 1.0) == [] and e.take_deferred() == []
    e.tick(T0 + 1.6)
    deferred = e.take_deferred()
    assert [d.query.request_id for d in deferred] == ["w1", "w2"]
    assert deferred[0].query.service == "reviews.default"
    e.finish(deferred, [PeerAnswer(True, RATINGS), PeerAnswer(False, None)], T0 + 1.7)
    got = e.forwarded
    assert [(v.rule, v.src) for v in got] == [("identity_mismatch", RATINGS)]
    # paired locally: no question
    e2 = engine(peers=True)
    e2.evaluate([inbound(sa("frontend"), rid="p")], T0)
    e2.evaluate([outbound(rid="p")], T0 + 0.5)
    e2.tick(T0 + 5)
    assert e2.take_deferred() == [] and e2.forwarded == []


BATCH = identity("batch-job", "default")  # a workload without a sidecar that traces its calls


def client_span(client: Identity = BATCH, rid: str = "s1", host: str = "reviews.default.svc.cluster.local:9080") -> Hop:
    """An application's client span (OpenTelemetry SDK) that carries the request id it sent
    (``http.request.header.x-request-id``); the host it called is all it knows of the destination."""
    return Hop(
        SPAN, "span:" + client.key, client, OUTBOUND, client, identity(host), T0, method="GET",
        path="/reviews/1", trace_id="cd" * 16, request_id=rid, span_kind=SPAN_KIND_CLIENT,
    )  # fmt: skip


def test_a_client_span_names_the_sender_of_a_request_that_presented_another_certificate() -> None:
    """batch-job has no sidecar: it called reviews with a certificate of payments it should not
    hold. Its own span, carrying the request id, names it; the span usually comes seconds after
    the destination's entry, and may come first."""
    for order in ("entry first", "span first"):
        stolen = inbound(sa("payments", "default"), rid="s1")
        batches = [(0.0, [stolen]), (3.0, [client_span()])]
        got = run(engine(), *(batches if order == "entry first" else batches[::-1]))
        assert [a.rule for a in got] == ["identity_mismatch"], order
        assert (got[0].source.key, got[0].destination.key) == ("batch-job.default", "reviews.default")
        assert "its own client span" in (got[0].detail or "") and sa("payments") in (got[0].detail or "")


def test_a_client_span_that_agrees_with_the_certificate_is_silent() -> None:
    agree = identity("frontend", "default")
    got = run(engine(), (0.0, [inbound(sa("frontend"), rid="s2")]), (2.0, [client_span(agree, "s2")]))
    assert got == []
    got = run(engine(), (0.0, [client_span(agree, "s3")]), (2.0, [inbound(sa("frontend"), rid="s3")]))
    assert got == []


def test_while_spans_come_a_paired_request_is_also_judged_against_its_span() -> None:
    """The client sidecar's entry and the certificate agree (frontend), but the span of the same
    request claims to be ratings: a workload naming itself as another service in its telemetry,
    or a certificate used by the wrong workload. Judged once client spans with request ids are
    seen; before that, a paired entry keeps nothing."""
    e = engine()
    ratings = identity("ratings", "default")
    got = run(
        e,
        (0.0, [client_span(identity("frontend", "default"), "warm")]),  # client spans come
        (10.0, [outbound(rid="p1"), inbound(sa("frontend"), rid="p1")]),
        (12.0, [client_span(ratings, "p1")]),
    )
    assert [a.rule for a in got] == ["identity_mismatch"] and got[0].source == ratings
