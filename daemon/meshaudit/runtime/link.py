"""A worker of ``workers: N``: its link to the coordinator, and the worker process's main."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import time
from typing import Any

from meshaudit import metrics
from meshaudit.app import (
    Daemon,
    setup_logging,
)
from meshaudit.config import Config, Policy
from meshaudit.engine.core import Engine
from meshaudit.engine.rules.unexpected_edge import UnexpectedEdge
from meshaudit.guard import ERRORS
from meshaudit.runtime.messages import Message, frame, read_frame, violation_to_wire
from meshaudit.runtime.summed import snapshot

log = logging.getLogger("meshaudit.workers")  # one name for both sides: their log lines stay as they were


def learner(engine: Engine) -> UnexpectedEdge | None:
    """The engine's unexpected_edge rule when it runs in learn mode."""
    for r in engine.rules:
        if isinstance(r, UnexpectedEdge) and r.learn:
            return r
    return None


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
