"""The delivery contract every sink shares: one delivery queue and one worker per sink, retry
with exponential backoff and jitter, counters, readiness.

The guarantee is at-least-once: an alert leaves the sink only when the backend acknowledged
it. Alert ids are deterministic, so a consumer removes the repeats a retry or a replay makes.

How an alert travels:

- ``offer`` (synchronous, O(1), never blocks the engine, never raises) puts it on the sink's
  :class:`~meshaudit.sinks.queue.DeliveryQueue`. With a spool that is **write-ahead**: the alert
  is appended to the on-disk spool (a few hundred bytes to the page cache) before any backend
  sees it, so killing the daemon at any moment loses nothing it accepted. Without a spool it is a
  bounded in-memory queue.
- The worker takes a batch from the queue, delivers it, and gives the queue its verdict: ``ack``
  (the backend acknowledged it; a spool's cursor moves), ``requeue`` (failed: retried first, in
  order) or ``drop`` (rejected for good). The queue owns what is in flight; this module owns the
  retry policy.
- A failed delivery marks the sink not ready and is retried with exponential backoff and
  jitter. Connecting and sending are bounded by ``attempt_timeout_ms``, so a backend that accepts
  and never answers is a failure like any other and cannot hold the worker.
- ``shutdown(deadline)`` delivers what waits until the deadline (a spool-backed sink whose
  backend is failing stops at once: everything is on disk for the next start); with no spool,
  what is left is dropped and counted (``reason="shutdown"``).

Drops are counted in ``meshaudit_sink_dropped_total{reason}``: ``queue_full`` (no spool and the
queue is full), ``spool_full`` (the spool is at ``spool_max_bytes``; ``spool_full_policy`` says
whether the newest or the oldest alerts go), ``spool_error`` (the spool write failed: a full
disk, an I/O error; the sink is not ready until a write succeeds), ``spool_corrupt`` (a damaged
spool record), ``permanent_error`` (the backend rejected the alert for good) and ``shutdown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from meshaudit import metrics
from meshaudit.logsafe import RateLimited
from meshaudit.model import Alert
from meshaudit.sinks.queue import Batch, DeliveryQueue, MemoryQueue, Outgoing, SpoolQueue
from meshaudit.sinks.spool import Spool, SpoolFullPolicy

log = logging.getLogger("meshaudit.sinks")


class PermanentError(Exception):
    """Retrying cannot help (e.g. the backend rejected the record as too large).

    ``item`` names the one alert at fault; without it the whole batch is given up.
    """

    def __init__(self, message: str, item: Outgoing | None = None) -> None:
        super().__init__(message)
        self.item = item


class FatalSinkError(Exception):
    """The sink cannot work as configured (e.g. idempotence required and refused).

    Raised from ``start()`` the daemon refuses to start; met later, the sink stays not ready and
    keeps everything in its spool.
    """


class SinkConfigBase(BaseModel):
    """Options every sink has. Sink modules subclass this with their own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    queue_size: int = Field(
        10_000,
        ge=1,
        description="Without a spool: alerts held in memory before dropping (queue_full). With a spool: "
        "the newest spooled alerts also kept in memory, so they are not read back from disk.",
    )
    batch_size: int = Field(100, ge=1, description="Alerts delivered per attempt, at most.")
    retry_initial_ms: int = Field(100, ge=1, description="First retry delay; doubles per failure.")
    retry_max_ms: int = Field(30_000, ge=1, description="Longest retry delay.")
    health_check_secs: float = Field(
        5, gt=0, description="While idle, check the connection (and reconnect) this often."
    )
    attempt_timeout_ms: int = Field(10_000, ge=1, description="A connect or delivery attempt taking longer has failed.")
    spool_dir: str | None = Field(
        "var/spool",
        description="Spool directory (the sink uses <spool_dir>/<sink name>/), relative to the working "
        "directory unless absolute; null: no spool (alerts the queue cannot hold are dropped).",
    )
    spool_max_bytes: int = Field(256 * 1024 * 1024, ge=4096, description="Cap on spooled alert bytes.")
    spool_full_policy: SpoolFullPolicy = Field(
        "drop_newest",
        description="When the spool is full: drop_newest refuses new alerts (keeps the first evidence of "
        "an incident), drop_oldest discards the oldest spooled alerts to make room.",
    )
    spool_fsync: bool = Field(False, description="fsync every spool write: survives power loss, costs ~ms.")


