"""The rule engine: pure, no I/O, no asyncio; the clock is passed in.

``Engine.evaluate(hops, now)`` and ``Engine.tick(now)`` return alerts. Per batch the engine
first indexes every hop into the shared :class:`Correlation` (so both sidecars' entries of
one request pair up even when they arrive in one batch), then runs each enabled rule.
Violations go through the :class:`Aggregator`: one alert per (rule, source, destination) at
once, later violations counted and summarized when the window closes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, NamedTuple, Protocol

from meshaudit import metrics
from meshaudit.config import Config, EngineConfig, Policy, RuleName
from meshaudit.engine.policy import CompiledPolicy
from meshaudit.engine.store import GenStore, Store, TTLStore
from meshaudit.model import (
    ALS_HTTP,
    ALS_TCP,
    OTEL_LOG,
    OUTBOUND,
    SEVERITIES,
    SPAN,
    Alert,
    Example,
    Hop,
    Identity,
    alert_id,
    identity,
)
from meshaudit.naming import Namer


class Violation:
    __slots__ = ("detail", "dst", "hop", "rule", "severity", "src", "summary", "when")

    def __init__(
        self,
        rule: RuleName,
        severity: str,
        src: Identity,
        dst: Identity,
        hop: Hop | None,
        detail: str,
        when: float,
        summary: str | None = None,
    ) -> None:
        self.rule = rule
        self.summary = summary  # overrides the rule's summary template
        self.severity = severity
        self.src = src
        self.dst = dst
        self.hop = hop
        self.detail = detail
        self.when = when  # observed time (data time, so replays give the same alert id)


Emit = Callable[[Violation], None]


class Correlation:
    """What the access logs showed recently, shared by all rules. Bounded stores only."""

    def __init__(self, ttl: float, max_items: int, horizon: float = 0.0) -> None:
        # request_id -> client-side (outbound) hop, for naming the source of an inbound hop
        # (the client's interned Identity, not the Hop: a Hop keeps many unique strings alive)
        self.outbound_by_rid: GenStore[str, Identity] = GenStore("outbound_by_request_id", ttl, max_items)
        # connection key -> outbound hop (pairs TCP entries, which have no request id)
        self.outbound_by_conn: GenStore[str, Identity] = GenStore("outbound_by_conn", ttl, max_items)
        # (request_id, observer) and (trace_id, observer service key) seen in access logs
        self.logged_rid: GenStore[tuple[str, str], bool] = GenStore("logged_request_ids", ttl, max_items)
        self.logged_trace: GenStore[tuple[str, str], bool] = GenStore("logged_trace_ids", ttl, max_items)
        # service key -> last time its sidecar logged anything; bounded by the number of services
        self.sidecar_last_log: GenStore[str, float] = GenStore("sidecar_last_log", 86_400, max_items)
        # The logged_* stores serve only span joins (missing_access_log). They are written while
        # a span arrived within the horizon (``span_index_horizon_secs``, at least a TTL; from
        # start-up, for one horizon). When spans resume after a longer pause, spans that started
        # before the index did cannot be joined (their access logs may have come while it was
        # off): missing_access_log judges those against ``sidecar_last_log`` instead.
        self.ttl = ttl
        self.horizon = max(ttl, horizon)
        self.index_logged_until: float | None = None  # None: not started yet
        self.logged_since = float("-inf")
        self.spans_at = float("-inf")  # when this process last received a span itself
        self.stores: list[GenStore[Any, Any]] = [
            self.outbound_by_rid,
            self.outbound_by_conn,
            self.logged_rid,
            self.logged_trace,
            self.sidecar_last_log,
        ]

    def saw_spans(self, now: float, remote: bool = False) -> None:
        """A span arrived (``remote``: at another worker): keep (or start again) indexing what
        the access logs showed."""
        until = self.index_logged_until
        if until is not None and now >= until:
            self.logged_since = now
        self.index_logged_until = max(until or now, now + self.horizon)
        if not remote:
            self.spans_at = now

    def judgeable(self, span_start: float) -> bool:
        """Whether a span's access log, if it came, was indexed (1 s allowed for clock skew)."""
        return span_start >= self.logged_since + 1.0

    def index(self, hops: list[Hop], now: float) -> None:
        # Written in place into each store's current generation; capacity checked once per batch.
        by_rid = self.outbound_by_rid.writable()
        by_conn = self.outbound_by_conn.writable()
        rids = self.logged_rid.writable()
        traces = self.logged_trace.writable()
        observers = self.sidecar_last_log.writable()
        last_observer = None
        if self.index_logged_until is None:
            self.index_logged_until = now + self.horizon
        logged = now < self.index_logged_until
        for h in hops:
            if h.origin == SPAN:
                continue
            rid = h.request_id
            svc = h.observer_service.key
            if h.direction == OUTBOUND:
                if rid:
                    by_rid[rid] = h.src
                if h.conn:
                    by_conn[h.conn] = h.src
            if logged:
                if rid:
                    # Keyed by the observer's service, not its node id: any replica's sidecar
                    # logging the request satisfies a span of that service.
                    rids[rid, svc] = True
                tid = h.trace_id
                if tid:
                    traces[tid, svc] = True
            if svc is not last_observer:  # batches come from one stream: one update per run
                observers[svc] = now
                last_observer = svc
        for store in self.stores:
            store.settle(now)

    def source_of(self, h: Hop) -> Identity | None:
        """The client of an inbound hop, from the client sidecar's entry of the same request."""
        if h.request_id:
            src = self.outbound_by_rid.get(h.request_id)
            if src is not None:
                return src
        if h.conn:
            return self.outbound_by_conn.get(h.conn)
        return None


