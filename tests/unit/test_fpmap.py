"""The fingerprint map under the correlation's id indexes (``engine/_fpmap.c``) and its Python
reference (``fpmap.HashMap``): a key is its 64-bit hash, values are held, keys are not."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshaudit.engine import fpmap
from meshaudit.engine.store import PairStore

MAKERS: list[Callable[[], Any]] = [fpmap.HashMap]
if fpmap.NATIVE:
    MAKERS.insert(0, fpmap._MAKE)


class Key:
    """A hashable key whose lifetime a test can watch (a str cannot be weakly referenced)."""

    def __init__(self, h: int) -> None:
        self.h = h

    def __hash__(self) -> int:
        return self.h

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and other.h == self.h


class Value:
    pass


def test_the_c_map_is_built() -> None:
    # `pip install` builds it (setup.py); without it the indexes fall back to the Python map.
    assert fpmap.NATIVE
    assert type(fpmap.new_map()).__module__ == "meshaudit.engine._fpmap"


@pytest.mark.parametrize("make", MAKERS)
def test_it_maps_keys_to_values(make: Callable[[], Any]) -> None:
    m = make()
    m["r1"] = True
    m["r2"] = "spiffe://cluster.local/ns/shop/sa/cart"
    m["r1"] = False  # a key written again keeps one slot, with the new value
    assert len(m) == 2
    assert m["r1"] is False and m.get("r2") == "spiffe://cluster.local/ns/shop/sa/cart"
    assert "r1" in m and "r3" not in m
    assert m.get("r3") is None and m.get("r3", 7) == 7
    with pytest.raises(KeyError):
        m["r3"]


@pytest.mark.parametrize("make", MAKERS)
def test_it_grows_and_keeps_every_key(make: Callable[[], Any]) -> None:
    m = make()
    n = 100_000
    for i in range(n):
        m[f"rid-{i}"] = i
    assert len(m) == n
    assert all(m[f"rid-{i}"] == i for i in range(0, n, 97))
    assert sum(f"rid-{i}" in m for i in range(n, n + 1000)) == 0


@pytest.mark.parametrize("make", MAKERS)
def test_keys_with_one_hash_are_one_key(make: Callable[[], Any]) -> None:
    # What the map gives up (documented): the key is its hash. A hash of 0 counts as 1.
    m = make()
    m[Key(42)] = "a"
    m[Key(42)] = "b"
    assert len(m) == 1 and m[Key(42)] == "b"
    m[Key(0)] = "zero"
    assert m.get(Key(1)) == "zero" and len(m) == 2


@pytest.mark.parametrize("make", MAKERS)
def test_it_holds_its_values_and_not_its_keys(make: Callable[[], Any]) -> None:
    m = make()
    key, value = Key(12345), Value()
    key_ref, value_ref = weakref.ref(key), weakref.ref(value)
    m[key] = value
    del key, value
    gc.collect()
    assert key_ref() is None  # nothing of the key is kept
    assert value_ref() is not None and m[Key(12345)] is value_ref()
    m[Key(12345)] = True  # the value it replaced is released
    gc.collect()
    assert value_ref() is None
    other = Value()
    other_ref = weakref.ref(other)
    m[Key(7)] = other
    del other, m  # the map's values go with it
    gc.collect()
    assert other_ref() is None


@pytest.mark.parametrize("make", MAKERS)
def test_misuse_is_an_error(make: Callable[[], Any]) -> None:
    m = make()
    with pytest.raises(TypeError):
        m[["unhashable"]] = True
    with pytest.raises(TypeError):
        del m["r1"]
    assert len(m) == 0


@pytest.mark.parametrize("make", MAKERS)
def test_values_partition_and_update(make: Callable[[], Any]) -> None:
    # What a fair-shared store needs at a rotation: its values' owners, the entries of the
    # observers over their share taken out, and a generation merged into another.
    m = make()
    for i in range(1000):
        m[f"rid-{i}"] = f"sidecar-{i % 4}"
    assert sorted(m.values()) == sorted(f"sidecar-{i % 4}" for i in range(1000))
    flood, rest = m.partition(lambda v: v == "sidecar-3")
    assert len(flood) == 250 and len(rest) == 750 and len(m) == 1000  # the map itself unchanged
    assert "rid-3" in flood and "rid-3" not in rest and rest["rid-0"] == "sidecar-0"
    other = make()
    other["rid-3"] = "moved"
    other["rid-5000"] = "new"
    rest.update(other)
    assert len(rest) == 752 and rest["rid-3"] == "moved" and rest["rid-5000"] == "new"
    rest.update(rest)  # itself: nothing changes
    assert len(rest) == 752 and rest["rid-3"] == "moved"
    with pytest.raises(TypeError):
        rest.update({"rid-1": "x"})
    with pytest.raises(ZeroDivisionError):
        m.partition(lambda v: 1 // 0 > 0)  # keep()'s error is the caller's


def test_a_partition_that_grows_the_map_is_an_error() -> None:
    if not fpmap.NATIVE:
        pytest.skip("the C map is not built")
    m = fpmap._MAKE()
    for i in range(8):
        m[f"k{i}"] = i

    def keep(v: int) -> bool:
        for j in range(100):
            m[f"grow-{v}-{j}"] = j
        return True

    with pytest.raises(RuntimeError, match="changed size"):
        m.partition(keep)


def test_the_c_map_takes_no_arguments() -> None:
    if not fpmap.NATIVE:
        pytest.skip("the C map is not built")
    make: Any = fpmap._MAKE
    with pytest.raises(TypeError):
        make({"r1": True})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["set", "get", "in"]), st.integers(-50, 50), st.integers(0, 9))))
def test_the_c_map_equals_its_reference(ops: list[tuple[str, int, int]]) -> None:
    if not fpmap.NATIVE:
        pytest.skip("the C map is not built")
    c, ref = fpmap._MAKE(), fpmap.HashMap()
    for op, k, v in ops:
        key = f"id-{k}" if k % 3 else Key(k)  # strings, and keys of chosen hashes (0, -1, ...)
        if op == "set":
            c[key] = v
            ref[key] = v
        elif op == "get":
            assert c.get(key) == ref.get(key)
        else:
            assert (key in c) == (key in ref)
        assert len(c) == len(ref)


def test_a_pair_store_keeps_no_key_alive() -> None:
    # The point of the map: a minute of request ids written is not a minute of id objects kept.
    s: PairStore[str, Key, bool] = PairStore("t", 60, 100)
    key = Key(99)
    ref = weakref.ref(key)
    d = s.writable("reviews.default")
    d[key] = True
    s.settle(1_800_000_000.0, 1)
    del key, d
    gc.collect()
    assert ref() is None
    assert s.has("reviews.default", Key(99))  # found by its hash


def test_start_up_warns_of_a_fixed_hash_seed_and_of_a_map_not_built(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # With PYTHONHASHSEED fixed, ids that collide in the indexes can be computed in advance.
    from meshaudit.runtime.common import check_id_maps

    monkeypatch.setattr(fpmap, "NATIVE", True)
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    assert check_id_maps() == []
    monkeypatch.setenv("PYTHONHASHSEED", "random")
    assert check_id_maps() == []
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    with caplog.at_level("WARNING", logger="meshaudit"):
        [warned] = check_id_maps()
    assert "PYTHONHASHSEED is fixed ('0')" in warned and warned in caplog.text
    monkeypatch.delenv("PYTHONHASHSEED")
    monkeypatch.setattr(fpmap, "NATIVE", False)
    [warned] = check_id_maps()
    assert "not built" in warned and "_fpmap.c" in warned
