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
from meshaudit.engine.sources import SourceRules
from meshaudit.model import Hop, Identity
from meshaudit.naming import cluster_port

if TYPE_CHECKING:
    from meshaudit.engine.api import RuleConfig


class _Route:
    __slots__ = ("allow", "dst")

    def __init__(self, dst: PartyMatcher, allow: list[tuple[frozenset[str], PathMatcher]]) -> None:
        self.dst = dst
        self.allow = allow


def _method_in(methods: frozenset[str], method: str | None) -> bool:
    """Whether a route's ``methods`` cover ``method`` (None: a method no route names)."""
    return "*" in methods or method in methods


class CompiledPolicy:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.sources = SourceRules(policy.sources)  # who may send for whom (receivers judge with it)
        self.has_edges = policy.edges is not None
        # (index in policy.edges, source, destination): the index names the edge that decided
        # (``allowing_edge``, for ``meshaudit policy explain``)
        edges = list(enumerate(policy.edges or ()))
        self._edges = [
            (i, PartyMatcher(e.from_), PartyMatcher(e.to)) for i, e in edges if e.protocol is None and e.ports is None
        ]
        # Edges only for a protocol or ports: judged per hop, after the parties' cached answer.
        self._narrow = [
            (i, PartyMatcher(e.from_), PartyMatcher(e.to), e.protocol, frozenset(e.ports) if e.ports else None)
            for i, e in edges
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
        # rule -> [(destination patterns, options, index in policy.overrides)] of the policy's
        # overrides for a destination, the last first (a later one over an earlier one): read
        # through ``dst_setting`` (Rule.setting) on violations only
        self.dst_overrides: dict[str, list[tuple[PartyMatcher, dict[str, Any], int]]] = {}
        for i, o in enumerate(policy.overrides):
            if o.to is not None:
                self.dst_overrides.setdefault(o.rule, []).insert(0, (PartyMatcher(o.to), o.options(), i))
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
        ok = self._plain_edge(src, dst) is not None
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
        return self._narrow_edge(src, dst, hop) is not None

    def allowing_edge(self, src: Identity, dst: Identity, hop: Hop) -> tuple[int, bool] | None:
        """Which edge allows this traffic, as unexpected_edge asks (a plain edge, then one for a
        protocol or ports): its index in ``policy.edges`` and whether it is a narrow one; None
        when none does. Not cached: for explanations (``meshaudit policy explain``)."""
        i = self._plain_edge(src, dst)
        if i is not None:
            return i, False
        i = self._narrow_edge(src, dst, hop) if self._narrow else None
        return (i, True) if i is not None else None

    def edges_from(self, src: Identity) -> list[int]:
        """The indexes in ``policy.edges`` of the edges whose ``from`` matches ``src``."""
        narrow = [(i, f) for i, f, _, _, _ in self._narrow]
        return sorted(i for i, f in [*((i, f) for i, f, _ in self._edges), *narrow] if f(src))

    def _plain_edge(self, src: Identity, dst: Identity) -> int | None:
        for i, f, t in self._edges:
            if f(src) and t(dst):
                return i
        return None

    def _narrow_edge(self, src: Identity, dst: Identity, hop: Hop) -> int | None:
        protocol = "http" if hop.method is not None else "tcp"
        port = cluster_port(hop.upstream_cluster)
        for i, f, t, proto, ports in self._narrow:
            if (proto is None or proto == protocol) and (ports is None or port in ports) and f(src) and t(dst):
                return i
        return None

    def route_check(self, dst: Identity) -> dict[str | None, PathMatcher] | None:
        """The paths allowed on ``dst`` per method (None key: any other method), cached; None when
        no route policy covers ``dst``. UnexpectedPath reads ``route_cache`` directly on a hit."""
        cache = self.route_cache
        if dst.uid in cache:
            return cache[dst.uid]
        check: dict[str | None, PathMatcher] | None = None
        routes = self._routes
        allows = [(methods, paths) for i in self.covering_routes(dst) for methods, paths in routes[i].allow]
        if allows:
            named = {m for methods, _ in allows for m in methods if m != "*"}
            check = {
                method: PathMatcher(
                    [p for methods, paths in allows if _method_in(methods, method) for p in paths.patterns]
                )
                for method in [*named, None]
            }
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        cache[dst.uid] = check
        return check

    def covering_routes(self, dst: Identity) -> list[int]:
        """The indexes in ``policy.routes`` of the routes whose ``to`` matches ``dst``."""
        return [i for i, r in enumerate(self._routes) if r.dst(dst)]

    def allowing_route(self, dst: Identity, method: str, path: str | None) -> tuple[int, int] | None:
        """Which route allows ``method`` ``path`` on ``dst``: (index in ``policy.routes``, index
        in its ``allow``), the first in the policy's order; None when none does. ``route_check``
        decides (unexpected_path); this names the entry, for explanations."""
        for i in self.covering_routes(dst):
            for j, (methods, paths) in enumerate(self._routes[i].allow):
                if _method_in(methods, method) and paths(path):
                    return i, j
        return None

    def rule_section(self, rule: str, section: RuleConfig) -> RuleConfig:
        """``rules.<rule>`` with the policy's overrides for all traffic over it (``tls`` is
        weak_tls's), in the policy's order."""
        return self.rule_section_explained(rule, section)[0]

    def rule_section_explained(self, rule: str, section: RuleConfig) -> tuple[RuleConfig, dict[str, str | int]]:
        """``rule_section``, and which part of the policy set each option it changed: ``"tls"``,
        or the index of an override in ``policy.overrides`` (the last one to set it)."""
        options: dict[str, Any] = {}
        origins: dict[str, str | int] = {}
        tls = self.policy.tls
        if rule == "weak_tls" and tls is not None:
            layer = {k: v for k, v in tls.model_dump().items() if v is not None}
            options.update(layer)
            origins.update(dict.fromkeys(layer, "tls"))
        for i, o in enumerate(self.policy.overrides):
            if o.rule == rule and o.to is None:
                layer = o.options()
                options.update(layer)
                origins.update(dict.fromkeys(layer, i))
        if not options:
            return section, origins
        return type(section).model_validate({**section.model_dump(), **options}), origins

    def dst_setting(self, rule: str, name: str, dst: Identity) -> tuple[Any, int] | None:
        """The value the policy's overrides for a destination give option ``name`` of ``rule`` on
        traffic to ``dst`` (the last override that sets it and matches), and that override's index
        in ``policy.overrides``; None when none does (the rule's own section applies)."""
        for matches, options, i in self.dst_overrides.get(rule, ()):
            if name in options and matches(dst):
                return options[name], i
        return None

    def exempt(self, rule: str, src: Identity, dst: Identity, hop: Hop | None) -> bool:
        """Whether an exception of the policy covers this violation of ``rule``."""
        return self.exceptions.exempt(rule, src, dst, hop)
