"""error_burst: an edge where at least ``min_ratio`` of the requests in a window failed, with at
least ``min_requests`` requests in it.

Failed: a 5xx the upstream answered (``response_code_details`` ``via_upstream``), or an
upstream failure flag (UF, UH, UO, UT, UC, UR, URX: connection failure, no healthy host,
overflow, timeout, termination, reset, retries exhausted). Not failed: a 1xx-4xx status, and the
mesh's own refusals (no route or cluster: NR, NC, ``route_not_found``; ``direct_response``;
``rbac_access_denied...``, UAEX): those never reached the upstream, so they are neither
``via_upstream`` nor flagged as an upstream failure. ``BlackHoleCluster`` (egress the mesh
blocks) is a refusal too.

Each request counts once, with its final outcome, at the *source* sidecar (outbound HTTP
entries): its router logs the request once after its retries (a 503 that a retry fixed logs as
200 with 2 attempts), while the destination sidecar logs every attempt. A source without a
sidecar (an inbound entry with no peer certificate and no client-sidecar entry of the same
request or connection in the correlation) is counted from the destination sidecar's inbound
entry instead, once per request id.
"""

from __future__ import annotations

from pydantic import Field

from meshaudit.engine.api import EngineContext, Rule, RuleConfig, Severity, Window
from meshaudit.engine.outcome import failed
from meshaudit.engine.store import GenStore
from meshaudit.model import INBOUND, OUTBOUND, Hop


class ErrorBurstConfig(RuleConfig):
    severity: Severity = "warning"
    window_secs: int = Field(
        60, ge=1, description="Requests and failures are counted per edge in windows of this length."
    )
    min_ratio: float = Field(
        0.5, gt=0, le=1, description="Alert when at least this share of a window's requests failed ..."
    )
    min_requests: int = Field(20, ge=1, description="... among at least this many requests.")


class ErrorBurst(Rule[ErrorBurstConfig]):
    name = "error_burst"
    Config = ErrorBurstConfig
    summary = "A burst of failed requests from {src} to {dst}"

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self.edges = self.edge_windows(0.0, self._judge)
        # Request ids counted from inbound entries (sources without a sidecar), once each.
        self.inbound_counted: GenStore[str, bool] = GenStore(
            "error_burst_inbound_request_ids", 0.0, ctx.max_items, fingerprints=True
        )
        self.store(self.inbound_counted)
        self.configure()

    def configure(self) -> None:
        self.window_secs = self.cfg.window_secs
        self.edges.windows.ttl = self.inbound_counted.ttl = self.window_secs

    def on_hops(self, hops: list[Hop], now: float) -> None:
        plain: list[Hop] = []  # requests that did not fail: counted in one call
        counted = plain.append
        for h in hops:
            d = h.direction
            if h.method is None:
                continue
            # The destination's entry counts only for a client without a sidecar: no
            # certificate, and no client-sidecar entry of the request.
            if d != OUTBOUND and (d != INBOUND or h.peer_principal is not None or not self._no_client_sidecar(h, now)):
                continue
            status: int = h.status
            if 0 < status < 500:  # failed()'s first test, inlined: nearly every request
                counted(h)
            elif failed(h) and not self.exempt(h.src, h.dst, h):
                self.edges.add(h.src, h.dst, h, now, 1, 1)
            else:
                counted(h)
        self.edges.count(plain, now)

    def _no_client_sidecar(self, h: Hop, now: float) -> bool:
        """An inbound entry counts when no client sidecar logged the request (its outbound entry
        counts then), once per request id."""
        if self.ctx.corr.source_of(h) is not None:
            return False
        rid = h.request_id
        if rid:
            if rid in self.inbound_counted:
                return False
            self.inbound_counted.put(rid, True, now)
        return True

    def _judge(self, w: Window, final: bool) -> None:
        failures, requests = w.hits, w.total
        dst = w.dst  # the policy may set them for a destination
        if requests < self.setting("min_requests", dst) or failures / requests < self.setting("min_ratio", dst):
            return
        self.window_violation(
            w,
            f"{failures} of {requests} requests failed ({failures / requests:.0%}) "
            f"in a {self.window_secs} s window: 5xx from the upstream or upstream failure flags",
        )

    def on_tick(self, now: float) -> None:
        super().on_tick(now)
        self.inbound_counted.expire(now)
