"""``workers: N``: several processes share the listen ports (SO_REUSEPORT), so the daemon uses
more than one core.

The process started by ``meshaudit run`` becomes the **coordinator**. It reserves the ports,
starts N worker processes and owns everything that must be single: the sinks, the one
aggregator (alert windows, suppression, "one request counts once"), ``/metrics`` and
``/readyz``. Each **worker** is the daemon's receivers and rule engine on the connections the
kernel hands it (:class:`meshaudit.app.Daemon` with a :class:`WorkerLink`).

The two sidecars of one request, or a span and its access log, usually reach different workers.
The common path stays local; only decisions that need evidence another worker may hold cross
a process boundary, in batches:

- a wait that ends without local evidence (a span's access log after ``grace_ms``, a plaintext
  hop's client after ``attribution_wait_ms``) is *deferred*: the coordinator asks every other
  worker at once and returns the merged answer, then the worker decides;
- shared facts, sent at most once a second: spans are flowing (so every worker keeps indexing
  access logs), each sidecar's last access log (silent sidecars, mesh membership), edges (and
  routes) learned in ``learn`` mode;
- violations go to the coordinator's aggregator; each worker's metrics are summed on
  ``/metrics``.

A failure handling one message, tick or alert is counted (``meshaudit_engine_errors_total{stage}``),
logged once per kind and skipped (``meshaudit.guard``). A worker whose engine or tick task ends
anyway exits non-zero and is started again; a coordinator task that ends fails ``/healthz``.
Each worker reports whether it can receive (engine tasks, ingest queue) once a second, and the
coordinator's ``/readyz`` combines them.

In ``learn`` mode the coordinator owns the baseline of ``unexpected_edge``: it reads the state file
(``rules.unexpected_edge.state_file``) at start, answers each worker's hello with the baseline and
whether learning is over (the worker builds its engine from it before it listens), merges what the
workers learn, ends the learning window (``learn_secs`` after the first edge a worker learned),
tells the workers, and writes the file. A worker that reloads its configuration asks again.

Frames on the coordinator's Unix socket (a private 0700 directory) are 4-byte big-endian
lengths and pickles: both ends are this program, started by this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from meshaudit import health, metrics
from meshaudit.app import (
    SHUTDOWN_SECS,
    Daemon,
    dispatch_to,
    load_for_reload,
    mesh_graph,
    print_ready,
    publish_stores,
    publish_violations,
    readiness_of,
    serve_http,
    setup_logging,
    start_sinks,
    tune_gc,
    watch_guarded,
    watched_files,
)
from meshaudit.baseline import Baseline, BaselineFile
from meshaudit.config import Config, Policy, for_reload
from meshaudit.engine.aggregate import Aggregator
from meshaudit.engine.api import NO_ANSWER, PeerAnswer, Violation
from meshaudit.engine.core import Engine
from meshaudit.engine.policy import CompiledPolicy
from meshaudit.engine.rules import SUMMARIES
from meshaudit.engine.rules.unexpected_edge import UnexpectedEdge
from meshaudit.guard import ERRORS, CoreTasks
from meshaudit.model import NOBODY, UNKNOWN, Alert, Hop, Identity
from meshaudit.receivers.auth import warn_plaintext
from meshaudit.receivers.sockets import ensure_free
from meshaudit.sinks import build_sinks
from meshaudit.views import page
from meshaudit.watch import FileWatch

log = logging.getLogger("meshaudit.workers")

QUERY_TIMEOUT = 2.0  # a peer that has not answered by then is taken as knowing nothing
SHARE_EVERY = 1.0  # seconds between shared-fact and metrics messages from a worker
RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)

# --- frames ------------------------------------------------------------------------------------
Message = tuple[Any, ...]


def frame(msg: Message) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return len(body).to_bytes(4, "big") + body


async def read_frame(reader: asyncio.StreamReader) -> Message | None:
    try:
        head = await reader.readexactly(4)
        body = await reader.readexactly(int.from_bytes(head, "big"))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    msg: Message = pickle.loads(body)
    return msg


# A violation crosses as a tuple: the hops stay behind, their example fields travel.
WireViolation = tuple[
    str,
    str,
    Identity,
    Identity,
    str,
    float,
    "str | None",
    "tuple[Any, ...] | None",
    "bool | None",
    "tuple[tuple[Any, ...], ...]",
]


def _example_to_wire(h: Hop) -> tuple[Any, ...]:
    return (h.trace_id, h.request_id, h.method, h.path, h.observer)


def _example_from_wire(ex: tuple[Any, ...], src: Identity, dst: Identity, when: float) -> Hop:
    trace_id, request_id, method, path, observer = ex
    return Hop(
        0, observer, NOBODY, UNKNOWN, src, dst, when, method=method, path=path, trace_id=trace_id,
        request_id=request_id,
    )  # fmt: skip


def violation_to_wire(v: Violation) -> WireViolation:
    h = v.hop
    ex = None if h is None else _example_to_wire(h)
    more = tuple(_example_to_wire(m) for m in v.more)
    return (v.rule, v.severity, v.src, v.dst, v.detail, v.when, v.summary, ex, v.blocked, more)


def violation_from_wire(w: WireViolation) -> Violation:
    rule, severity, src, dst, detail, when, summary, ex, blocked, more = w
    hop = None if ex is None else _example_from_wire(ex, src, dst, when)
    extra = [_example_from_wire(m, src, dst, when) for m in more]
    return Violation(rule, severity, src, dst, hop, detail, when, summary, blocked, extra)


def merge_answers(into: list[PeerAnswer], more: list[PeerAnswer]) -> None:
    """Covered if any worker covers it; the first worker that knows the source names it."""
    for i, (a, b) in enumerate(zip(into, more, strict=True)):
        if (b.covered and not a.covered) or (b.source is not None and a.source is None):
            into[i] = PeerAnswer(a.covered or b.covered, a.source or b.source)


def learner(engine: Engine) -> UnexpectedEdge | None:
    """The engine's unexpected_edge rule when it runs in learn mode."""
    for r in engine.rules:
        if isinstance(r, UnexpectedEdge) and r.learn:
            return r
    return None


