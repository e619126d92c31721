"""Delivery queues: the one owner of the alerts a sink has accepted and not yet delivered.

A sink's worker asks its queue for a :class:`Batch` (``take``), tries to deliver it, and hands
it back with exactly one verdict: ``ack`` (the backend acknowledged it: gone for good),
``requeue`` (not delivered: it is handed out again first, in order) or ``drop`` (given up for
good, counted in ``meshaudit_sink_dropped_total{reason}``). One batch is out at a time. The
retry policy (backoff, timeouts, readiness) lives in the sink, not here, as the OpenTelemetry
Collector separates its queue from its retry sender.

Two implementations:

- :class:`MemoryQueue` (a sink without a spool): a bounded deque; an alert it cannot hold is
  dropped and counted as ``queue_full``.
- :class:`SpoolQueue` (a sink with a spool): **write-ahead**. ``put`` appends the alert to the
  on-disk spool before anything else happens, so a daemon killed at any moment loses nothing it
  accepted; ``ack`` moves the spool's cursor. The disk is the source of truth; an in-memory mirror
  of the newest not-yet-acknowledged records (at most ``mirror_size``, keyed by spool position)
  saves re-reading and re-parsing what this process wrote itself. A full spool drops per
  ``spool_full_policy`` (``spool_full``); a failed write (ENOSPC, EIO) drops that alert
  (``spool_error``) and marks the queue failing until a spool write succeeds again.

Nothing here raises out of ``put``: it is called synchronously from the engine's dispatch.
"""

from __future__ import annotations

import collections
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import orjson

from meshaudit import metrics
from meshaudit.logsafe import RateLimited
from meshaudit.model import Alert
from meshaudit.sinks.spool import HEADER, Position, Spool

log = logging.getLogger("meshaudit.sinks")


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


@dataclass(slots=True)
class Batch:
    """Alerts handed out together, in order. ``starts`` are their spool positions (spool-backed
    queues only); ``end`` is the position just after the last one."""

    items: list[Outgoing]
    starts: list[Position] = field(default_factory=list)
    end: Position | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def split(self, item: Outgoing) -> tuple[Batch, Batch]:
        """(``item`` alone, the others in order): a backend rejected one alert for good."""
        i = next(n for n, x in enumerate(self.items) if x is item)
        if not self.starts:
            return Batch([item]), Batch(self.items[:i] + self.items[i + 1 :])
        one = Batch([item], [self.starts[i]], self.starts[i + 1] if i + 1 < len(self.starts) else self.end)
        rest = Batch(self.items[:i] + self.items[i + 1 :], self.starts[:i] + self.starts[i + 1 :], self.end)
        return one, rest


class DeliveryQueue(ABC):
    """What a sink has accepted and not delivered yet; see the module docstring."""

    def __init__(self, sink: str) -> None:
        self.sink = sink
        self._depth = metrics.SINK_QUEUE_DEPTH.labels(sink)
        self._out = False  # a batch is handed out and has no verdict yet

    @property
    def error(self) -> str | None:
        """Why the queue cannot take alerts right now (None: it can)."""
        return None

    @property
    def busy(self) -> bool:
        """A batch is handed out and has no verdict yet."""
        return self._out

    def dropped(self, reason: str, n: int = 1) -> None:
        if n:
            metrics.SINK_DROPPED.labels(self.sink, reason).inc(n)

    @abstractmethod
    def __len__(self) -> int:
        """Alerts accepted and not yet acknowledged or dropped (a batch out included)."""

    @abstractmethod
    def put(self, item: Outgoing) -> None:
        """Accept an alert, or drop and count it. Never raises, never blocks."""

    @abstractmethod
    def take(self, limit: int) -> Batch:
        """Up to ``limit`` of the oldest alerts, in order (empty: nothing waits)."""

    @abstractmethod
    def ack(self, batch: Batch) -> None:
        """The backend acknowledged the batch: its alerts leave for good."""

    @abstractmethod
    def requeue(self, batch: Batch) -> None:
        """Not delivered: the batch is handed out again, first and in order."""

    @abstractmethod
    def drop(self, batch: Batch, reason: str) -> None:
        """Given up for good: the batch leaves, counted as ``dropped_total{reason}``."""

    def close(self, deliver_by_now: bool) -> int:
        """The sink stops; ``deliver_by_now``: alerts still here will never be delivered (a
        memory queue drops and counts them as ``shutdown``). Returns the alerts left."""
        return len(self)


