"""unexpected_path: an HTTP method + path not allowed for a destination that has a route policy
(``policy.routes``).

Both sidecars of one request may log it; the aggregator counts a request id once per rule.
"""

from __future__ import annotations

from meshaudit.engine.api import Rule, RuleConfig, Severity
from meshaudit.model import UNKNOWN, Hop


class UnexpectedPathConfig(RuleConfig):
    severity: Severity = "warning"


class UnexpectedPath(Rule[UnexpectedPathConfig]):
    name = "unexpected_path"
    Config = UnexpectedPathConfig
    summary = "Request from {src} to {dst} on a method or path not allowed by policy"

    def on_hops(self, hops: list[Hop], now: float) -> None:
        ctx = self.ctx
        policy = ctx.policy
        cache = policy.route_cache
        sev = self.cfg.severity
        for h in hops:
            method = h.method
            if method is None or h.direction == UNKNOWN:
                continue
            dst = h.dst
            # route_check()'s cache hit, inlined: this loop runs for every HTTP entry
            uid = dst.uid
            check = cache[uid] if uid in cache else policy.route_check(dst)
            if check is None or (check.get(method) or check[None])(h.path):
                continue
            src = ctx.corr.named_source(h) or h.src
            if self.exempt(src, dst, h):
                continue
            self.violation(src, dst, h, f"{method} {h.path} is not allowed", h.start, sev)
