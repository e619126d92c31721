"""The pipeline: receivers -> ingest queue -> engine -> alerts, the same in every runner.

A runner (``meshaudit.runtime``: one process, or a worker of ``workers: N``) builds a
:class:`Pipeline` and plugs itself in through two things only: :class:`Peers` (the engines of
other processes: whom to ask, what to share) and an :data:`Outlet` (where alerts go). The
pipeline never imports a runner. A runner that does not evaluate where it receives (a receiver
of the distributed mode) also gives the pipeline its own :class:`Stage`, which takes the hops
off the ingest queue in place of the engine: that pipeline builds no engine.

Its lifecycle, driven by the runner: :meth:`Pipeline.start` (the engine and tick tasks),
:meth:`Pipeline.listen` (the receivers), :meth:`Pipeline.listening`, then on stop
:meth:`Pipeline.stop` (receivers first, then what was accepted is evaluated, then the engine's
tasks end). SIGHUP reloads the configuration as a dry run first (:meth:`Pipeline.reload`): an
invalid file keeps the old configuration, is logged, counted and raised as an alert.

No failure in one batch, tick or alert ends the engine or tick task (``meshaudit.guard``): it is
counted, logged once per kind, and skipped. A core task that ends anyway fails ``/healthz``
(and the runner hears of it: :meth:`Peers.core_task_ended`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

import grpc
from aiohttp import web

from meshaudit import metrics
from meshaudit.config import Config, ConfigError, ListenConfig, Policy, for_reload
from meshaudit.engine.core import Engine
from meshaudit.engine.exceptions import Exceptions
from meshaudit.engine.policy import CompiledPolicy
from meshaudit.engine.rules import REGISTRY
from meshaudit.engine.setup import build_engine
from meshaudit.engine.sources import Claim
from meshaudit.engine.store import Store, fair_share
from meshaudit.guard import ERRORS, CoreTasks
from meshaudit.loading import load
from meshaudit.logsafe import RateLimited, wire
from meshaudit.model import Alert, Hop, alert_id, identity
from meshaudit.naming import Namer
from meshaudit.receivers.auth import SourceCheck
from meshaudit.receivers.grpc_health import GrpcHealth
from meshaudit.receivers.grpc_server import build_server
from meshaudit.receivers.ingest import IngestQueue
from meshaudit.receivers.otlp.http import OtlpHttp

log = logging.getLogger("meshaudit")

MIN_BATCH, MAX_BATCH = 512, 4096  # hops per engine call

Outlet = Callable[[list[Alert]], None]
"""Where the pipeline's alerts go (the runner's sinks, or with ``workers: N`` a worker's count)."""


class Peers(Protocol):
    """The engines of the other processes, as the pipeline sees them. One process has none (its
    runner's ``several`` is False: the engine aggregates its own violations); a worker of
    ``workers: N`` has the others, through its coordinator: its engine forwards violations and
    defers decisions that need their evidence."""

    several: bool
    # Learn mode's baseline is shared with other processes (the workers' coordinator, the
    # distributed mode's evaluators): the engine hands out and takes in learned edges.
    baseline_shared: bool

    def attach(self, pipeline: Pipeline) -> None:
        """The pipeline's engine is built (before it sees a hop): seed it (the learn-mode baseline)."""

    def share(self, engine: Engine) -> None:
        """After every engine call: its violations out, its deferred decisions asked."""

    def periodic(self, engine: Engine) -> None:
        """Once a second: the engine's :meth:`Engine.facts` (and, to a worker's coordinator, its metrics)."""

    def core_task_ended(self, name: str) -> None:
        """A core task ended (it fails ``/healthz``); a worker exits, to be started again."""


