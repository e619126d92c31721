"""First evidence is not the only evidence: an aggregated alert keeps examples from several
observers and says how many distinct observers reported it, so a forged report sent first (from
a stream claiming to be a sidecar) cannot hide the real sidecar's report of the same thing."""

from __future__ import annotations

from meshaudit.model import ALS_HTTP, INBOUND, Hop, identity
from test_engine import REVIEWS, T0, engine

ADDR = identity(None, None, None, None, "10.0.0.9:4000")
FORGED = "sidecar~10.66.6.6~reviews-v1-1.default~default.svc.cluster.local"
REAL = "sidecar~10.0.0.2~reviews-v1-2.default~default.svc.cluster.local"


def plain(observer: str, rid: str) -> Hop:
    return Hop(
        ALS_HTTP, observer, REVIEWS, INBOUND, ADDR, REVIEWS, T0, method="GET", path=f"/reviews/{rid}", request_id=rid,
        upstream_cluster="inbound|9080||",
    )  # fmt: skip


def test_a_report_sent_first_does_not_hide_the_others() -> None:
    e = engine(plaintext_hop={"attribution_wait_ms": 0})
    first = e.evaluate([plain(FORGED, f"f{i}") for i in range(5)], T0)  # fills the examples (3)
    assert [a.observers for a in first] == [1]
    e.evaluate([plain(REAL, "r1")], T0 + 1)
    [summary] = e.tick(T0 + 61)
    assert summary.count == 6 and summary.observers == 2
    assert {x.observer for x in summary.examples} == {FORGED, REAL}
    assert summary.to_json()["evidence"]["observers"] == 2
