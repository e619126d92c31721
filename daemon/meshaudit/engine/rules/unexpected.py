"""unexpected_edge and unexpected_path: traffic the policy does not allow.

- unexpected_edge: a (source -> destination) edge not in ``policy.edges``; in ``learn`` mode,
  an edge not in the baseline learned during the first ``learn_secs``. Traffic to
  PassthroughCluster/BlackHoleCluster is an edge out of the mesh, named by its host.
- unexpected_path: an HTTP method + path not allowed for a destination that has a route policy.

Both sidecars of one request may log it; the aggregator counts a request id once per rule.
Hops whose source cannot be named (plaintext with no pairing yet) are left to plaintext_hop.
"""

from __future__ import annotations

from meshaudit.engine.core import LOGGED_ORIGINS, Emit, EngineContext, Violation
from meshaudit.engine.store import Store, TTLStore
from meshaudit.model import UNKNOWN, Hop, Identity


def _source(ctx: EngineContext, h: Hop) -> Identity | None:
    """The hop's named source, else the client sidecar's entry's (None when not paired yet)."""
    src = h.src
    if src.service is None and src.principal is None:
        return ctx.corr.source_of(h)
    return src


class UnexpectedEdge:
    name = "unexpected_edge"

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.config.rules.unexpected_edge
        self.learn = self.cfg.mode == "learn"
        # Baseline edges: kept for the daemon's life (bounded; a full baseline stops learning).
        self.baseline: TTLStore[tuple[str, str], bool] = TTLStore("learned_edges", float("inf"), ctx.max_items)
        self.learned_new: list[tuple[str, str]] = []  # with peers: learned here, not yet shared

    def stores(self) -> list[Store]:
        return [self.baseline]

    def on_hops(self, hops: list[Hop], now: float, emit: Emit) -> None:
        ctx = self.ctx
        policy = ctx.policy
        if not self.learn and not policy.has_edges:
            return
        learning = self.learn and ctx.started is not None and now - ctx.started < self.cfg.learn_secs
        sev = self.cfg.severity
        edge_cache = policy.edge_cache
        for h in hops:
            if h.direction == UNKNOWN or h.origin not in LOGGED_ORIGINS:
                continue
            # _source() and edge_allowed()'s cache hit, inlined: this loop runs for every entry,
            # and the two calls cost ~0.1 us per entry (~1 % of the daemon's work)
            src = h.src
            if src.service is None and src.principal is None:
                paired = ctx.corr.source_of(h)
                if paired is None:
                    continue
                src = paired
            dst = h.dst
            if self.learn:
                k = (src.key, dst.key)
                if learning:
                    if len(self.baseline) < self.baseline.max_items:
                        if ctx.peers and k not in self.baseline:
                            self.learned_new.append(k)
                        self.baseline.put(k, True, now)
                    continue
                if k in self.baseline:
                    continue
                detail = "edge not in the baseline learned at start-up"
            else:
                by_dst = edge_cache.get(src.uid)
                ok = by_dst.get(dst.uid) if by_dst is not None else None
                if ok or (ok is None and policy.edge_allowed(src, dst)):
                    continue
                detail = "no policy edge allows it"
            if policy.exempt("unexpected_edge", src, dst, h.path):
                continue
            emit(Violation("unexpected_edge", sev, src, dst, h, detail, h.start))

    def on_tick(self, now: float, emit: Emit) -> None:
        return


class UnexpectedPath:
    name = "unexpected_path"

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.config.rules.unexpected_path

    def stores(self) -> list[Store]:
        return []

    def on_hops(self, hops: list[Hop], now: float, emit: Emit) -> None:
        ctx = self.ctx
        policy = ctx.policy
        cache = policy.route_cache
        sev = self.cfg.severity
        for h in hops:
            method = h.method
            if method is None or h.direction == UNKNOWN or h.origin not in LOGGED_ORIGINS:
                continue
            dst = h.dst
            # route_check()'s cache hit, inlined: this loop runs for every HTTP entry
            uid = dst.uid
            check = cache[uid] if uid in cache else policy.route_check(dst)
            if check is None or (check.get(method) or check[None])(h.path):
                continue
            src = _source(ctx, h) or h.src
            if policy.exempt("unexpected_path", src, dst, h.path):
                continue
            emit(Violation("unexpected_path", sev, src, dst, h, f"{method} {h.path} is not allowed", h.start))

    def on_tick(self, now: float, emit: Emit) -> None:
        return