class Stage(Protocol):
    """What takes the hops off the ingest queue instead of the engine (a receiver of the
    distributed mode: its producer). The pipeline still runs the receivers as always (decoders,
    sender checks, limits, the ingest queue's bounds); the stage decides how fast the queue
    empties, so a stage that cannot keep up makes the receivers push back as for a slow engine."""

    def start(self, queue: IngestQueue, core: CoreTasks) -> None:
        """Start its tasks (through ``core``: one that ends fails ``/healthz``)."""

    def gate(self, queue: str) -> str:
        """The ``ingest_queue`` gate of ``/readyz`` ("ok" or why not), given the queue's own state."""

    async def stop(self, queue: IngestQueue, core: CoreTasks) -> None:
        """The receivers have stopped and the queue is closed: hand on what was accepted (within
        the stage's own deadline), then end the tasks (``core.stop()``) and release what it holds."""


def with_listen(config: Config, overrides: dict[str, str]) -> Config:
    """The command line's listen addresses (``--grpc``, ...) over the file's."""
    if not overrides:
        return config
    return config.model_copy(
        update={"listen": ListenConfig.model_validate({**config.listen.model_dump(), **overrides})}
    )


def load_for_reload(
    path: str | None, dispatch: Callable[[list[Alert]], None], overrides: dict[str, str] | None = None
) -> tuple[Config, Policy] | None:
    """SIGHUP: the file again, or None when there is none or it is invalid (then the running
    configuration stays; the failure is logged, counted and raised as a config_invalid alert)."""
    if path is None:
        log.warning("SIGHUP ignored: the daemon runs on built-in defaults, there is no file to reload.")
        return None
    try:
        config, policy = load(path)
        return with_listen(config, overrides or {}), policy
    except ConfigError as exc:
        metrics.CONFIG_RELOADS.labels("invalid").inc()
        log.error("Configuration reload failed; keeping the running configuration:\n%s", exc)
        dispatch([config_invalid_alert(path, exc)])
        return None


def config_invalid_alert(path: str, exc: ConfigError) -> Alert:
    now = time.time()
    me = identity("meshaudit")
    return Alert(
        id=alert_id("config_invalid", me.key, me.key, now, 0),
        rule="config_invalid",
        severity="warning",
        summary=f"Reloading {path} failed; the previous configuration stays in force.",
        source=me,
        destination=me,
        count=1,
        first_seen=now,
        last_seen=now,
        window_secs=0,
        examples=[],
        detail=str(exc)[:2000],
        emitted_at=now,
    )


def publish_violations(violations: dict[str, int], seen: dict[str, int]) -> None:
    for rule, n in violations.items():
        before = seen.get(rule, 0)
        if n > before:
            metrics.VIOLATIONS.labels(rule).inc(n - before)
            seen[rule] = n


def publish_exceptions(exceptions: Exceptions) -> None:
    """What the policy's exceptions covered since the last call, and those that expired. Every
    exception shows, at 0 until it covers something: a reviewer sees the dead ones too."""
    for name in exceptions.names:
        metrics.POLICY_EXCEPTION_MATCHES.labels(name)
        metrics.POLICY_EXCEPTION_REQUESTS.labels(name)
    matches, requests = exceptions.take_matches()
    for name, n in matches.items():
        metrics.POLICY_EXCEPTION_MATCHES.labels(name).inc(n)
    for name, n in requests.items():
        metrics.POLICY_EXCEPTION_REQUESTS.labels(name).inc(n)
    for x in exceptions.take_expired():
        metrics.POLICY_EXCEPTIONS_EXPIRED.labels(x.name).inc()
        log.warning(
            "Policy exception %r expired (its expires date has passed): it no longer applies; the traffic it "
            "covered (%s) alerts again. Renew or remove it in the policy.",
            x.name,
            x.reason,
        )


_floods = RateLimited(log, interval=60.0)


def publish_floods(stores: list[Store], top: dict[str, str]) -> None:
    """A store shared fairly among observers (waiting hops, the correlation indexes) whose share
    one observer overran: the top offender of the last second, as a metric (one label set per
    store) and a rate-limited log line."""
    for st in stores:
        fair = fair_share(st)
        if fair is None:
            continue
        counts = fair.take()
        before = top.get(st.name)
        if not counts:
            if before is not None:
                metrics.STORE_FLOOD_TOP.labels(st.name, before).set(0)
            continue
        observer, n = max(counts.items(), key=lambda kv: kv[1])
        observer = wire(observer)
        if before is not None and before != observer:
            metrics.STORE_FLOOD_TOP.remove(st.name, before)
        metrics.STORE_FLOOD_TOP.labels(st.name, observer).set(n)
        top[st.name] = observer
        _floods.warning(
            f"flood:{st.name}",
            "Store %s: observer %s sends more than its share (%d entries): %d of its own were evicted "
            'in the last second (counted in store_evictions_total{reason="capacity"}); other observers\' '
            "evidence is kept.",
            st.name,
            observer,
            fair.quota,
            n,
        )