class PeerQuery(NamedTuple):
    """What a worker asks the other workers about a hop it is about to alert on (``workers: N``):
    did any of them see its access log, and do they know its client?"""

    request_id: str | None
    trace_id: str | None  # set only for spans joined by trace (an application's SERVER span)
    service: str  # the service key whose sidecar should have logged it
    start: float
    conn: str | None
    parent_span_id: str | None


class PeerAnswer(NamedTuple):
    covered: bool  # logged, or not judgeable there (its index was paused): no alert
    source: Identity | None


NO_ANSWER: Final = PeerAnswer(False, None)


class Deferred:
    """A violation that depends on evidence other workers may hold, waiting for their answer."""

    __slots__ = ("hop", "query", "rule")

    def __init__(self, rule: PeerRule, hop: Hop, query: PeerQuery) -> None:
        self.rule = rule
        self.hop = hop
        self.query = query


class EngineContext:
    def __init__(self, config: Config, policy: CompiledPolicy, namer: Namer, corr: Correlation) -> None:
        self.config = config
        self.policy = policy
        self.namer = namer
        self.corr = corr
        self.max_items = config.engine.store_max_items
        self.started: float | None = None  # time of the first hop seen
        # With peers (``workers: N``), a rule whose wait ends without local evidence defers the
        # decision here instead of emitting: the worker asks its peers, then calls ``finish``.
        self.peers = False
        self.deferred: list[Deferred] = []


class Rule(Protocol):
    name: RuleName

    def on_hops(self, hops: list[Hop], now: float, emit: Emit) -> None: ...

    def on_tick(self, now: float, emit: Emit) -> None: ...

    def stores(self) -> list[Store]: ...


class PeerRule(Protocol):
    """A rule that can defer a violation to its peers' answer."""

    def finish(self, hop: Hop, answer: PeerAnswer, emit: Emit) -> None: ...


LOGGED_ORIGINS = frozenset((ALS_HTTP, ALS_TCP, OTEL_LOG))
BUDGET_PARTY: Final = identity("meshaudit")  # source and destination of an alert_budget_exceeded alert


