"""Stage 2 of the distributed mode, exact across evaluators: per-edge windows (error_burst,
excessive_retries) and alert windows keyed by (rule, source, destination), each key judged and
aggregated by exactly one evaluator, on every evaluator's counts and violations.

The plan (what this module and the engine build; README "Distributed mode"):

1. **Counting stays where the hops are.** Each evaluator's engine runs split
   (:meth:`Engine.split`): its rules count the hops of its own hops partitions as before, but an
   :class:`~meshaudit.engine.api.EdgeWindows` hands its counts out once per tick as a
   :class:`~meshaudit.engine.api.WindowDelta` (requests, hits, first and last seen, a few
   examples), in the window of epoch data time (the records' time) its tick falls in, so every
   member's deltas of one window name the same one; and every violation a rule raises is
   collected instead of aggregated (what ``Engine(peers=True)`` collects for the coordinator of
   ``workers: N``). The rules know nothing of it.
2. **A second topic re-keys them.** After every engine call (:meth:`Stage2.collect`) the deltas
   and violations become records of ``distributed.edges_topic`` keyed by
   ``rule|source|destination`` (``meshaudit.wire.edges``: one record per key per call), produced
   with acks=all; bounded (``max_in_flight_bytes``: past it a record is dropped and counted,
   ``evaluator_edges_records_total{what="unproduced"}``), sent again after a failure.
3. **The same group consumes it.** A second consumer of each evaluator joins the same consumer
   group, subscribed to the edges topic (Kafka assigns each topic's partitions among the
   members subscribed to it), so each key lives in exactly one member. That member sums every
   member's deltas into its judged windows, judges them with the rule's own judge (thresholds
   per destination, as in one process), and its aggregator takes every member's violations of
   the key: one first alert, a closing summary counting them all, one alert budget per key's
   owner. A judged window closes ``lateness`` (two ticks and 2 s) after its end by the
   evaluator's clock; a delta later than that is dropped and counted (``late``).
4. **Failover.** A member that gains an edges partition rebuilds its keys by replaying the
   partition for one horizon (the longest ``window_secs``, the lateness and ``suppress_secs``,
   :meth:`Engine.stage2_horizon`; records older are skipped): records before the committed
   offset are absorbed with ``replay`` (windows and alert windows rebuilt, a window past its
   threshold marked judged, nothing raised: the previous owner raised it), later ones live. The
   keys of a partition it loses are forgotten unjudged (:meth:`Engine.release_stage2`): no
   verdict and no summary from part of the evidence. Offsets are committed a commit interval
   after their records were absorbed. Alert ids stay deterministic (data-time windows,
   ``Aggregator.align``), so an alert raised again after a failover (records absorbed live by
   both owners) is a duplicate consumers drop by id: at least once, as everywhere. Hops judged
   again after a hops partition moved are counted again: a window's counts may then include, at
   most, the hops of the settle time before the failover twice (upper bounds, like duplicates).

The cost: one record per busy (rule, source, destination) per tick per evaluator, not per
request (measured in README "Distributed mode").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka import errors as kerrors

from meshaudit import metrics
from meshaudit.config import DistributedConfig
from meshaudit.engine.api import Violation, WindowDelta
from meshaudit.engine.core import Engine
from meshaudit.guard import ERRORS
from meshaudit.logsafe import RateLimited
from meshaudit.model import Alert
from meshaudit.runtime.kafka import connection, ensure_topic, forgotten
from meshaudit.wire import edges
from meshaudit.wire.partition import partition

log = logging.getLogger("meshaudit")
_limited = RateLimited(log, interval=30.0)

RETRY_SECS: Final = 2.0
BACKOFF_SECS: Final = (0.25, 5.0)
FETCH_WAIT_MS: Final = 50


class Host(Protocol):
    """What stage 2 needs of its evaluator."""

    @property
    def engine(self) -> Engine: ...

    def clock(self) -> float: ...

    def dispatch(self, alerts: list[Alert]) -> None: ...


class Plan(NamedTuple):
    """How a gained edges partition is read: records older than ``since_ms`` (and before the
    committed offset) are skipped, then those before ``committed`` replayed, the rest live."""

    since_ms: int
    committed: int | None

    def phase(self, offset: int, timestamp_ms: int) -> str:
        before = self.committed is not None and offset < self.committed
        if timestamp_ms < self.since_ms and (self.committed is None or before):
            return "skip"
        return "replay" if before else "live"


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type hints
    def __init__(self, stage2: Stage2) -> None:
        self.stage2 = stage2

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.stage2.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.stage2.assigned(set(assigned))


class Stage2:
    """One evaluator's part of stage 2: produce its deltas and violations to the edges topic,
    consume the keys the group gives it, judge and aggregate them in its engine."""

    def __init__(self, cfg: DistributedConfig, host: Host) -> None:
        self.cfg = cfg
        self.host = host
        self.topic = cfg.edges_topic
        # Records to produce, oldest first: (sequence number, key, value). A record leaves once the
        # broker acknowledged it (or it was dropped, counted); one that failed goes back to the
        # front, so the first one's number is the lowest not yet done (``done_below``).
        self.pending: deque[tuple[int, bytes, bytes]] = deque()
        self.next_seq = 0
        self.pending_bytes = 0
        self._wake = asyncio.Event()
        self.producer: AIOKafkaProducer | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.owned: set[TopicPartition] = set()
        self.partitions = 0
        self.plans: dict[TopicPartition, Plan] = {}
        self.positions: dict[TopicPartition, int] = {}
        self.absorbed: dict[TopicPartition, int] = {}  # the next offset past what was absorbed
        self.committed: dict[TopicPartition, int] = {}
        self._settled: dict[TopicPartition, int] = {}  # ``absorbed`` at the last commit
        self.state = "not started"
        self.joined = False
        # Set once the edges topic can be produced to: the evaluator judges no hop before (every
        # violation goes through this topic; the hops wait in theirs, retained, meanwhile).
        self.ready = asyncio.Event()
        self._backoff = BACKOFF_SECS[0]

    # --- producing --------------------------------------------------------------------------------
    def collect(self, engine: Engine) -> None:
        """After every engine call: its deltas and violations, as records to produce."""
        deltas, violations = engine.take_stage2()
        if deltas or violations:
            self.add(deltas, violations)
        late = engine.take_stage2_late()
        if late:
            metrics.EVALUATOR_EDGES.labels("late").inc(late)

    def add(self, deltas: Sequence[WindowDelta], violations: Sequence[Violation]) -> None:
        limit = self.cfg.max_in_flight_bytes
        for key, value in edges.encode(deltas, violations):
            if self.pending_bytes + len(value) > limit:
                metrics.EVALUATOR_EDGES.labels("unproduced").inc()
                _limited.error("full", "Stage-2 records waiting for the broker are at their bound; dropped one.")
                continue
            self.pending.append((self.next_seq, key, value))
            self.next_seq += 1
            self.pending_bytes += len(value)
        self._wake.set()

    async def _connect_producer(self) -> AIOKafkaProducer:
        """A started producer, the edges topic there (created with ``create_topic``); retried."""
        while True:
            producer = AIOKafkaProducer(
                **connection(self.cfg, "-edges"),
                acks="all",
                linger_ms=self.cfg.linger_ms,
                request_timeout_ms=self.cfg.request_timeout_ms,
                max_request_size=edges.MAX_RECORD_BYTES + 64 * 1024,
            )
            try:
                await producer.start()
                await self._topic(producer)
                return producer
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await producer.stop()
                self.state = f"cannot produce to {self.topic}: {type(exc).__name__}: {exc}"
                _limited.error("connect", "Stage 2: %s; trying again.", self.state)
                await asyncio.sleep(RETRY_SECS)

    async def _topic(self, producer: AIOKafkaProducer) -> None:
        cfg = self.cfg
        configs = {} if cfg.edges_retention_ms is None else {"retention.ms": str(cfg.edges_retention_ms)}
        await ensure_topic(producer, cfg, self.topic, cfg.edges_partitions, configs, "stage 2's")
        self.partitions = len(await producer.partitions_for(self.topic))

    async def _produce(self, producer: AIOKafkaProducer) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                batch = list(self.pending)
                failed = await self._send(producer, batch)
                for _ in batch:
                    _, _, value = self.pending.popleft()
                    self.pending_bytes -= len(value)
                metrics.EVALUATOR_EDGES.labels("produced").inc(len(batch) - len(failed))
                if not failed:
                    self._backoff = BACKOFF_SECS[0]
                    continue
                for rec in reversed(failed):  # sent again first, in their order
                    self.pending.appendleft(rec)
                    self.pending_bytes += len(rec[2])
                backoff, self._backoff = self._backoff, min(BACKOFF_SECS[1], self._backoff * 2)
                await asyncio.sleep(backoff)

    def done_below(self) -> int:
        """Every record numbered below this was acknowledged by the broker (or dropped, counted):
        the evaluator commits a hops offset only once the records of its verdicts are."""
        return self.pending[0][0] if self.pending else self.next_seq

    async def _send(
        self, producer: AIOKafkaProducer, batch: list[tuple[int, bytes, bytes]]
    ) -> list[tuple[int, bytes, bytes]]:
        """Produce ``batch``; the records that failed (kept to be sent again)."""
        futures: list[asyncio.Future[Any]] = []
        try:
            for _, key, value in batch:
                futures.append(await producer.send(self.topic, value, key=key))
        except kerrors.KafkaError as exc:
            ERRORS.record("edges", exc, f"producing to {self.topic}")
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = [rec for rec, r in zip(batch, results, strict=False) if isinstance(r, BaseException)]
        failed += batch[len(futures) :]
        for r in results:
            if isinstance(r, BaseException):
                ERRORS.record("edges", r, f"producing to {self.topic}")
                break
        return failed

    # --- consuming --------------------------------------------------------------------------------
    async def _connect_consumer(self) -> AIOKafkaConsumer:
        cfg = self.cfg
        while True:
            consumer = AIOKafkaConsumer(
                **connection(cfg, "-edges"),
                group_id=cfg.group_id,  # the evaluators' group: each key owned by one member
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=cfg.session_timeout_ms,
                heartbeat_interval_ms=max(100, cfg.session_timeout_ms // 3),
                rebalance_timeout_ms=cfg.session_timeout_ms,
                fetch_max_wait_ms=FETCH_WAIT_MS,
            )
            consumer.subscribe([self.topic], listener=_Listener(self))
            self.consumer = consumer
            try:
                await consumer.start()
                return consumer
            except kerrors.KafkaError as exc:
                self.state = f"cannot reach the brokers: {exc}"
                await consumer.stop()
                await asyncio.sleep(RETRY_SECS)

    async def run(self) -> None:
        """Produce and consume until cancelled."""
        for what in ("produced", "judge", "replay", "late", "undecodable", "unproduced"):
            metrics.EVALUATOR_EDGES.labels(what)
        self.state = "connecting"
        self.producer = await self._connect_producer()
        self.ready.set()
        consumer = await self._connect_consumer()
        self.state = "joining the group"
        log.info("Stage 2: producing and consuming Kafka topic %s (group %s).", self.topic, self.cfg.group_id)
        producing = asyncio.ensure_future(self._produce(self.producer))
        try:
            while True:
                if producing.done():
                    producing.result()  # raises what ended it
                try:
                    batches = await consumer.getmany(timeout_ms=200, max_records=self.cfg.fetch_max_records)
                except kerrors.KafkaError as exc:
                    ERRORS.record("edges", exc, f"fetching from {self.topic}")
                    await asyncio.sleep(0.5)
                    continue
                if batches:
                    self.take(batches)
        finally:
            producing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producing

    def take(self, batches: dict[TopicPartition, Sequence[Any]]) -> None:
        """One fetch: replay what rebuilds a gained partition, absorb the rest. No await."""
        replay: tuple[list[WindowDelta], list[Violation]] = ([], [])
        live: tuple[list[WindowDelta], list[Violation]] = ([], [])
        for tp, records in batches.items():
            if tp not in self.owned:
                continue
            plan = self.plans.get(tp)
            for rec in records:
                self.positions[tp] = rec.offset + 1
                phase = "live"
                if plan is not None:
                    phase = plan.phase(rec.offset, rec.timestamp)
                    if phase == "skip":
                        continue
                    if phase == "live":
                        del self.plans[tp]
                        plan = None
                try:
                    d, v = edges.decode(rec.value or b"")
                except edges.EdgesError as exc:
                    metrics.EVALUATOR_EDGES.labels("undecodable").inc()
                    _limited.warning("undecodable", "Skipped a record of %s that is not ours: %s", self.topic, exc)
                    continue
                into = replay if phase == "replay" else live
                into[0].extend(d)
                into[1].extend(v)
                metrics.EVALUATOR_EDGES.labels("replay" if phase == "replay" else "judge").inc()
            self.absorbed[tp] = self.positions[tp]
        now = self.host.clock()
        engine = self.host.engine
        try:
            if replay[0] or replay[1]:
                engine.absorb_stage2(*replay, now, replay=True)
            if live[0] or live[1]:
                alerts = engine.absorb_stage2(*live, now)
                if alerts:
                    self.host.dispatch(alerts)
        except Exception as exc:
            ERRORS.record("evaluate", exc, f"absorbing {len(live[0]) + len(replay[0])} window deltas")

    # --- rebalance --------------------------------------------------------------------------------
    async def revoked(self, revoked: set[TopicPartition]) -> None:
        await self.commit(only=revoked, settled=False)

    async def assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self.consumer
        assert consumer is not None
        self.partitions = max(len(consumer.partitions_for_topic(self.topic) or ()), self.partitions)
        lost = self.owned - assigned
        kept = {tp for tp in assigned & self.owned if tp in self.positions}
        anew = await forgotten(consumer, kept, self.committed)
        kept -= anew
        for tp in anew:  # what was absorbed and committed there belongs to a log that is gone
            for d in (self.plans, self.positions, self.absorbed, self.committed, self._settled):
                d.pop(tp, None)
        gained = sorted(assigned - kept)
        if lost and self.partitions:
            ids, n = {tp.partition for tp in lost}, self.partitions
            drop: Callable[[str, str, str], bool] = lambda r, s, d: partition(edges.key(r, s, d), n) in ids  # noqa: E731
            released = self.host.engine.release_stage2(drop)
            log.info("Stage-2 partitions %s moved to another evaluator; %d windows forgotten.", sorted(ids), released)
        for tp in lost:
            for d in (self.plans, self.positions, self.absorbed, self.committed, self._settled):
                d.pop(tp, None)
        plans = await self._plan(consumer, gained) if gained else {}
        for tp in kept:
            consumer.seek(tp, self.positions[tp])
        for tp, (plan, start) in plans.items():
            self.plans[tp] = plan
            self.positions[tp] = start
            consumer.seek(tp, start)
        self.owned = set(assigned)
        metrics.EVALUATOR_EDGES_PARTITIONS.set(len(assigned))
        self.joined = True
        self.state = "ok"

    async def _plan(
        self, consumer: AIOKafkaConsumer, gained: list[TopicPartition]
    ) -> dict[TopicPartition, tuple[Plan, int]]:
        horizon = self.host.engine.stage2_horizon()
        since = int((time.time() - horizon) * 1000)
        committed = {tp: await consumer.committed(tp) for tp in gained}
        found = await consumer.offsets_for_times(dict.fromkeys(gained, since))
        ends = await consumer.end_offsets(gained)
        out: dict[TopicPartition, tuple[Plan, int]] = {}
        for tp in gained:
            hit = found.get(tp)
            start = hit.offset if hit is not None else ends[tp]
            c = committed[tp]
            if c is not None:
                start = min(start, c)
            out[tp] = (Plan(since, c), start)
            if c is not None and start < c:
                log.info(
                    "Stage-2 partition %d gained: replaying offsets %d to %d (the last %.0f s) before judging.",
                    tp.partition,
                    start,
                    c,
                    horizon,
                )
        return out

    # --- committing -------------------------------------------------------------------------------
    async def commit(self, only: set[TopicPartition] | None = None, settled: bool = True) -> None:
        """Commit what was absorbed (``settled``: as of the previous call, a commit interval ago,
        so the alerts it raised have reached the sinks' queues and been ticked through)."""
        consumer = self.consumer
        if consumer is None:
            return
        offsets = {
            tp: o
            for tp, o in (self._settled if settled else self.absorbed).items()
            if (only is None or tp in only) and tp in self.owned and o > self.committed.get(tp, -1)
        }
        self._settled = dict(self.absorbed)
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except kerrors.KafkaError as exc:
            ERRORS.record("edges", exc, f"committing offsets of {self.topic}")
            return
        self.committed.update(offsets)

    async def commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.commit_interval_ms / 1000)
            await self.commit()

    # --- stopping ---------------------------------------------------------------------------------
    async def flush(self, deadline: float) -> None:
        """Produce what is pending, until ``deadline`` (monotonic) or a failure; what the broker
        did not acknowledge stays pending."""
        producer = self.producer
        while producer is not None and self.pending and time.monotonic() < deadline:
            batch = list(self.pending)
            try:
                failed = await asyncio.wait_for(self._send(producer, batch), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                return
            for _ in batch:
                _, _, value = self.pending.popleft()
                self.pending_bytes -= len(value)
            for rec in reversed(failed):
                self.pending.appendleft(rec)
                self.pending_bytes += len(rec[2])
            if failed:
                return

    async def stop(self, deadline: float) -> None:
        """Produce what is pending (until ``deadline``, monotonic), commit all absorbed, leave."""
        producer = self.producer
        await self.flush(deadline)
        if self.pending:
            metrics.EVALUATOR_EDGES.labels("unproduced").inc(len(self.pending))
            log.warning("Stopping: %d stage-2 records could not be produced.", len(self.pending))
        await self.commit(settled=False)
        if self.consumer is not None:
            with contextlib.suppress(kerrors.KafkaError):
                await self.consumer.stop()
        if producer is not None:
            with contextlib.suppress(kerrors.KafkaError):
                await producer.stop()
