"""The delivery contract every sink shares: one bounded in-memory queue and one worker per
sink, retry with exponential backoff and jitter, an on-disk spool, counters, readiness.

The guarantee is at-least-once: an alert leaves the sink only when the backend acknowledged
it. Alert ids are deterministic, so a consumer removes the repeats a retry or a replay makes.

How an alert travels:

- ``offer`` (synchronous, O(1), never blocks the engine) puts it on the queue while the sink is
  connected, its spool is empty and the queue has room. Otherwise it is appended to the spool
  (a few hundred bytes written to the page cache), so that nothing waits in memory for a
  backend that is down and everything keeps its order.
- The worker delivers the queue first, then replays the spool oldest first, in batches,
  acknowledging spool records only after the backend acknowledged them.
- A failed delivery marks the sink not ready, moves the failed batch and the rest of the queue
  to the spool (in order), and retries with exponential backoff and jitter. Connecting and
  sending are bounded by ``attempt_timeout_ms``, so a backend that accepts and never answers
  is a failure like any other and cannot hold the worker.
- ``shutdown(deadline)`` delivers the queue until the deadline, then spools what is left; with
  no spool configured, what is left is dropped and counted (``reason="shutdown"``).

Drops are counted in ``meshaudit_sink_dropped_total{reason}``: ``queue_full`` (no spool and the
queue is full), ``spool_full`` (the spool is at ``spool_max_bytes``; ``spool_full_policy`` says
whether the newest or the oldest alerts go), ``spool_corrupt`` (a damaged spool record),
``permanent_error`` (the backend rejected the alert for good) and ``shutdown``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from meshaudit import metrics
from meshaudit.model import Alert
from meshaudit.sinks.spool import Position, Spool, SpoolFullPolicy

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
    queue_size: int = Field(10_000, ge=1, description="Alerts held in memory before spooling (or dropping).")
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


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An alert as the worker carries it: what every backend needs, rebuilt the same way from
    a live alert or from a spool record."""

    id: str
    key: str
    rule: str
    severity: str
    destination_service: str | None
    emitted_at: float
    payload: bytes  # the JSON alert record

    @classmethod
    def from_alert(cls, alert: Alert) -> Outgoing:
        return cls(
            alert.id,
            alert.key,
            alert.rule,
            alert.severity,
            alert.destination.service,
            alert.emitted_at,
            alert.encode(),
        )

    def to_spool(self) -> bytes:
        # Key and emission time are not in the JSON record in a form cheap to rebuild, so they
        # go first on their own line; orjson never writes a newline.
        return orjson.dumps([self.key, self.emitted_at]) + b"\n" + self.payload

    @classmethod
    def from_spool(cls, data: bytes) -> Outgoing:
        head, _, payload = data.partition(b"\n")
        key, emitted_at = orjson.loads(head)
        record: dict[str, Any] = orjson.loads(payload)
        return cls(
            record["id"],
            key,
            record["rule"],
            record["severity"],
            (record.get("destination") or {}).get("service"),
            float(emitted_at),
            payload,
        )