class _AggState:
    __slots__ = (
        "count",
        "detail",
        "dst",
        "emitted_count",
        "examples",
        "first_seen",
        "last_seen",
        "opened_at",
        "opened_first",
        "rule",
        "seq",
        "severity",
        "src",
        "summary",
        "suppressed",
        "window_no",
    )

    def __init__(self, v: Violation, now: float, window_no: int) -> None:
        self.summary = v.summary
        self.rule = v.rule
        self.severity = v.severity
        self.src = v.src
        self.dst = v.dst
        self.detail = v.detail
        self.first_seen = v.when
        self.last_seen = v.when
        self.count = 0
        self.emitted_count = 0
        self.seq = 0
        self.examples: list[Example] = []
        # What names the window in its alerts' ids: when it opened (receive time), its ordinal
        # among the aggregator's windows, and the data time of its first violation.
        self.opened_at = now
        self.window_no = window_no
        self.opened_first = v.when
        self.suppressed = False  # an alert of this window was held back by the alert budget


SUMMARIES: dict[str, str] = {
    "plaintext_hop": "Plaintext traffic from {src} to {dst}: the destination sidecar saw no TLS",
    "unexpected_edge": "Traffic from {src} to {dst} is not allowed by policy",
    "unexpected_path": "Request from {src} to {dst} on a method or path not allowed by policy",
    "missing_access_log": "Traffic from {src} reached {dst} with no access log from its sidecar",
}

BUDGET_RULE: Final = "alert_budget_exceeded"
_SEVERITY_RANK: Final = {s: i for i, s in enumerate(SEVERITIES)}
_DEFAULT_BUDGET: Final[int] = EngineConfig.model_fields["alert_budget_per_window"].default


class _Windows(TTLStore[tuple[str, str, str], _AggState]):
    """The alert windows; expiring them first closes the alert budget's window when it is due
    (the daemon and the coordinator both call ``states.expire`` on every tick)."""

    __slots__ = ("before_expire",)

    def __init__(
        self,
        ttl: float,
        max_items: int,
        on_expire: Callable[[tuple[str, str, str], _AggState, float], None],
        before_expire: Callable[[float], None],
    ) -> None:
        super().__init__("alert_windows", ttl, max_items, on_expire)
        self.before_expire = before_expire

    def expire(self, now: float) -> int:
        self.before_expire(now)
        return super().expire(now)


