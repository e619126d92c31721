"""The daemon's lifecycle: start sinks, then the engine, then receivers; on SIGTERM stop in
reverse with a deadline (stop intake, drain the ingest queue through the engine, flush the
sinks), then cancel. SIGHUP reloads the configuration as a dry run first: an invalid file
keeps the old configuration, is logged, counted and raised as an alert.

No failure in one batch, tick or alert ends the engine or tick task (``meshaudit.guard``): it is
counted, logged once per kind, and skipped. A core task that ends anyway fails ``/healthz``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from aiohttp import web

from meshaudit import __version__, health, metrics
from meshaudit.config import Config, ConfigError, ListenConfig, Policy, for_reload
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
from meshaudit.receivers.auth import SourceCheck, warn_plaintext
from meshaudit.receivers.grpc_health import GrpcHealth
from meshaudit.receivers.grpc_server import build_server
from meshaudit.receivers.ingest import IngestQueue
from meshaudit.receivers.otlp.http import OtlpHttp
from meshaudit.receivers.sockets import raise_fd_limit
from meshaudit.sinks import build_sinks
from meshaudit.sinks.base import FatalSinkError, Sink
from meshaudit.views import page
from meshaudit.views.graph import MeshGraph
from meshaudit.watch import FileWatch

if TYPE_CHECKING:
    from meshaudit.runtime.link import WorkerLink

log = logging.getLogger("meshaudit")

SHUTDOWN_SECS = 10.0
MIN_BATCH, MAX_BATCH = 512, 4096  # hops per engine call
GC_THRESHOLD_0 = 20_000  # young objects between collections (CPython default: 700)


def check_protobuf_backend() -> str:
    """The upb backend is ~10x faster than pure Python; warn loudly when it is not in use."""
    from google.protobuf.internal import api_implementation

    kind = str(api_implementation.Type())
    if kind != "upb":
        log.warning(
            "protobuf is using the %r backend, not upb: decoding will be several times slower. "
            "Install protobuf from PyPI wheels (not Debian's python3-protobuf).",
            kind,
        )
    return kind


def tune_gc() -> None:
    """After start-up: freeze what exists (modules, config, policy: never garbage) so no later
    collection walks it again, and collect young objects less often. Under load the daemon
    allocates a Hop per entry; with the default threshold (700) the collector runs every ~30
    messages and its full passes showed as the alert-latency tail (BENCHMARKS.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_0, 20, 10)


async def start_sinks(sinks: list[Sink]) -> bool:
    """Start every sink concurrently (a backend that is down or hangs delays start-up once, not
    once per sink); False, with the reason logged, when one cannot run at all."""
    results = await asyncio.gather(*(s.start() for s in sinks), return_exceptions=True)
    fatal = [(s, r) for s, r in zip(sinks, results, strict=True) if isinstance(r, BaseException)]
    for s, r in fatal:
        log.error("Sink %s cannot start: %s", s.name, r)
        if not isinstance(r, FatalSinkError):
            log.error("Unexpected error starting sink %s", s.name, exc_info=r)
    if fatal:
        await asyncio.gather(*(s.shutdown(time.monotonic() + 2) for s in sinks))
    return not fatal


