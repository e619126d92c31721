"""The pair-keyed generational store under the correlation index: look-ups by (group, key), a
TTL between one and two generations, and a capacity bound that rotates early and counts what
it dropped (the store gauges and eviction counters read ``len``, ``expired`` and
``evicted_capacity``)."""

from __future__ import annotations

from meshaudit.engine.store import PairStore

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
    s: PairStore[str, str, bool] = PairStore("t", 60, 10)  # half: 5 pairs per generation
    write(s, "a", [f"k{i}" for i in range(3)], T0)
    write(s, "b", ["k0", "k1"], T0)  # 5: rotated
    write(s, "a", ["x0", "x1", "x2", "x3", "x4"], T0)  # 5 more: rotated again, the first 5 dropped
    assert s.evicted_capacity == 5 and len(s) == 5
    assert not s.has("b", "k0") and s.has("a", "x4")
    write(s, "c", ["y"], T0)
    write(s, "c", ["y"], T0)  # rewriting a pair of the current generation adds nothing
    assert len(s) == 6 and s.evicted_capacity == 5
