"""missing_access_log: traffic that traces show reaching a mesh destination with no access log
from that destination's sidecar within ``grace_ms`` — a bypassed or broken sidecar.

Joins, best first:
- an Envoy span (it carries ``node_id``) expects an entry from that same node with the request
  id of its ``guid:x-request-id`` tag;
- an application's SERVER span (OpenTelemetry SDK) on a mesh service expects an entry from that
  service's sidecar in the same trace (W3C ``traceparent`` logged with
  ``additional_request_headers_to_log``, or the trace id of an OpenTelemetry access-log record),
  or with the same x-request-id when the span has one.

A span waits in a bounded store; the access log arriving removes it; expiry is the violation
(the store's on-expire hook). With ``workers: N`` the log may have reached another worker:
at the end of the grace the workers are asked first, in one batch per tick. Also: a sidecar
whose logs went silent for ``silent_secs`` while spans show its service still serving.

A span that started before the access-log index was on (spans resumed after a pause longer than
``span_index_horizon_secs``) cannot be joined to its own log; it is judged against each sidecar's
last log instead: it alerts when that sidecar logged nothing at all since the span started.
"""

from __future__ import annotations

from pydantic import Field

from meshaudit.engine.api import (
    LOGGED_ORIGINS,
    Deferred,
    EngineContext,
    PeerAnswer,
    PeerQuery,
    Rule,
    RuleConfig,
    Severity,
)
from meshaudit.engine.store import GenStore
from meshaudit.model import INBOUND, OUTBOUND, SPAN, SPAN_KIND_CLIENT, SPAN_KIND_SERVER, Hop, Identity, identity

# A silent sidecar is about all of its traffic, whoever the clients are.
ANY_SOURCE = identity("*")


class MissingAccessLogConfig(RuleConfig):
    severity: Severity = "high"
    grace_ms: int = Field(
        3000, ge=0, description="Wait for the access log this long: Envoy flushes every 1 s, plus clock skew."
    )
    silent_secs: int = Field(30, ge=1, description="A sidecar silent this long while spans show traffic alerts.")
    span_index_horizon_secs: int = Field(
        900,
        ge=0,
        description="Access logs are indexed for span joins while a span arrived this recently; a tracer "
        "that sends less often is judged only against each sidecar's last log (README, span index).",
    )


