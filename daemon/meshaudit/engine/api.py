"""The rule API: everything a rule may touch, and nothing else.

A rule is one module under ``engine/rules/`` with one class, registered by one line in
``engine/rules/__init__.py``. The class declares:

- ``name``: the rule's name (alerts, metrics, config section, exemptions);
- ``Config``: its config model, a :class:`RuleConfig` (``enabled``, ``severity`` and its own
  options, units in their names); ``rules.<name>`` in the configuration is built from it;
- ``summary``: the one-sentence summary of its alerts, ``{src}`` and ``{dst}`` filled in;
- ``hops``: which hops it judges: ``"logged"`` (access-log entries: ALS HTTP and TCP, OTLP log
  records), ``"spans"``, ``"all"``, or ``"none"`` (a rule whose input is the receivers' claims:
  ``on_claims``). The core hands it only those.

A hop is judged in two stages (the shape every rule fits; each stage's key says where its state
may live when the daemon runs as several processes):

1. **Per hop**, keyed by correlation key: ``on_hops`` sees hops whose correlation is done (both
   sidecars' entries indexed, ``ctx.corr.source_of`` names a plaintext hop's client) and emits a
   :class:`Violation` through :meth:`Rule.violation`, or parks a hop that must wait for more
   evidence in a :meth:`Rule.parking` store (the core detaches it from its message and calls the
   rule back when the wait ends), or counts it per edge in an :class:`EdgeWindows`.
2. **Per edge**, keyed by (rule, source, destination): :class:`EdgeWindows` counts per window and
   asks the rule's ``judge_window`` when a window changed or closed; the aggregator turns
   violations into alerts (first at once, later ones counted).

The core imports no rule: it builds what the registry lists, filters hops by ``hops``, sets
``emit`` on each rule before the first call, and asks each rule for its stores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, Literal, NamedTuple, TypeVar, cast

from pydantic import BaseModel, ConfigDict

from meshaudit.engine.store import FairShare, Store, TTLStore
from meshaudit.engine.tally import EdgeTally
from meshaudit.model import ALS_HTTP, ALS_TCP, OTEL_LOG, Hop, Identity

if TYPE_CHECKING:
    from meshaudit.config import Config
    from meshaudit.engine.correlation import Correlation
    from meshaudit.engine.policy import CompiledPolicy
    from meshaudit.engine.sources import Claim
    from meshaudit.naming import Namer

Severity = Literal["info", "warning", "high", "critical"]
HopKind = Literal["logged", "spans", "all", "none"]
LOGGED_ORIGINS: Final = frozenset((ALS_HTTP, ALS_TCP, OTEL_LOG))


class RuleConfig(BaseModel):
    """Options every rule has. A rule's own config model subclasses this; options carry their
    units in their names (``window_secs``, ``grace_ms``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    enabled: bool = True
    severity: Severity = "warning"


class Violation:
    """One request or connection (or, ``hop`` None, one fact about a service) that breaks a rule,
    before aggregation."""

    __slots__ = ("blocked", "detail", "dst", "hop", "more", "rule", "severity", "src", "summary", "when")

    def __init__(
        self,
        rule: str,
        severity: str,
        src: Identity,
        dst: Identity,
        hop: Hop | None,
        detail: str,
        when: float,
        summary: str | None = None,
        blocked: bool | None = None,
        more: Sequence[Hop] = (),
    ) -> None:
        self.rule = rule
        self.summary = summary  # overrides the rule's summary template
        self.severity = severity
        self.src = src
        self.dst = dst
        self.hop = hop
        self.detail = detail
        self.when = when  # observed time (data time, so replays give the same alert id)
        # Whether the mesh denied this request (RBAC, ext_authz): True denied, False served;
        # None for rules where enforcement does not apply. The aggregator keeps a window's
        # "all blocked so far" from it.
        self.blocked = blocked
        # Further examples after ``hop`` (a per-edge violation stands for many requests).
        self.more = more


Emit = Callable[[Violation], None]


def _not_started(v: Violation) -> None:
    raise RuntimeError("a rule emitted before the engine set its emit")


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

Edge = tuple[str, str, float]  # a learned edge: (source key, destination key, first seen)
Route = tuple[str, str, str]  # a learned route: (destination key, method, path)


class Learned(NamedTuple):
    """What a rule learned from traffic since it was last asked (``Rule.take_learned``): with
    ``workers: N`` it goes to the coordinator, which owns the baseline, and to the other workers."""

    edges: list[Edge]
    routes: list[Route]


class Deferred:
    """A violation that depends on evidence other workers may hold, waiting for their answer."""

    __slots__ = ("hop", "query", "rule")

    def __init__(self, rule: Rule[Any], hop: Hop, query: PeerQuery) -> None:
        self.rule = rule
        self.hop = hop
        self.query = query


class EngineContext:
    """What every rule shares: configuration, compiled policy, naming, the correlation state."""

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
        # Learn mode's baseline is shared with other processes (with peers, or the evaluators of
        # the distributed mode): what is learned is handed out (``Rule.take_learned``), merged in
        # (``Rule.add_learned``), and the learning window is ended from outside (``Rule.seed``).
        self.baseline_shared = False
        # Each rule's options as the core gives them: its ``rules.<name>`` section under the
        # policy's overrides for all traffic.
        self.sections: dict[str, RuleConfig] = {}
        # Per-edge traffic counts for the service graph; rules report what only they decide
        # (missing_access_log: whether a traced request was logged).
        self.tally = EdgeTally(config.graph.enabled)


C = TypeVar("C", bound=RuleConfig)
K = TypeVar("K")


class Parking(TTLStore[K, Hop]):
    """Hops a rule keeps past their batch, waiting for evidence; a hop is detached from its
    message when parked, and the rule's hook is called when its wait ends.

    Shared fairly among observers (the sidecar or tracer that reported each hop,
    :class:`~meshaudit.engine.store.FairShare`): one observer holds at most its share of the
    store, and past that its own oldest hop makes room. A flood from one stream (a forged one, or
    one runaway sidecar) so evicts its own evidence, never another observer's; ``fair.evicted_by``
    counts whose hops went (the top offender is logged and exported). Only when the whole store
    is full does the oldest hop of all go. ``on_evict(key, hop)`` lets the rule drop what it
    keeps about an evicted hop elsewhere (an index of waiting hops by request id)."""

    __slots__ = ("_by_observer", "fair", "on_evict")

    def __init__(
        self,
        name: str,
        ttl: float,
        max_items: int,
        on_expire: Callable[[K, Hop, float], None],
        on_evict: Callable[[K, Hop], None] | None = None,
    ) -> None:
        def expired(key: K, hop: Hop, now: float) -> None:
            self._forget(key, hop.observer)
            on_expire(key, hop, now)

        super().__init__(name, ttl, max_items, expired)
        self.fair = FairShare(max_items)
        self.on_evict = on_evict
        self._by_observer: dict[str, dict[K, None]] = {}  # each observer's keys, oldest first

    def park(self, key: K, hop: Hop, now: float) -> bool:
        """Keep ``hop`` until its wait ends; a key already waiting keeps its first hop (False)."""
        if key in self:
            return False
        hop.detach()
        observer = hop.observer
        mine = self._by_observer.get(observer)
        if mine is None:
            mine = self._by_observer[observer] = {}
        if len(mine) >= self.fair.quota:  # this observer's share is full: its own oldest goes
            self._evict(next(iter(mine)), observer)
        elif len(self) >= self.max_items:  # the store is full: the oldest of all goes
            oldest = self.oldest()
            if oldest is not None:
                self._evict(oldest[0], oldest[1].observer)
        mine[key] = None
        return self.add(key, hop, now)

    def pop(self, key: K) -> Hop | None:
        hop = super().pop(key)
        if hop is not None:
            self._forget(key, hop.observer)
        return hop

    def release(self, drop: Callable[[Hop], bool]) -> int:
        """Forget, without judging, every waiting hop ``drop`` selects (the evaluator role: hops of
        a partition this member no longer owns, whose evidence now goes to another member);
        ``on_evict`` lets the rule forget what else it kept about each. Returns how many went."""
        gone = [(key, hop) for key, hop in self.items() if drop(hop)]
        for key, hop in gone:
            super().pop(key)
            self._forget(key, hop.observer)
            if self.on_evict is not None:
                self.on_evict(key, hop)
        return len(gone)

    def _evict(self, key: K, observer: str) -> None:
        hop = super().pop(key)
        self._forget(key, observer)
        self.evicted_capacity += 1
        self.fair.evicted(observer)
        if hop is not None and self.on_evict is not None:
            self.on_evict(key, hop)

    def _forget(self, key: K, observer: str) -> None:
        mine = self._by_observer.get(observer)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._by_observer[observer]


class Window:
    """One edge's counts in one window (``EdgeWindows``)."""

    __slots__ = (
        "dirty", "dst", "examples", "hits", "judged", "live", "seen_first", "seen_last", "src", "start", "total",
    )  # fmt: skip

    def __init__(self, src: Identity, dst: Identity, start: float, when: float) -> None:
        self.src = src
        self.dst = dst
        self.start = start  # receive time the window opened
        self.total = 0  # requests (or connections) counted
        self.hits = 0  # of them, what the rule counts against the edge (retries, failures, ...)
        # Data time of the first and last hop that counted as a hit (until the first hit, of the
        # hop that opened the window): the time of the evidence, and no per-request time read.
        self.seen_first = when
        self.seen_last = when
        self.examples: list[Hop] = []  # the first few hops that counted as hits (their example fields)
        self.judged = False  # the rule raised its violation for this window already
        self.dirty = False  # counted since the last tick
        self.live = True  # open: not closed, not evicted


def _example(h: Hop, when: float) -> Hop:
    """What an alert's example needs of a hop, and no more: a window keeps a few of them for its
    whole length, and an access-log entry's hop, detached, holds every field it has read."""
    return Hop(
        h.origin, h.observer, h.observer_service, h.direction, h.src, h.dst, when, method=h.method, path=h.path,
        request_id=h.request_id, trace_id=h.trace_id,
    )  # fmt: skip


class WindowDelta(NamedTuple):
    """One process's counts of one edge in one window since its last tick, when stage 2 runs split
    (:meth:`EdgeWindows.split`): what a counting process gives out and the process that judges
    the edge sums (the evaluator role: through the edges topic, keyed by rule, source and
    destination)."""

    windows: str  # the EdgeWindows' name (``<rule>_windows``): which counter of the rule
    rule: str
    src: Identity
    dst: Identity
    start: float  # the window's start: a multiple of ``window_secs`` in epoch data time
    total: int
    hits: int
    seen_first: float
    seen_last: float
    examples: tuple[Hop, ...]


class EdgeWindows:
    """Stage 2 of rules that need many requests: per (source, destination) counts in tumbling
    windows of ``window_secs``. ``add`` counts a hop; on every tick the rule's ``judge`` is
    asked about each window that changed since (``final`` False) and about each window that
    closed (``final`` True), and may emit; a window is judged at most once as a violation.
    Bounded by ``max_items`` edges (the oldest goes first, counted as a capacity eviction).

    **Split** (:meth:`split`, set by the core, never by a rule: the evaluator role, where an
    edge's requests are spread over several processes): ``add`` counts as before, but into
    windows of this tick only, which ``tick`` hands out as :class:`WindowDelta` (``take``), each
    in the window of epoch time its evaluation time falls in (``start``, a multiple of
    ``window_secs``: every process's deltas of one window name the same one). The process that
    owns the edge ``absorb``s every process's deltas into the judged windows (``windows``) and
    judges the sums with the same ``judge``; a judged window closes ``lateness`` seconds after
    its end (deltas of a process behind still count), and a delta for one closed already is
    dropped and counted (``late``)."""

    def __init__(
        self,
        name: str,
        window_secs: float,
        max_items: int,
        judge: Callable[[Window, bool], None],
        examples: int = 3,
        rule: str = "",
    ) -> None:
        self.name = name
        self.rule = rule
        self.judge = judge
        self.examples = examples
        self.windows: TTLStore[tuple[str, str], Window] = TTLStore(name, window_secs, max_items, self._closed)
        # The open windows again, by source key then destination key: ``add``'s lookup, once
        # per counted request, with no key tuple; and the last edge added to, since a batch
        # from one sidecar mostly repeats a few edges.
        self._open: dict[str, dict[str, Window]] = {}
        self._dirty: list[Window] = []
        self._last: tuple[Identity, Identity, Window] | None = None
        # Split (``split``): deltas made at the last ticks, judged windows changed since the last
        # tick, judged windows closed recently (key -> when), deltas dropped as late.
        self.splits = False
        self.lateness = 0.0
        self._deltas: list[WindowDelta] = []
        self._changed: list[Window] = []
        self._gone: dict[tuple[str, str], float] = {}
        self.late = 0

    def split(self, lateness: float) -> None:
        """Count here, judge where the edge is owned (see the class). Before the first ``add``."""
        self.splits = True
        self.lateness = lateness

    def add(self, src: Identity, dst: Identity, hop: Hop, now: float, total: int, hits: int) -> None:
        """Count ``total`` requests of the edge, ``hits`` of them against it. Called for every
        counted request: a request that is no hit costs two dict lookups, and its time (a lazy
        field of an access-log entry) is not read."""
        last = self._last
        if last is not None and last[0] is src and last[1] is dst and last[2].live:
            w = last[2]
        else:
            by_dst = self._open.get(src.key)
            found = by_dst.get(dst.key) if by_dst is not None else None
            w = found if found is not None else self._open_window(src, dst, hop, now)
            self._last = (src, dst, w)
        w.total += total
        if hits:
            w.hits += hits
            when = hop.start
            if len(w.examples) < self.examples:
                w.examples.append(_example(hop, when))
            if w.hits == hits:  # the first hit: its time replaces the opening hop's
                w.seen_first = w.seen_last = when
            elif when < w.seen_first:
                w.seen_first = when
            elif when > w.seen_last:
                w.seen_last = when
        if not w.dirty:
            w.dirty = True
            self._dirty.append(w)

    def count(self, hops: Iterable[Hop], now: float) -> None:
        """Count each hop as one request of its edge (``h.src`` to ``h.dst``) and no hit: what
        ``add(h.src, h.dst, h, now, 1, 0)`` does for each, in one call. For the requests a rule
        counts without judging them (nearly all): a call per request cost as much as the rest of
        the rule's loop. A window's times are those of its hits, so counting a batch's plain
        requests before or after its hits makes no difference."""
        opened = self._open
        dirty = self._dirty
        last = self._last
        lsrc, ldst, lw = last if last is not None else (None, None, None)
        for h in hops:
            src = h.src
            dst = h.dst
            if src is lsrc and dst is ldst and lw is not None and lw.live:
                w = lw
            else:
                by_dst = opened.get(src.key)
                found = by_dst.get(dst.key) if by_dst is not None else None
                w = found if found is not None else self._open_window(src, dst, h, now)
                lsrc, ldst, lw = src, dst, w
            w.total += 1
            if not w.dirty:
                w.dirty = True
                dirty.append(w)
        if lw is not None:
            assert lsrc is not None and ldst is not None
            self._last = (lsrc, ldst, lw)

    def _open_window(self, src: Identity, dst: Identity, hop: Hop, now: float) -> Window:
        if self.splits:  # this tick's counts, in the window of epoch time ``now`` falls in
            ttl = self.windows.ttl
            w = Window(src, dst, (now // ttl) * ttl if ttl > 0 else now, hop.start)
            if len(self._dirty) >= self.windows.max_items:  # bounded per tick: counted, not kept
                self.windows.evicted_capacity += 1
                w.dirty = True
                return w
            self._open.setdefault(src.key, {})[dst.key] = w
            return w
        w = Window(src, dst, now, hop.start)
        key = (src.key, dst.key)
        oldest = self.windows.oldest() if len(self.windows) >= self.windows.max_items else None
        if oldest is not None:  # full: the store evicts its oldest window (unjudged, counted)
            self._forget(oldest[0], oldest[1])
        self.windows.put(key, w, now)  # the TTL is the window: its end is the expire hook
        self._open.setdefault(src.key, {})[dst.key] = w
        return w

    def _forget(self, key: tuple[str, str], w: Window) -> None:
        w.live = False
        by_dst = self._open.get(key[0])
        if by_dst is not None:
            by_dst.pop(key[1], None)
            if not by_dst:
                del self._open[key[0]]

    def tick(self, now: float) -> None:
        if self.splits:
            self._hand_out()
            self.judge_changed()
            self.windows.expire(now)
            self._prune(now)
            return
        dirty, self._dirty = self._dirty, []
        for w in dirty:
            w.dirty = False
            if w.live and not w.judged:
                self.judge(w, False)
        self.windows.expire(now)

    def _closed(self, key: tuple[str, str], w: Window, now: float) -> None:
        self._forget(key, w)
        if self.splits:
            self._gone[key] = now
        if not w.judged:
            self.judge(w, True)

    # --- split ----------------------------------------------------------------------------------
    def _hand_out(self) -> None:
        """This tick's counts become deltas; the next ``add`` opens new windows."""
        dirty, self._dirty = self._dirty, []
        self._open.clear()
        self._last = None
        out = self._deltas
        for w in dirty:
            w.live = False
            if w.total:
                out.append(
                    WindowDelta(
                        self.name, self.rule, w.src, w.dst, w.start, w.total, w.hits, w.seen_first, w.seen_last,
                        tuple(w.examples),
                    )
                )  # fmt: skip

    def take(self) -> list[WindowDelta]:
        """The deltas made at the ticks since the last call (split)."""
        out, self._deltas = self._deltas, []
        return out

    def absorb(self, d: WindowDelta, now: float) -> None:
        """Add one process's delta to the judged window it names (split); judged at the next tick."""
        key = (d.src.key, f"{d.dst.key}|{int(d.start)}")
        w = self.windows.get(key)
        if w is None:
            if key in self._gone:
                self.late += 1
                return
            w = Window(d.src, d.dst, d.start, d.seen_first)
            # Its deadline: the window's end by data time, and the lateness after it (a window
            # of the past, as in a replay, closes at the next tick).
            self.windows.put(key, w, d.start + self.lateness)
        had = w.hits
        w.total += d.total
        if d.hits:
            w.hits += d.hits
            room = self.examples - len(w.examples)
            if room > 0:
                w.examples.extend(d.examples[:room])
            if not had:
                w.seen_first, w.seen_last = d.seen_first, d.seen_last
            else:
                w.seen_first = min(w.seen_first, d.seen_first)
                w.seen_last = max(w.seen_last, d.seen_last)
        if not w.dirty:
            w.dirty = True
            self._changed.append(w)

    def judge_changed(self) -> None:
        """Judge the judged windows changed since the last call (split)."""
        changed, self._changed = self._changed, []
        for w in changed:
            w.dirty = False
            if w.live and not w.judged:
                self.judge(w, False)

    def release(self, drop: Callable[[str, str, str], bool]) -> int:
        """Forget, unjudged, the judged windows whose (rule, source key, destination key) ``drop``
        selects (split: keys now owned by another process, which rebuilds them). Returns how many."""
        gone = [(k, w) for k, w in self.windows.items() if drop(self.rule, w.src.key, w.dst.key)]
        for k, w in gone:
            self.windows.pop(k)
            w.live = False
        return len(gone)

    def _prune(self, now: float) -> None:
        gone = self._gone
        horizon = now - self.windows.ttl - self.lateness
        while gone:
            key, at = next(iter(gone.items()))
            if at > horizon and len(gone) <= self.windows.max_items:
                break
            del gone[key]

    def stores(self) -> list[Store]:
        return [self.windows]


class Rule(Generic[C]):
    """The base of every rule. Subclasses set the class attributes below and implement
    ``on_hops`` (and, as they need, ``on_tick``, ``finish``, ``peer_source``)."""

    name: ClassVar[str]
    Config: ClassVar[type[RuleConfig]]
    summary: ClassVar[str]
    hops: ClassVar[HopKind] = "logged"

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        # The rule's options: its section of ``rules:`` under the policy's overrides for all
        # traffic (``ctx.sections``, from the core; a rule the configuration does not know, e.g.
        # in a test, runs on its defaults).
        self.cfg = cast(C, ctx.sections.get(self.name) or getattr(ctx.config.rules, self.name, None) or self.Config())
        self.emit: Emit = _not_started  # set by the core before the rule's first call
        self._stores: list[Store] = []
        self._edges: list[EdgeWindows] = []

    @classmethod
    def correlation(cls, cfg: RuleConfig) -> tuple[float, float]:
        """(time-to-live, span index horizon) in seconds the rule needs of the shared
        correlation state; the core keeps the largest any enabled rule asks for."""
        return 0.0, 0.0

    # --- configuration ----------------------------------------------------------------------
    def configure(self) -> None:
        """Derive what the rule keeps from ``self.cfg`` and ``self.ctx.policy`` (thresholds,
        wait times as store TTLs, compiled sets). Called by the rule's own ``__init__`` when it
        needs it, and by ``reconfigure`` on every reload."""

    def reconfigure(self, cfg: RuleConfig) -> None:
        """A reload (new section, or a new policy in ``ctx``): the rule keeps its state (waiting
        hops, open windows, what it learned) and only what it derives changes. A store whose TTL
        changes keeps its entries until their old deadlines."""
        self.cfg = cast(C, cfg)
        self.configure()

    # --- state ------------------------------------------------------------------------------
    def store(self, s: Store) -> None:
        """Register a store of the rule's own (gauges, evictions, expiry on every tick)."""
        self._stores.append(s)

    def parking(
        self,
        name: str,
        ttl: float,
        on_expire: Callable[[Any, Hop, float], None],
        on_evict: Callable[[Any, Hop], None] | None = None,
    ) -> Parking[Any]:
        """A bounded store of hops waiting for evidence; ``on_expire(key, hop, now)`` when the
        wait ends (the rule emits through ``self.emit``), ``on_evict(key, hop)`` when a hop is
        evicted for capacity (no event: the rule forgets what else it kept about it)."""
        p: Parking[Any] = Parking(name, ttl, self.ctx.max_items, on_expire, on_evict)
        self.store(p)
        return p

    def edge_windows(self, window_secs: float, judge: Callable[[Window, bool], None]) -> EdgeWindows:
        """Per-edge windowed counts (stage 2), judged by ``judge(window, final)``."""
        w = EdgeWindows(
            f"{self.name}_windows", window_secs, self.ctx.max_items, judge, self.ctx.config.engine.examples, self.name
        )
        self._edges.append(w)
        self._stores.extend(w.stores())
        return w

    def stores(self) -> list[Store]:
        return self._stores

    def edge_counters(self) -> list[EdgeWindows]:
        """The rule's per-edge windows (the core runs them split in the evaluator role)."""
        return self._edges

    # --- judging --------------------------------------------------------------------------------
    def violation(
        self,
        src: Identity,
        dst: Identity,
        hop: Hop | None,
        detail: str,
        when: float,
        severity: str | None = None,
        summary: str | None = None,
        blocked: bool | None = None,
        more: Sequence[Hop] = (),
    ) -> None:
        """Emit a violation of this rule (after its exemptions: ``exempt`` first); ``more``:
        further examples after ``hop``."""
        severity = severity or self.setting("severity", dst)
        self.emit(Violation(self.name, severity, src, dst, hop, detail, when, summary, blocked, more))

    def setting(self, name: str, dst: Identity) -> Any:
        """An option as it applies to traffic to ``dst``: the policy's last override for a
        destination that matches it, else the rule's own (``self.cfg``). Read on violations and
        window judgements, never per entry."""
        found = self.ctx.policy.dst_setting(self.name, name, dst)
        return found[0] if found is not None else getattr(self.cfg, name)

    def window_violation(self, w: Window, detail: str) -> None:
        """Emit the violation of a per-edge window (once per window): its first example as the
        hop, the others after it."""
        w.judged = True
        ex = w.examples
        self.violation(w.src, w.dst, ex[0] if ex else None, detail, w.seen_first, more=ex[1:])

    def exempt(self, src: Identity, dst: Identity, hop: Hop | None) -> bool:
        return self.ctx.policy.exempt(self.name, src, dst, hop)

    def on_hops(self, hops: list[Hop], now: float) -> None:
        raise NotImplementedError

    def on_replay(self, hops: list[Hop], now: float) -> None:
        """Hops replayed to rebuild stage-1 state (the evaluator role, after it gained a
        partition): index what later hops are joined against, never judge, park or count. The
        core has indexed the shared correlation state already; a rule with an index of its own
        (missing_access_log's client spans) fills it here."""

    def on_evidence(self, hops: list[Hop], now: float) -> None:
        """Evidence copies (the evaluator role): hops another partition judges, copied to this
        one because hops here are joined to them (README, Distributed mode). Index them as
        :meth:`on_replay` does and let them settle this rule's waits (a span waiting for its
        access log); never judge or count them. The core has indexed them already."""
        self.on_replay(hops, now)

    def on_claims(self, claims: list[Claim], now: float) -> None:
        """Senders that claimed what they may not (``meshaudit.engine.sources``): once per ALS
        stream or OTLP export, never per hop. Only log_source_mismatch reads them."""

    def on_tick(self, now: float) -> None:
        """Called every ``engine.tick_ms``; the base ticks the rule's edge windows."""
        for w in self._edges:
            w.tick(now)

    # --- peers (``workers: N``) -----------------------------------------------------------------
    def finish(self, hop: Hop, answer: PeerAnswer) -> None:
        """The other workers answered about a hop this rule deferred."""
        raise NotImplementedError(f"{self.name} defers no decision to its peers")

    def peer_source(self, q: PeerQuery) -> Identity | None:
        """What this rule's own state knows of a peer's hop's client (see ``Engine.answer``)."""
        return None

    # --- a learned baseline shared between workers (``workers: N``) ---------------------------------
    def learns(self) -> bool:
        """Whether the rule learns a baseline from traffic (learn mode). With peers the coordinator
        owns it: it seeds the rule (``seed``), collects what each worker learned
        (``take_learned``), shares it (``add_learned``) and says when learning is over."""
        return False

    def take_learned(self) -> Learned | None:
        """With peers: what the rule learned since the last call (then forgotten here); None: nothing."""
        return None

    def add_learned(self, edges: Iterable[Edge]) -> None:
        """With peers: edges another worker learned, merged into this rule's baseline."""

    def seed(self, edges: Iterable[Edge], over: bool) -> None:
        """Start from a baseline learned before (``over``: learning is over; no edges and ``over``
        ends learning)."""
