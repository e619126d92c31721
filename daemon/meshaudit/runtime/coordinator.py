"""The coordinator of ``workers: N`` (the hub): it reserves the ports, starts the workers
(:mod:`meshaudit.runtime.link`), and owns what must be single: the sinks, the one aggregator,
``/metrics`` and ``/readyz``, the service graph, the learn-mode baseline. Its message handling
(:meth:`Coordinator.handle`, one handler per message type) and :meth:`Coordinator.tick` are all
its logic; ``run`` adds the processes and sockets around them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from meshaudit import health, metrics
from meshaudit.baseline import Baseline, BaselineFile
from meshaudit.config import Config, Policy, for_reload
from meshaudit.engine.aggregate import Aggregator
from meshaudit.engine.api import NO_ANSWER, Edge, PeerAnswer, PeerQuery, Route
from meshaudit.engine.core import Facts
from meshaudit.engine.policy import CompiledPolicy
from meshaudit.engine.rules import SUMMARIES
from meshaudit.engine.setup import build_engine
from meshaudit.guard import ERRORS, CoreTasks
from meshaudit.model import Alert
from meshaudit.pipeline import load_for_reload, publish_stores, publish_violations
from meshaudit.receivers.auth import warn_plaintext
from meshaudit.receivers.sockets import ensure_free
from meshaudit.runtime.common import (
    SHUTDOWN_SECS,
    dispatch_to,
    lateness,
    mesh_graph,
    print_ready,
    readiness_of,
    serve_http,
    start_sinks,
    tune_gc,
    watch_guarded,
    watched_files,
)
from meshaudit.runtime.link import worker_entry
from meshaudit.runtime.messages import (
    Answer,
    AskSeed,
    Hello,
    Intake,
    LearningOver,
    MetricsReport,
    Query,
    Ready,
    Scrape,
    Seed,
    Shared,
    ToWorker,
    Violations,
    delta_from_wire,
    frame,
    read_frame,
    violation_from_wire,
)
from meshaudit.runtime.summed import SummedMetrics
from meshaudit.sinks import build_sinks
from meshaudit.views import page
from meshaudit.watch import FileWatch

log = logging.getLogger("meshaudit.workers")  # one name for both sides: their log lines stay as they were

QUERY_TIMEOUT = 2.0  # a peer that has not answered by then is taken as knowing nothing
RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)


def merge_answers(into: list[PeerAnswer], more: list[PeerAnswer]) -> None:
    """Covered if any worker covers it; the first worker that knows the source names it."""
    for i, (a, b) in enumerate(zip(into, more, strict=True)):
        if (b.covered and not a.covered) or (b.source is not None and a.source is None):
            into[i] = PeerAnswer(a.covered or b.covered, a.source or b.source)


# --- the coordinator ------------------------------------------------------------------------------
def reserve_port(addr: str) -> tuple[socket.socket, str]:
    """Bind (not listen) a SO_REUSEPORT socket: it fixes the port (0: any free one) that the
    workers then listen on together, and keeps any other program from taking it. A port another
    process already holds is refused first (SO_REUSEPORT is for our own workers only)."""
    ensure_free(addr)
    host, _, port = addr.rpartition(":")
    bare = host.strip("[]")
    family, kind, proto, _, sockaddr = socket.getaddrinfo(bare, int(port), type=socket.SOCK_STREAM)[0]
    s = socket.socket(family, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind(sockaddr)
    except OSError:
        s.close()
        raise
    return s, f"{host}:{s.getsockname()[1]}"


@dataclass
class _Worker:
    index: int
    process: BaseProcess | None = None
    writer: asyncio.StreamWriter | None = None
    ready: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # its link closed
    restarts: int = 0
    started_at: float = 0.0


@dataclass
class _Fanout:
    origin: int
    qid: int
    answers: list[PeerAnswer]
    waiting: set[int]
    deadline: float


class Coordinator:
    def __init__(
        self, config: Config, policy: Policy, config_path: str | None, overrides: dict[str, str] | None = None
    ) -> None:
        self.config = config
        self.overrides = overrides or {}  # the command line's listen addresses, again on each reload
        self.policy = policy
        self.config_path = config_path
        self.files = FileWatch(lambda: watched_files(self.config_path, self.config))
        self._listen_as_started = config.listen  # before the ports are bound (port 0 stays 0)
        self.n = config.workers
        self.agg = Aggregator.from_config(config.engine, SUMMARIES)
        # Stage 2 of the per-edge rules (excessive_retries, error_burst): every worker's window
        # counts are summed and judged here, as the evaluators do between them, since an edge's
        # requests may reach several workers (each of the source service's pods has its stream).
        # This engine judges no hop: it absorbs the workers' deltas and ticks.
        # (``baseline_shared``: its unexpected_edge never reads or writes learn mode's state file,
        # which is the coordinator's own.)
        self.windows = build_engine(config, policy, baseline_shared=True)
        self.windows.split(lateness(config.engine.tick_ms))
        self.sinks = build_sinks(config.sinks)
        self.workers = {i: _Worker(i) for i in range(self.n)}
        self.fanouts: dict[int, _Fanout] = {}
        self._cqids = itertools.count(1)
        self.last_log: dict[str, float] = {}
        # learn mode: the merged baseline, its window and its file (``_start_baseline``)
        self.baseline = Baseline()
        self.learn_started: float | None = None
        self.learn_over = False
        self.baseline_file: BaselineFile | None = None
        self._start_baseline()
        self.graph = mesh_graph(config, CompiledPolicy(policy))
        self.summed = SummedMetrics(metrics.REGISTRY)
        self.expo = CollectorRegistry(auto_describe=False)
        self.expo.register(self.summed)
        self.bound: dict[str, str] = {}
        self._stop = asyncio.Event()
        self._stopping = False
        self._violations_seen: dict[str, int] = {}
        self._store_seen: dict[tuple[str, str], int] = {}
        self._scrape_seq = 0
        self._scrape_waiting: set[int] = set()
        self._scrape_done = asyncio.Event()
        self._intake: dict[int, dict[str, str]] = {}  # each worker's last "can receive" report
        self.core = CoreTasks()
        self._ctx = multiprocessing.get_context("spawn")
        self._sockdir: str | None = None  # the workers' Unix socket's private directory (``run``)
        self.sock_path = ""
        self.clock: Callable[[], float] = time.time
        self.outlet: Callable[[list[Alert]], None] = self._deliver  # where alerts go: the sinks and the graph
        self._handlers: dict[type[Any], Callable[[int, Any], None]] = {
            Violations: self._on_violations,
            Query: self._on_query,
            Answer: self._on_answer,
            Shared: self._on_shared,
            AskSeed: self._on_ask_seed,
            MetricsReport: self._on_metrics,
            Intake: self._on_intake,
            Ready: self._on_ready,
        }

    # --- readiness and alerts ------------------------------------------------------------------
    def readiness(self) -> tuple[dict[str, str], dict[str, str]]:
        up = sum(1 for w in self.workers.values() if w.ready)
        gates = {"receivers": "ok" if up == self.n and not self._stopping else f"{up} of {self.n} workers listening"}
        own = self.core.dead()
        for gate in ("engine", "ingest_queue"):
            bad = [f"{k} {v}" for k, v in own.items()] if gate == "engine" else []
            for i, state in sorted(self._intake.items()):
                if self.workers[i].ready and state.get(gate, "ok") != "ok":
                    bad.append(f"worker {i}: {state[gate]}")
            gates[gate] = "; ".join(bad) or "ok"
        return readiness_of(gates, self.sinks)

    def dispatch(self, alerts: list[Alert]) -> None:
        self.outlet(alerts)

    def _deliver(self, alerts: list[Alert]) -> None:
        dispatch_to(self.sinks, alerts)
        self.graph.alerts(alerts, time.time())

    async def gather_metrics(self) -> None:
        """Before /metrics renders: every worker's counters as of now (each also sends them
        once a second; a worker that does not answer within 0.5 s shows its last ones)."""
        self._scrape_seq += 1
        self._scrape_waiting = {w.index for w in self.workers.values() if w.ready}
        if not self._scrape_waiting:
            return
        self._scrape_done.clear()
        msg = frame(Scrape(self._scrape_seq))
        for i in self._scrape_waiting:
            w = self.workers[i]
            if w.writer is not None:
                w.writer.write(msg)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._scrape_done.wait(), 0.5)

    def _learn_mode(self) -> bool:
        r = self.config.rules.unexpected_edge
        return bool(r.enabled and r.mode == "learn")

    # --- learn mode: the baseline --------------------------------------------------------------
    def _start_baseline(self) -> None:
        """At start and on reload: an empty baseline, or the one saved in the state file (then
        learning is over already)."""
        cfg = self.config
        limit = cfg.engine.store_max_items
        self.baseline = Baseline(limit, limit)
        self.learn_started = None
        self.learn_over = False
        self.baseline_file = None
        r = cfg.rules.unexpected_edge
        if not self._learn_mode() or r.state_file is None:
            return
        self.baseline_file = BaselineFile(r.state_file)
        saved = self.baseline_file.load(r.learn_secs)
        if saved is not None:
            self.baseline.add_edges((s, d, t) for (s, d), t in saved.edges.items())
            self.baseline.routes.update(saved.routes)
            self.learn_over = True

    def _seed(self) -> Seed:
        """What a worker's engine starts from: the baseline's edges and whether learning is over."""
        return Seed([(s, d, t) for (s, d), t in self.baseline.edges.items()], self.learn_over)

    def _learned(self, edges: list[Edge], routes: list[Route]) -> list[Edge]:
        """Edges and routes a worker learned, into the baseline; returns the edges new to it."""
        if self.learn_started is None and edges:
            self.learn_started = min(t for _, _, t in edges)
        new = self.baseline.add_edges(edges)
        fresh_routes = [r for r in routes if self.baseline.routes.add(*r)]
        if self.learn_over and (new or fresh_routes) and self.baseline_file is not None:
            self.baseline_file.request()  # learned just before the window ended: saved again
        return new

    def _baseline_tick(self, now: float) -> None:
        if not self._learn_mode():
            return
        started = self.learn_started
        learn_secs = self.config.rules.unexpected_edge.learn_secs
        if not self.learn_over and started is not None and now - started >= learn_secs:
            self.learn_over = True
            log.info(
                "Learning window over: %d edges learned by the workers; edges not among them alert from now on.",
                len(self.baseline),
            )
            self._broadcast(-1, LearningOver())
            if self.baseline_file is not None:
                self.baseline_file.request()
        f = self.baseline_file
        if f is not None and f.pending:
            f.flush(lambda: self.baseline, now)

    # --- messages from workers -------------------------------------------------------------------
    def _send(self, index: int, msg: ToWorker) -> None:
        w = self.workers.get(index)
        if w is not None and w.writer is not None and not w.writer.is_closing():
            w.writer.write(frame(msg))

    def _broadcast(self, sender: int, msg: ToWorker) -> None:
        data = frame(msg)
        for w in self.workers.values():
            if w.index != sender and w.writer is not None and not w.writer.is_closing():
                w.writer.write(data)

    def handle(self, index: int, msg: object) -> None:
        """One message from worker ``index``; one that fails is counted and skipped, never the link."""
        try:
            handler = self._handlers.get(type(msg))
            if handler is None:
                raise TypeError(f"no handler for {type(msg).__name__}")
            handler(index, msg)
        except Exception as exc:
            ERRORS.record("peers", exc, f"the coordinator handling {type(msg).__name__} from worker {index}")

    def _on_violations(self, index: int, msg: Violations) -> None:
        learn = self._learn_mode()
        now = self.clock()
        for wire in msg.items:
            v = violation_from_wire(wire)
            if (
                learn
                and v.rule == "unexpected_edge"
                and (not self.learn_over or (v.src.key, v.dst.key) in self.baseline.edges)
            ):
                continue  # learned by another worker (or still learning): not new after all
            self.agg.add(v, now)
        if msg.deltas:
            self.windows.absorb_stage2([delta_from_wire(d) for d in msg.deltas], [], now)
        self.dispatch(self.agg.drain())

    def _on_query(self, index: int, msg: Query) -> None:
        self._fan_out(index, msg.qid, msg.queries)

    def _on_answer(self, index: int, msg: Answer) -> None:
        fo = self.fanouts.get(msg.qid)
        if fo is not None:
            merge_answers(fo.answers, msg.answers)
            fo.waiting.discard(index)
            if not fo.waiting:
                self._answer(msg.qid, "answered")

    def _on_shared(self, index: int, msg: Shared) -> None:
        """A worker's facts: the graph takes the tally, the baseline what was learned, and what
        is new of the rest goes to the other workers."""
        facts = msg.facts
        news = Facts(spans_at=facts.spans_at)
        if facts.last_log:
            last = self.last_log
            news.last_log = {svc: t for svc, t in facts.last_log.items() if t > last.get(svc, float("-inf"))}
            last.update(news.last_log)
        if facts.learned or facts.routes:  # (source, destination, first seen), (destination, method, path)
            news.learned = self._learned(facts.learned, facts.routes)
        if facts.tally:  # the worker's per-edge counts of the last second
            self.graph.absorb(facts.tally, self.clock())
        if news:
            self._broadcast(index, Shared(news))

    def _on_ask_seed(self, index: int, msg: AskSeed) -> None:  # a worker that reloaded
        self._send(index, self._seed())

    def _on_metrics(self, index: int, msg: MetricsReport) -> None:
        self.summed.workers[index] = msg.snapshot
        if msg.seq is not None and msg.seq == self._scrape_seq:
            self._scrape_waiting.discard(index)
            if not self._scrape_waiting:
                self._scrape_done.set()

    def _on_intake(self, index: int, msg: Intake) -> None:
        self._intake[index] = dict(msg.state)

    def _on_ready(self, index: int, msg: Ready) -> None:
        w = self.workers[index]
        w.ready = True
        metrics.WORKERS_READY.set(sum(1 for x in self.workers.values() if x.ready))
        if w.restarts:
            log.info("Worker %d listening again.", index)

    def _fan_out(self, origin: int, qid: int, queries: list[PeerQuery]) -> None:
        peers = {w.index for w in self.workers.values() if w.index != origin and w.ready}
        answers = [NO_ANSWER] * len(queries)
        if not peers:
            self._send(origin, Answer(qid, answers))
            return
        cqid = next(self._cqids)
        self.fanouts[cqid] = _Fanout(origin, qid, answers, peers, time.monotonic() + QUERY_TIMEOUT)
        msg = frame(Query(cqid, queries))
        for i in peers:
            w = self.workers[i]
            if w.writer is not None:
                w.writer.write(msg)

    def _answer(self, cqid: int, result: str) -> None:
        fo = self.fanouts.pop(cqid)
        metrics.PEER_QUERIES.labels(result).inc(len(fo.answers))
        self._send(fo.origin, Answer(fo.qid, fo.answers))

    async def _serve_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await read_frame(reader)
        if not isinstance(hello, Hello) or hello.index not in self.workers:
            writer.close()
            return
        w = self.workers[hello.index]
        w.writer = writer
        w.gone.clear()
        writer.write(frame(self._seed()))  # before any broadcast: the worker starts from it
        try:
            while True:
                msg = await read_frame(reader)
                if msg is None:
                    break
                self.handle(w.index, msg)
        finally:
            self._gone(w)
            writer.close()

    def _gone(self, w: _Worker) -> None:
        """A worker's link closed (it stopped or died): nobody waits on it any more."""
        w.ready = False
        w.writer = None
        w.gone.set()
        self._intake.pop(w.index, None)
        self._scrape_waiting.discard(w.index)
        if not self._scrape_waiting:
            self._scrape_done.set()
        metrics.WORKERS_READY.set(sum(1 for x in self.workers.values() if x.ready))
        self.summed.retire(w.index)
        for cqid, fo in list(self.fanouts.items()):
            if fo.origin == w.index:
                del self.fanouts[cqid]
            else:
                fo.waiting.discard(w.index)
                if not fo.waiting:
                    self._answer(cqid, "answered")

    # --- worker processes ----------------------------------------------------------------------
    def _spawn(self, w: _Worker) -> None:
        p = self._ctx.Process(
            target=worker_entry,
            args=(self.config, self.policy, self.config_path, w.index, self.sock_path),
            name=f"meshaudit-worker-{w.index}",
            daemon=False,
        )
        p.start()
        w.process = p
        w.started_at = time.monotonic()

    async def _supervise(self) -> None:
        """Start again a worker that exited while the daemon runs (with a growing pause)."""
        while True:
            await asyncio.sleep(0.5)
            for w in self.workers.values():
                p = w.process
                if self._stopping or p is None or p.is_alive():
                    continue
                code = p.exitcode
                p.close()
                w.process = None
                if time.monotonic() - w.started_at > 60:  # it ran a while: start the backoff afresh
                    w.restarts = 0
                pause = RESTART_BACKOFF[min(w.restarts, len(RESTART_BACKOFF) - 1)]
                log.error("Worker %d exited (code %s); starting it again in %.1f s.", w.index, code, pause)
                metrics.WORKER_RESTARTS.inc()
                w.restarts += 1
                await asyncio.sleep(pause)
                if not self._stopping:
                    try:
                        self._spawn(w)
                    except Exception as exc:  # tried again on the next pass (w.process is None)
                        ERRORS.record("supervise", exc, f"starting worker {w.index}")

    async def _tick_loop(self) -> None:
        interval = self.config.engine.tick_ms / 1000
        last_stats = 0.0
        while True:
            await asyncio.sleep(interval)
            now = self.clock()
            self.tick(now)
            if now - last_stats >= 1.0:
                last_stats = now
                try:
                    publish_violations(self.agg.violations, self._violations_seen)
                    publish_stores([self.agg.states, self.agg.counted], self._store_seen)
                except Exception as exc:
                    ERRORS.record("stats", exc)

    def tick(self, now: float) -> None:
        """Every ``engine.tick_ms``: alert windows that closed, the learning window, peer
        questions that timed out."""
        try:
            self.windows.tick(now)  # the summed per-edge windows: judged, and closed
            for v in self.windows.take_forwarded():
                self.agg.add(v, now)
            late = self.windows.take_stage2_late()
            if late:
                metrics.WINDOW_DELTAS_LATE.inc(late)
        except Exception as exc:  # judged again on the next tick
            ERRORS.record("tick", exc, "the per-edge windows")
        try:
            self.agg.counted.expire(now)
            self.agg.states.expire(now)
        except Exception as exc:  # windows are checked again on the next tick
            ERRORS.record("tick", exc)
        self.dispatch(self.agg.drain())
        try:
            self._baseline_tick(now)
        except Exception as exc:
            ERRORS.record("tick", exc, "the learned baseline")
        mono = time.monotonic()
        for cqid in [c for c, fo in self.fanouts.items() if fo.deadline <= mono]:
            try:
                self._answer(cqid, "timeout")
            except Exception as exc:
                ERRORS.record("peers", exc, "answering a peer query that timed out")

    # --- reload ----------------------------------------------------------------------------------
    def reload(self) -> None:
        """Check the file here first; the workers reload it only when it is valid."""
        self.files.mark()
        loaded = load_for_reload(self.config_path, self.dispatch, self.overrides)
        if loaded is None:
            return
        # compared with the addresses as configured (port 0 stays 0), kept as bound
        config, waiting = for_reload(self.config.model_copy(update={"listen": self._listen_as_started}), loaded[0])
        config = config.model_copy(update={"listen": self.config.listen})
        if waiting:
            log.warning(
                "Changed keys that apply only on restart (the running values stay until then): %s", ", ".join(waiting)
            )
        self.agg.reconfigure(config.engine)  # open windows and the learned baseline are kept
        self.windows.reconfigure(config, loaded[1])
        self.config = config
        self.policy = loaded[1]
        self.graph.policy = CompiledPolicy(self.policy)
        logging.getLogger().setLevel(config.log_level.upper())
        for w in self.workers.values():
            if w.process is not None and w.process.pid is not None:
                os.kill(w.process.pid, signal.SIGHUP)
        metrics.CONFIG_RELOADS.labels("ok").inc()
        log.info("Configuration reloaded from %s by the coordinator and %d workers.", self.config_path, self.n)

    # --- lifecycle ----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stopping = True  # from now on a worker that exits is not started again
        self._stop.set()

    async def run(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        if not await start_sinks(self.sinks):
            return 1
        reserved: list[socket.socket] = []
        runners: list[web.AppRunner] = []
        server: asyncio.base_events.Server | None = None
        self._sockdir = tempfile.mkdtemp(prefix="meshaudit-")  # mode 0700
        self.sock_path = os.path.join(self._sockdir, "coordinator.sock")
        try:
            for name, addr in (("grpc", cfg.listen.grpc), ("http", cfg.listen.http)):
                sock, bound = reserve_port(addr)
                reserved.append(sock)
                self.bound[name] = bound
            server = await asyncio.start_unix_server(self._serve_worker, self.sock_path)
        except OSError as exc:
            log.error("Cannot listen: %s", exc)
            await self._close(server, runners, reserved, time.monotonic() + SHUTDOWN_SECS)
            return 1
        # The workers listen on the reserved ports; the listen overrides reach them here.
        listen = cfg.listen.model_copy(update={"grpc": self.bound["grpc"], "http": self.bound["http"]})
        self.config = cfg.model_copy(update={"listen": listen})
        for w in self.workers.values():
            self._spawn(w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        # Up when every worker listens: like the single process, /metrics and /healthz answer
        # only once the receivers do. A worker that exits before that fails the start.
        failed = await self._wait_workers_ready(time.monotonic() + 60)
        try:
            if failed:
                raise OSError(failed)
            app = health.build_app(self.readiness, self.expo, self.gather_metrics, self.core.dead)
            page.add_routes(app, self.graph, lambda: self.config.graph.top_edges)
            self.bound["metrics"] = await serve_http(app, cfg.listen.metrics, runners)
        except OSError as exc:
            log.error("Cannot start: %s", exc)
            await self._close(server, runners, reserved, time.monotonic() + SHUTDOWN_SECS)
            return 1
        warn_plaintext({"gRPC": cfg.listen.grpc, "OTLP/HTTP": cfg.listen.http}, cfg.receivers)  # once, not per worker
        self.core.start(self._tick_loop(), "coordinator-tick")
        self.core.start(self._supervise(), "supervise")
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        metrics.init_series([*SUMMARIES, "config_invalid"])  # the alerts are counted here
        if self.config_path and self.config.reload_watch_ms:
            self.core.start(watch_guarded(self.files, self.reload, self.config.reload_watch_ms / 1000), "watch")
        tune_gc()
        if not self._stop.is_set():
            print_ready(self.bound, cfg.sinks.jsonl.path, self.n)
        await self._stop.wait()
        log.info("Stopping: the workers first (they drain their engines), then the sinks.")
        await self._close(server, runners, reserved, time.monotonic() + SHUTDOWN_SECS)
        return 0

    async def _wait_workers_ready(self, deadline: float) -> str | None:
        """None when every worker listens; else why the start failed."""
        while not self._stop.is_set():
            if all(w.ready for w in self.workers.values()):
                return None
            for w in self.workers.values():
                if w.process is not None and not w.process.is_alive():
                    return f"worker {w.index} exited with code {w.process.exitcode} while starting (see its log above)"
            if time.monotonic() > deadline:
                return "the workers did not start listening within 60 s"
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.05)
        return None

    async def _close(
        self,
        server: asyncio.base_events.Server | None,
        runners: list[web.AppRunner],
        reserved: list[socket.socket],
        deadline: float,
    ) -> None:
        self._stopping = True
        procs = [w.process for w in self.workers.values() if w.process is not None]
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        # Each worker drains its engine and sends its last violations, then closes its link.
        linked = [w.gone.wait() for w in self.workers.values() if w.writer is not None]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*linked), max(0.1, deadline - 2 - time.monotonic()))
        loop = asyncio.get_running_loop()
        for p in procs:
            await loop.run_in_executor(None, p.join, 2.0)
            if p.is_alive():
                log.error("Worker %s did not stop in time; killing it.", p.name)
                p.kill()
                p.join(1)
        await self.core.stop()
        if server is not None:
            server.close()
        for s in reserved:
            s.close()
        if self._sockdir is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.sock_path)
            with contextlib.suppress(OSError):
                os.rmdir(self._sockdir)
        await asyncio.gather(*(s.shutdown(deadline) for s in self.sinks))
        for r in runners:
            await r.cleanup()
