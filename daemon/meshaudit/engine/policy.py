"""The compiled policy: glob patterns turned into regexes once, answers cached per party
(``Identity.uid``: by value, so one party interned twice shares its entries; a mesh has few
parties, so the caches stay small; they are bounded anyway).

A pattern matches a party when it matches any of its names: ``service.namespace``, service,
SPIFFE principal, workload or address. In path patterns ``*`` matches any characters,
including ``/``; the query string is ignored.
"""

from __future__ import annotations

from meshaudit.config import Policy
from meshaudit.engine.exceptions import Exceptions
from meshaudit.engine.matchers import CACHE_LIMIT, PartyMatcher, PathMatcher
from meshaudit.model import Hop, Identity


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
        self.exceptions = Exceptions(policy.exceptions, policy.exemptions)
        self.mesh_services = PartyMatcher(policy.mesh_services)
        self.has_mesh_services = bool(policy.mesh_services)

    def edge_allowed(self, src: Identity, dst: Identity) -> bool:
        by_dst = self.edge_cache.get(src.uid)
        if by_dst is not None:
            found = by_dst.get(dst.uid)
            if found is not None:
                return found
        else:
            if len(self.edge_cache) >= CACHE_LIMIT:
                self.edge_cache.clear()
            by_dst = self.edge_cache[src.uid] = {}
        ok = any(f(src) and t(dst) for f, t in self._edges)
        if len(by_dst) >= CACHE_LIMIT:
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
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        cache[dst.uid] = check
        return check

    def exempt(self, rule: str, src: Identity, dst: Identity, hop: Hop | None) -> bool:
        """Whether an exception of the policy covers this violation of ``rule``."""
        return self.exceptions.exempt(rule, src, dst, hop)