class MissingAccessLog(Rule[MissingAccessLogConfig]):
    name = "missing_access_log"
    Config = MissingAccessLogConfig
    summary = "Traffic from {src} reached {dst} with no access log from its sidecar"
    hops = "all"  # spans wait for access logs; access logs release them

    @classmethod
    def correlation(cls, cfg: RuleConfig) -> tuple[float, float]:
        # Span joins look access logs up for a few graces; the index stays on for the horizon.
        assert isinstance(cfg, MissingAccessLogConfig)
        return cfg.grace_ms / 1000 * 4, float(cfg.span_index_horizon_secs)

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self.pending = self.parking("spans_awaiting_access_log", 0.0, self._expired)
        # Spans the index cannot join (see the module doc), judged on expiry against the
        # sidecar's last log; one second more than the grace: with workers, each sidecar's last
        # log is shared once a second.
        self.unjoined = self.parking("spans_awaiting_any_access_log", 0.0, self._expired_unjoined)
        # service key -> latest start time (the span's own clock) of a span showing it serving
        self.last_span: GenStore[str, float] = GenStore("service_last_span", 86_400, ctx.max_items)
        self.silence_reported: dict[str, float] = {}
        # service key -> start of the first span seen (at a tick) that started more than the grace
        # after the sidecar's last log: the evidence of silence, however many spans come after it.
        self.silent_from: dict[str, float] = {}
        # span id -> the service that made the call: names the source of a bypassed request
        # from the parent span in the same trace.
        self.client_spans: GenStore[str, Identity] = GenStore("client_spans", 60.0, ctx.max_items)
        self.store(self.last_span)
        self.store(self.client_spans)
        self.configure()

    def configure(self) -> None:
        self.grace = self.cfg.grace_ms / 1000
        self.pending.ttl = self.grace
        self.unjoined.ttl = self.grace + 1.0
        self.client_spans.ttl = max(60.0, self.grace * 4)

    def _seen_serving(self, svc: str, h: Hop, now: float) -> None:
        last = self.last_span.get(svc)
        if last is None or h.start > last:
            self.last_span.put(svc, h.start, now)

    def _is_mesh(self, h: Hop) -> bool:
        dst = h.dst
        if dst.key in self.ctx.corr.sidecar_last_log:
            return True
        policy = self.ctx.policy
        return policy.has_mesh_services and policy.mesh_services(dst)

    def on_hops(self, hops: list[Hop], now: float) -> None:
        corr = self.ctx.corr
        pending = self.pending
        # Whether a span may wait for this batch's logs: tested once per batch, not per entry (a
        # store's len() is a Python call), and set again when a span parks. A pop from a store
        # that emptied meanwhile finds nothing, as the test would have.
        waiting = len(pending) > 0
        spans = False
        for h in hops:
            if h.origin in LOGGED_ORIGINS:
                if waiting:
                    self._arrived(h)
                continue
            if h.origin != SPAN:
                continue
            if not spans:
                spans = True
                corr.saw_spans(now)
            if h.span_kind == SPAN_KIND_CLIENT and h.span_id:
                self.client_spans.put(h.span_id, h.observer_service, now)
            if h.observer.startswith("span:"):  # an application's span (SDK)
                if h.span_kind != SPAN_KIND_SERVER:
                    continue
                svc = h.dst.key
                self._seen_serving(svc, h, now)
                if not self._is_mesh(h):
                    continue
                if not corr.judgeable(h.start):
                    self.unjoined.park((h.trace_id or h.request_id or str(id(h)), svc), h, now)
                    continue
                if h.request_id and corr.logged_rid.has(svc, h.request_id):
                    self._logged(h)
                    continue
                logged_by = corr.logged_trace.get(svc, h.trace_id) if h.trace_id else None
                if logged_by is not None:  # the client its sidecar saw names the edge
                    self._logged(h, logged_by)
                    continue
                pending.park((h.trace_id or h.request_id or str(id(h)), svc), h, now)
                waiting = True
            else:  # a sidecar's own span: that sidecar must have logged the request
                svc = h.observer_service.key
                if h.direction == INBOUND:
                    self._seen_serving(svc, h, now)
                rid = h.request_id
                if not rid:
                    continue
                if corr.logged_rid.has(svc, rid):
                    self._logged(h)
                    continue
                if corr.judgeable(h.start):
                    pending.park((rid, svc), h, now)
                    waiting = True
                else:
                    self.unjoined.park((rid, svc), h, now)

    def _arrived(self, h: Hop) -> None:
        """An access log that arrived after its span: the span is satisfied."""
        pending = self.pending
        if h.request_id:
            self._logged(pending.pop((h.request_id, h.observer_service.key)))
        if h.direction != OUTBOUND and h.trace_id:  # an app's server span: its inbound entry
            self._logged(pending.pop((h.trace_id, h.observer_service.key)), h.src)

    def on_evidence(self, hops: list[Hop], now: float) -> None:
        """Evidence copies: an inbound entry copied to its trace's partition satisfies the
        application span waiting for it here; a client span names a bypassed request's source."""
        self.on_replay(hops, now)
        if len(self.pending):
            for h in hops:
                if h.origin in LOGGED_ORIGINS:
                    self._arrived(h)

    def on_replay(self, hops: list[Hop], now: float) -> None:
        """Rebuilding state (evaluator role): spans keep the access-log index on, and client
        spans name the source of a bypassed request judged later. Nothing is parked, and no span
        counts as the service serving (silence is judged from spans judged here)."""
        for h in hops:
            if h.origin != SPAN:
                continue
            self.ctx.corr.saw_spans(now)
            if h.span_kind == SPAN_KIND_CLIENT and h.span_id:
                self.client_spans.put(h.span_id, h.observer_service, now)

    def _logged(self, h: Hop | None, client: Identity | None = None) -> None:
        """A traced request its sidecar logged (the service graph's access-log coverage); ``client``:
        the source the sidecar's entry names, when the span does not."""
        if h is not None:
            src = client if client is not None and client.service and h.src.service is None else self._source(h)
            self.ctx.tally.traced(src, h.dst, True)

    def _source(self, h: Hop, remote: Identity | None = None) -> Identity:
        """Who sent the unlogged request: the client sidecar's entry for the same request id,
        else the parent span's service in the same trace (``remote``: what the other workers
        knew of either), else the span's peer address."""
        if h.src.service is None:
            paired = self.ctx.corr.source_of(h)
            if paired is not None:
                return paired
            if h.parent_span_id:
                parent = self.client_spans.get(h.parent_span_id)
                if parent is not None and parent != h.dst:
                    return parent
            if remote is not None and remote != h.dst:
                return remote
        return h.src

    def _expired(self, key: tuple[str, str], h: Hop, now: float) -> None:
        if self.ctx.peers:  # the access log may have reached another worker: ask first
            app_span = h.observer.startswith("span:")
            q = PeerQuery(h.request_id, h.trace_id if app_span else None, key[1], h.start, h.conn, h.parent_span_id)
            self.ctx.deferred.append(Deferred(self, h, q))
        else:
            self._alert(h, None)

    def _expired_unjoined(self, key: tuple[str, str], h: Hop, now: float) -> None:
        """A span the index could not join: alert only when its sidecar logged nothing at all
        since the span started (1 s allowed for clock skew); else it cannot be told."""
        logged_at = self.ctx.corr.sidecar_last_log.get(key[1])
        if logged_at is None or logged_at < h.start - 1.0:
            self._alert(h, None)

    def finish(self, hop: Hop, answer: PeerAnswer) -> None:
        if not answer.covered:
            self._alert(hop, answer.source)

    def peer_source(self, q: PeerQuery) -> Identity | None:
        """The client of a peer's unlogged request, from a CLIENT span seen here."""
        return self.client_spans.get(q.parent_span_id) if q.parent_span_id else None

    def _alert(self, h: Hop, remote_source: Identity | None) -> None:
        src = self._source(h, remote_source)
        self.ctx.tally.traced(src, h.dst, False)
        if self.exempt(src, h.dst, h):
            return
        if h.observer.startswith("span:"):
            detail = "the application traced this request, but its sidecar did not log it (bypassed?)"
        else:
            detail = "the sidecar traced this request but sent no access log for it"
        self.violation(src, h.dst, h, detail, h.start)

    def on_tick(self, now: float) -> None:
        self.pending.expire(now)
        self.unjoined.expire(now)
        last_log = self.ctx.corr.sidecar_last_log
        silent = self.cfg.silent_secs
        grace = self.grace
        silent_from = self.silent_from
        for svc, span_at in self.last_span.items():
            logged_at = last_log.get(svc)
            # Silent: no log for silent_secs, yet a span shows traffic that *started* after the
            # last log arrived, by more than the grace (flush interval plus clock skew). An idle
            # sidecar's last spans are older than its last log, so idleness is not silence.
            if logged_at is None or span_at <= logged_at + grace:
                if svc in silent_from:
                    del silent_from[svc]
                continue
            # The first such span is the evidence, once its own access log has had the grace to
            # arrive (spans may be flushed sooner than access logs). Not the newest span: under
            # steady traffic the newest is always younger than the grace.
            first = silent_from.get(svc)
            if first is None or first <= logged_at + grace:  # none yet, or the sidecar logged since
                first = silent_from[svc] = span_at
            if now - logged_at < silent or now - first < grace:
                continue
            if self.silence_reported.get(svc) == logged_at:
                continue
            self.silence_reported[svc] = logged_at
            name, _, ns = svc.partition(".")
            silent_for = int(now - logged_at)
            self.violation(
                ANY_SOURCE,
                identity(name, ns or None),
                None,
                f"the sidecar has sent no access log for {silent_for} s while spans show the service serving",
                now,
                summary=f"The sidecar of {svc} has sent no access log for {silent_for} s "
                "while traces show the service serving",
            )