# --- metrics: each worker's registry, summed ----------------------------------------------------
Snapshot = list[tuple[str, str, str, list[tuple[str, tuple[tuple[str, str], ...], float]]]]


NOT_SUMMED = frozenset(("process_start_time_seconds", "process_max_fds"))  # the coordinator's own


def snapshot(registry: CollectorRegistry, worker: bool = False) -> Snapshot:
    out: Snapshot = []
    for m in registry.collect():
        if worker and m.name in NOT_SUMMED:
            continue
        samples = [
            (s.name, tuple(sorted(s.labels.items())), s.value) for s in m.samples if not s.name.endswith("_created")
        ]
        out.append((m.name, m.type, m.documentation, samples))
    return out


class SummedMetrics(Collector):
    """The coordinator's /metrics: its own registry plus every worker's latest snapshot, and
    the counters of workers that exited (so a restart never makes a counter go down)."""

    def __init__(self, own: CollectorRegistry) -> None:
        self.own = own
        self.workers: dict[int, Snapshot] = {}
        self.retired: Snapshot = []

    def retire(self, index: int) -> None:
        snap = self.workers.pop(index, None)
        if snap:
            self.retired.extend(f for f in snap if f[1] in ("counter", "histogram"))

    def collect(self) -> Iterator[Metric]:
        fams: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
        for name, typ, doc, samples in itertools.chain(snapshot(self.own), self.retired, *self.workers.values()):
            fam = fams.setdefault(name, (typ, doc, {}))
            acc = fam[2]
            for sname, labels, value in samples:
                k = (sname, labels)
                acc[k] = acc.get(k, 0.0) + value
        for name, (typ, doc, acc) in fams.items():
            m = Metric(name, doc, typ)
            for (sname, labels), value in acc.items():
                m.add_sample(sname, dict(labels), value)
            yield m


