"""unexpected_edge: traffic the policy does not allow: a (source -> destination) edge not in
``policy.edges``; in ``learn`` mode, an edge not in the baseline learned during the first
``learn_secs``. Traffic to PassthroughCluster/BlackHoleCluster is an edge out of the mesh, named
by its host.

Both sidecars of one request may log it; the aggregator counts a request id once per rule.
Hops whose source cannot be named (plaintext with no pairing yet) are left to plaintext_hop.

Each violation says whether the mesh blocked the request (``engine/enforcement.py``): denied by
RBAC or ext_authz (``severity``) or served (``severity_when_served``); a source sidecar's entry
that cannot tell waits up to ``denial_wait_ms`` for the destination sidecar's entry.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from meshaudit.engine.api import EngineContext, Rule, RuleConfig, Severity
from meshaudit.engine.enforcement import DENIAL_WAIT_MS, Enforcement
from meshaudit.engine.store import TTLStore
from meshaudit.model import UNKNOWN, Hop


class UnexpectedEdgeConfig(RuleConfig):
    severity: Severity = "high"
    mode: Literal["policy", "learn"] = "policy"
    learn_secs: int = Field(600, ge=1, description="In learn mode: edges seen this long after start are the baseline.")
    severity_when_served: Severity = Field(
        "critical", description="Severity when a request the policy forbids was served (not denied by RBAC/ext_authz)."
    )
    denial_wait_ms: int = Field(
        DENIAL_WAIT_MS,
        ge=0,
        description="How long a source sidecar's entry that cannot tell a denial (HTTP 4xx/5xx from the "
        "upstream, TCP) waits for the destination sidecar's entry of the same request.",
    )


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
        cfg = self.cfg
        self.enforcement = Enforcement(self, cfg.denial_wait_ms / 1000, cfg.severity, cfg.severity_when_served)

    def configure(self) -> None:
        cfg = self.cfg
        self.learn = cfg.mode == "learn"
        self.enforcement.configure(cfg.denial_wait_ms / 1000, cfg.severity, cfg.severity_when_served)

    def on_hops(self, hops: list[Hop], now: float) -> None:
        ctx = self.ctx
        policy = ctx.policy
        if not self.learn and not policy.has_edges:
            return
        learning = self.learn and ctx.started is not None and now - ctx.started < self.cfg.learn_secs
        edge_cache = policy.edge_cache
        enf = self.enforcement
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
            enf.judge(h, src, dst, detail, now)
        if len(enf.pending):
            enf.resolve(hops)

    def on_tick(self, now: float) -> None:
        super().on_tick(now)
        self.enforcement.tick(now)
