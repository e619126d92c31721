"""The compiled policy: glob patterns turned into regexes once, answers cached per party
(``Identity.uid``: by value, so one party interned twice shares its entries; a mesh has few
parties, so the caches stay small; they are bounded anyway).

A pattern matches a party when it matches any of its names: ``service.namespace``, service,
SPIFFE principal, workload or address. In path patterns ``*`` matches any characters,
including ``/``; the query string is ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshaudit.config import Policy
from meshaudit.engine.exceptions import Exceptions
from meshaudit.engine.matchers import CACHE_LIMIT, PartyMatcher, PathMatcher
from meshaudit.model import Hop, Identity
from meshaudit.naming import cluster_port

if TYPE_CHECKING:
    from meshaudit.engine.api import RuleConfig


class _Route:
    __slots__ = ("allow", "dst")

    def __init__(self, dst: PartyMatcher, allow: list[tuple[frozenset[str], PathMatcher]]) -> None:
        self.dst = dst
        self.allow = allow


class CompiledPolicy:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.has_edges = policy.edges is not None
        plain = [e for e in policy.edges or () if e.protocol is None and e.ports is None]
        self._edges = [(PartyMatcher(e.from_), PartyMatcher(e.to)) for e in plain]
        # Edges only for a protocol or ports: judged per hop, after the parties' cached answer.
        self._narrow = [
            (PartyMatcher(e.from_), PartyMatcher(e.to), e.protocol, frozenset(e.ports) if e.ports else None)
            for e in policy.edges or ()
            if e.protocol is not None or e.ports is not None
        ]
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
        # rule -> [(destination patterns, options)] of the policy's overrides for a destination,
        # in order (a later one over an earlier one): read by Rule.setting on violations only
        self.dst_overrides: dict[str, list[tuple[PartyMatcher, dict[str, Any]]]] = {}
        for o in policy.overrides:
            if o.to is not None:
                self.dst_overrides.setdefault(o.rule, []).insert(0, (PartyMatcher(o.to), o.options()))
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

    def narrow_edge_allows(self, src: Identity, dst: Identity, hop: Hop) -> bool:
        """Whether an edge for a protocol or ports allows this request or connection (asked
        only of traffic no plain edge allows). The port is the Envoy cluster's: the listener's on
        an inbound entry (``inbound|9000||``), the destination's on an outbound one."""
        if not self._narrow:
            return False
        protocol = "http" if hop.method is not None else "tcp"
        port = cluster_port(hop.upstream_cluster)
        return any(
            (proto is None or proto == protocol) and (ports is None or port in ports) and f(src) and t(dst)
            for f, t, proto, ports in self._narrow
        )

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

    def rule_section(self, rule: str, section: RuleConfig) -> RuleConfig:
        """``rules.<rule>`` with the policy's overrides for all traffic over it (``tls`` is
        weak_tls's), in the policy's order."""
        options: dict[str, Any] = {}
        tls = self.policy.tls
        if rule == "weak_tls" and tls is not None:
            options.update({k: v for k, v in tls.model_dump().items() if v is not None})
        for o in self.policy.overrides:
            if o.rule == rule and o.to is None:
                options.update(o.options())
        if not options:
            return section
        return type(section).model_validate({**section.model_dump(), **options})

    def exempt(self, rule: str, src: Identity, dst: Identity, hop: Hop | None) -> bool:
        """Whether an exception of the policy covers this violation of ``rule``."""
        return self.exceptions.exempt(rule, src, dst, hop)
