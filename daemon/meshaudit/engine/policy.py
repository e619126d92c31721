"""The compiled policy: glob patterns turned into regexes once, answers cached per interned
identity (a mesh has few parties, so the caches stay small; they are bounded anyway).

A pattern matches a party when it matches any of its names: ``service.namespace``, service,
SPIFFE principal, workload or address. In path patterns ``*`` matches any characters,
including ``/``; the query string is ignored.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from meshaudit.config import Policy, RuleName
from meshaudit.model import Identity

_CACHE_LIMIT = 100_000


def _compile(patterns: Sequence[str]) -> re.Pattern[str]:
    if not patterns:
        return re.compile(r"(?!)")  # matches nothing
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class PartyMatcher:
    __slots__ = ("_cache", "_match_all", "_re")

    def __init__(self, patterns: Sequence[str]) -> None:
        self._re = _compile(patterns)
        self._match_all = "*" in patterns
        self._cache: dict[Identity, bool] = {}

    def __call__(self, party: Identity) -> bool:
        if self._match_all:
            return True
        found = self._cache.get(party)
        if found is not None:
            return found
        m = self._re.match
        ok = any(
            n is not None and m(n) is not None
            for n in (party.key, party.service, party.principal, party.workload, party.address)
        )
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[party] = ok
        return ok


class PathMatcher:
    __slots__ = ("_match_all", "_re")

    def __init__(self, patterns: Sequence[str]) -> None:
        self._re = _compile(patterns)
        self._match_all = "*" in patterns

    def __call__(self, path: str | None) -> bool:
        if self._match_all:
            return True
        if path is None:
            return False
        q = path.find("?")
        return self._re.match(path if q < 0 else path[:q]) is not None


class _Exemption:
    __slots__ = ("dst", "paths", "rules", "src")

    def __init__(self, rules: Sequence[str], src: PartyMatcher, dst: PartyMatcher, paths: PathMatcher) -> None:
        self.rules = frozenset(rules)
        self.src = src
        self.dst = dst
        self.paths = paths


class _Route:
    __slots__ = ("allow", "dst")

    def __init__(self, dst: PartyMatcher, allow: list[tuple[frozenset[str], PathMatcher]]) -> None:
        self.dst = dst
        self.allow = allow


class CompiledPolicy:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.has_edges = policy.edges is not None
        self._edges = [(PartyMatcher(e.from_), PartyMatcher(e.to)) for e in policy.edges or ()]
        self._edge_cache: dict[tuple[Identity, Identity], bool] = {}
        self._routes = [
            _Route(PartyMatcher(r.to), [(frozenset(a.methods), PathMatcher(a.paths)) for a in r.allow])
            for r in policy.routes
        ]
        self._route_cache: dict[Identity, list[_Route]] = {}
        self._exemptions = [
            _Exemption(x.rules, PartyMatcher(x.from_), PartyMatcher(x.to), PathMatcher(x.paths))
            for x in policy.exemptions
        ]
        self.mesh_services = PartyMatcher(policy.mesh_services)
        self.has_mesh_services = bool(policy.mesh_services)

    def edge_allowed(self, src: Identity, dst: Identity) -> bool:
        k = (src, dst)
        found = self._edge_cache.get(k)
        if found is not None:
            return found
        ok = any(f(src) and t(dst) for f, t in self._edges)
        if len(self._edge_cache) >= _CACHE_LIMIT:
            self._edge_cache.clear()
        self._edge_cache[k] = ok
        return ok

    def routes_for(self, dst: Identity) -> list[_Route]:
        found = self._route_cache.get(dst)
        if found is None:
            found = [r for r in self._routes if r.dst(dst)]
            if len(self._route_cache) >= _CACHE_LIMIT:
                self._route_cache.clear()
            self._route_cache[dst] = found
        return found

    def path_allowed(self, dst: Identity, method: str, path: str | None) -> bool | None:
        """True/False when a route policy covers ``dst``; None when none does."""
        routes = self.routes_for(dst)
        if not routes:
            return None
        for r in routes:
            for methods, paths in r.allow:
                if ("*" in methods or method in methods) and paths(path):
                    return True
        return False

    def exempt(self, rule: RuleName, src: Identity, dst: Identity, path: str | None) -> bool:
        return any(rule in x.rules and x.src(src) and x.dst(dst) and x.paths(path) for x in self._exemptions)
