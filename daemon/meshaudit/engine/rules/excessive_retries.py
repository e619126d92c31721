"""excessive_retries: an edge whose requests needed many retries in a window: the source's
sidecar retried at least ``min_retries`` times, and at least ``min_ratio`` retries per request.

Counted from the *source* sidecar's entries only (outbound, HTTP): its router made the attempts
and logs the request once, with ``upstream_request_attempt_count``; the destination sidecar logs
every attempt as a request of its own (same x-request-id), so counting there would count a
retried request several times. A request's retries are ``attempts - 1``, plus one when Envoy
gave up with retries left to want (``URX``, ``upstream_retry_limit_exceeded``).

An edge whose source has no sidecar (inbound entries only) is not judged: its retries are the
application's, and they show only as repeated requests, which cannot be told apart exactly
(the destination sidecar gives each a new request id unless the client sets one).
"""

from __future__ import annotations

from pydantic import Field

from meshaudit.engine.api import EngineContext, Rule, RuleConfig, Severity, Window
from meshaudit.model import OUTBOUND, Hop, slot_attempts


class ExcessiveRetriesConfig(RuleConfig):
    severity: Severity = "warning"
    window_secs: int = Field(60, ge=1, description="Retries are counted per edge in windows of this length.")
    min_retries: int = Field(10, ge=1, description="Alert when a window has at least this many retries ...")
    min_ratio: float = Field(0.2, ge=0, description="... and at least this many retries per request.")


def retries_of(h: Hop) -> int:
    """Retries one outbound entry shows: attempts beyond the first, plus one for URX. The flags
    (a costly field of an access-log entry) are read only when the attempts are not exactly 1."""
    attempts: int = h.attempts
    if attempts == 1:
        return 0
    n = attempts - 1 if attempts > 1 else 0
    flags: str = h.response_flags
    if flags and "URX" in flags:  # no other flag contains the letters URX
        n += 1
    return n


class ExcessiveRetries(Rule[ExcessiveRetriesConfig]):
    name = "excessive_retries"
    Config = ExcessiveRetriesConfig
    summary = "Requests from {src} to {dst} needed excessive retries"

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self.edges = self.edge_windows(0.0, self._judge)
        self.configure()

    def configure(self) -> None:
        self.window_secs = self.cfg.window_secs
        self.edges.windows.ttl = self.window_secs

    def on_hops(self, hops: list[Hop], now: float) -> None:
        plain: list[Hop] = []  # requests with no retry: counted in one call
        counted = plain.append
        for h in hops:
            if h.direction != OUTBOUND or h.method is None:
                continue
            try:
                attempts: int = slot_attempts(h)
            except AttributeError:  # a lazy field not read yet
                attempts = h.attempts
            if attempts == 1:  # nearly every request: no retry
                counted(h)
                continue
            n = retries_of(h)
            if n and self.exempt(h.src, h.dst, h):
                n = 0  # an exempted request still counts as a request
            self.edges.add(h.src, h.dst, h, now, 1, n)
        self.edges.count(plain, now)

    def _judge(self, w: Window, final: bool) -> None:
        retries, requests = w.hits, w.total
        dst = w.dst  # the policy may set them for a destination
        if retries < self.setting("min_retries", dst) or retries / requests < self.setting("min_ratio", dst):
            return
        self.window_violation(
            w,
            f"{retries} retries over {requests} requests (ratio {retries / requests:.2f}) "
            f"in a {self.window_secs} s window, from the source sidecar's outbound entries",
        )
