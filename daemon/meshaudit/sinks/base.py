"""The delivery contract every sink shares: one bounded queue and one worker per sink, retry
with exponential backoff and jitter, counters, readiness.

A sink never blocks the engine: ``offer`` is synchronous and O(1). When the queue is full the
alert is dropped and counted (``queue_full``). A backend that is down at start-up does not
stop the daemon: ``start`` logs one clear error, the sink reports not ready, and the worker
keeps retrying. Errors are retryable unless they are :class:`PermanentError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from abc import ABC, abstractmethod

from pydantic import BaseModel, ConfigDict, Field

from meshaudit import metrics
from meshaudit.model import Alert

log = logging.getLogger("meshaudit.sinks")


class PermanentError(Exception):
    """Retrying cannot help (e.g. the backend rejected the record as too large)."""


class SinkConfigBase(BaseModel):
    """Options every sink has. Sink modules subclass this with their own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    queue_size: int = Field(10_000, ge=1, description="Alerts held in memory before dropping.")
    retry_initial_ms: int = Field(100, ge=1)
    retry_max_ms: int = Field(30_000, ge=1)


class Sink(ABC):
    """Base class of all sinks. Subclasses implement ``_connect``, ``_send`` and ``_close``."""

    def __init__(self, name: str, config: SinkConfigBase) -> None:
        self.name = name
        self.config = config
        self._queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=config.queue_size)
        self._worker: asyncio.Task[None] | None = None
        self._connected = False
        self._ready_reason = "not started"
        self._stopping = False
        self._sent = metrics.SINK_SENT.labels(name)
        self._failed = metrics.SINK_FAILED.labels(name)
        self._retried = metrics.SINK_RETRIED.labels(name)
        self._latency = metrics.SINK_LATENCY.labels(name)
        self._depth = metrics.SINK_QUEUE_DEPTH.labels(name)
        self._ready_gauge = metrics.SINK_READY.labels(name)
        self._ready_gauge.set(0)

    # --- subclass hooks -------------------------------------------------------------------
    @abstractmethod
    async def _connect(self) -> None:
        """Open the backend connection; raise on failure (the worker retries)."""

    @abstractmethod
    async def _send(self, alert: Alert) -> None:
        """Deliver one alert and return only when the backend acknowledged it."""

    @abstractmethod
    async def _close(self) -> None:
        """Close the backend connection; must be safe when never connected."""

    # --- contract -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._connected

    @property
    def ready_reason(self) -> str:
        return "ok" if self._connected else self._ready_reason

    def offer(self, alert: Alert) -> None:
        """Enqueue without blocking; drop and count when the queue is full."""
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            metrics.SINK_DROPPED.labels(self.name, "queue_full").inc()
            return
        self._depth.set(self._queue.qsize())

    async def start(self) -> None:
        if self._worker is not None:
            return
        try:
            await self._connect()
            self._set_connected(True, "ok")
        except Exception as exc:  # the daemon must start even when a backend is down
            self._set_connected(False, f"cannot connect: {exc}")
            log.error("Sink %s cannot reach its backend; will keep retrying: %s", self.name, exc)
        self._worker = asyncio.create_task(self._run(), name=f"sink-{self.name}")

    async def shutdown(self, deadline: float) -> None:
        """Deliver what is queued until ``deadline`` (monotonic), then stop. Safe twice."""
        self._stopping = True
        worker, self._worker = self._worker, None
        if worker is not None:
            while not self._queue.empty() and time.monotonic() < deadline and not worker.done():
                await asyncio.sleep(0.01)
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        left = self._queue.qsize()
        if left:
            metrics.SINK_DROPPED.labels(self.name, "shutdown").inc(left)
            log.warning("Sink %s stopped with %d undelivered alerts.", self.name, left)
            while not self._queue.empty():
                self._queue.get_nowait()
        with contextlib.suppress(Exception):
            await self._close()
        self._set_connected(False, "stopped")

    # --- internals ------------------------------------------------------------------------
    def _set_connected(self, ok: bool, reason: str) -> None:
        self._connected = ok
        self._ready_reason = reason
        self._ready_gauge.set(1 if ok else 0)

    def _backoff(self, attempt: int) -> float:
        cap = self.config.retry_max_ms / 1000
        base = min(cap, self.config.retry_initial_ms / 1000 * (2**attempt))
        return random.uniform(base / 2, base)  # "equal jitter": never zero, never in lockstep

    async def _run(self) -> None:
        while True:
            alert = await self._queue.get()
            self._depth.set(self._queue.qsize())
            await self._deliver(alert)

    async def _deliver(self, alert: Alert) -> None:
        attempt = 0
        while True:
            try:
                if not self._connected:
                    await self._connect()
                    self._set_connected(True, "ok")
                    log.info("Sink %s connected.", self.name)
                await self._send(alert)
            except PermanentError as exc:
                self._failed.inc()
                metrics.SINK_DROPPED.labels(self.name, "permanent_error").inc()
                log.error("Sink %s rejected alert %s permanently: %s", self.name, alert.id, exc)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed.inc()
                if self._connected:
                    log.warning("Sink %s delivery failed, will retry: %s", self.name, exc)
                self._set_connected(False, f"delivery failing: {exc}")
                with contextlib.suppress(Exception):
                    await self._close()
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1
                self._retried.inc()
                continue
            self._sent.inc()
            self._latency.observe(max(0.0, time.time() - alert.emitted_at))
            return
