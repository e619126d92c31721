"""The rule engine: pure, no I/O, no asyncio; the clock is passed in. One exception: in learn
mode with a ``state_file`` (one process), unexpected_edge reads its baseline when it is built
and writes it at the tick that ends its learning window (``meshaudit.baseline``).

``Engine.evaluate(hops, now)`` and ``Engine.tick(now)`` return alerts. Per batch the engine
first indexes every hop into the shared :class:`Correlation` (stage 1: both sidecars' entries of
one request pair up even when they arrive in one batch), then hands each enabled rule the hops
it judges (``Rule.hops``). Violations go through the :class:`Aggregator` (stage 2): one alert per
(rule, source, destination) at once, later violations counted and summarized when the window
closes.

The engine imports no rule: it runs the rule classes it is given (``engine/setup.py`` passes the
registry) and knows them only through :class:`meshaudit.engine.api.Rule`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshaudit.config import Config, Policy
from meshaudit.engine.aggregate import Aggregator
from meshaudit.engine.api import (
    Deferred,
    Edge,
    EdgeWindows,
    Emit,
    EngineContext,
    Parking,
    PeerAnswer,
    PeerQuery,
    Route,
    Rule,
    Violation,
    WindowDelta,
)
from meshaudit.engine.correlation import Correlation
from meshaudit.engine.policy import CompiledPolicy
from meshaudit.engine.sources import Claim
from meshaudit.engine.store import Store
from meshaudit.engine.tally import EdgeCounts
from meshaudit.model import SPAN, Alert, Hop
from meshaudit.naming import Namer

CORRELATION_TTL_SECS = 60.0  # the least any pairing needs: both sidecars flush within seconds


@dataclass(slots=True)
class Facts:
    """What one engine's evidence says that the engines of other processes need (``workers: N``),
    from :meth:`Engine.facts`, applied by :meth:`Engine.absorb`. Each field holds only what is
    new since the last :meth:`Engine.facts`; an empty field: nothing new."""

    spans_at: float | None = None  # the last span this engine received itself: spans flow (keep indexing logs)
    last_log: dict[str, float] = field(default_factory=dict)  # service key -> its sidecar's last access log
    learned: list[Edge] = field(default_factory=list)  # learn mode: edges learned
    routes: list[Route] = field(default_factory=list)  # learn mode (learn_routes): routes learned
    # The per-edge counts of the service graph, for the process serving /graph (no engine absorbs them).
    tally: list[EdgeCounts] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.spans_at is not None or self.last_log or self.learned or self.routes or self.tally)


class Engine:
    """Owns all window state. Not thread-safe; one engine per process."""

    def __init__(
        self,
        config: Config,
        policy: Policy,
        rules: Sequence[type[Rule[Any]]],
        peers: bool = False,
        baseline_shared: bool = False,
    ) -> None:
        """``rules``: the rule classes to run (those enabled in ``config.rules``). ``peers``: one
        of several workers. Violations are then not aggregated here but collected in
        ``forwarded`` for the one aggregator, and waits that end without local evidence are
        deferred (``take_deferred``) until the other workers answered. ``baseline_shared``: learn
        mode's baseline is shared with other processes (always with peers; the evaluators of the
        distributed mode share it through a topic): learned edges are handed out
        (``take_learned``), merged in (``absorb``) and the window ended (``seed``) from outside."""
        self.config = config
        self.rule_classes = list(rules)
        compiled = CompiledPolicy(policy)
        sections = self._sections(config, compiled)
        enabled = [cls for cls in rules if sections[cls].enabled]
        corr_ttl, horizon = self._correlation_needs(enabled, sections)
        self.corr = Correlation(corr_ttl, config.engine.store_max_items, horizon)
        self.ctx = EngineContext(config, compiled, Namer(config.mesh), self.corr)
        self.ctx.sections = {cls.name: sections[cls] for cls in rules}
        self.ctx.peers = peers
        self.ctx.baseline_shared = peers or baseline_shared
        self.agg = Aggregator.from_config(config.engine, {cls.name: cls.summary for cls in rules})
        self.forwarded: list[Violation] = []
        self._emit: Emit = self.forwarded.append if peers else self._on_violation
        self.rules: list[Rule[Any]] = [cls(self.ctx) for cls in enabled]
        for r in self.rules:
            r.emit = self._emit
        self._now = 0.0
        self.hops_evaluated = 0
        self._spans_shared = float("-inf")  # Facts already given out (``facts``)
        self._log_shared = float("-inf")
        # Stage 2 split (``split``): where the rules' violations go instead of the aggregator,
        # and whether they are dropped (judging replayed deltas: their verdict is out already).
        self.splits = False
        self.lateness = 0.0
        self._muted = False
        self.deltas_unknown = 0  # deltas of a counter no enabled rule here has (a rule disabled here)
        self._late_taken = 0  # late deltas given out (``take_stage2_late``)

    def _sections(self, config: Config, policy: CompiledPolicy) -> dict[type[Rule[Any]], Any]:
        """Each rule's options: its ``rules.<name>`` section, under the policy's overrides."""
        return {
            cls: policy.rule_section(cls.name, getattr(config.rules, cls.name, None) or cls.Config())
            for cls in self.rule_classes
        }

    @staticmethod
    def _correlation_needs(enabled: list[type[Rule[Any]]], sections: dict[type[Rule[Any]], Any]) -> tuple[float, float]:
        needs = [cls.correlation(sections[cls]) for cls in enabled]
        return max([CORRELATION_TTL_SECS, *(ttl for ttl, _ in needs)]), max([0.0, *(h for _, h in needs)])

    def reconfigure(self, config: Config, policy: Policy) -> None:
        """A reload that keeps the engine's state: the correlation indexes, every rule's waits,
        windows and baseline, the aggregation windows. Rules still enabled get their new
        section (``Rule.reconfigure``); newly enabled ones start; disabled ones go, with their
        state. The mesh naming and store bounds are restart-only (the caller says so)."""
        compiled = CompiledPolicy(policy)
        sections = self._sections(config, compiled)
        enabled = [cls for cls in self.rule_classes if sections[cls].enabled]
        corr_ttl, horizon = self._correlation_needs(enabled, sections)
        corr = self.corr
        corr.ttl = max(corr.ttl, corr_ttl)  # entries already indexed keep theirs
        for s in (corr.outbound_by_rid, corr.outbound_by_conn, corr.logged_rid, corr.logged_trace):
            s.ttl = corr.ttl
        corr.horizon = max(corr.ttl, horizon)
        self.config = config
        self.ctx.config = config
        self.ctx.policy = compiled
        self.ctx.sections = {cls.name: sections[cls] for cls in self.rule_classes}
        running = {type(r): r for r in self.rules}
        rules: list[Rule[Any]] = []
        for cls in enabled:
            r = running.get(cls)
            if r is None:
                r = cls(self.ctx)
                r.emit = self._emit
                if self.splits:
                    for w in r.edge_counters():
                        w.split(self.lateness)
            else:
                r.reconfigure(sections[cls])
            rules.append(r)
        self.rules = rules
        self.agg.reconfigure(config.engine)

    @property
    def namer(self) -> Namer:
        return self.ctx.namer

    def _on_violation(self, v: Violation) -> None:
        self.agg.add(v, self._now)

    def evaluate(self, hops: list[Hop], now: float) -> list[Alert]:
        if self.ctx.started is None:
            self.ctx.started = now
        self._now = now
        self.ctx.policy.exceptions.clock(now)
        self.corr.index(hops, now)
        # Each rule gets the hops it judges; one pass splits a batch that mixes spans in.
        spans = [h for h in hops if h.origin == SPAN]
        logged = [h for h in hops if h.origin != SPAN] if spans else hops
        tally = self.ctx.tally
        if tally.enabled and logged:
            tally.add(logged, self.corr)
        by_kind: dict[str, list[Hop]] = {"logged": logged, "spans": spans, "all": hops, "none": []}
        for rule in self.rules:
            batch = by_kind[rule.hops]
            if batch:
                rule.on_hops(batch, now)
        self.hops_evaluated += len(hops)
        return self.agg.drain()

    def replay(self, hops: list[Hop], now: float) -> None:
        """Rebuild stage-1 state from hops another process judged already (the evaluator role: the
        last TTL of a partition this member gained, up to the offset its previous owner committed):
        the correlation indexes and what rules index for later joins (``Rule.on_replay``), without
        judging, parking, counting or alerting. Hops judged after them pair and join as they would
        have in the previous owner."""
        if self.ctx.started is None:
            self.ctx.started = now
        self.corr.index(hops, now)
        for rule in self.rules:
            rule.on_replay(hops, now)

    def evidence(self, hops: list[Hop], now: float) -> None:
        """Index evidence copies (the evaluator role: hops judged in another partition, copied to
        this one for the joins of hops judged here): the correlation indexes and each rule's
        ``on_evidence``, which may settle waits they answer (a span's access log); never judged,
        counted or tallied."""
        if self.ctx.started is None:
            self.ctx.started = now
        self._now = now
        self.corr.index(hops, now)
        for rule in self.rules:
            rule.on_evidence(hops, now)

    def release(self, drop: Callable[[Hop], bool]) -> int:
        """Forget, without judging, the waiting hops ``drop`` selects (the evaluator role: those of
        partitions this member lost; their waits would end with part of the evidence, which now
        goes to the partition's new owner, who judges them again). Returns how many went."""
        return sum(s.release(drop) for r in self.rules for s in r.stores() if isinstance(s, Parking))

    def longest_wait(self) -> float:
        """Seconds the longest wait for evidence lasts (a parked hop's time-to-live): a hop
        evaluated longer ago than this (and a tick) has had its verdict."""
        return max((s.ttl for r in self.rules for s in r.stores() if isinstance(s, Parking)), default=0.0)

    def claims(self, claims: list[Claim], now: float) -> list[Alert]:
        """Senders whose claims the receivers found they may not make (log_source_mismatch)."""
        self._now = now
        self.ctx.policy.exceptions.clock(now)
        for rule in self.rules:
            rule.on_claims(claims, now)
        return self.agg.drain()

    def tick(self, now: float) -> list[Alert]:
        self._now = now
        self.ctx.policy.exceptions.clock(now)
        for rule in self.rules:
            rule.on_tick(now)
        for s in self.corr.stores:
            s.expire(now)
        self.agg.counted.expire(now)
        self.agg.states.expire(now)
        return self.agg.drain()

    # --- stage 2 split (the evaluator role) ------------------------------------------------------
    def split(self, lateness: float) -> None:
        """Run stage 2 split across processes (the evaluator role: each process counts the hops of
        its partitions, and each (rule, source, destination) is judged and aggregated in the one
        process that owns it). Call before the first hop. From then on:

        - every violation the rules raise is collected for its owner (``take_stage2``), never
          aggregated here;
        - every rule's :class:`~meshaudit.engine.api.EdgeWindows` counts into per-tick deltas
          (``take_stage2``) and judges only the sums it absorbs (``absorb_stage2``), closing a
          judged window ``lateness`` seconds after its end;
        - the aggregator takes the violations ``absorb_stage2`` is given (every process's, of the
          keys this one owns).

        The rules know nothing of it; one process never calls it. The evaluators of the
        distributed mode run it across their group, the workers of ``workers: N`` with their
        coordinator (which judges with an engine of its own that evaluates no hop)."""
        self.splits = True
        self.lateness = lateness
        self._emit = self._forward
        for r in self.rules:
            r.emit = self._emit
            for w in r.edge_counters():
                w.split(lateness)

    def _forward(self, v: Violation) -> None:
        if not self._muted:
            self.forwarded.append(v)

    def _counters(self) -> dict[str, EdgeWindows]:
        return {w.name: w for r in self.rules for w in r.edge_counters()}

    def take_stage2(self) -> tuple[list[WindowDelta], list[Violation]]:
        """Split: the window deltas made at the ticks and the violations raised since the last
        call, for the processes that own their keys."""
        deltas = [d for r in self.rules for w in r.edge_counters() for d in w.take()]
        return deltas, self.take_forwarded()

    def absorb_stage2(
        self, deltas: Sequence[WindowDelta], violations: Sequence[Violation], now: float, replay: bool = False
    ) -> list[Alert]:
        """Split: every process's deltas and violations of the keys this one owns. The deltas are
        summed into the judged windows (judged at the next tick); the violations go to the
        aggregator. ``replay``: rebuilding after this process gained the keys (records its
        previous owner handled): windows and alert windows are rebuilt, a window that crosses its
        threshold is marked judged, and nothing is raised (the previous owner raised it)."""
        self._now = now
        counters = self._counters()
        for d in deltas:
            w = counters.get(d.windows)
            if w is None:
                self.deltas_unknown += 1
                continue
            w.absorb(d, now)
        if replay:
            self._muted = True
            try:
                for w in counters.values():
                    w.judge_changed()
            finally:
                self._muted = False
        counted = dict(self.agg.violations) if replay else None
        for v in violations:
            self.agg.add(v, now)
        alerts = self.agg.drain()
        if counted is not None:  # the previous owner counted them (violations_total)
            self.agg.violations.clear()
            self.agg.violations.update(counted)
            return []
        return alerts

    def release_stage2(self, drop: Callable[[str, str, str], bool]) -> int:
        """Split: forget the judged windows and alert windows of the keys ``drop(rule, source key,
        destination key)`` selects (owned by another process now, which rebuilds them from the
        edges topic): no verdict and no closing summary here. Returns how many went."""
        n = sum(w.release(drop) for w in self._counters().values())
        return n + self.agg.release(drop)

    def stage2_horizon(self) -> float:
        """Seconds of the past a judged window and an alert window depend on: the longest
        per-edge window, its lateness, and ``suppress_secs`` (what a new owner replays)."""
        longest = max((w.windows.ttl for w in self._counters().values()), default=0.0)
        return longest + self.lateness + self.agg.window

    def take_stage2_late(self) -> int:
        """Split: deltas dropped because their window had closed, since the last call (the
        count of the rules enabled now; one disabled by a reload takes its count with it)."""
        late = sum(w.late for w in self._counters().values())
        if late <= self._late_taken:
            return 0
        new, self._late_taken = late - self._late_taken, late
        return new

    # --- peers (``workers: N``) ---------------------------------------------------------------
    def take_forwarded(self) -> list[Violation]:
        """With peers: the violations found since the last call, for the one aggregator."""
        out = self.forwarded[:]
        self.forwarded.clear()  # the same list: the rules' ``emit`` appends to it
        return out

    def facts(self) -> Facts:
        """What this engine saw since the last call that the others need: that spans flow, each
        sidecar's last access log (silent sidecars), what learn mode learned, and the tally of
        the service graph (taken: each hop is counted once)."""
        corr = self.corr
        out = Facts()
        if corr.spans_at > self._spans_shared:
            self._spans_shared = out.spans_at = corr.spans_at
        since = self._log_shared
        fresh = {svc: t for svc, t in corr.sidecar_last_log.items() if t > since}
        if fresh:
            self._log_shared = max(fresh.values())
            out.last_log = fresh
        out.learned, out.routes = self.take_learned()
        out.tally = self.take_tally()
        return out

    def absorb(self, facts: Facts, now: float) -> None:
        """Facts another engine gave out: spans flowing there keep this engine indexing its access
        logs, a sidecar's later last log counts here too, edges learned there join the baseline
        here. Routes and the tally are the coordinator's: no engine takes them."""
        corr = self.corr
        if facts.spans_at is not None:
            corr.saw_spans(facts.spans_at, remote=True)
        store = corr.sidecar_last_log
        for svc, t in facts.last_log.items():
            mine = store.get(svc)
            if mine is None or mine < t:
                store.put(svc, t, now)
        if facts.learned:
            for r in self.rules:
                if r.learns():
                    r.add_learned(facts.learned)

    def take_tally(self) -> list[EdgeCounts]:
        """The service graph's per-edge counts since the last call (each hop counted once)."""
        return self.ctx.tally.take()

    def take_learned(self) -> tuple[list[Edge], list[Route]]:
        """Learn mode with a shared baseline: the edges and routes learned since the last call."""
        edges: list[Edge] = []
        routes: list[Route] = []
        for r in self.rules:
            learned = r.take_learned()
            if learned is not None:
                edges.extend(learned.edges)
                routes.extend(learned.routes)
        return edges, routes

    def learns(self) -> bool:
        """Whether a rule learns a baseline (learn mode): with peers, the coordinator's."""
        return any(r.learns() for r in self.rules)

    def seed(self, edges: Iterable[Edge], over: bool) -> None:
        """Start the learning rules from a baseline (``over``: learning is over)."""
        edges = list(edges)
        for r in self.rules:
            if r.learns():
                r.seed(edges, over)

    def take_deferred(self) -> list[Deferred]:
        out, self.ctx.deferred = self.ctx.deferred, []
        return out

    def answer(self, queries: list[PeerQuery]) -> list[PeerAnswer]:
        """A peer's question, answered from this engine's evidence."""
        corr = self.corr
        logged_rid, logged_trace = corr.logged_rid, corr.logged_trace
        by_rid, by_conn = corr.outbound_by_rid, corr.outbound_by_conn
        out: list[PeerAnswer] = []
        for q in queries:
            svc = q.service
            covered = (
                (q.request_id is not None and logged_rid.has(svc, q.request_id))
                or (q.trace_id is not None and logged_trace.has(svc, q.trace_id))
                or not corr.judgeable(q.start)
            )
            src = by_rid.get((q.request_id, svc)) if q.request_id else None
            if src is None and q.conn:
                src = by_conn.get(q.conn)
            if src is None:
                src = next((s for r in self.rules if (s := r.peer_source(q)) is not None), None)
            out.append(PeerAnswer(covered, src))
        return out

    def finish(self, deferred: list[Deferred], answers: list[PeerAnswer], now: float) -> list[Alert]:
        """The peers answered (merged over all of them): decide each deferred violation."""
        self._now = now
        for d, a in zip(deferred, answers, strict=True):
            d.rule.finish(d.hop, a)
        return self.agg.drain()

    def stores(self) -> list[Store]:
        out: list[Store] = [*self.corr.stores, self.agg.states, self.agg.counted]
        for r in self.rules:
            out.extend(r.stores())
        return out
