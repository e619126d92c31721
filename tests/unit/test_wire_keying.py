"""Where the receivers put each hop, judged as the evaluators judge it: one engine per partition
(the worst case: every partition owned by a different evaluator). Every piece of evidence about
one request must reach the partition that judges it, or that evaluator raises a false alert.

The request id keys a hop when it has one: both sidecars log it and Envoy's span tags it, while
the trace id is in an entry only when it logs ``traceparent``, which a request its sidecar answers
itself (a ``direct_response``) is logged without. An application's span (no request id) is keyed
by its trace id and joined to its sidecar's entry by an evidence copy of that entry."""

from __future__ import annotations

import pytest
from meshaudit.engine.core import Engine
from meshaudit.model import ALS_HTTP, OUTBOUND, SPAN, SPAN_KIND_CLIENT, Alert, Hop, identity
from meshaudit.wire.hops import correlation_key, decode_split, encode, evidence_key, route
from meshaudit.wire.partition import partition
from test_engine import FRONTEND, NODE_FRONTEND, REVIEWS, T0, app_span, engine, inbound, outbound, rules

PARTITIONS = 6


def split_ids(prefix: str, trace: str) -> str:
    """A request id whose partition differs from ``trace``'s (the case that needs care)."""
    tp = partition(trace.encode(), PARTITIONS)
    return next(r for i in range(100) if partition((r := f"{prefix}-{i}").encode(), PARTITIONS) != tp)


def judged(hops: list[Hop], copies: bool = True) -> list[Alert]:
    """``hops`` produced as a receiver does (one record per partition, through the wire) and
    judged by one engine per partition, each of which has seen reviews' sidecar log other
    requests; every grace over."""
    engines: dict[int, Engine] = {}
    out: list[Alert] = []
    for p, (own, evidence) in route(hops, PARTITIONS).items():
        batch, n = decode_split(encode(own + evidence, evidence=len(evidence)))
        assert n == len(evidence)
        e = engines[p] = engine()
        e.agg.align()
        assert e.evaluate([inbound(rid="seen")], T0 - 1) == []
        if n and copies:
            e.evidence(batch[-n:], T0)
        if batch[: len(batch) - n]:
            out += e.evaluate(batch[: len(batch) - n], T0)
    for e in engines.values():
        out += e.tick(T0 + 30)
    return out


def direct_response(rid: str) -> list[Hop]:
    """A request to a host outside the registry, answered by the client sidecar's ``block_all``
    route (502, no upstream cluster, no traceparent logged), and that sidecar's span of it."""
    entry = Hop(
        ALS_HTTP, NODE_FRONTEND, FRONTEND, OUTBOUND, FRONTEND, identity("api.example.com"), T0,
        method="GET", path="/v1", authority="api.example.com", request_id=rid, status=502,
        response_code_details="direct_response", route_name="block_all",
    )  # fmt: skip
    span = Hop(
        SPAN, NODE_FRONTEND, FRONTEND, OUTBOUND, FRONTEND, REVIEWS, T0,
        request_id=rid, trace_id="ce" * 16, span_id="5" * 16, span_kind=SPAN_KIND_CLIENT,
    )  # fmt: skip
    return [entry, span]


def test_a_direct_response_and_its_sidecars_span_are_judged_together() -> None:
    """The defect: the entry was keyed by its request id and its span by the trace id; the span's
    evaluator found no access log and raised a false missing_access_log."""
    hops = direct_response(split_ids("dr", "ce" * 16))
    assert correlation_key(hops[0]) == correlation_key(hops[1])
    assert sorted(rules(judged(hops))) == ["route_mismatch", "unexpected_edge"]  # and no missing_access_log


def test_an_app_span_joins_its_sidecars_entry_through_an_evidence_copy() -> None:
    trace = "cd" * 16
    rid = split_ids("app", trace)
    hops = [outbound(rid=rid), inbound(rid=rid, trace_id=trace), app_span(trace=trace)]
    assert evidence_key(hops[1]) == trace.encode() and evidence_key(hops[0]) is None
    assert rules(judged(hops)) == []
    # The control: without the copy, the span's partition has no access log of its trace.
    assert rules(judged(hops, copies=False)) == ["missing_access_log"]


def test_a_copy_that_comes_after_the_span_settles_its_wait() -> None:
    """Records of two partitions reach an evaluator in any order: the span waits for its grace,
    and the copy arriving within it satisfies it, as a late access log does in one process."""
    trace = "cf" * 16
    rid = split_ids("late", trace)
    parts = route([inbound(rid=rid, trace_id=trace), app_span(trace=trace)], PARTITIONS)
    p = partition(trace.encode(), PARTITIONS)
    own, copies = parts[p]
    assert [h.origin for h in own] == [SPAN] and len(copies) == 1
    e = engine()
    assert e.evaluate(own, T0) == []
    e.evidence(copies, T0 + 1)
    assert e.tick(T0 + 30) == []
    assert e.hops_evaluated == 1  # the copy is not judged or counted


@pytest.mark.parametrize("n", [1, 2, 3, 6, 12])
def test_no_copy_goes_to_the_hops_own_partition(n: int) -> None:
    trace = "ab" * 16
    hops = [inbound(rid=f"r{i}", trace_id=trace) for i in range(20)]
    parts = route(hops, n)
    tp = partition(trace.encode(), n)
    copies = sum(len(c) for _, c in parts.values())
    own_in_tp = len(parts.get(tp, ([], []))[0])
    assert copies == 20 - own_in_tp and all(not c for q, (_, c) in parts.items() if q != tp)