class Aggregator:
    """One alert per (rule, source, destination) per window of ``suppress_secs``, and at most
    ``alert_budget`` alerts per budget window (``suppress_secs`` from the first alert after the
    previous one closed) across all keys: the excess is counted and reported in one
    ``alert_budget_exceeded`` alert when the budget window closes, so the output is bounded
    whatever the input."""

    def __init__(
        self, suppress_secs: int, max_examples: int, max_items: int, alert_budget: int = _DEFAULT_BUDGET
    ) -> None:
        self.window = suppress_secs
        self.max_examples = max_examples
        self.states: TTLStore[tuple[str, str, str], _AggState] = _Windows(
            suppress_secs, max_items, self._close, self._roll_budget
        )
        # One request seen by both sidecars must count once: (rule, request id) recently counted.
        self.counted: GenStore[tuple[str, str], bool] = GenStore("counted_requests", 300, max_items)
        self.out: list[Alert] = []
        self.violations: dict[str, int] = {}
        self.windows_opened = 0  # ordinal of the next window, part of its alerts' ids
        # The alert budget: alerts emitted in the current budget window, and what it held back.
        self.budget = alert_budget
        self.budget_windows = 0
        self._budget_start: float | None = None
        self._budget_used = 0
        self._held: dict[str, int] = {}  # rule -> alerts held back in this budget window
        self._held_keys = 0
        self._held_severity = SEVERITIES[0]
        self._held_first = float("inf")
        self._held_last = float("-inf")
        self.suppressed: dict[str, int] = {}  # rule -> alerts held back since start (a metric)

    @classmethod
    def from_config(cls, engine: EngineConfig) -> Aggregator:
        return cls(engine.suppress_secs, engine.examples, engine.store_max_items, engine.alert_budget_per_window)

    def add(self, v: Violation, now: float) -> None:
        h = v.hop
        if h is not None and h.request_id:
            k = (v.rule, h.request_id)
            if k in self.counted:
                return
            self.counted.put(k, True, now)
        self.violations[v.rule] = self.violations.get(v.rule, 0) + 1
        key = (v.rule, v.src.key, v.dst.key)
        st = self.states.get(key)
        fresh = st is None
        if st is None:
            st = _AggState(v, now, self.windows_opened)
            self.windows_opened += 1
            self.states.put(key, st, now)  # the TTL is the window: closing it is the expire hook
        st.count += 1
        st.last_seen = max(st.last_seen, v.when)
        st.first_seen = min(st.first_seen, v.when)
        if h is not None and len(st.examples) < self.max_examples:
            st.examples.append(Example(h))
        if fresh:
            self._emit(st, now)

    def _emit(self, st: _AggState, now: float) -> None:
        if not self._spend_budget(st, now):
            return
        src, dst = st.src, st.dst
        summary = st.summary or SUMMARIES.get(st.rule, "{rule} from {src} to {dst}").format(
            rule=st.rule, src=src.key, dst=dst.key
        )
        if st.count > 1:
            summary += f" ({st.count} times in {self.window} s)"
        self.out.append(
            Alert(
                id=alert_id(st.rule, src.key, dst.key, st.opened_at, st.seq, st.window_no, st.opened_first),
                rule=st.rule,
                severity=st.severity,
                summary=summary + ".",
                source=src,
                destination=dst,
                count=st.count,
                first_seen=st.first_seen,
                last_seen=st.last_seen,
                window_secs=self.window,
                examples=list(st.examples),
                detail=st.detail,
                emitted_at=now,
            )
        )
        st.emitted_count = st.count
        st.seq += 1

    # --- the alert budget ---------------------------------------------------------------------
    def _spend_budget(self, st: _AggState, now: float) -> bool:
        """True when the alert may go out; else it is counted as held back."""
        self._roll_budget(now)
        if self._budget_start is None:
            self._budget_start = now
        if self._budget_used < self.budget:
            self._budget_used += 1
            return True
        rule = st.rule
        self._held[rule] = self._held.get(rule, 0) + 1
        self.suppressed[rule] = self.suppressed.get(rule, 0) + 1
        metrics.ALERTS_SUPPRESSED.labels(rule).inc()
        if not st.suppressed:
            st.suppressed = True
            self._held_keys += 1
        if _SEVERITY_RANK.get(st.severity, 0) > _SEVERITY_RANK[self._held_severity]:
            self._held_severity = st.severity
        self._held_first = min(self._held_first, st.first_seen)
        self._held_last = max(self._held_last, st.last_seen)
        return False

    def _roll_budget(self, now: float) -> None:
        """Close the budget window when it is over: one alert for what it held back."""
        start = self._budget_start
        if start is None or now < start + self.window:
            return
        held = sum(self._held.values())
        if held:
            top = sorted(self._held.items(), key=lambda kv: (-kv[1], kv[0]))
            rules = ", ".join(f"{r} {n}" for r, n in top[:5])
            me = BUDGET_PARTY
            self.out.append(
                Alert(
                    id=alert_id(BUDGET_RULE, me.key, me.key, start, 0, self.budget_windows),
                    rule=BUDGET_RULE,
                    severity=self._held_severity,
                    summary=f"More than {self.budget} alerts in {self.window} s: {held} alerts "
                    f"({self._held_keys} source/destination pairs) were held back; by rule: {rules}.",
                    source=me,
                    destination=me,
                    count=held,
                    first_seen=self._held_first,
                    last_seen=self._held_last,
                    window_secs=self.window,
                    examples=[],
                    detail=f"engine.alert_budget_per_window is {self.budget}; held back by rule: {rules}",
                    emitted_at=now,
                )
            )
        self.budget_windows += 1
        self._budget_start = None
        self._budget_used = 0
        self._held = {}
        self._held_keys = 0
        self._held_severity = SEVERITIES[0]
        self._held_first = float("inf")
        self._held_last = float("-inf")

    def _close(self, key: tuple[str, str, str], st: _AggState, now: float) -> None:
        # The window's summary, with the full count; not for a window the budget held back (the
        # budget's alert reported it: one alert held back, never counted twice).
        if st.count > st.emitted_count and not st.suppressed:
            self._emit(st, now)

    def drain(self) -> list[Alert]:
        out, self.out = self.out, []
        return out


