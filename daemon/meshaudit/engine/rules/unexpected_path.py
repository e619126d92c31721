"""unexpected_path: an HTTP method + path not allowed for a destination that has a route policy
(``policy.routes``).

Both sidecars of one request may log it; the aggregator counts a request id once per rule.

Each violation says whether the mesh blocked the request (``engine/enforcement.py``): denied by
RBAC or ext_authz (``severity``) or served (``severity_when_served``); a source sidecar's entry
answered 4xx/5xx by its upstream waits up to ``denial_wait_ms`` for the destination sidecar's entry.
"""

from __future__ import annotations

from pydantic import Field

from meshaudit.engine.api import EngineContext, Rule, RuleConfig, Severity
from meshaudit.engine.enforcement import DENIAL_WAIT_MS, Enforcement
from meshaudit.model import UNKNOWN, Hop


class UnexpectedPathConfig(RuleConfig):
    severity: Severity = "warning"
    severity_when_served: Severity = Field(
        "critical", description="Severity when a request the policy forbids was served (not denied by RBAC/ext_authz)."
    )
    denial_wait_ms: int = Field(
        DENIAL_WAIT_MS,
        ge=0,
        description="How long a source sidecar's entry answered 4xx/5xx by its upstream waits for the "
        "destination sidecar's entry of the same request.",
    )


class UnexpectedPath(Rule[UnexpectedPathConfig]):
    name = "unexpected_path"
    Config = UnexpectedPathConfig
    summary = "Request from {src} to {dst} on a method or path not allowed by policy"

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self.enforcement = Enforcement(self)

    def configure(self) -> None:
        self.enforcement.configure()

    def on_hops(self, hops: list[Hop], now: float) -> None:
        ctx = self.ctx
        policy = ctx.policy
        cache = policy.route_cache
        enf = self.enforcement
        for h in hops:
            method = h.method
            if method is None or h.direction == UNKNOWN:
                continue
            dst = h.dst
            # route_check()'s cache hit, inlined: this loop runs for every HTTP entry
            uid = dst.uid
            check = cache[uid] if uid in cache else policy.route_check(dst)
            if check is None:
                continue
            # the matcher's prefixes, inlined (most requests match one): a call fewer per request
            matcher = check.get(method) or check[None]
            path = h.path
            if (path is not None and path.startswith(matcher.prefixes)) or matcher(path):
                continue
            src = ctx.corr.named_source(h) or h.src
            if self.exempt(src, dst, h):
                continue
            enf.judge(h, src, dst, f"{method} {h.path} is not allowed", now)
        if len(enf.pending):
            enf.resolve(hops)

    def on_tick(self, now: float) -> None:
        super().on_tick(now)
        self.enforcement.tick(now)