class MemoryQueue(DeliveryQueue):
    """A bounded in-memory FIFO: what a sink without a spool has."""

    def __init__(self, sink: str, size: int) -> None:
        super().__init__(sink)
        self.size = size
        self._items: collections.deque[Outgoing] = collections.deque()
        self._taken: Batch | None = None  # the batch out, until its verdict

    def __len__(self) -> int:
        return len(self._items) + (len(self._taken) if self._taken else 0)

    def put(self, item: Outgoing) -> None:
        if len(self) >= self.size:
            self.dropped("queue_full")
            return
        self._items.append(item)
        self._depth.set(len(self))

    def take(self, limit: int) -> Batch:
        items = self._items
        batch = Batch([items.popleft() for _ in range(min(limit, len(items)))])
        if batch:
            self._taken, self._out = batch, True
        return batch

    def ack(self, batch: Batch) -> None:
        self._done()

    def requeue(self, batch: Batch) -> None:
        self._items.extendleft(reversed(batch.items))
        self._done()

    def drop(self, batch: Batch, reason: str) -> None:
        self.dropped(reason, len(batch))
        self._done()

    def _done(self) -> None:
        self._taken, self._out = None, False
        self._depth.set(len(self._items))

    def close(self, deliver_by_now: bool) -> int:
        if self._taken is not None:  # cancelled mid-delivery: not acknowledged, so it stays
            self.requeue(self._taken)
        left = len(self)
        if deliver_by_now and left:
            self.dropped("shutdown", left)
            log.warning("Sink %s stopped with %d undelivered alerts and no spool.", self.sink, left)
            self._items.clear()
            self._done()
        return left


@dataclass(slots=True)
class _Mirrored:
    start: Position
    end: Position
    item: Outgoing


