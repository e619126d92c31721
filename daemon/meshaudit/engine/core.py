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

from collections.abc import Sequence
from typing import Any

from meshaudit.config import Config, Policy
from meshaudit.engine.aggregate import Aggregator
from meshaudit.engine.api import Deferred, Emit, EngineContext, PeerAnswer, PeerQuery, Rule, Violation
from meshaudit.engine.correlation import Correlation
from meshaudit.engine.policy import CompiledPolicy
from meshaudit.engine.sources import Claim
from meshaudit.engine.store import Store
from meshaudit.model import SPAN, Alert, Hop
from meshaudit.naming import Namer

CORRELATION_TTL_SECS = 60.0  # the least any pairing needs: both sidecars flush within seconds


class Engine:
    """Owns all window state. Not thread-safe; one engine per process."""

    def __init__(self, config: Config, policy: Policy, rules: Sequence[type[Rule[Any]]], peers: bool = False) -> None:
        """``rules``: the rule classes to run (those enabled in ``config.rules``). ``peers``: one
        of several workers. Violations are then not aggregated here but collected in
        ``forwarded`` for the one aggregator, and waits that end without local evidence are
        deferred (``take_deferred``) until the other workers answered."""
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
        self.agg = Aggregator.from_config(config.engine, {cls.name: cls.summary for cls in rules})
        self.forwarded: list[Violation] = []
        self._emit: Emit = self.forwarded.append if peers else self._on_violation
        self.rules: list[Rule[Any]] = [cls(self.ctx) for cls in enabled]
        for r in self.rules:
            r.emit = self._emit
        self._now = 0.0
        self.hops_evaluated = 0

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

    # --- peers (``workers: N``) ---------------------------------------------------------------
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
