"""The service graph's pieces: its time buckets, its latency estimate, its bounds, and the page's
escaping of names that came from the network."""

from __future__ import annotations

from meshaudit.engine.tally import BINS, BOUNDS_MS, COUNTERS, IN, IN_MTLS, LIVE_WIDTH, OUT, EdgeTally
from meshaudit.model import ALS_HTTP, INBOUND, OUTBOUND, Hop, identity
from meshaudit.views.graph import MeshGraph, Ring, parse_duration, percentile
from meshaudit.views.page import fragment, page

A, B = identity("a", "ns1"), identity("b", "ns2")


def test_ring_keeps_its_slots_and_drops_what_is_older() -> None:
    r = Ring(10.0, 3, 2)
    r.add(r.bucket(5), (1, 2))
    r.add(r.bucket(15), (10, 0))
    assert r.total(0, 1) == [11, 2]
    r.add(r.bucket(35), (100, 100))  # bucket 3: bucket 0 falls out of the three slots
    assert r.total(0, 4) == [110, 100]
    assert [b for b, _ in r.rows(0, 4)] == [1, 2, 3]
    r.add(0, (1000, 1000))  # too old for the ring: dropped
    assert r.total(0, 4) == [110, 100]
    r.add(r.bucket(1000), (1, 1))  # a long gap clears every slot
    assert r.total(0, 200) == [1, 1]


def test_percentile_interpolates_inside_a_bin() -> None:
    bins = [0] * BINS
    assert percentile(bins, 0.5) is None
    bins[BOUNDS_MS.index(25.0)] = 100  # all between 10 and 25 ms
    assert percentile(bins, 0.5) == 17.5
    bins[-1] = 1  # one above the last bound
    assert percentile(bins, 1.0) == BOUNDS_MS[-1]


def test_parse_duration() -> None:
    assert parse_duration("90") == 90 and parse_duration("15m") == 900 and parse_duration("1h") == 3600
    assert parse_duration("7d") == 7 * 86400
    for bad in ("", "soon", "-1h", "0", "nan", "inf"):
        try:
            parse_duration(bad)
        except ValueError as exc:
            assert "duration" in str(exc)
        else:
            raise AssertionError(bad)


class _Corr:
    def source_of(self, h: Hop) -> None:
        return None


def _hop(direction: int, status: int = 200, attempts: int = 1, peer: str | None = "spiffe://x") -> Hop:
    return Hop(ALS_HTTP, "n", B if direction == INBOUND else A, direction, A, B, 0.0, method="GET", status=status,
               attempts=attempts, peer_principal=peer, tls_version="TLSv1.3" if peer else None,
               response_code_details="via_upstream", duration_ms=3.0)  # fmt: skip


def test_tally_counts_each_side_and_bounds_latency_samples() -> None:
    t = EdgeTally()
    t.add([_hop(OUTBOUND) for _ in range(300)] + [_hop(INBOUND), _hop(INBOUND, peer=None)], _Corr())
    [(src, dst, c)] = t.take()
    assert (src, dst) == (A, B) and len(c) == LIVE_WIDTH
    assert c[OUT] == 300 and c[IN] == 2 and c[IN_MTLS] == 1
    assert sum(c[COUNTERS : COUNTERS + BINS]) == 8 + 300 // 32  # durations read: the first 8, then 1 in 32
    assert t.take() == []
    off = EdgeTally(enabled=False)
    off.add([_hop(OUTBOUND)], _Corr())
    assert off.take() == []


def test_graph_keeps_at_most_max_edges_and_counts_evictions() -> None:
    g = MeshGraph(max_edges=2)
    for i in range(3):
        g.absorb([(identity(f"s{i}", "ns"), B, [1] + [0] * (LIVE_WIDTH - 1))], 100.0 + i)
    assert len(g.edges) == 2 and g.evicted == 1 and ("s0.ns", "b.ns2") not in g.edges
    view = g.live(103.0, 60)
    assert view["edges_evicted"] == 1 and len(view["edges"]) == 2
    top = g.live(103.0, 60, top=1)
    assert len(top["edges"]) == 1 and top["other"] == {"edges": 1, "requests": 1}


def test_page_escapes_names_from_the_network() -> None:
    evil = identity('<img src=x onerror="alert(1)">', "</svg><script>alert(2)</script>")
    g = MeshGraph()
    c = [0] * LIVE_WIDTH
    c[IN] = c[OUT] = 1
    g.absorb([(evil, B, c)], 100.0)
    view = g.live(101.0, 60)
    for html in (page(view, "n0nce", 60), fragment(view)):
        assert "<img" not in html and "<script>alert" not in html and "</svg><script" not in html
        assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
