"""The compiled policy: glob patterns turned into regexes once, answers cached per party
(``Identity.uid``: by value, so one party interned twice shares its entries; a mesh has few
parties, so the caches stay small; they are bounded anyway).

A pattern matches a party when it matches any of its names: ``service.namespace``, service,
SPIFFE principal, workload or address. In path patterns ``*`` matches any characters,
including ``/``; the query string is ignored.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from meshaudit.config import Policy
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
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[uid] = ok
        return ok


class PathMatcher:
    """Path globs, matched without the query string. The common shapes skip the regex: exact
    paths are a set lookup and ``prefix*`` patterns one ``str.startswith`` over all prefixes."""

    __slots__ = ("_exact", "_match_all", "_prefixes", "_re", "patterns")

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
        self._prefixes = tuple(prefixes)
        self._re = _compile(rest) if rest else None

    def __call__(self, path: str | None) -> bool:
        if self._match_all:
            return True
        if path is None:
            return False
        q = path.find("?")
        if q >= 0:
            path = path[:q]
        if path in self._exact or (self._prefixes and path.startswith(self._prefixes)):
            return True
        return self._re is not None and self._re.match(path) is not None


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
        # source uid -> destination uid -> allowed: two lookups, no key tuple per hop
        # (UnexpectedEdge reads it directly on its hot path, and calls edge_allowed on a miss)
        self.edge_cache: dict[str, dict[str, bool]] = {}
        # destination uid -> method -> the paths allowed for it (None key: any other method), or
        # None when no route policy covers the destination
        self.route_cache: dict[str, dict[str | None, PathMatcher] | None] = {}
        self._routes = [
            _Route(PartyMatcher(r.to), [(frozenset(a.methods), PathMatcher(a.paths)) for a in r.allow])
            for r in policy.routes
        ]
        self._exemptions = [
            _Exemption(x.rules, PartyMatcher(x.from_), PartyMatcher(x.to), PathMatcher(x.paths))
            for x in policy.exemptions
        ]
        self.mesh_services = PartyMatcher(policy.mesh_services)
        self.has_mesh_services = bool(policy.mesh_services)

    def edge_allowed(self, src: Identity, dst: Identity) -> bool:
        by_dst = self.edge_cache.get(src.uid)
        if by_dst is not None:
            found = by_dst.get(dst.uid)
            if found is not None:
                return found
        else:
            if len(self.edge_cache) >= _CACHE_LIMIT:
                self.edge_cache.clear()
            by_dst = self.edge_cache[src.uid] = {}
        ok = any(f(src) and t(dst) for f, t in self._edges)
        if len(by_dst) >= _CACHE_LIMIT:
            by_dst.clear()
        by_dst[dst.uid] = ok
        return ok

    def route_check(self, dst: Identity) -> dict[str | None, PathMatcher] | None:
        """The paths allowed on ``dst`` per method (None key: any other method), cached; None when
        no route policy covers ``dst``. UnexpectedPath reads ``route_cache`` directly on a hit."""
        cache = self.route_cache
        if dst.uid in cache:
            return cache[dst.uid]
        check: dict[str | None, PathMatcher] | None = None
        allows = [(methods, paths) for r in self._routes if r.dst(dst) for methods, paths in r.allow]
        if allows:
            named = {m for methods, _ in allows for m in methods if m != "*"}
            check = {
                method: PathMatcher(
                    [p for methods, paths in allows if "*" in methods or method in methods for p in paths.patterns]
                )
                for method in [*named, None]
            }
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[dst.uid] = check
        return check

    def exempt(self, rule: str, src: Identity, dst: Identity, path: str | None) -> bool:
        return any(rule in x.rules and x.src(src) and x.dst(dst) and x.paths(path) for x in self._exemptions)
