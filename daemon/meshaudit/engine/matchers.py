"""Pattern matchers of the policy: parties (shell globs against any of a party's names, cached
per party) and paths (globs where ``*`` crosses ``/``; the query string is ignored).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from meshaudit.model import Identity

CACHE_LIMIT = 100_000


def _compile(patterns: Sequence[str]) -> re.Pattern[str]:
    if not patterns:
        return re.compile(r"(?!)")  # matches nothing
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class PartyMatcher:
    __slots__ = ("_cache", "_match_all", "_re")

    def __init__(self, patterns: Sequence[str]) -> None:
        self._re = _compile(patterns)
        self._match_all = "*" in patterns
        self._cache: dict[str, bool] = {}  # by Identity.uid

    def __call__(self, party: Identity) -> bool:
        if self._match_all:
            return True
        uid = party.uid
        found = self._cache.get(uid)
        if found is not None:
            return found
        m = self._re.match
        ok = any(
            n is not None and m(n) is not None
            for n in (party.key, party.service, party.principal, party.workload, party.address)
        )
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[uid] = ok
        return ok


class PathMatcher:
    """Path globs, matched without the query string. The common shapes skip the regex: exact
    paths are a set lookup and ``prefix*`` patterns one ``str.startswith`` over all prefixes."""

    __slots__ = ("_exact", "_match_all", "_re", "patterns", "prefixes")

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._match_all = "*" in patterns
        exact: set[str] = set()
        prefixes: list[str] = []
        rest: list[str] = []
        for p in patterns:
            body = p[:-1] if p.endswith("*") else p
            if any(ch in body for ch in "*?["):
                rest.append(p)
            elif p.endswith("*"):
                prefixes.append(body)
            else:
                exact.add(p)
        self._exact = frozenset(exact)
        # Public for a hot loop that tests them inline (``path.startswith(m.prefixes)`` is True
        # only for a path the matcher allows): "" when every path is allowed.
        self.prefixes: tuple[str, ...] = ("",) if self._match_all else tuple(prefixes)
        self._re = _compile(rest) if rest else None

    def __call__(self, path: str | None) -> bool:
        if self._match_all:
            return True
        if path is None:
            return False
        # A prefix holds no "?" (a glob character: such a pattern goes to the regex), so it
        # starts the path exactly when it starts the path without its query: tested first, on
        # the path as it is (most requests match a prefix).
        if path.startswith(self.prefixes):
            return True
        q = path.find("?")
        if q >= 0:
            path = path[:q]
        if path in self._exact:
            return True
        return self._re is not None and self._re.match(path) is not None
