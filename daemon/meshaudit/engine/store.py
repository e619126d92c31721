"""Bounded window stores, with eviction counters (after the OpenTelemetry Collector
servicegraph store). Two kinds, for two access patterns:

- :class:`TTLStore`: exact time-to-live plus a maximum size, with an on-expire hook. For state
  whose expiry *is* an event (a span whose access log never came, a window that closes).
- :class:`GenStore`: evidence looked up by key (which client sent request X, was trace Y
  logged), written once per access-log entry. Two generations of plain dicts: a put is one dict
  store, and expiry drops the older generation whole. An entry lives between one and two TTLs.

TTLStore entries expire in insertion order: every entry of one store has the same TTL, so the oldest
insertion is always the first to expire and ``expire`` is O(expired). Refreshing an entry
moves it to the back. When full, the oldest entry is evicted and counted as ``capacity``;
the expire hook is *not* called for it (a capacity eviction is a loss of evidence, never a
violation: alerting on it would turn overload into false alarms).

Stores keyed by request, trace or socket are shared fairly among observers (:class:`FairShare`):
one observer (a forged stream, a runaway sidecar) may hold at most a share of the store, so its
flood evicts its own entries and never another observer's evidence. A :class:`GenStore` given an
``owner`` and every :class:`PairStore` (its groups are observers) enforce the share when the store
fills: the observers over their share lose their entries first, and only when none is over does a
generation of everyone's go. ``Parking`` (engine/api.py) enforces it at every insertion.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, KeysView
from typing import Any, ClassVar, Generic, Protocol, TypeVar, cast

from meshaudit.engine.fpmap import FingerprintMap, IdMap, new_map

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class FairShare:
    """A store's fair sharing among observers (the sidecar, or the service, that reported what it
    holds): each may hold ``SHARE`` of the store (``quota`` entries). ``evicted_by`` counts whose
    entries the store evicted for capacity, bounded (cleared past ``LIMIT`` observers); the daemon
    takes it every second and names the top offender in a metric and a rate-limited log line."""

    SHARE: ClassVar[float] = 1 / 8
    LIMIT: ClassVar[int] = 1000

    __slots__ = ("evicted_by", "quota")

    def __init__(self, max_items: int) -> None:
        self.quota = max(1, int(max_items * self.SHARE))
        self.evicted_by: dict[str, int] = {}

    def evicted(self, observer: str, n: int = 1) -> None:
        by = self.evicted_by
        if len(by) >= self.LIMIT and observer not in by:
            by.clear()
        by[observer] = by.get(observer, 0) + n

    def take(self) -> dict[str, int]:
        """The evictions counted since the last call, by observer."""
        counts, self.evicted_by = self.evicted_by, {}
        return counts


class TTLStore(Generic[K, V]):
    __slots__ = ("_data", "evicted_capacity", "expired", "max_items", "name", "on_expire", "ttl")

    def __init__(
        self,
        name: str,
        ttl: float,
        max_items: int,
        on_expire: Callable[[K, V, float], None] | None = None,
    ) -> None:
        self.name = name
        self.ttl = ttl
        self.max_items = max_items
        self.on_expire = on_expire
        # value, deadline
        self._data: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self.expired = 0
        self.evicted_capacity = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: K) -> bool:
        return key in self._data

    def get(self, key: K) -> V | None:
        item = self._data.get(key)
        return None if item is None else item[0]

    def put(self, key: K, value: V, now: float) -> None:
        """Insert or refresh ``key``; evict the oldest entry when full."""
        data = self._data
        if key in data:
            data.move_to_end(key)
            data[key] = (value, now + self.ttl)
        else:
            self.add(key, value, now)

    def add(self, key: K, value: V, now: float) -> bool:
        """Insert only if absent (no refresh); True when inserted."""
        data = self._data
        if key in data:
            return False
        if len(data) >= self.max_items:
            data.popitem(last=False)
            self.evicted_capacity += 1
        data[key] = (value, now + self.ttl)
        return True

    def pop(self, key: K) -> V | None:
        item = self._data.pop(key, None)
        return None if item is None else item[0]

    def keys(self) -> KeysView[K]:
        """A live view of the keys, for membership tests inlined in a per-entry loop."""
        return self._data.keys()

    def oldest(self) -> tuple[K, V] | None:
        """The entry that expires (or is evicted) first."""
        for key, (value, _) in self._data.items():
            return key, value
        return None

    def expire(self, now: float) -> int:
        """Remove every entry whose deadline has passed, calling the hook for each."""
        data = self._data
        hook = self.on_expire
        n = 0
        while data:
            # Taken off the front, and put back if it has not expired: one look-up of the key an
            # entry (reading the front through an iterator cost another, ~3 % of the daemon's time).
            key, item = data.popitem(last=False)
            if item[1] > now:
                data[key] = item
                data.move_to_end(key, last=False)
                break
            n += 1
            if hook is not None:
                hook(key, item[0], now)
        self.expired += n
        return n

    def items(self) -> list[tuple[K, V]]:
        return [(k, v) for k, (v, _) in self._data.items()]


def due(store: GenStore[Any, Any] | PairStore[Any, Any, Any], now: float) -> bool:
    """Whether a generational store's TTL has passed since it last rotated (its first call
    only starts the clock)."""
    if store._rotated_at is None:
        store._rotated_at = now
        return False
    return now - store._rotated_at >= store.ttl


class GenStore(Generic[K, V]):
    """Generational store: ``put`` writes the current dict; every ``ttl`` (checked by ``expire``,
    which the engine calls on its tick) the previous generation is dropped and the current one
    becomes the previous. When the current dict reaches half of ``max_items`` it is rotated early
    and the dropped generation counts as evicted for capacity. No on-expire hook: nothing in a
    GenStore is an event when it goes. Values must not be None (None means absent).

    With ``owner`` (the observer a value came from) the store is shared fairly: when the current
    dict is full, the entries of every observer holding more than its share go first (counted in
    ``fair.evicted_by``), and the generation rotates only if that did not make room. Nothing is
    added to a write: the owners are counted only when the store is full.

    With ``fingerprints`` the generations are :mod:`meshaudit.engine.fpmap` maps, which keep a
    key's 64-bit hash and not the key (for a store written per entry, whose keys would otherwise
    stay alive for its TTL): two keys with one hash are one key, and the store has no ``items``
    and no ``pop``."""

    __slots__ = (
        "_cur", "_half", "_new", "_old", "_owner", "_rotated_at", "evicted_capacity", "expired", "fair", "max_items",
        "name", "ttl",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        ttl: float,
        max_items: int,
        owner: Callable[[V], str] | None = None,
        fingerprints: bool = False,
    ) -> None:
        self.name = name
        self.ttl = ttl
        self.max_items = max_items
        self._half = max(1, max_items // 2)
        self._new: Callable[[], IdMap[K, V]] = new_map if fingerprints else dict
        self._cur: IdMap[K, V] = self._new()
        self._old: IdMap[K, V] = self._new()
        self._rotated_at: float | None = None
        self.expired = 0
        self.evicted_capacity = 0
        self._owner = owner
        self.fair = FairShare(max_items) if owner is not None else None

    def __len__(self) -> int:
        return len(self._cur) + len(self._old)

    def __contains__(self, key: K) -> bool:
        return key in self._cur or key in self._old

    def get(self, key: K) -> V | None:
        v = self._cur.get(key)
        return self._old.get(key) if v is None else v

    def put(self, key: K, value: V, now: float) -> None:
        cur = self._cur
        cur[key] = value
        if len(cur) >= self._half:
            self._spill(now)

    def writable(self) -> IdMap[K, V]:
        """The current generation, for a batch of writes in place; call ``settle`` after."""
        return self._cur

    def generations(self) -> tuple[IdMap[K, V], IdMap[K, V]]:
        """(current, previous) maps, for look-ups inlined in a per-entry loop (current first);
        valid until the next write through ``put``, ``settle`` or ``expire``."""
        return self._cur, self._old

    def settle(self, now: float) -> None:
        """The capacity check after writes through ``writable``."""
        if len(self._cur) >= self._half:
            self._spill(now)

    def _spill(self, now: float) -> None:
        """The current generation is full: the observers over their share rotate alone; if that
        leaves it full, everyone's rotates (the dropped generation counts as capacity)."""
        if self._owner is not None and self._rotate_over_share() and len(self._cur) < self._half:
            return
        self.evicted_capacity += len(self._old)
        self._old = self._cur
        self._cur = self._new()
        self._rotated_at = now

    def _held(self, *gens: IdMap[K, V]) -> tuple[Counter[str], dict[V, str]]:
        """Entries per owner in ``gens``, and each distinct value's owner. The values repeat
        (interned parties, one a sidecar): they are counted as they are, at C speed, and
        ``owner`` runs once a distinct value, not once an entry (an f-string for the outbound
        index, for each of the 200 000 entries of a full store at each of its rotations: half
        the time of this count)."""
        owner = self._owner
        assert owner is not None
        per_value: Counter[V] = Counter()
        for gen in gens:
            per_value.update(_values(gen))
        names = {v: owner(v) for v in per_value}
        held: Counter[str] = Counter()
        for v, n in per_value.items():
            held[names[v]] += n
        return held, names

    def _rotate_over_share(self) -> bool:
        """The entries of each observer over its share rotate alone: its previous generation is
        dropped and its current one becomes its previous (dropped too when the previous
        generation would outgrow a whole rotation's). True if any observer was over."""
        fair = self.fair
        assert fair is not None
        cur, old = self._cur, self._old
        held, names = self._held(cur, old)
        over = {o for o, n in held.items() if n > fair.quota}
        if not over:
            return False
        kept_old, gone = _split(old, lambda v: names[v] not in over)
        moved, stay = _split(cur, lambda v: names[v] in over)
        dropped = Counter(names[v] for v in _values(gone))
        if len(kept_old) + len(moved) <= len(cur):
            _merge(kept_old, moved)
        else:  # no room: its current entries go too
            dropped.update(names[v] for v in _values(moved))
        self._cur = stay
        self._old = kept_old
        for o, n in dropped.items():
            fair.evicted(str(o), n)
            self.evicted_capacity += n
        return True

    def pop(self, key: K) -> V | None:
        cur, old = self._cur, self._old
        if not isinstance(cur, dict) or not isinstance(old, dict):
            raise TypeError(f"{self.name}: a store of fingerprints cannot pop a key")
        v: V | None = cur.pop(key, None)
        w: V | None = old.pop(key, None)
        return w if v is None else v

    def expire(self, now: float) -> int:
        """Rotate when a TTL has passed since the last rotation; returns the entries dropped."""
        if not due(self, now):
            return 0
        n = len(self._old)
        self._old = self._cur
        self._cur = self._new()
        self._rotated_at = now
        self.expired += n
        return n

    def items(self) -> list[tuple[K, V]]:
        cur, old = self._cur, self._old
        if not isinstance(cur, dict) or not isinstance(old, dict):
            raise TypeError(f"{self.name}: a store of fingerprints has no keys")
        merged = dict(old)
        merged.update(cur)
        return list(merged.items())


