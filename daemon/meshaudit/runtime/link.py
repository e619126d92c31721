"""A worker of ``workers: N``: its link to the coordinator, and the worker process's main."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from meshaudit import metrics
from meshaudit.config import Config, Policy
from meshaudit.engine.api import Deferred
from meshaudit.engine.core import Engine
from meshaudit.guard import ERRORS
from meshaudit.model import Alert
from meshaudit.pipeline import Pipeline
from meshaudit.runtime.common import SHUTDOWN_SECS, dispatch_to, lateness, setup_logging, tune_gc
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
    ToCoordinator,
    Violations,
    delta_to_wire,
    frame,
    read_frame,
    violation_to_wire,
)
from meshaudit.runtime.summed import snapshot

log = logging.getLogger("meshaudit.workers")  # one name for both sides: their log lines stay as they were


# --- the worker side ----------------------------------------------------------------------------
class WorkerLink:
    """A worker's connection to its coordinator: the worker's pipeline's
    :class:`~meshaudit.pipeline.Peers` (the other workers, through the coordinator)."""

    several = True
    baseline_shared = True

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        self.pipeline: Pipeline | None = None
        self.clock: Callable[[], float] = time.time
        self._qids = itertools.count(1)
        self._waiting: dict[int, list[Deferred]] = {}
        self._reader_task: asyncio.Task[None] | None = None  # set once the worker listens
        self.seed: Seed | None = None  # the coordinator's answer to hello: the baseline to start from
        self._handlers: dict[type[Any], Callable[[Any], None]] = {
            Query: self._on_query,
            Answer: self._on_answer,
            Scrape: self._on_scrape,
            Shared: self._on_shared,
            LearningOver: self._on_learning_over,
            Seed: self._on_seed,
        }

    def send(self, msg: ToCoordinator) -> None:
        if not self.writer.is_closing():
            self.writer.write(frame(msg))

    # --- Peers ---------------------------------------------------------------------------------
    def attach(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.engine_built(pipeline.engine)

    def engine_built(self, engine: Engine) -> None:
        """A new engine (at start, or after a reload): its learn-mode baseline comes from the
        coordinator. At start the answer to hello is here already; after a reload the worker
        asks, and until the answer comes the rule alerts as if learning were over (the
        coordinator drops what its own baseline knows, and everything while it still learns)."""
        # Per-edge windows are summed and judged by the coordinator (stage 2 split, as between
        # evaluators): a window here counts only this worker's connections.
        engine.split(lateness(engine.config.engine.tick_ms))
        seed, self.seed = self.seed, None
        if not engine.learns():
            return
        if seed is not None:
            engine.seed(seed.edges, seed.over)
        else:
            engine.seed((), True)
            self.send(AskSeed())

    def share(self, engine: Engine) -> None:
        """After each batch or tick: violations to the aggregator and the per-edge window counts
        of the last tick to the coordinator, deferred decisions to the peers."""
        deltas, violations = engine.take_stage2()
        if deltas or violations:
            self.send(Violations([violation_to_wire(v) for v in violations], [delta_to_wire(d) for d in deltas]))
        deferred = engine.take_deferred()
        if deferred:
            qid = next(self._qids)
            self._waiting[qid] = deferred
            self.send(Query(qid, [d.query for d in deferred]))

    def periodic(self, engine: Engine) -> None:
        """Once a second: the shared facts, and this worker's metrics."""
        facts = engine.facts()
        if facts:
            self.send(Shared(facts))
        self.send(MetricsReport(snapshot(metrics.REGISTRY, worker=True)))
        if self.pipeline is not None and self._reader_task is not None:
            self.send(Intake(self.pipeline.intake_state()))

    def core_task_ended(self, name: str) -> None:
        """Exit non-zero: the coordinator starts the worker again."""
        if self.pipeline is not None:
            self.pipeline.exit_code = 1
            self.pipeline.request_stop()

    # --- the coordinator's messages ---------------------------------------------------------------
    def ready(self, bound: dict[str, str]) -> None:
        """The worker listens: tell the coordinator, and from now on hear it."""
        self.send(Ready(bound))
        self._reader_task = asyncio.create_task(self._read(), name="coordinator-link")

    async def _read(self) -> None:
        while True:
            msg = await read_frame(self.reader)
            if msg is None:
                break
            self.handle(msg)
        if self.pipeline is not None and not self.writer.is_closing():
            log.error("Worker %d lost its coordinator; stopping.", self.index)
            self.pipeline.request_stop()

    def handle(self, msg: object) -> None:
        """One message from the coordinator; one that fails is counted and skipped, never the link."""
        try:
            handler = self._handlers.get(type(msg))
            if handler is None:
                raise TypeError(f"no handler for {type(msg).__name__}")
            handler(msg)
        except Exception as exc:
            ERRORS.record("peers", exc, f"worker {self.index} handling {type(msg).__name__} from the coordinator")

    @property
    def _engine(self) -> Engine:
        assert self.pipeline is not None  # messages are read once the worker listens
        return self.pipeline.engine

    def _on_query(self, msg: Query) -> None:  # another worker asks
        self.send(Answer(msg.qid, self._engine.answer(msg.queries)))

    def _on_answer(self, msg: Answer) -> None:  # the merged answer to one of ours
        deferred = self._waiting.pop(msg.qid, None)
        if deferred is not None and self.pipeline is not None:
            engine = self._engine
            self.pipeline.dispatch(engine.finish(deferred, msg.answers, self.clock()))
            self.share(engine)

    def _on_scrape(self, msg: Scrape) -> None:  # /metrics is being read: this worker's counters, now
        self.send(MetricsReport(snapshot(metrics.REGISTRY, worker=True), msg.seq))

    def _on_shared(self, msg: Shared) -> None:  # facts other workers gave out
        self._engine.absorb(msg.facts, self.clock())

    def _on_learning_over(self, msg: LearningOver) -> None:  # the coordinator's learning window ended
        self._engine.seed((), True)

    def _on_seed(self, msg: Seed) -> None:  # the answer to AskSeed after a reload
        self._engine.seed(msg.edges, msg.over)

    async def close(self, deadline: float) -> None:
        if self.pipeline is not None and self._reader_task is not None:
            self.periodic(self.pipeline.engine)  # final metrics
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            await asyncio.wait_for(self.writer.drain(), max(0.1, deadline - time.monotonic()))
        self.writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()