class Sink(ABC):
    """Base class of all sinks. Subclasses implement ``_connect``, ``_send`` and ``_close``."""

    def __init__(self, name: str, config: SinkConfigBase) -> None:
        self.name = name
        self.config = config
        self._queue: collections.deque[Outgoing] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._spool: Spool | None = None
        self._inflight: list[Outgoing] = []
        self._inflight_from_queue = False
        self._rejected: set[str] = set()  # ids rejected for good, skipped when replaying the spool
        self._connected = False
        self._ready_reason = "not started"
        self._stopping = False
        self._closed = False
        self._sent = metrics.SINK_SENT.labels(name)
        self._failed = metrics.SINK_FAILED.labels(name)
        self._retried = metrics.SINK_RETRIED.labels(name)
        self._spooled = metrics.SINK_SPOOLED.labels(name)
        self._latency = metrics.SINK_LATENCY.labels(name)
        self._depth = metrics.SINK_QUEUE_DEPTH.labels(name)
        self._spool_depth = metrics.SINK_SPOOL_DEPTH.labels(name)
        self._spool_bytes = metrics.SINK_SPOOL_BYTES.labels(name)
        self._ready_gauge = metrics.SINK_READY.labels(name)
        self._ready_gauge.set(0)

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
        return self._connected

    @property
    def ready_reason(self) -> str:
        return "ok" if self._connected else self._ready_reason

    @property
    def spool(self) -> Spool | None:
        return self._spool

    def offer(self, alert: Alert) -> None:
        """Take an alert without blocking: queue it, or spool it, or drop and count it."""
        if self._closed:
            metrics.SINK_DROPPED.labels(self.name, "shutdown").inc()
            return
        item = Outgoing.from_alert(alert)
        spool = self._spool
        if spool is not None and (
            len(spool) or not self._connected or self._stopping or len(self._queue) >= self.config.queue_size
        ):
            self._to_spool([item])
        elif len(self._queue) >= self.config.queue_size:
            metrics.SINK_DROPPED.labels(self.name, "queue_full").inc()
            return
        else:
            self._queue.append(item)
            self._depth.set(len(self._queue))
        self._idle.clear()
        self._wake.set()

    async def start(self) -> None:
        """Open the spool, try to connect once, and start the worker.

        A backend that cannot be reached is logged and retried (the daemon must start: Envoy
        would lose access logs meanwhile); a :class:`FatalSinkError` propagates.
        """
        if self._worker is not None or self._closed:
            return
        self._open_spool()
        try:
            async with asyncio.timeout(self.config.attempt_timeout_ms / 1000):
                await self._connect()
            self._set_connected(True, "ok")
            log.info("Sink %s connected.", self.name)
        except FatalSinkError:
            await self._close_quietly()
            self._close_spool()
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
        """Deliver the queue until ``deadline`` (monotonic), then spool the rest. Safe twice and
        safe without ``start``."""
        if self._closed:
            return
        self._stopping = True
        worker, self._worker = self._worker, None
        if worker is not None:
            while (self._queue or self._inflight_from_queue) and not worker.done():
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
        if self._inflight_from_queue:  # cancelled mid-delivery: not acknowledged, so keep it
            self._queue.extendleft(reversed(self._inflight))
        self._inflight, self._inflight_from_queue = [], False
        left = list(self._queue)
        self._queue.clear()
        self._depth.set(0)
        if left:
            if self._spool is None and self.config.spool_dir is not None:
                with contextlib.suppress(Exception):
                    self._open_spool()
            if self._spool is not None:
                self._to_spool(left)
                log.info("Sink %s spooled %d undelivered alerts for the next start.", self.name, len(left))
            else:
                metrics.SINK_DROPPED.labels(self.name, "shutdown").inc(len(left))
                log.warning("Sink %s stopped with %d undelivered alerts and no spool.", self.name, len(left))
        await self._close_quietly()
        self._close_spool()
        self._set_connected(False, "stopped")

    async def _close_quietly(self) -> None:
        """Close the backend connection, bounded in time; a failure to close changes nothing."""
        try:
            async with asyncio.timeout(self.config.attempt_timeout_ms / 1000):
                await self._close()
        except Exception as exc:
            log.debug("Sink %s: closing the connection failed: %s", self.name, _describe(exc))

    # --- spool ------------------------------------------------------------------------------
    def _open_spool(self) -> None:
        if self._spool is not None or self.config.spool_dir is None:
            return
        self._spool = Spool(
            Path(self.config.spool_dir) / self.name,
            self.config.spool_max_bytes,
            self.config.spool_full_policy,
            fsync=self.config.spool_fsync,
        )
        self._count_corrupt()
        self._spool_gauges()

    def _close_spool(self) -> None:
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()

    def _to_spool(self, items: Sequence[Outgoing]) -> None:
        spool = self._spool
        assert spool is not None
        for item in items:
            stored, dropped = spool.append(item.to_spool())
            if stored:
                self._spooled.inc()
            if dropped:
                metrics.SINK_DROPPED.labels(self.name, "spool_full").inc(dropped)
                log.debug("Sink %s spool is full; dropped %d alerts (%s).", self.name, dropped, spool.policy)
        self._spool_gauges()

    def _spool_gauges(self) -> None:
        spool = self._spool
        self._spool_depth.set(len(spool) if spool else 0)
        self._spool_bytes.set(spool.size_bytes if spool else 0)

    def _count_corrupt(self) -> None:
        spool = self._spool
        if spool is not None and spool.corrupt_dropped:
            metrics.SINK_DROPPED.labels(self.name, "spool_corrupt").inc(spool.corrupt_dropped)
            spool.corrupt_dropped = 0

    # --- internals ------------------------------------------------------------------------
    def _set_connected(self, ok: bool, reason: str) -> None:
        self._connected = ok
        self._ready_reason = reason
        self._ready_gauge.set(1 if ok else 0)

    def _backoff(self, attempt: int) -> float:
        cap = self.config.retry_max_ms / 1000
        base = min(cap, self.config.retry_initial_ms / 1000 * (2**attempt))
        return random.uniform(base / 2, base)  # "equal jitter": never zero, never in lockstep

    def _next_batch(self) -> tuple[list[Outgoing], Position | None]:
        """The queue first (it is older than anything spooled), then the spool."""
        size = self.config.batch_size
        if self._queue:
            batch = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
            self._depth.set(len(self._queue))
            self._inflight, self._inflight_from_queue = batch, True
            return batch, None
        spool = self._spool
        while spool is not None and len(spool):
            records = spool.peek(size)
            self._count_corrupt()
            if not records:
                break
            batch = [Outgoing.from_spool(r.payload) for r in records]
            if self._rejected:
                batch = [i for i in batch if i.id not in self._rejected]
            if not batch:  # only rejected alerts: they leave the spool now
                spool.ack(records[-1].end)
                self._spool_gauges()
                continue
            self._inflight, self._inflight_from_queue = batch, False
            return batch, records[-1].end
        self._rejected.clear()
        return [], None

    async def _run(self) -> None:
        attempt = 0
        while True:
            batch, spool_end = self._next_batch()
            if not batch:
                self._inflight, self._inflight_from_queue = [], False
                self._idle.set()
                self._wake.clear()
                try:
                    async with asyncio.timeout(self.config.health_check_secs):
                        await self._wake.wait()
                except TimeoutError:
                    await self._check_health()
                continue
            try:
                await self._attempt(batch)
            except PermanentError as exc:
                self._give_up(batch, spool_end, exc)
                continue
            except FatalSinkError as exc:
                self._failed.inc()
                log.error("Sink %s cannot work as configured; spooling everything: %s", self.name, exc)
                self._fail(batch, f"fatal: {exc}")
            except Exception as exc:
                self._failed.inc()
                reason = _describe(exc)
                if self._connected:
                    log.warning("Sink %s delivery failed; spooling and retrying with backoff: %s", self.name, reason)
                self._fail(batch, f"delivery failing: {reason}")
            else:
                self._delivered(batch, spool_end)
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

    def _delivered(self, batch: Sequence[Outgoing], spool_end: Position | None) -> None:
        if spool_end is not None and self._spool is not None:
            self._spool.ack(spool_end)
            self._spool_gauges()
        self._inflight, self._inflight_from_queue = [], False
        self._sent.inc(len(batch))
        now = time.time()
        for item in batch:
            self._latency.observe(max(0.0, now - item.emitted_at))

    def _fail(self, batch: list[Outgoing], reason: str) -> None:
        self._set_connected(False, reason)
        if self._inflight_from_queue:
            if self._spool is not None:
                # Nothing waits in memory for a backend that is down: a crash now loses nothing.
                left = [*batch, *self._queue]
                self._queue.clear()
                self._depth.set(0)
                self._to_spool(left)
            else:
                self._queue.extendleft(reversed(batch))
                self._depth.set(len(self._queue))
        self._inflight, self._inflight_from_queue = [], False

    def _give_up(self, batch: list[Outgoing], spool_end: Position | None, exc: PermanentError) -> None:
        """Drop the alert the backend rejected for good (or the whole batch when it is not
        named) and retry the others at once, in their place."""
        bad = [exc.item] if exc.item is not None else batch
        metrics.SINK_DROPPED.labels(self.name, "permanent_error").inc(len(bad))
        self._failed.inc()
        for item in bad:
            log.error("Sink %s rejected alert %s for good; dropping it: %s", self.name, item.id, exc)
        if spool_end is not None and self._spool is not None:
            if exc.item is None:
                self._spool.ack(spool_end)
                self._spool_gauges()
            else:  # the same records are read again, without the rejected one
                self._rejected.add(exc.item.id)
        elif exc.item is not None:
            self._queue.extendleft(reversed([i for i in batch if i is not exc.item]))
        self._inflight, self._inflight_from_queue = [], False


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        return "timed out"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
