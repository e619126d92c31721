"""Maps keyed by a key's 64-bit hash alone (its fingerprint), for the stores written per entry:
the inner maps of the correlation's per-service id indexes (:class:`meshaudit.engine.store.PairStore`),
the generations of the outbound indexes and of error_burst's inbound request ids
(``GenStore(fingerprints=True)``), and the excused requests of policy exceptions. Nothing of a
key is kept, so a minute of request and trace ids does not keep a minute of id strings alive
(``_fpmap.c`` says why that matters, and why a fingerprint is enough for ids the client chooses
anyway).

:func:`new_map` makes one: the C ``FpMap`` that ``pip install`` builds, else (a source tree where
it was not built) :class:`HashMap`, the same in Python and the reference its tests compare with.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar

K = TypeVar("K")
K_contra = TypeVar("K_contra", contravariant=True)
V = TypeVar("V")


class IdMap(Protocol[K_contra, V]):
    """What a per-entry loop writes and reads of a store's generation: a dict, or a
    :class:`FingerprintMap`."""

    def __setitem__(self, key: K_contra, value: V, /) -> None: ...

    def __getitem__(self, key: K_contra, /) -> V: ...

    def __contains__(self, key: object, /) -> bool: ...

    def __len__(self) -> int: ...

    def get(self, key: K_contra, /) -> V | None: ...


class FingerprintMap(IdMap[K, V], Protocol[K, V]):
    """``m[key] = value``, ``m[key]``, ``key in m``, ``len(m)``, ``m.get(key)``, ``values()``,
    ``partition(keep)``, ``update(other)``: a key is its hash; no deletion, no keys."""

    def values(self) -> list[V]: ...

    def partition(self, keep: Callable[[V], bool], /) -> tuple[FingerprintMap[K, V], FingerprintMap[K, V]]:
        """New maps of the entries whose value ``keep`` finds true, and of the others."""
        ...

    def update(self, other: FingerprintMap[K, V], /) -> None:
        """Every entry of another map of this kind, set here."""
        ...


class HashMap(dict[int, Any]):
    """:class:`FingerprintMap` in Python: a dict keyed by ``hash(key)`` (the C map's fingerprint,
    with a hash of 0 counted as 1 as there)."""

    __slots__ = ()

    def __setitem__(self, key: object, value: Any, /) -> None:
        super().__setitem__(hash(key) or 1, value)

    def __getitem__(self, key: object, /) -> Any:
        try:
            return super().__getitem__(hash(key) or 1)
        except KeyError:
            raise KeyError(key) from None

    def __contains__(self, key: object, /) -> bool:
        return super().__contains__(hash(key) or 1)

    def get(self, key: object, default: Any = None, /) -> Any:
        return super().get(hash(key) or 1, default)

    def __delitem__(self, key: object, /) -> None:
        raise TypeError("an FpMap's keys cannot be deleted")

    def values(self) -> list[Any]:  # type: ignore[override]  # a list, as the C map's
        return list(super().values())

    def partition(self, keep: Callable[[Any], bool], /) -> tuple[HashMap, HashMap]:
        kept, rest = HashMap(), HashMap()
        for fp, v in self.items():
            dict.__setitem__(kept if keep(v) else rest, fp, v)
        return kept, rest

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        if not isinstance(other, HashMap) or kwargs:
            raise TypeError("update() takes another FpMap")
        super().update(other)


def _maker() -> Callable[[], Any]:
    try:
        return importlib.import_module("meshaudit.engine._fpmap").FpMap  # type: ignore[no-any-return]
    except ImportError:
        return HashMap


_MAKE: Final = _maker()
NATIVE: Final = _MAKE is not HashMap  # the C map was built (``pip install``)


def new_map() -> FingerprintMap[Any, Any]:
    """An empty map: the C one when it was built, else :class:`HashMap`."""
    m: FingerprintMap[Any, Any] = _MAKE()
    return m