class Sink(ABC):
    """Base class of all sinks. Subclasses implement ``_connect``, ``_send`` and ``_close``."""

    def __init__(self, name: str, config: SinkConfigBase) -> None:
        self.name = name
        self.config = config
        self._queue: DeliveryQueue | None = None  # built by start(): the spool is opened there
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._connected = False
        self._ready_reason = "not started"
        self._queue_error: str | None = None  # the queue's error as readiness last saw it
        self._closed = False
        self._sent = metrics.SINK_SENT.labels(name)
        self._failed = metrics.SINK_FAILED.labels(name)
        self._retried = metrics.SINK_RETRIED.labels(name)
        self._latency = metrics.SINK_LATENCY.labels(name)
        self._ready_gauge = metrics.SINK_READY.labels(name)
        self._ready_gauge.set(0)
        metrics.init_sink_series(name)
        self._rate = RateLimited(log)

    # --- subclass hooks -------------------------------------------------------------------
    @abstractmethod
    async def _connect(self) -> None:
        """Open the backend connection; raise on failure (the worker retries)."""

    @abstractmethod
    async def _send(self, items: Sequence[Outgoing]) -> None:
        """Deliver a batch, in order, and return only when the backend acknowledged all of it."""

    @abstractmethod
    async def _close(self) -> None:
        """Close the backend connection; must be safe when never connected."""

    async def _probe(self) -> None:
        """Raise if the connection is known to be gone (called while idle); default: trust it."""
        return None

    # --- contract -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._connected and self._queue_error is None

    @property
    def ready_reason(self) -> str:
        if self._queue_error is not None:
            return self._queue_error
        return "ok" if self._connected else self._ready_reason

    @property
    def spool(self) -> Spool | None:
        queue = self._queue
        return queue.spool if isinstance(queue, SpoolQueue) else None

    def offer(self, alert: Alert) -> None:
        """Take an alert without blocking and without raising: write it ahead to the spool (or
        queue it in memory without one), or drop and count it."""
        if self._closed:
            metrics.SINK_DROPPED.labels(self.name, "shutdown").inc()
            return
        try:
            queue = self._queue or self._open_queue()
            queue.put(Outgoing.from_alert(alert))
        except Exception as exc:  # the spool cannot even be opened: this sink's failure alone
            metrics.SINK_DROPPED.labels(self.name, "spool_error").inc()
            self._rate.error("offer", "Sink %s could not take an alert: %s", self.name, _describe(exc))
            return
        if queue.error is not self._queue_error:
            self._readiness()
        self._idle.clear()
        self._wake.set()

    async def start(self) -> None:
        """Open the spool, try to connect once, and start the worker.

        A backend that cannot be reached is logged and retried (the daemon must start: Envoy
        would lose access logs meanwhile); a :class:`FatalSinkError` propagates.
        """
        if self._worker is not None or self._closed:
            return
        self._open_queue()
        try:
            async with asyncio.timeout(self.config.attempt_timeout_ms / 1000):
                await self._connect()
            self._set_connected(True, "ok")
            log.info("Sink %s connected.", self.name)
        except FatalSinkError:
            await self._close_quietly()
            self._close_queue(deliver_by_now=False)
            raise
        except Exception as exc:
            reason = _describe(exc)
            self._set_connected(False, f"cannot connect: {reason}")
            log.error(
                "Sink %s cannot deliver yet; alerts go to its spool (if any) and delivery is retried: %s",
                self.name,
                reason,
            )
            await self._close_quietly()
        self._worker = asyncio.create_task(self._run(), name=f"sink-{self.name}")

    async def shutdown(self, deadline: float) -> None:
        """Deliver what waits until ``deadline`` (monotonic); then what is left stays in the spool
        for the next start, or without a spool is dropped and counted. A spool-backed sink whose
        backend is failing does not wait: everything is on disk already. Safe twice and safe
        without ``start``."""
        if self._closed:
            return
        worker, self._worker = self._worker, None
        queue = self._queue
        if worker is not None and queue is not None:
            while len(queue) and not worker.done():
                if isinstance(queue, SpoolQueue) and not self._connected:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._idle.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, 0.1)):
                        await self._idle.wait()
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._closed = True
        await self._close_quietly()
        self._close_queue(deliver_by_now=True)
        self._set_connected(False, "stopped")

    async def _close_quietly(self) -> None:
        """Close the backend connection, bounded in time; a failure to close changes nothing."""
        try:
            async with asyncio.timeout(self.config.attempt_timeout_ms / 1000):
                await self._close()
        except Exception as exc:
            log.debug("Sink %s: closing the connection failed: %s", self.name, _describe(exc))

    # --- queue ------------------------------------------------------------------------------
    def _open_queue(self) -> DeliveryQueue:
        if self._queue is not None:
            return self._queue
        cfg = self.config
        queue: DeliveryQueue
        if cfg.spool_dir is None:
            queue = MemoryQueue(self.name, cfg.queue_size)
        else:
            spool = Spool(
                Path(cfg.spool_dir) / self.name, cfg.spool_max_bytes, cfg.spool_full_policy, fsync=cfg.spool_fsync
            )
            queue = SpoolQueue(self.name, spool, mirror_size=cfg.queue_size)
        self._queue = queue
        return queue

    def _close_queue(self, deliver_by_now: bool) -> None:
        queue, self._queue = self._queue, None
        if queue is not None:
            queue.close(deliver_by_now)
        self._queue_error = None

    # --- internals ------------------------------------------------------------------------
    def _set_connected(self, ok: bool, reason: str) -> None:
        self._connected = ok
        self._ready_reason = reason
        self._readiness()

    def _readiness(self) -> None:
        queue = self._queue
        self._queue_error = queue.error if queue is not None else None
        self._ready_gauge.set(1 if self.ready else 0)

    def _backoff(self, attempt: int) -> float:
        cap = self.config.retry_max_ms / 1000
        base = min(cap, self.config.retry_initial_ms / 1000 * (2**attempt))
        return random.uniform(base / 2, base)  # "equal jitter": never zero, never in lockstep

    async def _run(self) -> None:
        queue = self._queue
        assert queue is not None
        attempt = 0
        while True:
            batch = queue.take(self.config.batch_size)
            if queue.error is not self._queue_error:  # an ack's cursor write failed or recovered
                self._readiness()
            if not batch:
                self._idle.set()
                self._wake.clear()
                try:
                    async with asyncio.timeout(self.config.health_check_secs):
                        await self._wake.wait()
                except TimeoutError:
                    await self._check_health()
                continue
            try:
                await self._attempt(batch.items)
            except PermanentError as exc:
                self._give_up(queue, batch, exc)
                continue
            except FatalSinkError as exc:
                queue.requeue(batch)
                self._failed.inc()
                log.error("Sink %s cannot work as configured; keeping its alerts: %s", self.name, exc)
                self._set_connected(False, f"fatal: {exc}")
            except Exception as exc:
                queue.requeue(batch)
                self._failed.inc()
                reason = _describe(exc)
                if self._connected:
                    log.warning("Sink %s delivery failed; retrying with backoff: %s", self.name, reason)
                self._set_connected(False, f"delivery failing: {reason}")
            else:
                queue.ack(batch)
                self._delivered(batch)
                attempt = 0
                continue
            await self._close_quietly()
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1
            self._retried.inc()

    async def _check_health(self) -> None:
        """While idle, keep readiness true to the backend: probe a connected sink, reconnect a
        disconnected one, so /readyz does not wait for the next alert to tell the truth."""
        try:
            async with asyncio.timeout(self.config.attempt_timeout_ms / 1000):
                if self._connected:
                    await self._probe()
                else:
                    await self._connect()
                    self._set_connected(True, "ok")
                    log.info("Sink %s connected.", self.name)
        except Exception as exc:
            if self._connected:
                log.warning("Sink %s lost its backend: %s", self.name, _describe(exc))
                self._set_connected(False, f"health check failed: {_describe(exc)}")
            await self._close_quietly()

    async def _attempt(self, batch: Sequence[Outgoing]) -> None:
        async with asyncio.timeout(self.config.attempt_timeout_ms / 1000):
            if not self._connected:
                await self._connect()
                self._set_connected(True, "ok")
                log.info("Sink %s connected; delivering.", self.name)
            await self._send(batch)

    def _delivered(self, batch: Batch) -> None:
        self._sent.inc(len(batch))
        now = time.time()
        for item in batch.items:
            self._latency.observe(max(0.0, now - item.emitted_at))

    def _give_up(self, queue: DeliveryQueue, batch: Batch, exc: PermanentError) -> None:
        """Drop the alert the backend rejected for good (or the whole batch when it is not
        named) and retry the others at once, in their place."""
        self._failed.inc()
        if exc.item is None or exc.item not in batch.items:
            bad, rest = batch, Batch([])
        else:
            bad, rest = batch.split(exc.item)
        for item in bad.items:
            log.error("Sink %s rejected alert %s for good; dropping it: %s", self.name, item.id, exc)
        queue.drop(bad, "permanent_error")
        if rest:
            queue.requeue(rest)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        return "timed out"
    name = type(exc).__name__
    if text.startswith(name):  # aiokafka's errors name themselves already
        return text
    return f"{name}: {text}" if text else name
