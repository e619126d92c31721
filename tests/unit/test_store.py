"""The pair-keyed generational store under the correlation index: look-ups by (group, key), a
TTL between one and two generations, and a capacity bound that rotates early and counts what
it dropped (the store gauges and eviction counters read ``len``, ``expired`` and
``evicted_capacity``)."""

from __future__ import annotations

import pytest
from meshaudit.engine.store import GenStore, PairStore

T0 = 1_800_000_000.0


def write(s: PairStore[str, str, bool], group: str, keys: list[str], now: float) -> None:
    d = s.writable(group)
    n = len(d)
    for k in keys:
        d[k] = True
    s.settle(now, len(d) - n)


def test_pairs_are_found_by_group_and_key_only() -> None:
    s: PairStore[str, str, bool] = PairStore("t", 60, 100)
    write(s, "reviews.default", ["r1", "r2"], T0)
    s.put("ratings.default", "r1", True, T0)
    assert s.has("reviews.default", "r1") and s.has("ratings.default", "r1")
    assert not s.has("ratings.default", "r2") and not s.has("other", "r1")
    assert s.get("reviews.default", "r2") is True and s.get("other", "r2") is None
    assert len(s) == 3


def test_a_pair_lives_between_one_and_two_ttls() -> None:
    s: PairStore[str, str, bool] = PairStore("t", 60, 100)
    s.expire(T0)  # the first tick starts the clock
    write(s, "a", ["old"], T0 + 1)
    assert s.expire(T0 + 59) == 0 and s.has("a", "old")
    assert s.expire(T0 + 60) == 0 and s.has("a", "old")  # rotated: now the previous generation
    write(s, "a", ["new"], T0 + 61)
    assert s.expire(T0 + 120) == 1 and not s.has("a", "old") and s.has("a", "new")
    assert s.expired == 1 and len(s) == 1


def test_capacity_rotates_early_and_counts_the_dropped_generation() -> None:
    # 80 pairs: 40 per generation, a share of 10 per group; no group here holds more than its share
    s: PairStore[str, str, bool] = PairStore("t", 60, 80)
    for g in "abcd":
        write(s, g, [f"k{i}" for i in range(10)], T0)  # 40: rotated
    assert s.evicted_capacity == 0 and len(s) == 40
    for g in "efgh":
        write(s, g, [f"x{i}" for i in range(10)], T0)  # 40 more: rotated again, the first 40 dropped
    assert s.evicted_capacity == 40 and len(s) == 40
    assert not s.has("a", "k0") and s.has("h", "x9")
    write(s, "i", ["y"], T0)
    write(s, "i", ["y"], T0)  # rewriting a pair of the current generation adds nothing
    assert len(s) == 41 and s.evicted_capacity == 40 and s.fair.evicted_by == {}


def test_a_group_over_its_share_rotates_alone_and_the_others_keep_their_pairs() -> None:
    s: PairStore[str, str, bool] = PairStore("t", 60, 80)  # 40 per generation, a share of 10
    write(s, "real", ["r1", "r2"], T0)
    for n in range(0, 2000, 50):  # a flood from one group: 50 x the store
        write(s, "flood", [f"f{i}" for i in range(n, n + 50)], T0 + 1)
    assert s.has("real", "r1") and s.has("real", "r2")  # never rotated away
    assert s.has("flood", "f1999") and not s.has("flood", "f0")  # the flood keeps its newest
    assert len(s) <= 80 + 50  # the bound (a batch may pass it until it settles)
    assert s.fair.evicted_by["flood"] >= 1900 and "real" not in s.fair.evicted_by
    assert s.evicted_capacity == s.fair.evicted_by["flood"]


@pytest.mark.parametrize("fingerprints", [False, True])
def test_a_generational_store_with_owners_evicts_the_flooding_owner_first(fingerprints: bool) -> None:
    # The outbound index: request id -> the client sidecar that logged it (the value's owner).
    # 40 per generation, share 10; the outbound indexes keep fingerprints (engine/fpmap.py).
    s: GenStore[str, str] = GenStore("t", 60, 80, owner=lambda v: v, fingerprints=fingerprints)
    s.put("rid-real", "reviews-v1-1", T0)
    for i in range(5000):
        s.put(f"rid-{i}", "flood-9", T0 + 1)
    assert s.get("rid-real") == "reviews-v1-1"
    assert s.get("rid-4999") == "flood-9" and s.get("rid-0") is None
    assert len(s) <= 80
    assert s.fair is not None and s.fair.evicted_by["flood-9"] >= 4900 and "reviews-v1-1" not in s.fair.evicted_by
    # Many owners within their shares: the store rotates whole, as without owners.
    t: GenStore[str, str] = GenStore("t", 60, 80, owner=lambda v: v, fingerprints=fingerprints)
    for i in range(80):
        t.put(f"k{i}", f"owner{i % 8}", T0)
    assert t.evicted_capacity == 40 and t.fair is not None and t.fair.evicted_by == {}


def test_a_store_of_fingerprints_has_no_keys_to_give() -> None:
    s: GenStore[str, str] = GenStore("outbound_by_conn", 60, 80, owner=lambda v: v, fingerprints=True)
    s.put("10.0.0.1:4242", "reviews-v1-1", T0)
    assert "10.0.0.1:4242" in s and s.get("10.0.0.1:4242") == "reviews-v1-1" and len(s) == 1
    with pytest.raises(TypeError, match="outbound_by_conn"):
        s.items()
    with pytest.raises(TypeError, match="outbound_by_conn"):
        s.pop("10.0.0.1:4242")
    assert s.expire(T0) == 0 and s.expire(T0 + 60) == 0 and s.expire(T0 + 120) == 1 and len(s) == 0