# --- the worker side ----------------------------------------------------------------------------
class WorkerLink:
    """A worker's connection to its coordinator, called by the worker's :class:`Daemon`."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        self.daemon: Daemon | None = None
        self._qids = itertools.count(1)
        self._waiting: dict[int, list[Any]] = {}
        self._spans_sent = float("-inf")
        self._last_log_sent = float("-inf")
        self._reader_task: asyncio.Task[None] | None = None
        self.seed: Message | None = None  # the coordinator's answer to hello: the baseline to start from

    def send(self, msg: Message) -> None:
        if not self.writer.is_closing():
            self.writer.write(frame(msg))

    def engine_built(self, engine: Engine) -> None:
        """A new engine (at start, or after a reload): its learn-mode baseline comes from the
        coordinator. At start the answer to hello is here already; after a reload the worker
        asks, and until the answer comes the rule alerts as if learning were over (the
        coordinator drops what its own baseline knows, and everything while it still learns)."""
        rule = learner(engine)
        seed, self.seed = self.seed, None
        if rule is None:
            return
        if seed is not None:
            rule.seed(seed[1], seed[2])
        else:
            rule.learning_over = True
            self.send(("baseline?",))

    def ready(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.send(("ready", daemon.bound))
        self._reader_task = asyncio.create_task(self._read(), name="coordinator-link")

    def after_engine(self, engine: Engine) -> None:
        """After each batch or tick: violations to the aggregator, deferred decisions to the peers."""
        if engine.forwarded:
            self.send(("violations", [violation_to_wire(v) for v in engine.forwarded]))
            engine.forwarded.clear()
        deferred = engine.take_deferred()
        if deferred:
            qid = next(self._qids)
            self._waiting[qid] = deferred
            self.send(("query", qid, [d.query for d in deferred]))

    def periodic(self, engine: Engine) -> None:
        """Once a second: the shared facts, and this worker's metrics."""
        corr = engine.corr
        if corr.spans_at > self._spans_sent:
            self._spans_sent = corr.spans_at
            self.send(("spans", corr.spans_at))
        since = self._last_log_sent
        fresh = {svc: t for svc, t in corr.sidecar_last_log.items() if t > since}
        if fresh:
            self._last_log_sent = max(fresh.values())
            self.send(("last_log", fresh))
        rule = learner(engine)
        if rule is not None and (rule.learned_new or rule.routes_new):
            self.send(("learned", rule.learned_new, rule.routes_new))
            rule.learned_new, rule.routes_new = [], []
        tally = engine.ctx.tally.take()
        if tally:
            self.send(("graph", tally))
        self.send(("metrics", snapshot(metrics.REGISTRY, worker=True)))
        if self.daemon is not None:
            self.send(("intake", self.daemon.intake_state()))

    async def _read(self) -> None:
        while True:
            msg = await read_frame(self.reader)
            if msg is None:
                break
            try:
                self._handle(msg)
            except Exception as exc:  # one bad message must not end the link
                ERRORS.record("peers", exc, f"worker {self.index} handling {msg[0]!r} from the coordinator")
        if self.daemon is not None and not self.writer.is_closing():
            log.error("Worker %d lost its coordinator; stopping.", self.index)
            self.daemon.request_stop()

    def _handle(self, msg: Message) -> None:
        assert self.daemon is not None
        engine = self.daemon.engine
        tag = msg[0]
        if tag == "query":  # another worker asks
            self.send(("answer", msg[1], engine.answer(msg[2])))
        elif tag == "answer":  # the merged answer to one of ours
            deferred = self._waiting.pop(msg[1], None)
            if deferred is not None:
                self.daemon.dispatch(engine.finish(deferred, msg[2], time.time()))
                self.after_engine(engine)
        elif tag == "scrape":  # /metrics is being read: this worker's counters, now
            self.send(("metrics", snapshot(metrics.REGISTRY, worker=True), msg[1]))
        elif tag == "spans":
            engine.corr.saw_spans(msg[1], remote=True)
        elif tag == "last_log":
            store = engine.corr.sidecar_last_log
            now = time.time()
            for svc, t in msg[1].items():
                mine = store.get(svc)
                if mine is None or mine < t:
                    store.put(svc, t, now)
        elif tag == "learned":  # (source, destination, first seen) another worker learned
            rule = learner(engine)
            if rule is not None:
                rule.add_learned(msg[1])
        elif tag == "learn_over":  # the coordinator's learning window ended
            rule = learner(engine)
            if rule is not None:
                rule.learning_over = True
        elif tag == "baseline":  # the answer to "baseline?" after a reload
            rule = learner(engine)
            if rule is not None:
                rule.seed(msg[1], msg[2])

    async def close(self, deadline: float) -> None:
        if self.daemon is not None:
            self.periodic(self.daemon.engine)  # final metrics
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            await asyncio.wait_for(self.writer.drain(), max(0.1, deadline - time.monotonic()))
        self.writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()


