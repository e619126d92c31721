"""unexpected_edge: traffic the policy does not allow: a (source -> destination) edge not in
``policy.edges``; in ``learn`` mode, an edge not in the baseline learned during the first
``learn_secs``. Traffic to PassthroughCluster/BlackHoleCluster is an edge out of the mesh, named
by its host.

Both sidecars of one request may log it; the aggregator counts a request id once per rule.
Hops whose source cannot be named (plaintext with no pairing yet) are left to plaintext_hop.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from meshaudit.engine.api import EngineContext, Rule, RuleConfig, Severity
from meshaudit.engine.store import TTLStore
from meshaudit.model import UNKNOWN, Hop


class UnexpectedEdgeConfig(RuleConfig):
    severity: Severity = "high"
    mode: Literal["policy", "learn"] = "policy"
    learn_secs: int = Field(600, ge=1, description="In learn mode: edges seen this long after start are the baseline.")


class UnexpectedEdge(Rule[UnexpectedEdgeConfig]):
    name = "unexpected_edge"
    Config = UnexpectedEdgeConfig
    summary = "Traffic from {src} to {dst} is not allowed by policy"

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self.learn = self.cfg.mode == "learn"
        # Baseline edges: kept for the daemon's life (bounded; a full baseline stops learning).
        self.baseline: TTLStore[tuple[str, str], bool] = TTLStore("learned_edges", float("inf"), ctx.max_items)
        self.store(self.baseline)
        self.learned_new: list[tuple[str, str]] = []  # with peers: learned here, not yet shared

    def on_hops(self, hops: list[Hop], now: float) -> None:
        ctx = self.ctx
        policy = ctx.policy
        if not self.learn and not policy.has_edges:
            return
        learning = self.learn and ctx.started is not None and now - ctx.started < self.cfg.learn_secs
        sev = self.cfg.severity
        edge_cache = policy.edge_cache
        for h in hops:
            if h.direction == UNKNOWN:
                continue
            # corr.named_source() and edge_allowed()'s cache hit, inlined: this loop runs for every entry,
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
            if self.exempt(src, dst, h):
                continue
            self.violation(src, dst, h, detail, h.start, sev)