class Engine:
    """Owns all window state. Not thread-safe; one engine per process."""

    def __init__(self, config: Config, policy: Policy, peers: bool = False) -> None:
        """``peers``: one of several workers. Violations are then not aggregated here but
        collected in ``forwarded`` for the one aggregator, and waits that end without local
        evidence are deferred (``take_deferred``) until the other workers answered."""
        from meshaudit.engine.rules import build_rules

        self.config = config
        corr_ttl = max(60.0, config.rules.missing_access_log.grace_ms / 1000 * 4)
        self.corr = Correlation(
            corr_ttl, config.engine.store_max_items, config.rules.missing_access_log.span_index_horizon_secs
        )
        self.ctx = EngineContext(config, CompiledPolicy(policy), Namer(config.mesh), self.corr)
        self.ctx.peers = peers
        self.rules: list[Rule] = build_rules(self.ctx)
        self.agg = Aggregator.from_config(config.engine)
        self.forwarded: list[Violation] = []
        self._emit: Emit = self.forwarded.append if peers else self._on_violation
        self._now = 0.0
        self.hops_evaluated = 0

    @property
    def namer(self) -> Namer:
        return self.ctx.namer

    def _on_violation(self, v: Violation) -> None:
        self.agg.add(v, self._now)

    def evaluate(self, hops: list[Hop], now: float) -> list[Alert]:
        if self.ctx.started is None:
            self.ctx.started = now
        self._now = now
        self.corr.index(hops, now)
        for rule in self.rules:
            rule.on_hops(hops, now, self._emit)
        self.hops_evaluated += len(hops)
        return self.agg.drain()

    def tick(self, now: float) -> list[Alert]:
        self._now = now
        for rule in self.rules:
            rule.on_tick(now, self._emit)
        for s in self.corr.stores:
            s.expire(now)
        self.agg.counted.expire(now)
        self.agg.states.expire(now)
        return self.agg.drain()

    # --- peers (``workers: N``) ---------------------------------------------------------------
    def take_deferred(self) -> list[Deferred]:
        out, self.ctx.deferred = self.ctx.deferred, []
        return out

    def answer(self, queries: list[PeerQuery]) -> list[PeerAnswer]:
        """A peer's question, answered from this engine's evidence."""
        corr = self.corr
        logged_rid, logged_trace = corr.logged_rid, corr.logged_trace
        by_rid, by_conn = corr.outbound_by_rid, corr.outbound_by_conn
        client_spans = next((r.client_spans for r in self.rules if hasattr(r, "client_spans")), None)
        out: list[PeerAnswer] = []
        for q in queries:
            svc = q.service
            covered = (
                (q.request_id is not None and (q.request_id, svc) in logged_rid)
                or (q.trace_id is not None and (q.trace_id, svc) in logged_trace)
                or not corr.judgeable(q.start)
            )
            src = by_rid.get(q.request_id) if q.request_id else None
            if src is None and q.conn:
                src = by_conn.get(q.conn)
            if src is None and q.parent_span_id and client_spans is not None:
                src = client_spans.get(q.parent_span_id)
            out.append(PeerAnswer(covered, src))
        return out

    def finish(self, deferred: list[Deferred], answers: list[PeerAnswer], now: float) -> list[Alert]:
        """The peers answered (merged over all of them): decide each deferred violation."""
        self._now = now
        for d, a in zip(deferred, answers, strict=True):
            d.rule.finish(d.hop, a, self._emit)
        return self.agg.drain()

    def stores(self) -> list[Store]:
        out: list[Store] = [*self.corr.stores, self.agg.states, self.agg.counted]
        for r in self.rules:
            out.extend(r.stores())
        return out


__all__ = [
    "BUDGET_RULE",
    "LOGGED_ORIGINS",
    "NO_ANSWER",
    "Aggregator",
    "Correlation",
    "Deferred",
    "Emit",
    "Engine",
    "EngineContext",
    "PeerAnswer",
    "PeerQuery",
    "PeerRule",
    "Rule",
    "Violation",
]