def worker_entry(config: Config, policy: Policy, config_path: str | None, index: int, sock_path: str) -> None:
    """A worker process's main (multiprocessing, spawn)."""
    setup_logging(config.log_level)
    import uvloop

    # Ctrl-C reaches the whole process group: the coordinator decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(uvloop.run(_worker_main(config, policy, config_path, index, sock_path)))


async def _worker_main(config: Config, policy: Policy, config_path: str | None, index: int, sock_path: str) -> int:
    reader, writer = await asyncio.open_unix_connection(sock_path)
    link = WorkerLink(index, reader, writer)
    link.send(("hello", index, os.getpid()))
    # The coordinator answers with the learn-mode baseline: the engine starts from it, before
    # the worker listens, so no hop is ever judged without it.
    link.seed = await read_frame(reader)
    if link.seed is None or link.seed[0] != "baseline":
        log.error("Worker %d: no answer from the coordinator; stopping.", index)
        return 1
    return await Daemon(config, policy, config_path, link=link).run(ready_message=False)


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
        self._sockdir = tempfile.mkdtemp(prefix="meshaudit-")  # mode 0700
        self.sock_path = os.path.join(self._sockdir, "coordinator.sock")

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
        msg = frame(("scrape", self._scrape_seq))
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

    def _seed(self) -> Message:
        """What a worker's engine starts from: the baseline's edges and whether learning is over."""
        return ("baseline", [(s, d, t) for (s, d), t in self.baseline.edges.items()], self.learn_over)

    def _learned(self, index: int, edges: list[tuple[str, str, float]], routes: list[tuple[str, str, str]]) -> None:
        if self.learn_started is None and edges:
            self.learn_started = min(t for _, _, t in edges)
        new = self.baseline.add_edges(edges)
        fresh_routes = [r for r in routes if self.baseline.routes.add(*r)]
        if new:
            self._broadcast(index, ("learned", new))
        if self.learn_over and (new or fresh_routes) and self.baseline_file is not None:
            self.baseline_file.request()  # learned just before the window ended: saved again

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
            self._broadcast(-1, ("learn_over",))
            if self.baseline_file is not None:
                self.baseline_file.request()
        f = self.baseline_file
        if f is not None and f.pending:
            f.flush(lambda: self.baseline, now)

    # --- messages from workers -------------------------------------------------------------------
    def _send(self, index: int, msg: Message) -> None:
        w = self.workers.get(index)
        if w is not None and w.writer is not None and not w.writer.is_closing():
            w.writer.write(frame(msg))

    def _broadcast(self, sender: int, msg: Message) -> None:
        data = frame(msg)
        for w in self.workers.values():
            if w.index != sender and w.writer is not None and not w.writer.is_closing():
                w.writer.write(data)

    def handle(self, index: int, msg: Message) -> None:
        tag = msg[0]
        now = time.time()
        if tag == "violations":
            learn = self._learn_mode()
            for wire in msg[1]:
                v = violation_from_wire(wire)
                if (
                    learn
                    and v.rule == "unexpected_edge"
                    and (not self.learn_over or (v.src.key, v.dst.key) in self.baseline.edges)
                ):
                    continue  # learned by another worker (or still learning): not new after all
                self.agg.add(v, now)
            self.dispatch(self.agg.drain())
        elif tag == "query":
            self._fan_out(index, msg[1], msg[2], now)
        elif tag == "answer":
            fo = self.fanouts.get(msg[1])
            if fo is not None:
                merge_answers(fo.answers, msg[2])
                fo.waiting.discard(index)
                if not fo.waiting:
                    self._answer(msg[1], "answered")
        elif tag == "spans":
            self._broadcast(index, msg)
        elif tag == "last_log":
            fresh = {svc: t for svc, t in msg[1].items() if t > self.last_log.get(svc, float("-inf"))}
            if fresh:
                self.last_log.update(fresh)
                self._broadcast(index, ("last_log", fresh))
        elif tag == "learned":  # (source, destination, first seen), (destination, method, path)
            self._learned(index, msg[1], msg[2])
        elif tag == "baseline?":  # a worker that reloaded its configuration
            self._send(index, self._seed())
        elif tag == "metrics":
            self.summed.workers[index] = msg[1]
            if len(msg) > 2 and msg[2] == self._scrape_seq:
                self._scrape_waiting.discard(index)
                if not self._scrape_waiting:
                    self._scrape_done.set()
        elif tag == "graph":  # the worker's per-edge counts of the last second
            self.graph.absorb(msg[1], now)
        elif tag == "intake":
            self._intake[index] = dict(msg[1])
        elif tag == "ready":
            w = self.workers[index]
            w.ready = True
            metrics.WORKERS_READY.set(sum(1 for x in self.workers.values() if x.ready))
            if w.restarts:
                log.info("Worker %d listening again.", index)

    def _fan_out(self, origin: int, qid: int, queries: list[Any], now: float) -> None:
        peers = {w.index for w in self.workers.values() if w.index != origin and w.ready}
        answers = [NO_ANSWER] * len(queries)
        if not peers:
            self._send(origin, ("answer", qid, answers))
            return
        cqid = next(self._cqids)
        self.fanouts[cqid] = _Fanout(origin, qid, answers, peers, time.monotonic() + QUERY_TIMEOUT)
        msg = frame(("query", cqid, queries))
        for i in peers:
            w = self.workers[i]
            if w.writer is not None:
                w.writer.write(msg)

    def _answer(self, cqid: int, result: str) -> None:
        fo = self.fanouts.pop(cqid)
        metrics.PEER_QUERIES.labels(result).inc(len(fo.answers))
        self._send(fo.origin, ("answer", fo.qid, fo.answers))

    async def _serve_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await read_frame(reader)
        if hello is None or hello[0] != "hello" or hello[1] not in self.workers:
            writer.close()
            return
        w = self.workers[hello[1]]
        w.writer = writer
        w.gone.clear()
        writer.write(frame(self._seed()))  # before any broadcast: the worker starts from it
        try:
            while True:
                msg = await read_frame(reader)
                if msg is None:
                    break
                try:
                    self.handle(w.index, msg)
                except Exception as exc:
                    ERRORS.record("peers", exc, f"the coordinator handling {msg[0]!r} from worker {w.index}")
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

    async def _tick(self) -> None:
        interval = self.config.engine.tick_ms / 1000
        last_stats = 0.0
        while True:
            await asyncio.sleep(interval)
            now = time.time()
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
            if now - last_stats >= 1.0:
                last_stats = now
                try:
                    publish_violations(self.agg.violations, self._violations_seen)
                    publish_stores([self.agg.states, self.agg.counted], self._store_seen)
                except Exception as exc:
                    ERRORS.record("stats", exc)

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
        self.core.start(self._tick(), "coordinator-tick")
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
        with contextlib.suppress(OSError):
            os.unlink(self.sock_path)
            os.rmdir(self._sockdir)
        await asyncio.gather(*(s.shutdown(deadline) for s in self.sinks))
        for r in runners:
            await r.cleanup()
