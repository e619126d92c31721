"""unexpected_edge: traffic the policy does not allow: a (source -> destination) edge not in
``policy.edges``; in ``learn`` mode, an edge not in the baseline learned during the first
``learn_secs``. Traffic to PassthroughCluster/BlackHoleCluster is an edge out of the mesh, named
by its host.

Both sidecars of one request may log it; the aggregator counts a request id once per rule.
Hops whose source cannot be named (plaintext with no pairing yet) are left to plaintext_hop.

Each violation says whether the mesh blocked the request (``engine/enforcement.py``): denied by
RBAC or ext_authz (``severity``) or served (``severity_when_served``); a source sidecar's entry
that cannot tell waits up to ``denial_wait_ms`` for the destination sidecar's entry.

Learn mode: the window opens at the first hop the engine sees and ends ``learn_secs`` later (the
first tick after it ends it); from then on an edge not learned alerts. With ``state_file`` the
baseline is read at construction (``meshaudit.baseline``): a saved one means learning is over
already; otherwise the baseline is written at the tick that ends the window (the one file write
the engine does). With ``learn_routes`` the (method, path) pairs per destination are learned and
saved too, for ``meshaudit baseline export``; this rule never alerts on a route. With peers
(``workers: N``) the coordinator owns the window and the file: it seeds each worker's baseline
(:meth:`UnexpectedEdge.seed`), merges what the workers learned and tells them when learning is
over. The evaluators of the distributed mode share it through a topic
(``runtime/baseline_topic.py``) the same way, with no coordinator to drop a violation whose edge
another member learned just before the window ended: for ``HOLD_SECS`` after it ended, a
request on an edge not (yet) in the baseline is held, and judged when its hold ends, against
the baseline as the other members' last edges have made it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

from pydantic import Field

from meshaudit.baseline import Baseline, BaselineFile, Routes, route_path
from meshaudit.engine.api import Edge, EngineContext, Learned, Parking, Rule, RuleConfig, Severity
from meshaudit.engine.enforcement import DENIAL_WAIT_MS, Enforcement
from meshaudit.engine.store import TTLStore
from meshaudit.model import UNKNOWN, Hop, Identity

log = logging.getLogger("meshaudit.rules.unexpected_edge")

# Distributed learn mode: how long after the learning window the evaluators' last learned edges
# may take to reach every member (each hands them out once a second, each reads them once a
# second, plus a fetch), and so how long a violation found then is held before it is judged.
HOLD_SECS = 5.0


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
    state_file: str | None = Field(
        None,
        description="In learn mode: a file (relative to the working directory) that keeps the learned baseline "
        "across restarts: read at start (a saved baseline means no relearning), written when the learning "
        "window ends. None: the baseline is learned again on every start.",
    )
    learn_routes: bool = Field(
        False,
        description="In learn mode: also learn (method, path) pairs per destination (at most 1000 each), saved in "
        "state_file and exported by `meshaudit baseline export` as a routes: policy. Never alerted by this rule.",
    )


class UnexpectedEdge(Rule[UnexpectedEdgeConfig]):
    name = "unexpected_edge"
    Config = UnexpectedEdgeConfig
    summary = "Traffic from {src} to {dst} is not allowed by policy"

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        cfg = self.cfg
        self.learn = cfg.mode == "learn"
        # Baseline edges -> the time each was first seen: kept for the daemon's life (bounded; a
        # full baseline stops learning).
        self.baseline: TTLStore[tuple[str, str], float] = TTLStore("learned_edges", float("inf"), ctx.max_items)
        self.store(self.baseline)
        self.routes: Routes | None = None  # learn_routes: (method, path) per destination key
        if self.learn and cfg.learn_routes:
            self.routes = Routes(ctx.max_items)
            self.store(self.routes)
        # With peers: learned here, not yet shared (source, destination, first seen) and
        # (destination, method, path).
        self.learned_new: list[tuple[str, str, float]] = []
        self.routes_new: list[tuple[str, str, str]] = []
        # The window ended, or a saved baseline was loaded (with peers: the coordinator says so).
        self.learning_over = False
        self.file: BaselineFile | None = None
        # Distributed (a shared baseline, no coordinator): requests on edges not in the baseline,
        # held for ``HOLD_SECS`` after the window ended (``over_at``: the first hop after it).
        self.over_at: float | None = None
        # (Only then: a parked hop's wait delays an evaluator's commits, ``Engine.longest_wait``.)
        self.held: Parking[tuple[str, str, str]] | None = None
        if self.learn and ctx.baseline_shared and not ctx.peers:
            self.held = self.parking("unexpected_edge_held", HOLD_SECS, self._held_over)
        self._released: list[tuple[Hop, Identity, Identity]] = []
        if self.learn and cfg.state_file is not None and not ctx.baseline_shared:
            self.file = BaselineFile(cfg.state_file)
            saved = self.file.load(cfg.learn_secs)
            if saved is not None:
                self.seed(((s, d, t) for (s, d), t in saved.edges.items()), True, saved.routes)
        self.enforcement = Enforcement(self)

    def configure(self) -> None:
        self.learn = self.cfg.mode == "learn"
        self.enforcement.configure()

    # --- the baseline ----------------------------------------------------------------------------
    def learns(self) -> bool:
        return self.learn

    def take_learned(self) -> Learned | None:
        if not (self.learned_new or self.routes_new):
            return None
        out = Learned(self.learned_new, self.routes_new)
        self.learned_new, self.routes_new = [], []
        return out

    def seed(self, edges: Iterable[Edge], over: bool, routes: Routes | None = None) -> None:
        """Start from a baseline learned before: the state file's, or (with peers) the
        coordinator's merged one. ``over``: learning is over (edges not in it alert at once)."""
        store = self.baseline
        dropped = 0
        for s, d, t in edges:
            if len(store) >= store.max_items:
                dropped += 1
            else:
                store.add((s, d), t, t)
        if dropped:
            log.warning(
                "The learned baseline has %d more edges than engine.store_max_items (%d) holds; they are "
                "left out and alert when seen.",
                dropped,
                store.max_items,
            )
        if routes is not None and self.routes is not None:
            self.routes.update(routes)
        self.learning_over = over

    def add_learned(self, edges: Iterable[Edge]) -> None:
        """Edges another worker learned (with peers), merged into this one's baseline."""
        store = self.baseline
        for s, d, t in edges:
            if len(store) < store.max_items:
                store.add((s, d), t, t)

    def end_learning(self) -> None:
        if not self.learning_over:
            self.learning_over = True
            n = len(self.baseline)
            log.info("Learning window over: %d edges learned; edges not among them alert from now on.", n)
            if self.file is not None:
                self.file.request()

    def snapshot(self) -> Baseline:
        """The baseline as it is saved."""
        b = Baseline(self.baseline.max_items, self.ctx.max_items)
        b.edges = dict(self.baseline.items())
        if self.routes is not None:
            b.routes = self.routes
        return b

    def on_hops(self, hops: list[Hop], now: float) -> None:
        ctx = self.ctx
        policy = ctx.policy
        if not self.learn and not policy.has_edges:
            return
        # With peers the coordinator ends the window (``learning_over``); alone, the clock does.
        shared = ctx.baseline_shared
        learning = (
            self.learn
            and not self.learning_over
            and (shared or (ctx.started is not None and now - ctx.started < self.cfg.learn_secs))
        )
        held = self.held
        holding = False
        if held is not None and self.learning_over:
            if self.over_at is None:
                self.over_at = now
            holding = now < self.over_at + HOLD_SECS
        baseline = self.baseline
        routes = self.routes
        edge_cache = policy.edge_cache
        enf = self.enforcement
        for h in hops:
            if h.direction == UNKNOWN:
                continue
            if learning and routes is not None:  # any request, as unexpected_path judges: named source or not
                method = h.method
                if method is not None:
                    path = route_path(h.path)
                    dkey = h.dst.key
                    if path is not None and routes.add(dkey, method, path) and shared:
                        self.routes_new.append((dkey, method, path))
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
                    if k not in baseline and len(baseline) < baseline.max_items:
                        baseline.add(k, now, now)
                        if shared:
                            self.learned_new.append((k[0], k[1], now))
                    continue
                if k in baseline:
                    continue
                if holding and held is not None:  # another member may have learned it just before the end
                    held.park((k[0], k[1], h.request_id or h.conn or str(id(h))), h, now)
                    continue
                detail = "edge not in the baseline learned at start-up"
            else:
                by_dst = edge_cache.get(src.uid)
                ok = by_dst.get(dst.uid) if by_dst is not None else None
                if ok or (ok is None and policy.edge_allowed(src, dst)) or policy.narrow_edge_allows(src, dst, h):
                    continue
                detail = "no policy edge allows it"
            if self.exempt(src, dst, h):
                continue
            enf.judge(h, src, dst, detail, now)
        if len(enf.pending):
            enf.resolve(hops)

    def _held_over(self, key: tuple[str, str, str], h: Hop, now: float) -> None:
        src, dst = (self.ctx.corr.named_source(h) or h.src), h.dst
        self._released.append((h, src, dst))

    def _judge_released(self, now: float) -> None:
        """Held requests whose hold ended (in the order they came: a destination sidecar's entry
        decides its source sidecar's, as in a batch): judged against the baseline as it is now."""
        released, self._released = self._released, []
        hops = []
        for h, src, dst in released:
            if (src.key, dst.key) in self.baseline or self.exempt(src, dst, h):
                continue
            self.enforcement.judge(h, src, dst, "edge not in the baseline learned at start-up", now)
            hops.append(h)
        if hops and len(self.enforcement.pending):
            self.enforcement.resolve(hops)

    def on_tick(self, now: float) -> None:
        super().on_tick(now)
        if self.held is not None and len(self.held):
            self.held.expire(now)  # each hold that ended: ``_held_over``
            if self._released:
                self._judge_released(now)
        self.enforcement.tick(now)
        if self.learn and not self.learning_over and not self.ctx.baseline_shared:
            started = self.ctx.started
            if started is not None and now - started >= self.cfg.learn_secs:
                self.end_learning()
        file = self.file
        if file is not None and file.pending:
            file.flush(self.snapshot, now)
