"""Bounded window store: time-to-live plus a maximum size, with an on-expire hook and
eviction counters (after the OpenTelemetry Collector servicegraph store).

Entries expire in insertion order: every entry of one store has the same TTL, so the oldest
insertion is always the first to expire and ``expire`` is O(expired). Refreshing an entry
moves it to the back. When full, the oldest entry is evicted and counted as ``capacity``;
the expire hook is *not* called for it (a capacity eviction is a loss of evidence, never a
violation: alerting on it would turn overload into false alarms).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


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
        elif len(data) >= self.max_items:
            data.popitem(last=False)
            self.evicted_capacity += 1
        data[key] = (value, now + self.ttl)

    def add(self, key: K, value: V, now: float) -> bool:
        """Insert only if absent (no refresh); True when inserted."""
        if key in self._data:
            return False
        self.put(key, value, now)
        return True

    def pop(self, key: K) -> V | None:
        item = self._data.pop(key, None)
        return None if item is None else item[0]

    def expire(self, now: float) -> int:
        """Remove every entry whose deadline has passed, calling the hook for each."""
        data = self._data
        hook = self.on_expire
        n = 0
        while data:
            key, (value, deadline) = next(iter(data.items()))
            if deadline > now:
                break
            data.popitem(last=False)
            n += 1
            if hook is not None:
                hook(key, value, now)
        self.expired += n
        return n

    def values(self) -> list[V]:
        return [v for v, _ in self._data.values()]

    def items(self) -> list[tuple[K, V]]:
        return [(k, v) for k, (v, _) in self._data.items()]
