"""The receiver's stage (``meshaudit run --role receiver``): the hops its receivers accepted go
to the hops topic instead of to an engine.

Hops are taken off the ingest queue (what is waiting, up to ``TAKE_HOPS`` at a time), grouped by
partition, as Kafka's default partitioner puts ``wire.correlation_key(hop)`` (so both sidecars'
entries and the spans of one request land in one partition, whichever receiver got each; an
entry that logged a trace is also copied, as evidence, to its trace id's partition where an
application's span joins it: ``wire.route``), and each group is encoded as HopBatch records of
at most ``max_hops_per_record`` hops and ``max_record_bytes`` bytes, produced to that partition
with acks=all (idempotent when the broker grants it). Records of one partition are produced in
the order their hops were taken.

Senders' mismatched claims (log_source_mismatch: ``meshaudit.engine.sources``, judged by the
receivers once per stream or export) go to the same topic, in records of their own
(``wire.encode_claims``), to the partition Kafka's default partitioner puts their sender's
principal in: one evaluator judges all of a sender's claims, whichever receiver each came to, and
raises the alert one process would. They are produced before the hops taken with them, and are
bounded, sent again and given up (``source_claims_unforwarded_total``) exactly as hops are.

Bounded: records produced and not yet acknowledged hold at most ``max_in_flight_bytes`` (a
record that failed stays counted until it is acknowledged; the producer's own buffers hold only
these), and at most ``TAKE_HOPS`` more hops are being grouped and encoded. Near the bound the
stage stops taking from the ingest queue, which then fills, and
the receivers push back as they do for a slow engine: ALS entries are dropped and counted
(``dropped_total{reason="queue_full"}``), OTLP callers are told to retry (RESOURCE_EXHAUSTED,
429/503). Nothing else grows while the broker is away.

A record whose produce fails (the broker did not answer within ``request_timeout_ms``, refused
it, the connection broke) is sent again, oldest first and before any new record, after a
backoff; a broker that comes back gets them without anyone's help. Only a record the broker can
never take is given up: one hop larger than ``max_record_bytes`` (``hops_unproduced_total``).
A record sent again may land after a later record of its partition, which the evaluators do not
mind: correlation waits for evidence in any order within its TTL.

Its cost per hop, measured in one process (ALS at 25 entries per message, 12 partitions):
about 2.3 us for the key and its partition and 3.9 us for encoding into one record per
partition, on top of the receivers' own ~2.7 us an entry; then aiokafka's per-record work.

Start-up does not wait for the broker: the receivers listen at once, and the producer connects
(and checks, or with ``create_topic`` creates, the topic) in the background, again and again
until it can, while the ingest queue's bounds apply as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka import errors as kerrors

from meshaudit import metrics
from meshaudit.config import DistributedConfig
from meshaudit.engine.sources import Claim
from meshaudit.guard import ERRORS, CoreTasks
from meshaudit.logsafe import RateLimited
from meshaudit.model import Hop
from meshaudit.receivers.ingest import IngestQueue
from meshaudit.runtime.kafka import connection, ensure_topic
from meshaudit.sinks.base import FatalSinkError
from meshaudit.wire.hops import MAX_CLAIMS, claim_key, encode, encode_claims, route
from meshaudit.wire.partition import partition

log = logging.getLogger("meshaudit.producer")
_limited = RateLimited(log, interval=30.0)

TAKE_HOPS = 2048  # hops taken off the ingest queue at once, at most (then grouped and encoded)
BACKOFF_SECS = (0.25, 5.0)  # between connection attempts, and before a failed record is sent again
STOP_SECS = 10.0  # on stop, how long what was accepted may take to be acknowledged
# Records the broker may take once it is back; any other failure is retried too.
_TIMEOUTS = (kerrors.KafkaTimeoutError, kerrors.RequestTimedOutError)
_TOO_LARGE = (kerrors.MessageSizeTooLargeError, kerrors.RecordTooLargeError)


@dataclass(order=True, slots=True)
class Record:
    """One HopBatch for one partition, of ``hops`` hops or ``claims`` senders' claims; ordered by
    ``seq``, the order it was made in."""

    seq: int
    partition: int = field(compare=False)
    value: bytes = field(compare=False)
    hops: int = field(compare=False)
    sent_at: float = field(default=0.0, compare=False)
    claims: int = field(default=0, compare=False)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _TIMEOUTS):
        return "timeout"
    if isinstance(exc, _TOO_LARGE):
        return "too_large"
    if isinstance(exc, (kerrors.KafkaConnectionError, ConnectionError, OSError)):
        return "connection"
    if isinstance(exc, kerrors.KafkaError):
        return "broker"
    return "other"


class HopStage:
    """The producer loop, as the pipeline's :class:`~meshaudit.pipeline.Stage`."""

    def __init__(self, config: DistributedConfig) -> None:
        self.cfg = config
        self._producer: Any = None
        self._idempotent = True  # until a broker refuses it (then decided for this process)
        self._seq = 0
        self._retry: list[Record] = []  # a heap by seq: failed records, sent again oldest first
        self._in_flight = 0  # bytes of records sent and not acknowledged, failed ones included
        self._held = 0  # hops taken off the ingest queue and neither acknowledged nor given up
        self._held_claims = 0  # the same, of senders' claims
        self._wake = asyncio.Event()  # an acknowledgement or a failure came back
        self._failing_since: float | None = time.monotonic()  # None while producing works
        self._why = "not connected yet"
        self._backoff = BACKOFF_SECS[0]
        self._partitions = 1  # the topic's, as last known
        self._broken = False  # the producer refused a record outright: make a new one
        metrics.HOPS_TOPIC_UP.set(0)
        for reason in metrics.HOP_PRODUCE_ERROR_REASONS:
            metrics.HOP_PRODUCE_ERRORS.labels(reason)
        for reason in metrics.HOPS_UNPRODUCED_REASONS:
            metrics.HOPS_UNPRODUCED.labels(reason)
            metrics.SOURCE_CLAIMS_UNFORWARDED.labels(reason)

    # --- the Stage interface -----------------------------------------------------------------
    def start(self, queue: IngestQueue, core: CoreTasks) -> None:
        core.start(self._run(queue), "producer")

    def gate(self, queue: str) -> str:
        """A queue saturated because the hops topic cannot be produced to keeps the receiver
        ready (README, "Distributed mode": every receiver shares the broker, and a receiver out of
        its Service only moves Envoy's drops where meshaudit cannot count them); saturated while
        producing works means this receiver is behind: not ready, as for a slow engine."""
        if queue != "ok" and self._failing_since is not None:
            return "ok"
        return queue

    def state(self) -> str:
        """The hops topic as this receiver sees it: "ok", or why it cannot produce and for how long."""
        since = self._failing_since
        if since is None:
            return "ok"
        return f"cannot produce for {time.monotonic() - since:.0f} s: {self._why}"

    async def stop(self, queue: IngestQueue, core: CoreTasks) -> None:
        """Until what was accepted is acknowledged, at most ``STOP_SECS``; what is left then is
        counted (``hops_unproduced_total{reason="shutdown"}``, claims in
        ``source_claims_unforwarded_total``) and logged."""
        deadline = time.monotonic() + STOP_SECS
        while queue.entries or queue.claims or self._held or self._held_claims:
            left_secs = deadline - time.monotonic()
            if left_secs <= 0:
                break
            self._wake.clear()  # set by every acknowledgement (or failure)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left_secs, 0.1)):  # the queue empties without one
                    await self._wake.wait()
        await core.stop()  # the loop first: it uses the producer
        producer, self._producer = self._producer, None
        if producer is not None:  # flushes what it holds, within what is left of the deadline
            with contextlib.suppress(Exception):
                async with asyncio.timeout(max(0.5, deadline - time.monotonic())):
                    await producer.stop()
        left = queue.entries + self._held
        claims = len(queue.claims) + self._held_claims
        if left:
            metrics.HOPS_UNPRODUCED.labels("shutdown").inc(left)
        if claims:
            metrics.SOURCE_CLAIMS_UNFORWARDED.labels("shutdown").inc(claims)
        if left or claims:
            log.warning(
                "Stopping with %d hops not acknowledged by the broker, and %d senders' claims (%s); they are "
                "lost (counted).",
                left,
                claims,
                self.state(),
            )

    def check(self) -> str | None:
        """Why the producer can never connect as configured (TLS files that cannot be loaded, a
        key's password that is not there), or None: a start-up check, so that such a receiver
        stops at once with the reason rather than retrying for ever."""
        try:
            self._options()
        except FatalSinkError as exc:
            return f"distributed.{exc}"
        return None

    # --- connection ----------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        return {**connection(self.cfg), "request_timeout_ms": self.cfg.request_timeout_ms}

    def _make(self, options: dict[str, Any]) -> Any:
        cfg = self.cfg
        return AIOKafkaProducer(
            **options,
            acks="all",
            enable_idempotence=self._idempotent,
            compression_type=None if cfg.compression == "none" else cfg.compression,
            linger_ms=cfg.linger_ms,
            max_batch_size=cfg.max_record_bytes,
            max_request_size=cfg.max_record_bytes + 64 * 1024,
        )

    async def _connect(self) -> Any:
        """A started producer, the topic there (created with ``create_topic``); retried with a
        backoff until it works (each failure logged, at most every 30 s)."""
        while True:
            producer = None
            try:
                options = self._options()
                producer = self._make(options)
                try:
                    await producer.start()
                except kerrors.BrokerResponseError as exc:
                    # Bootstrap failures are connection errors; a broker *answer* here is its
                    # refusal of a producer id (InitProducerId): go on with acks=all alone.
                    if not self._idempotent:
                        raise
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    log.warning(
                        "Kafka broker refused the idempotent producer (%s); producing hops with acks=all "
                        "without idempotence, so a record sent again may be written twice (evaluators "
                        "and alert consumers deduplicate).",
                        type(exc).__name__,
                    )
                    self._idempotent = False
                    producer = self._make(options)
                    await producer.start()
                await self._topic(producer)
                log.info(
                    "Producing hops to Kafka topic %s on %s (%d partitions, acks=all%s).",
                    self.cfg.hops_topic,
                    ",".join(self.cfg.bootstrap_servers),
                    len(producer.client.cluster.partitions_for_topic(self.cfg.hops_topic) or ()),
                    ", idempotent" if self._idempotent else "",
                )
                return producer
            except asyncio.CancelledError:
                if producer is not None:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                raise
            except Exception as exc:
                if producer is not None:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                self._failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                _limited.error(
                    "connect",
                    "Cannot produce to Kafka topic %s on %s: %s; trying again (the receivers keep "
                    "listening; past the ingest queue's bounds ALS entries are dropped and counted, "
                    "OTLP callers told to retry).",
                    self.cfg.hops_topic,
                    ",".join(self.cfg.bootstrap_servers),
                    self._why,
                )
                await asyncio.sleep(self._next_backoff())

    async def _topic(self, producer: Any) -> None:
        cfg = self.cfg
        retention = "retention the broker's default" if cfg.retention_ms is None else f"retention {cfg.retention_ms} ms"
        configs = {} if cfg.retention_ms is None else {"retention.ms": str(cfg.retention_ms)}
        await ensure_topic(producer, cfg, cfg.hops_topic, cfg.partitions, configs, retention)
        self._partitions = len(await producer.partitions_for(cfg.hops_topic))  # before the first record

    def _next_backoff(self) -> float:
        b = self._backoff
        self._backoff = min(BACKOFF_SECS[1], b * 2)
        return b

    def _failed(self, why: str) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        self._why = why
        metrics.HOPS_TOPIC_UP.set(0)

    def _succeeded(self) -> None:
        if self._failing_since is not None:
            if self._producer is not None and self._why != "not connected yet":
                log.info("Producing hops again (the broker acknowledges records).")
            self._failing_since = None
            self._backoff = BACKOFF_SECS[0]
            metrics.HOPS_TOPIC_UP.set(1)

    # --- the loop ------------------------------------------------------------------------------
    async def _run(self, queue: IngestQueue) -> None:
        self._producer = await self._connect()
        self._succeeded()
        while True:
            await self._room()  # what failed goes first; new hops only when records fit
            hops = await self._next(queue)
            if queue.claims:  # log_source_mismatch: judged by the evaluator of the sender's partition
                for record in self._claim_records(queue.take_claims()):
                    await self._send(record)
            if not hops:
                continue
            # What else is waiting, in one go (after one loop pass for the other ready streams).
            await asyncio.sleep(0)
            while len(hops) < TAKE_HOPS:
                more = queue.get_nowait()
                if more is None:
                    break
                hops.extend(more)
            self._held += len(hops)
            for record in self._records(hops):
                await self._send(record)

    async def _next(self, queue: IngestQueue) -> list[Hop]:
        """The next hops off the queue ([] when only claims wait). While records are in flight, one
        that fails is sent again without waiting for more hops: after an outage the last records
        (a sender's claim, the end of a burst) reach the broker although nothing more arrives."""
        if not self._in_flight or queue.entries or queue.claims:
            return await queue.get()
        get = asyncio.ensure_future(queue.get())
        try:
            while not get.done():
                if self._retry:
                    await self._room()
                    continue
                self._wake.clear()  # set by every acknowledgement or failure
                wake = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait((get, wake), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
        except BaseException:
            get.cancel()  # it has taken nothing: taking follows its wait with no await between
            raise
        return get.result()

    def _records(self, hops: list[Hop]) -> list[Record]:
        """The records of ``hops``: each partition's hops (then its evidence copies, see
        :func:`~meshaudit.wire.hops.evidence_key`) in batches of ``max_hops_per_record``."""
        parts = self._producer.client.cluster.partitions_for_topic(self.cfg.hops_topic)
        if parts:  # partitions added to the topic count from the next metadata refresh
            self._partitions = len(parts)
        out: list[Record] = []
        step = self.cfg.max_hops_per_record
        copied = 0
        for p, (own, copies) in sorted(route(hops, self._partitions).items()):
            both = own + copies if copies else own
            copied += len(copies)
            for i in range(0, len(both), step):
                chunk = both[i : i + step]
                self._encode(p, chunk, max(0, i + len(chunk) - max(i, len(own))), out)
        if copied:
            metrics.HOP_EVIDENCE_COPIES.inc(copied)
        return out

    def _encode(self, p: int, hops: list[Hop], evidence: int, out: list[Record]) -> None:
        """One record of ``hops`` for partition ``p``, the last ``evidence`` of them copies (not
        counted as hops held: the receiver accounts for the hops it took)."""
        own = len(hops) - evidence
        try:
            value = encode(hops, evidence=evidence)
        except (ValueError, TypeError, AttributeError) as exc:  # a hop not of the model's types: a bug
            ERRORS.record("produce", exc, f"encoding {len(hops)} hops")
            self._give_up(own, "encode")
            return
        if len(value) > self.cfg.max_record_bytes:
            if len(hops) == 1:
                self._give_up(own, "too_large")
                _limited.warning(
                    "too_large",
                    "A hop of %d bytes encoded is larger than distributed.max_record_bytes (%d): dropped, counted.",
                    len(value),
                    self.cfg.max_record_bytes,
                )
                return
            half = len(hops) // 2
            self._encode(p, hops[:half], max(0, half - own), out)
            self._encode(p, hops[half:], min(evidence, len(hops) - half), out)
            return
        self._seq += 1
        out.append(Record(self._seq, p, value, own))

    def _claim_records(self, claims: list[Claim]) -> list[Record]:
        """Records of senders' claims, grouped by the partition of their sender's principal."""
        self._held_claims += len(claims)
        parts = self._producer.client.cluster.partitions_for_topic(self.cfg.hops_topic)
        n = len(parts) if parts else self._partitions
        groups: dict[int, list[Claim]] = {}
        for c in claims:
            groups.setdefault(partition(claim_key(c), n), []).append(c)
        out: list[Record] = []
        for p, group in groups.items():
            for i in range(0, len(group), MAX_CLAIMS):
                self._encode_claims(p, group[i : i + MAX_CLAIMS], out)
        return out

    def _encode_claims(self, p: int, claims: list[Claim], out: list[Record]) -> None:
        try:
            value = encode_claims(claims)
        except (ValueError, TypeError, AttributeError) as exc:  # a claim not of its types: a bug
            ERRORS.record("produce", exc, f"encoding {len(claims)} senders' claims")
            self._give_up(0, "encode", len(claims))
            return
        if len(value) > self.cfg.max_record_bytes:
            if len(claims) == 1:  # a node id or resource of megabytes
                self._give_up(0, "too_large", 1)
                _limited.warning(
                    "claim_too_large",
                    "A sender's claim of %d bytes encoded is larger than distributed.max_record_bytes (%d): "
                    "dropped, counted (source_claims_unforwarded_total).",
                    len(value),
                    self.cfg.max_record_bytes,
                )
                return
            half = len(claims) // 2
            self._encode_claims(p, claims[:half], out)
            self._encode_claims(p, claims[half:], out)
            return
        self._seq += 1
        out.append(Record(self._seq, p, value, 0, claims=len(claims)))

    def _give_up(self, hops: int, reason: str, claims: int = 0) -> None:
        self._held -= hops
        self._held_claims -= claims
        if hops:
            metrics.HOPS_UNPRODUCED.labels(reason).inc(hops)
        if claims:
            metrics.SOURCE_CLAIMS_UNFORWARDED.labels(reason).inc(claims)

    async def _room(self) -> None:
        """Until failed records are sent again and a new record of the largest size fits in flight."""
        room = self.cfg.max_in_flight_bytes - self.cfg.max_record_bytes
        while True:
            while self._retry:
                await self._resend()
            if self._in_flight <= room:
                return
            self._wake.clear()
            await self._wake.wait()

    async def _send(self, record: Record) -> None:
        """A new record: once it fits in the in-flight bound (failed ones sent again first)."""
        size = len(record.value)
        bound = self.cfg.max_in_flight_bytes
        while True:
            while self._retry:
                await self._resend()
            if not self._in_flight or self._in_flight + size <= bound:
                break
            self._wake.clear()
            await self._wake.wait()
        self._in_flight += size
        metrics.HOP_IN_FLIGHT_BYTES.set(self._in_flight)
        await self._produce(record)

    async def _resend(self) -> None:
        """Every failed record again, oldest first, after one backoff (and a new producer when
        the old one refused a record outright)."""
        if self._failing_since is not None:
            await asyncio.sleep(self._next_backoff())
        if self._broken:
            old, self._producer = self._producer, None
            with contextlib.suppress(Exception):
                await old.stop()  # what it still held fails back into the retry heap
            self._broken = False
            self._producer = await self._connect()
        records = sorted(self._retry)
        self._retry.clear()
        for record in records:
            await self._produce(record)

    async def _produce(self, record: Record) -> None:
        """Hand ``record`` (counted in flight) to the producer; its acknowledgement or failure
        comes back in :meth:`_done`."""
        record.sent_at = time.monotonic()
        try:
            fut = await self._producer.send(self.cfg.hops_topic, value=record.value, partition=record.partition)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # not even queued: later (by a new producer, unless its buffer stayed full)
            self._broken = not isinstance(exc, _TIMEOUTS + _TOO_LARGE)
            self._fail(record, exc)
            return
        fut.add_done_callback(lambda f: self._done(record, f))

    def _done(self, record: Record, fut: asyncio.Future[Any]) -> None:
        exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
        if exc is None:
            size = len(record.value)
            self._in_flight -= size
            self._held -= record.hops
            self._held_claims -= record.claims
            metrics.HOP_IN_FLIGHT_BYTES.set(self._in_flight)
            metrics.HOPS_PRODUCED.inc(record.hops)
            metrics.HOP_RECORDS_PRODUCED.inc()
            metrics.HOP_BYTES_PRODUCED.inc(size)
            metrics.HOP_PRODUCE_LATENCY.observe(time.monotonic() - record.sent_at)
            self._succeeded()
        else:
            self._fail(record, exc)
        self._wake.set()

    def _fail(self, record: Record, exc: BaseException) -> None:
        reason = _reason(exc)
        metrics.HOP_PRODUCE_ERRORS.labels(reason).inc()
        if reason == "too_large":  # the broker will never take it (its message.max.bytes is lower)
            self._in_flight -= len(record.value)
            metrics.HOP_IN_FLIGHT_BYTES.set(self._in_flight)
            self._give_up(record.hops, "too_large", record.claims)
            _limited.error(
                "rejected",
                "The broker refused a record of %d bytes as too large (%s): its %d hops and %d senders' claims "
                "are dropped, counted. Lower distributed.max_record_bytes below the topic's max.message.bytes.",
                len(record.value),
                type(exc).__name__,
                record.hops,
                record.claims,
            )
            return
        self._failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        heapq.heappush(self._retry, record)
        _limited.warning(
            "produce",
            "Producing hops to %s failed (%s); the records are kept and sent again (%d bytes in flight).",
            self.cfg.hops_topic,
            self._why,
            self._in_flight,
        )