class SpoolQueue(DeliveryQueue):
    """Write-ahead: every alert is on disk before a backend sees it; see the module docstring."""

    def __init__(self, sink: str, spool: Spool, mirror_size: int) -> None:
        super().__init__(sink)
        self.spool = spool
        self.mirror_size = mirror_size
        # The newest not-yet-acknowledged records, contiguous up to the spool's tail.
        self._mirror: collections.deque[_Mirrored] = collections.deque()
        # Records rejected for good that sit behind the cursor's next stop: skipped when read.
        self._skip: set[Position] = set()
        self._error: str | None = None
        self._spooled = metrics.SINK_SPOOLED.labels(sink)
        self._spool_depth = metrics.SINK_SPOOL_DEPTH.labels(sink)
        self._spool_bytes = metrics.SINK_SPOOL_BYTES.labels(sink)
        self._rate = RateLimited(log)
        self._count_corrupt()
        self._gauges()

    def __len__(self) -> int:
        return len(self.spool)

    @property
    def error(self) -> str | None:
        return self._error

    # --- writing ------------------------------------------------------------------------------
    def put(self, item: Outgoing) -> None:
        spool = self.spool
        data = item.to_spool()
        try:
            stored, dropped = spool.append(data)
        except Exception as exc:  # ENOSPC, EIO, a damaged head met by drop_oldest: this sink's alone
            self.dropped("spool_error")
            self._failed(exc)
            return
        if self._error is not None:
            self._recovered()
        if dropped:
            self.dropped("spool_full", dropped)
            self._rate.warning(
                "spool_full", "Sink %s spool is full; dropped %d alerts (%s).", self.sink, dropped, spool.policy
            )
            self._prune()
        if stored:
            self._spooled.inc()
            end = spool.tail  # the record just written is the last of the newest segment
            mirror = self._mirror
            if len(mirror) >= self.mirror_size:
                mirror.popleft()  # the oldest is read back from disk when its turn comes
            mirror.append(_Mirrored(Position(end.segment, end.offset - HEADER.size - len(data)), end, item))
        self._gauges()

    def _failed(self, exc: BaseException) -> None:
        reason = _os_reason(exc)
        self._error = f"spool write failed: {reason}"
        self._rate.error(
            "spool_error",
            "Sink %s cannot write its spool (%s): alerts for it are dropped (counted as spool_error) "
            "until a write succeeds again.",
            self.sink,
            reason,
        )

    def _recovered(self) -> None:
        log.warning("Sink %s: spool writes succeed again.", self.sink)
        self._error = None

    # --- reading ------------------------------------------------------------------------------
    def take(self, limit: int) -> Batch:
        """From disk while the head is older than the mirror (a backlog from an outage or a
        previous run), else from the mirror: a batch never mixes the two."""
        spool, mirror, skip = self.spool, self._mirror, self._skip
        while len(spool):
            batch = Batch([])
            head = spool.head
            first = mirror[0].start if mirror else None
            if first is None or head < first:
                try:
                    records = spool.read(head, limit, stop=first)
                except Exception as exc:
                    self._rate.error("spool_read", "Sink %s cannot read its spool: %s", self.sink, _os_reason(exc))
                    return batch
                self._count_corrupt()
                if spool.head != head:  # a damaged segment was dropped on the way
                    self._prune()
                    self._gauges()
                for r in records:
                    if r.start not in skip:
                        batch.items.append(Outgoing.from_spool(r.payload))
                        batch.starts.append(r.start)
                    batch.end = r.end
            if batch.end is None:  # nothing on disk before the mirror: the mirror's turn
                for m in mirror:
                    if len(batch.starts) >= limit:
                        break
                    if m.start not in skip:
                        batch.items.append(m.item)
                        batch.starts.append(m.start)
                    batch.end = m.end
            if batch.end is None:
                return batch
            if batch.items:
                self._out = True
                return batch
            self._ack_to(batch.end)  # only records rejected for good: they leave now
        return Batch([])

    # --- verdicts -----------------------------------------------------------------------------
    def ack(self, batch: Batch) -> None:
        if batch.end is not None:
            self._ack_to(batch.end)
        self._out = False

    def requeue(self, batch: Batch) -> None:
        self._out = False  # the cursor did not move: the next take starts there again

    def drop(self, batch: Batch, reason: str) -> None:
        self.dropped(reason, len(batch))
        self._out = False
        if not batch.items or batch.end is None:
            return
        if batch.starts[0] <= self.spool.head:
            self._ack_to(batch.end)  # at the head: the cursor moves past it
        else:
            self._skip.update(batch.starts)  # behind others still to deliver: skipped when read

    def _ack_to(self, end: Position) -> None:
        try:
            self.spool.ack(end)
        except Exception as exc:
            # Delivered all the same; a restart may deliver these again (at-least-once).
            self._failed(exc)
        else:
            if self._error is not None:
                self._recovered()
        self._prune()
        self._gauges()

    def _prune(self) -> None:
        head = self.spool.head
        mirror = self._mirror
        while mirror and mirror[0].start < head:
            mirror.popleft()
        if self._skip:
            self._skip = {p for p in self._skip if p >= head}
        if not len(self.spool):
            mirror.clear()

    def _count_corrupt(self) -> None:
        spool = self.spool
        if spool.corrupt_dropped:
            self.dropped("spool_corrupt", spool.corrupt_dropped)
            spool.corrupt_dropped = 0

    def _gauges(self) -> None:
        self._depth.set(len(self._mirror))
        self._spool_depth.set(len(self.spool))
        self._spool_bytes.set(self.spool.size_bytes)

    def close(self, deliver_by_now: bool) -> int:
        left = len(self.spool)
        try:
            self.spool.close()
        except Exception as exc:
            log.error("Sink %s: closing its spool failed: %s", self.sink, _os_reason(exc))
        self._mirror.clear()
        self._depth.set(0)
        if left:
            log.info("Sink %s leaves %d undelivered alerts in its spool for the next start.", self.sink, left)
        return left


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