def publish_stores(stores: list[Store], seen: dict[tuple[str, str], int]) -> None:
    items: dict[str, int] = {}
    for st in stores:
        items[st.name] = items.get(st.name, 0) + len(st)
        for reason, n in (("expired", st.expired), ("capacity", st.evicted_capacity)):
            k = (st.name, reason)
            before = seen.get(k)
            if before is None:  # the series exists from the store's first publish, at 0
                metrics.STORE_EVICTIONS.labels(st.name, reason)
                before = seen[k] = 0
            if n > before:
                metrics.STORE_EVICTIONS.labels(st.name, reason).inc(n - before)
                seen[k] = n
    for name, n in items.items():
        metrics.STORE_ITEMS.labels(name).set(n)


class Pipeline:
    """Receivers, the ingest queue, the engine and its tick, in one process; ``peers`` and
    ``outlet`` are the runner's."""

    def __init__(
        self,
        config: Config,
        policy: Policy,
        config_path: str | None,
        peers: Peers,
        outlet: Outlet,
        overrides: dict[str, str] | None = None,
        stage: Stage | None = None,
    ) -> None:
        """``overrides``: the command line's listen addresses, applied again on every reload.
        ``stage``: what takes the hops off the ingest queue instead of the engine (then there is none)."""
        self.config = config
        self.overrides = overrides or {}
        self.policy = policy
        self.config_path = config_path
        self.peers = peers
        self.outlet = outlet
        self.stage = stage
        self._engine: Engine | None = None
        self._compiled: CompiledPolicy | None = None  # the running policy, when there is no engine
        if stage is None:
            self._engine = build_engine(config, policy, peers=peers.several, baseline_shared=peers.baseline_shared)
            self.namer = self._engine.namer
        else:
            self.namer = Namer(config.mesh)
            self._compiled = CompiledPolicy(policy)
        r = config.receivers
        self.queue = IngestQueue(r.ingest_queue_entries, r.ingest_queue_bytes, r.max_entries_per_message)
        self.core = CoreTasks(peers.core_task_ended)
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._listening = False
        self._violations_seen: dict[str, int] = {}
        self._store_seen: dict[tuple[str, str], int] = {}
        self._flood_top: dict[str, str] = {}  # store -> the observer its flood gauge names
        self._grpc_server: grpc.aio.Server | None = None
        self._runners: list[web.AppRunner] = []
        self.bound: dict[str, str] = {}
        self.grpc_health = GrpcHealth()
        # The time ticks are judged at: the wall clock, or the runner's (the evaluator role ticks at
        # the time up to which its partitions have been read, so no wait ends before its evidence
        # could have been consumed).
        self.clock: Callable[[], float] = time.time
        peers.attach(self)

    @property
    def engine(self) -> Engine:
        """The engine; a pipeline given its own :class:`Stage` has none (a runner that gives one never asks)."""
        if self._engine is None:
            raise RuntimeError("this pipeline's hops go to its runner's stage, not to an engine")
        return self._engine

    @property
    def compiled(self) -> CompiledPolicy:
        """The running policy (the receivers judge senders' claims under its ``sources``)."""
        if self._engine is not None:
            return self._engine.ctx.policy
        assert self._compiled is not None
        return self._compiled

    # --- health and readiness ---------------------------------------------------------------
    def intake_state(self) -> dict[str, str]:
        """Whether this process can receive: listening, engine tasks alive, queue not saturated
        (a stage of its own decides what its queue's state means)."""
        dead = self.core.dead()
        queue = self.queue.saturation()
        return {
            "receivers": "ok" if self._listening else "not listening",
            "engine" if self.stage is None else "tasks": "; ".join(f"{k} {v}" for k, v in dead.items()) or "ok",
            "ingest_queue": queue if self.stage is None else self.stage.gate(queue),
        }

    async def _grpc_health(self) -> None:
        """grpc.health.v1: SERVING exactly when /readyz says ready."""
        await self.grpc_health.update(all(v == "ok" for v in self.intake_state().values()))

    # --- alerts ----------------------------------------------------------------------------
    def dispatch(self, alerts: list[Alert]) -> None:
        self.outlet(alerts)

    def _shared(self) -> None:
        try:
            self.peers.share(self.engine)
        except Exception as exc:
            ERRORS.record("peers", exc, "sending violations and queries to the coordinator")

    # --- engine tasks ------------------------------------------------------------------------
    async def _engine_loop(self) -> None:
        queue = self.queue
        while True:
            batch = await queue.get()
            if queue.claims:  # log_source_mismatch: a stream or export that claimed what it may not
                self.claims(queue.take_claims(), time.time())
                if not batch:
                    continue
            # Evaluate what is waiting in one go: fewer wake-ups and engine calls under load. A
            # small batch first lets the other ready streams run (one loop pass, microseconds
            # when idle), so that under load one engine call covers many messages.
            for _ in range(2):
                while len(batch) < MAX_BATCH:
                    more = queue.get_nowait()
                    if more is None:
                        break
                    batch.extend(more)
                if len(batch) >= MIN_BATCH:
                    break
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:  # stopping: what was taken is still evaluated
                    self.evaluate(batch, time.time())
                    raise
            await self._evaluate_sliced(batch)

    async def _evaluate_sliced(self, batch: list[Hop]) -> None:
        """At most MAX_BATCH hops per engine call, yielding to the loop between calls: one
        large message (a big OTLP export) must not stall the loop for longer than a tick."""
        n = len(batch)
        if n <= MAX_BATCH:
            self.evaluate(batch, time.time())
            return
        for i in range(0, n, MAX_BATCH):
            if i:
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:  # stopping: what was taken is still evaluated
                    self.evaluate(batch[i:], time.time())
                    raise
            self.evaluate(batch[i : i + MAX_BATCH], time.time())

    def claims(self, claims: list[Claim], now: float) -> None:
        try:
            alerts = self.engine.claims(claims, now)
        except Exception as exc:
            ERRORS.record("evaluate", exc, f"{len(claims)} sender claims")
            return
        if alerts:
            self.dispatch(alerts)
        self._shared()

    def evaluate(self, batch: list[Hop], now: float) -> None:
        """One engine call. A failure costs this batch, never the engine task: counted, logged once
        per kind, skipped."""
        metrics.HOPS_EVALUATED.inc(len(batch))
        try:
            alerts = self.engine.evaluate(batch, now)
        except Exception as exc:
            ERRORS.record("evaluate", exc, f"a batch of {len(batch)} hops")
            return
        if alerts:
            self.dispatch(alerts)
        self._shared()

    def tick(self, now: float) -> None:
        """Every ``engine.tick_ms``: waits and windows that ended."""
        try:
            alerts = self.engine.tick(now)
        except Exception as exc:  # windows are checked again on the next tick
            ERRORS.record("tick", exc)
            alerts = []
        if alerts:
            self.dispatch(alerts)
        self._shared()

    def periodic(self) -> None:
        """Once a second: the engine's counters as metrics, and its facts to the peers."""
        try:
            self._publish_stats()
        except Exception as exc:
            ERRORS.record("stats", exc)
        try:
            self.peers.periodic(self.engine)
        except Exception as exc:
            if self.peers.several:
                ERRORS.record("peers", exc, "sending shared facts and metrics to the coordinator")
            else:
                ERRORS.record("stats", exc)

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_stats = 0.0
        while True:
            interval = self.config.engine.tick_ms / 1000  # a reload may change it
            expected = loop.time() + interval
            await asyncio.sleep(interval)
            metrics.LOOP_LAG.observe(max(0.0, loop.time() - expected))
            now = self.clock()
            self.tick(now)
            if now - last_stats >= 1.0:
                last_stats = now
                self.periodic()
                try:
                    await self._grpc_health()
                except Exception as exc:
                    ERRORS.record("stats", exc)

    def _publish_stats(self) -> None:
        self.queue.qsize()
        publish_violations(self.engine.agg.violations, self._violations_seen)
        publish_stores(self.engine.stores(), self._store_seen)
        publish_floods(self.engine.stores(), self._flood_top)
        publish_exceptions(self.engine.ctx.policy.exceptions)

    # --- reload --------------------------------------------------------------------------------
    def reload(self) -> list[str] | None:
        """SIGHUP, or the files changed: the whole new configuration is validated first (an
        invalid one changes nothing: None); then it is applied without losing state: correlation
        indexes, waits, per-edge and aggregation windows and the learned baseline survive.
        Returns the changed keys that apply only on restart (the runner says so)."""
        loaded = load_for_reload(self.config_path, self.dispatch, self.overrides)
        if loaded is None:
            return None
        config, waiting = for_reload(self.config, loaded[0])
        if self._engine is not None:
            self._engine.reconfigure(config, loaded[1])
        else:
            self._compiled = CompiledPolicy(loaded[1])
        self.config, self.policy = config, loaded[1]
        logging.getLogger().setLevel(config.log_level.upper())
        return waiting

    # --- lifecycle ------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    async def stopped(self) -> None:
        """Until a stop is requested (SIGTERM, or the runner's reason)."""
        await self._stop.wait()

    def start(self) -> None:
        """The engine and tick tasks, or the runner's stage."""
        if self.stage is not None:
            self.stage.start(self.queue, self.core)
            return
        self.core.start(self._engine_loop(), "engine")
        self.core.start(self._tick_loop(), "tick")

    async def listen(self, reuse_port: bool = False) -> None:
        """The receivers, on ``listen.grpc`` and ``listen.http`` (``reuse_port``: workers share
        them); raises OSError when a port cannot be had."""
        cfg = self.config
        # Authenticated senders' claims, judged under the running policy's sources (a reload applies).
        sources = SourceCheck(self.queue, cfg.mesh, lambda: self.compiled.sources, cfg.receivers.enforce_sources)
        otlp_http = OtlpHttp(self.queue, self.namer, cfg.receivers, sources)
        self._grpc_server, grpc_port = build_server(cfg, self.queue, self.namer, cfg.listen.grpc, sources)
        self.grpc_health.attach(self._grpc_server)
        await self._grpc_server.start()
        self.bound["grpc"] = f"{cfg.listen.grpc.rpartition(':')[0]}:{grpc_port}"
        self.bound["http"] = await otlp_http.serve(cfg.listen.http, self._runners, reuse_port=reuse_port)

    async def listening(self) -> None:
        """The receivers are up: ready, once the engine tasks run and the queue has room."""
        self._listening = True
        metrics.init_series([*(r.name for r in REGISTRY), "config_invalid"] if self.stage is None else [])
        await self._grpc_health()

    async def stop(self) -> None:
        """Receivers first (no new data; open ALS streams are cut, Envoy reconnects elsewhere),
        then what was accepted is evaluated, then the engine's tasks end."""
        self._listening = False
        if self._grpc_server is not None:
            await self.grpc_health.shutdown()  # NOT_SERVING first: checkers stop sending
            await self._grpc_server.stop(grace=1.0)
        for r in self._runners:
            await r.cleanup()
        self.queue.closed = True
        if self.stage is not None:
            await self.stage.stop(self.queue, self.core)
            return
        # Engine: evaluate what was accepted, then stop its tasks (one that died fails nothing here).
        try:
            batch = self.queue.get_nowait()
            while batch is not None:
                self.evaluate(batch, time.time())
                batch = self.queue.get_nowait()
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # even then the sinks are flushed by the runner
            ERRORS.record("evaluate", exc, "draining the ingest queue on shutdown; the rest is dropped")
        await self.core.stop()