def count_only(alerts: list[Alert]) -> None:
    """A worker's outlet: its engine forwards violations to the coordinator, which owns the
    sinks; what the worker itself raises (an invalid reload) is counted here."""
    dispatch_to([], alerts)


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
    link.send(Hello(index, os.getpid()))
    # The coordinator answers with the learn-mode baseline: the engine starts from it, before
    # the worker listens, so no hop is ever judged without it.
    seed = await read_frame(reader)
    if not isinstance(seed, Seed):
        log.error("Worker %d: no answer from the coordinator; stopping.", index)
        return 1
    link.seed = seed
    return await run_worker(Pipeline(config, policy, config_path, link, count_only), link)


async def run_worker(p: Pipeline, link: WorkerLink) -> int:
    """The worker's receivers and engine on the ports its coordinator reserved (SO_REUSEPORT);
    the coordinator serves /metrics and owns the sinks."""
    loop = asyncio.get_running_loop()
    p.start()
    try:
        await p.listen(reuse_port=True)
    except OSError as exc:
        log.error("Cannot listen: %s", exc)
        await _stop(p, link)
        return 1
    await p.listening()
    tune_gc()
    loop.add_signal_handler(signal.SIGTERM, p.request_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(p))
    link.ready(p.bound)
    await p.stopped()
    log.info("Stopping: receivers first, then the engine, then the sinks.")
    await _stop(p, link)
    return p.exit_code


async def _stop(p: Pipeline, link: WorkerLink) -> None:
    deadline = time.monotonic() + SHUTDOWN_SECS
    await p.stop()
    await link.close(deadline)  # what the last batches found goes to the coordinator


def _reload(p: Pipeline) -> None:
    """The coordinator checked the file and signals each worker (it counts the reload, once)."""
    waiting = p.reload()
    if waiting is None:
        return
    if waiting:  # the coordinator says it once
        log.debug(
            "Changed keys that apply only on restart (the running values stay until then): %s", ", ".join(waiting)
        )
    log.info("Configuration reloaded from %s; windows, waits and the learned baseline are kept.", p.config_path)
