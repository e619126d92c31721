"""Fair bounds per source: a store of waiting hops is shared among observers, so one stream's
flood (a forged sidecar, or a runaway one) evicts its own waiting hops, never another observer's
pending evidence: the true plaintext hop from the real sidecar still alerts."""

from __future__ import annotations

from meshaudit.config import Config, Policy
from meshaudit.engine.api import Parking
from meshaudit.engine.setup import build_engine
from meshaudit.model import ALS_HTTP, INBOUND, Hop, identity
from test_engine import FRONTEND, REVIEWS, T0, outbound

REAL = "sidecar~10.0.0.2~reviews-v1-1.default~default.svc.cluster.local"
FLOOD = "sidecar~10.66.6.6~reviews-v1-9.default~default.svc.cluster.local"


def plain(observer: str, i: int) -> Hop:
    """A plaintext request at reviews' sidecar from an address no client sidecar names (it waits)."""
    src = identity(None, None, None, None, f"10.9.{i // 250}.{i % 250}:4000")
    return Hop(
        ALS_HTTP, observer, REVIEWS, INBOUND, src, REVIEWS, T0, method="GET", path="/reviews/1",
        request_id=f"{observer[-30:]}-{i}", conn=src.address, upstream_cluster="inbound|9080||",
    )  # fmt: skip


def test_a_flood_from_one_observer_does_not_evict_another_observers_pending_hop() -> None:
    cfg = Config.model_validate({"engine": {"suppress_secs": 60, "store_max_items": 1000}})
    e = build_engine(cfg, Policy())
    e.evaluate([plain(REAL, 0)], T0)  # waits for its client's entry (1.5 s)
    for n in range(0, 20_000, 1000):  # 20 x the store: every flooded hop waits too
        e.evaluate([plain(FLOOD, i) for i in range(n + 1, n + 1001)], T0 + 0.5)
    [pending] = [s for s in e.stores() if isinstance(s, Parking) and s.name == "plaintext_pending_attribution"]
    assert (
        len(pending) <= 1000 and pending.fair.evicted_by.get(FLOOD, 0) >= 19_000 and REAL not in pending.fair.evicted_by
    )
    got = e.tick(T0 + 2)
    assert any(a.rule == "plaintext_hop" and a.examples[0].observer == REAL for a in got)


def test_a_flooded_wait_keeps_the_index_by_which_another_observers_client_entry_finds_its_hop() -> None:
    # The waiting hops' index by request id goes with each evicted hop: the flood cannot fill it
    # and push out the key by which the client sidecar's entry, coming late, names the sender.
    cfg = Config.model_validate({"engine": {"suppress_secs": 60, "store_max_items": 1000}})
    e = build_engine(cfg, Policy())
    real = plain(REAL, 0)
    e.evaluate([real], T0)
    for n in range(0, 20_000, 1000):
        e.evaluate([plain(FLOOD, i) for i in range(n + 1, n + 1001)], T0 + 0.5)
    got = e.evaluate([outbound(rid=real.request_id)], T0 + 1)  # frontend's sidecar names the sender
    assert [(a.rule, a.source.key) for a in got] == [("plaintext_hop", FRONTEND.key)]


def test_many_observers_share_the_store_and_the_oldest_goes_when_it_is_full() -> None:
    evicted: list[str] = []
    p: Parking[int] = Parking("t", 10, 16, lambda k, h, now: evicted.append(h.observer))
    for i in range(16):
        assert p.park(i, plain(f"obs-{i % 8}", i), T0)  # 2 each: within every share (quota 2)
    assert p.park(100, plain("obs-0", 100), T0)  # obs-0's share is full: its own oldest goes
    assert p.fair.evicted_by == {"obs-0": 1} and 0 not in p and 8 in p and 1 in p
    p.expire(T0 + 11)
    assert len(p) == 0 and len(evicted) == 16