async def serve_http(app: web.Application, addr: str, runners: list[web.AppRunner], reuse_port: bool = False) -> str:
    """Serve ``app`` on ``addr`` (HOST:PORT, port 0 for any); returns the bound HOST:PORT."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    runners.append(runner)
    host, _, port = addr.rpartition(":")
    site = web.TCPSite(runner, host, int(port), reuse_address=True, reuse_port=reuse_port or None)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or ()
    bound_port = sockets[0].getsockname()[1] if sockets else int(port)
    return f"{host}:{bound_port}"


def print_ready(bound: dict[str, str], alerts_path: str, workers: int = 1) -> None:
    out = "stdout" if alerts_path == "-" else alerts_path
    procs = f" ({workers} worker processes)" if workers > 1 else ""
    print(
        f"meshaudit {__version__} running{procs}.\n"
        f"  Envoy access logs (ALS) and OTLP/gRPC -> {bound['grpc']}\n"
        f"  OTLP/HTTP                             -> http://{bound['http']}/v1/traces, /v1/logs\n"
        f"  metrics and health                    -> http://{bound['metrics']}/metrics, /healthz, /readyz\n"
        f"  alerts (JSON lines)                   -> {out}",
        file=sys.stderr,
        flush=True,
    )


def readiness_of(gates: dict[str, str], sinks: list[Sink]) -> tuple[dict[str, str], dict[str, str]]:
    """/readyz: what decides readiness ("can receive": receivers, engine tasks, ingest queue; each
    "ok" or why not), and each sink's state, shown only with ``?verbose``: a backend that is down
    never stops ingestion, so it must not take the daemon out of its Service either."""
    return gates, {s.name: s.ready_reason for s in sinks}


def mesh_graph(config: Config, policy: CompiledPolicy) -> MeshGraph:
    g = config.graph
    graph = MeshGraph(g.max_edges, g.history_bucket_secs, g.history_hours)
    graph.policy = policy
    return graph


def dispatch_to(sinks: list[Sink], alerts: list[Alert]) -> None:
    """Every alert to every sink; one that cannot be offered (a sink's bug, an alert that
    cannot be encoded) is counted and skipped, never the rest."""
    for a in alerts:
        metrics.ALERTS.labels(a.rule, a.severity).inc()
        for s in sinks:
            try:
                s.offer(a)
            except Exception as exc:
                ERRORS.record("dispatch", exc, f"offering a {a.rule} alert to sink {s.name}")


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


def watched_files(config_path: str | None, config: Config) -> list[Path]:
    if config_path is None:
        return []
    base = Path(config_path).parent
    names = [config.policy_file] if config.policy_file else config.policy_files
    return [Path(config_path), *(base / n for n in names)]


async def watch_guarded(files: FileWatch, reload: Callable[[], None], interval: float) -> None:
    """The file watch, restarted after a failure (counted): a broken watch must not fail /healthz."""
    while True:
        try:
            await files.run(reload, interval)
        except Exception as exc:
            ERRORS.record("watch", exc, "watching the configuration files for changes")
            await asyncio.sleep(interval)


def publish_exceptions(exceptions: Exceptions) -> None:
    """What the policy's exceptions covered since the last call, and those that expired. Every
    exception shows, at 0 until it covers something: a reviewer sees the dead ones too."""
    for name in exceptions.names:
        metrics.POLICY_EXCEPTION_MATCHES.labels(name)
    for name, n in exceptions.take_matches().items():
        metrics.POLICY_EXCEPTION_MATCHES.labels(name).inc(n)
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


class Daemon:
    """The whole daemon in one process, or (``link`` set) one worker of ``workers: N``: then it
    runs the receivers and the rules only, and its violations go to the coordinator."""

    def __init__(
        self,
        config: Config,
        policy: Policy,
        config_path: str | None,
        link: WorkerLink | None = None,
        overrides: dict[str, str] | None = None,
    ) -> None:
        """``overrides``: the command line's listen addresses, applied again on every reload."""
        self.config = config
        self.overrides = overrides or {}
        self.policy = policy
        self.config_path = config_path
        # the configuration's files as last loaded: a change reloads (reload_watch_ms)
        self.files = FileWatch(lambda: watched_files(self.config_path, self.config))
        self.link = link
        self.engine = build_engine(config, policy, peers=link is not None)
        if link is not None:  # a worker: the learn-mode baseline comes from the coordinator
            link.engine_built(self.engine)
        r = config.receivers
        self.queue = IngestQueue(r.ingest_queue_entries, r.ingest_queue_bytes, r.max_entries_per_message)
        self.core = CoreTasks(self._core_task_died)
        self._exit_code = 0
        self.sinks: list[Sink] = [] if link is not None else build_sinks(config.sinks)
        self._stop = asyncio.Event()
        self._listening = False
        self._violations_seen: dict[str, int] = {}
        self._store_seen: dict[tuple[str, str], int] = {}
        self._flood_top: dict[str, str] = {}  # store -> the observer its flood gauge names
        self.bound: dict[str, str] = {}
        self.grpc_health = GrpcHealth()
        # The service graph (/graph): this process's own, or (a worker) the coordinator's.
        self.graph = mesh_graph(config, self.engine.ctx.policy)

    # --- health and readiness ---------------------------------------------------------------
    def readiness(self) -> tuple[dict[str, str], dict[str, str]]:
        return readiness_of(self.intake_state(), self.sinks)

    async def _grpc_health(self) -> None:
        """grpc.health.v1: SERVING exactly when /readyz says ready."""
        gates, _ = self.readiness()
        await self.grpc_health.update(all(v == "ok" for v in gates.values()))

    def intake_state(self) -> dict[str, str]:
        """Whether this process can receive: listening, engine tasks alive, queue not saturated."""
        dead = self.core.dead()
        return {
            "receivers": "ok" if self._listening else "not listening",
            "engine": "; ".join(f"{k} {v}" for k, v in dead.items()) or "ok",
            "ingest_queue": self.queue.saturation(),
        }

    def _core_task_died(self, name: str) -> None:
        if self.link is not None:  # a worker: exit non-zero, and the coordinator starts it again
            self._exit_code = 1
            self.request_stop()

    # --- alerts ----------------------------------------------------------------------------
    def dispatch(self, alerts: list[Alert]) -> None:
        dispatch_to(self.sinks, alerts)
        self.graph.alerts(alerts, time.time())

    # --- engine tasks ------------------------------------------------------------------------
    async def _engine_loop(self) -> None:
        queue = self.queue
        while True:
            batch = await queue.get()
            if queue.claims:  # log_source_mismatch: a stream or export that claimed what it may not
                self._claims(queue.take_claims())
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
                    self._evaluate(batch)
                    raise
            await self._evaluate_sliced(batch)

    async def _evaluate_sliced(self, batch: list[Hop]) -> None:
        """At most MAX_BATCH hops per engine call, yielding to the loop between calls: one
        large message (a big OTLP export) must not stall the loop for longer than a tick."""
        n = len(batch)
        if n <= MAX_BATCH:
            self._evaluate(batch)
            return
        for i in range(0, n, MAX_BATCH):
            if i:
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:  # stopping: what was taken is still evaluated
                    self._evaluate(batch[i:])
                    raise
            self._evaluate(batch[i : i + MAX_BATCH])

    def _claims(self, claims: list[Claim]) -> None:
        try:
            alerts = self.engine.claims(claims, time.time())
        except Exception as exc:
            ERRORS.record("evaluate", exc, f"{len(claims)} sender claims")
            return
        if alerts:
            self.dispatch(alerts)
        if self.link is not None:
            try:
                self.link.after_engine(self.engine)
            except Exception as exc:
                ERRORS.record("peers", exc, "sending violations to the coordinator")

    def _evaluate(self, batch: list[Hop]) -> None:
        """One engine call. A failure costs this batch, never the engine task: counted, logged once
        per kind, skipped."""
        metrics.HOPS_EVALUATED.inc(len(batch))
        try:
            alerts = self.engine.evaluate(batch, time.time())
        except Exception as exc:
            ERRORS.record("evaluate", exc, f"a batch of {len(batch)} hops")
            return
        if alerts:
            self.dispatch(alerts)
        if self.link is not None:
            try:
                self.link.after_engine(self.engine)
            except Exception as exc:
                ERRORS.record("peers", exc, "sending violations and queries to the coordinator")

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_stats = 0.0
        while True:
            interval = self.config.engine.tick_ms / 1000  # a reload may change it
            expected = loop.time() + interval
            await asyncio.sleep(interval)
            metrics.LOOP_LAG.observe(max(0.0, loop.time() - expected))
            now = time.time()
            try:
                alerts = self.engine.tick(now)
            except Exception as exc:  # windows are checked again on the next tick
                ERRORS.record("tick", exc)
                alerts = []
            if alerts:
                self.dispatch(alerts)
            link = self.link
            if link is not None:
                try:
                    link.after_engine(self.engine)
                except Exception as exc:
                    ERRORS.record("peers", exc, "sending violations and queries to the coordinator")
            if now - last_stats >= 1.0:
                last_stats = now
                try:
                    self._publish_stats()
                    await self._grpc_health()
                except Exception as exc:
                    ERRORS.record("stats", exc)
                if link is not None:
                    try:
                        link.periodic(self.engine)
                    except Exception as exc:
                        ERRORS.record("peers", exc, "sending shared facts and metrics to the coordinator")

    def _publish_stats(self) -> None:
        if self.link is None:  # a worker sends its tally to the coordinator (WorkerLink.periodic)
            self.graph.absorb(self.engine.ctx.tally.take(), time.time())
        self.queue.qsize()
        publish_violations(self.engine.agg.violations, self._violations_seen)
        publish_stores(self.engine.stores(), self._store_seen)
        publish_floods(self.engine.stores(), self._flood_top)
        publish_exceptions(self.engine.ctx.policy.exceptions)

    # --- reload --------------------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP, or the files changed: the whole new configuration is validated first (an
        invalid one changes nothing); then it is applied without losing state: correlation
        indexes, waits, per-edge and aggregation windows and the learned baseline survive."""
        self.files.mark()
        loaded = load_for_reload(self.config_path, self.dispatch, self.overrides)
        if loaded is None:
            return
        config, waiting = for_reload(self.config, loaded[0])
        if waiting:  # a worker's coordinator says it once
            (log.debug if self.link is not None else log.warning)(
                "Changed keys that apply only on restart (the running values stay until then): %s",
                ", ".join(waiting),
            )
        self.engine.reconfigure(config, loaded[1])
        self.config, self.policy = config, loaded[1]
        self.graph.policy = self.engine.ctx.policy
        logging.getLogger().setLevel(config.log_level.upper())
        if self.link is None:  # a worker reloads when its coordinator says; that one counts
            metrics.CONFIG_RELOADS.labels("ok").inc()
        log.info("Configuration reloaded from %s; windows, waits and the learned baseline are kept.", self.config_path)

    # --- lifecycle ------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, ready_message: bool = True) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        if not await start_sinks(self.sinks):
            return 1
        self.core.start(self._engine_loop(), "engine")
        self.core.start(self._tick_loop(), "tick")
        worker = self.link is not None
        grpc_server: grpc.aio.Server | None = None
        runners: list[web.AppRunner] = []
        # Authenticated senders' claims, judged under the running policy's sources (a reload applies).
        sources = SourceCheck(
            self.queue, cfg.mesh, lambda: self.engine.ctx.policy.sources, cfg.receivers.enforce_sources
        )
        try:
            otlp_http = OtlpHttp(self.queue, self.engine.namer, cfg.receivers, sources)
            grpc_server, grpc_port = build_server(cfg, self.queue, self.engine.namer, cfg.listen.grpc, sources)
            self.grpc_health.attach(grpc_server)
            await grpc_server.start()
            self.bound["grpc"] = f"{cfg.listen.grpc.rpartition(':')[0]}:{grpc_port}"
            # Workers share the coordinator's ports (SO_REUSEPORT); it serves /metrics itself.
            self.bound["http"] = await otlp_http.serve(cfg.listen.http, runners, reuse_port=worker)
            if not worker:
                app = health.build_app(self.readiness, liveness=self.core.dead)
                page.add_routes(app, self.graph, lambda: self.config.graph.top_edges)
                self.bound["metrics"] = await serve_http(app, cfg.listen.metrics, runners)
        except OSError as exc:
            log.error("Cannot listen: %s", exc)
            await self._shutdown(grpc_server, runners)
            return 1
        self._listening = True
        if not worker:
            warn_plaintext({"gRPC": cfg.listen.grpc, "OTLP/HTTP": cfg.listen.http}, cfg.receivers)
        metrics.init_series([*(r.name for r in REGISTRY), "config_invalid"])
        await self._grpc_health()
        tune_gc()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        if not worker:  # Ctrl-C reaches every process of the group: the coordinator stops workers
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if not worker and self.config_path and cfg.reload_watch_ms:
            self.core.start(watch_guarded(self.files, self.reload, cfg.reload_watch_ms / 1000), "watch")
        if self.link is not None:
            self.link.ready(self)
        elif ready_message:
            print_ready(self.bound, self.config.sinks.jsonl.path)
        await self._stop.wait()
        log.info("Stopping: receivers first, then the engine, then the sinks.")
        await self._shutdown(grpc_server, runners)
        return self._exit_code

    async def _shutdown(self, grpc_server: grpc.aio.Server | None, runners: list[web.AppRunner]) -> None:
        deadline = time.monotonic() + SHUTDOWN_SECS
        self._listening = False
        # Receivers first: no new data; open ALS streams are cut (Envoy reconnects elsewhere).
        if grpc_server is not None:
            await self.grpc_health.shutdown()  # NOT_SERVING first: checkers stop sending
            await grpc_server.stop(grace=1.0)
        for r in runners[:1]:
            await r.cleanup()
        self.queue.closed = True
        # Engine: evaluate what was accepted, then stop its tasks (one that died fails nothing here).
        try:
            batch = self.queue.get_nowait()
            while batch is not None:
                self._evaluate(batch)
                batch = self.queue.get_nowait()
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # even then the sinks are flushed below
            ERRORS.record("evaluate", exc, "draining the ingest queue on shutdown; the rest is dropped")
        await self.core.stop()
        if self.link is not None:  # what the last batches found goes to the coordinator
            await self.link.close(deadline)
        # Sinks last, each with the remaining time.
        await asyncio.gather(*(s.shutdown(deadline) for s in self.sinks))
        for r in runners[1:]:
            await r.cleanup()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run(config_path: str | None, overrides: dict[str, str], alerts_format: str | None = None) -> int:
    """Load, validate and run; returns the process exit code (2 for a bad configuration).
    ``alerts_format``: the command line's over ``sinks.jsonl.format``."""
    try:
        config, policy = load(config_path)
        config = with_listen(config, overrides)
        if alerts_format is not None:
            jsonl = config.sinks.jsonl.model_copy(update={"format": alerts_format})
            config = config.model_copy(update={"sinks": config.sinks.model_copy(update={"jsonl": jsonl})})
    except ConfigError as exc:
        print(f"meshaudit: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"meshaudit: invalid listen address: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    raise_fd_limit()
    check_protobuf_backend()
    import uvloop

    path = str(Path(config_path).resolve()) if config_path else None
    if config.workers > 1:
        from meshaudit.runtime.coordinator import Coordinator

        return uvloop.run(Coordinator(config, policy, path, overrides).run())
    return uvloop.run(_main(config, policy, path, overrides))


async def _main(config: Config, policy: Policy, path: str | None, overrides: dict[str, str]) -> int:
    return await Daemon(config, policy, path, overrides=overrides).run()