def _values(m: IdMap[K, V]) -> Iterable[V]:
    return m.values() if isinstance(m, dict) else cast("FingerprintMap[K, V]", m).values()


def _split(m: IdMap[K, V], keep: Callable[[V], bool]) -> tuple[IdMap[K, V], IdMap[K, V]]:
    """New maps of ``m``'s entries whose value ``keep`` finds true, and of the others."""
    if isinstance(m, dict):
        kept = {k: v for k, v in m.items() if keep(v)}
        return kept, {k: v for k, v in m.items() if k not in kept}
    return cast("FingerprintMap[K, V]", m).partition(keep)


def _merge(into: IdMap[K, V], other: IdMap[K, V]) -> None:
    """Every entry of ``other`` (a map of the same kind) set in ``into``."""
    if isinstance(into, dict):
        into.update(cast("dict[K, V]", other))
    else:
        cast("FingerprintMap[K, V]", into).update(cast("FingerprintMap[K, V]", other))


G = TypeVar("G", bound=Hashable)


class PairStore(Generic[G, K, V]):
    """A :class:`GenStore` keyed by pairs (group, key), held as one map per group: what the
    correlation index writes for nearly every entry, (service, request id) and (service, trace
    id). A tuple key per write cost a tuple allocation, its hash and its tracking by the garbage
    collector, and made the index the largest single cost of an entry; here a write is one store
    into the group's map (a batch comes from one sidecar: one group), keyed by the id string,
    whose hash Python caches. The group's map keeps the key's 64-bit hash, not the key
    (:mod:`meshaudit.engine.fpmap`: keeping a minute of id strings alive slowed every entry,
    engine/_fpmap.c): two keys of one group with the same hash are one key. Same generations,
    TTL and capacity as a GenStore; the capacity counts pairs.

    Groups are observers (the service whose sidecar logged the entries), and the store is shared
    fairly among them: when the current generation is full, every group holding more than its
    share loses its pairs (counted in ``fair.evicted_by``), and the generation rotates only if
    that did not make room. A flood from one service so never rotates another's pairs away."""

    __slots__ = (
        "_cur", "_half", "_n_cur", "_n_old", "_old", "_rotated_at", "evicted_capacity", "expired", "fair", "name",
        "ttl",
    )  # fmt: skip

    def __init__(self, name: str, ttl: float, max_items: int) -> None:
        self.name = name
        self.ttl = ttl
        self.fair = FairShare(max_items)
        self._half = max(1, max_items // 2)
        self._cur: dict[G, FingerprintMap[K, V]] = {}
        self._old: dict[G, FingerprintMap[K, V]] = {}
        self._n_cur = 0  # pairs in the current generation (kept by ``settle``)
        self._n_old = 0
        self._rotated_at: float | None = None
        self.expired = 0
        self.evicted_capacity = 0

    def __len__(self) -> int:
        return self._n_cur + self._n_old

    def has(self, group: G, key: K) -> bool:
        cur = self._cur.get(group)
        if cur is not None and key in cur:
            return True
        old = self._old.get(group)
        return old is not None and key in old

    def get(self, group: G, key: K) -> V | None:
        cur = self._cur.get(group)
        v = cur.get(key) if cur is not None else None
        if v is None:
            old = self._old.get(group)
            v = old.get(key) if old is not None else None
        return v

    def put(self, group: G, key: K, value: V, now: float) -> None:
        d = self.writable(group)
        n = len(d)
        d[key] = value
        self.settle(now, len(d) - n)

    def writable(self, group: G) -> FingerprintMap[K, V]:
        """The group's map in the current generation, for writes in place; then ``settle``
        with the number of pairs added."""
        d = self._cur.get(group)
        if d is None:
            d = self._cur[group] = new_map()
        return d

    def generations(self) -> tuple[dict[G, FingerprintMap[K, V]], dict[G, FingerprintMap[K, V]]]:
        """(current, previous) dicts of the groups' maps, for look-ups inlined in a per-entry
        loop; valid until the next ``put``, ``settle`` or ``expire``."""
        return self._cur, self._old

    def settle(self, now: float, added: int) -> None:
        """The capacity check after ``added`` new pairs were written through ``writable``."""
        self._n_cur += added
        if self._n_cur >= self._half and not (self._rotate_over_share() and self._n_cur < self._half):
            self.evicted_capacity += self._n_old
            self._rotate(now)

    def _rotate_over_share(self) -> bool:
        """Each group over its share rotates alone: its previous generation is dropped and its
        current one becomes its previous (dropped too when the previous generation would
        outgrow a whole rotation's). True if any group was over."""
        cur, old, fair = self._cur, self._old, self.fair
        over = [g for g, d in cur.items() if len(d) + len(old.get(g, ())) > fair.quota]
        over += [g for g, d in old.items() if len(d) > fair.quota and g not in cur]
        if not over:
            return False
        room = self._n_cur  # what a whole rotation would leave in the previous generation
        for group in over:
            mine = cur.pop(group) if group in cur else new_map()
            before = old.pop(group, None)
            dropped = len(before) if before is not None else 0
            self._n_cur -= len(mine)
            self._n_old -= dropped
            if self._n_old + len(mine) <= room:
                old[group] = mine
                self._n_old += len(mine)
            else:  # no room: its current pairs go too
                dropped += len(mine)
            if dropped:
                self.evicted_capacity += dropped
                fair.evicted(str(group), dropped)
        return True

    def _rotate(self, now: float) -> None:
        self._old, self._n_old = self._cur, self._n_cur
        self._cur, self._n_cur = {}, 0
        self._rotated_at = now

    def expire(self, now: float) -> int:
        """Rotate when a TTL has passed since the last rotation; returns the pairs dropped."""
        if not due(self, now):
            return 0
        n = self._n_old
        self._rotate(now)
        self.expired += n
        return n


class Store(Protocol):
    """What the metrics need of any store."""

    name: str
    expired: int
    evicted_capacity: int

    def __len__(self) -> int: ...


def fair_share(store: Store) -> FairShare | None:
    """The store's fair share among observers, if it has one."""
    fair = getattr(store, "fair", None)
    return fair if isinstance(fair, FairShare) else None
