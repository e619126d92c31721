"""The evaluator role of the distributed mode (``meshaudit run --role evaluator``): a member of a
Kafka consumer group over the hops topic (``distributed.hops_topic``, hop batches keyed by
correlation key, so every piece of evidence about one request is in one partition). Each member
owns some partitions and runs the engine on their hops (stage 1: pairing, span joins, source
naming, per-hop rules; the per-edge counts), and stage 2 (per-edge windows and alert windows) of
the (rule, source, destination) keys it owns on the edges topic, on every member's counts and
violations (``meshaudit.runtime.stage2``), and hands its alerts to its own sinks. It is the same
:class:`~meshaudit.pipeline.Pipeline` as one process, without receivers: hops come from the topic
instead.

Senders' claims (log_source_mismatch) come in records of their own, in the partition of their
sender's principal: judged (``Engine.claims``, the alert one process raises) and committed like
hops, and skipped when replayed (their previous owner judged them).

Delivery: at least once. An offset is committed only once every hop before it has had its
verdict: evaluated, and every wait it started (a span's grace for its access log, a plaintext
hop's wait for its client) over, plus two ticks (``Engine.longest_wait``). A member that dies
loses no judgement: the next owner judges again from the committed offset, and alerts raised
twice carry the same id (windows are named by data time, ``Aggregator.align``), so consumers
deduplicate them.

State on rebalance: stage-1 state is a function of the last TTL seconds of input
(``Engine.corr.ttl``). A member that gains a partition seeks to ``offsets_for_times(now - ttl)``
and *replays* the records before the committed offset (``Engine.replay``: indexed, never
judged), then judges from the committed offset on: a span whose access log came before the
failover, or a plaintext hop whose client entry did, is joined as its previous owner would have
joined it, and no missing_access_log or unnamed plaintext_hop is raised from the gap. Records
older than ``now - ttl`` are skipped even when the broker answers ``offsets_for_times`` coarsely
(Tansu answers the partition's first offset). A partition with no committed offset (a new group)
is replayed for a TTL and judged from ``now - ttl`` on.

A partition this member loses: its settled offsets are committed on revoke, and the hops waiting
for evidence from it are dropped unjudged (``Engine.release``): their evidence now goes to the
new owner, and their records, not committed yet (their waits had not ended), are judged there
again with all of it. Judging them here would alert with part of the evidence. A partition kept
across a rebalance keeps its state and position.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from aiohttp import web
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka import errors as kerrors

from meshaudit import __version__, health, metrics
from meshaudit.config import Config, DistributedConfig, Policy
from meshaudit.engine.core import Engine
from meshaudit.engine.sources import Claim
from meshaudit.guard import ERRORS, CoreTasks
from meshaudit.model import Alert, Hop
from meshaudit.pipeline import MAX_BATCH, Pipeline
from meshaudit.runtime.baseline_topic import SharedBaseline
from meshaudit.runtime.common import (
    SHUTDOWN_SECS,
    Alone,
    dispatch_to,
    lateness,
    readiness_of,
    serve_http,
    start_sinks,
    tune_gc,
)
from meshaudit.runtime.kafka import connection, forgotten
from meshaudit.runtime.stage2 import Stage2
from meshaudit.sinks import build_sinks
from meshaudit.wire import hops as wire
from meshaudit.wire.partition import partition

log = logging.getLogger("meshaudit")

RETRY_SECS: Final = 2.0  # between attempts to reach the brokers at start
SETTLE_MARGIN_SECS: Final = 0.5  # past the longest wait and two ticks, before an offset is committed
# A record produced this long before a fetch response may still be on its way to the broker: its
# timestamp is when a receiver's producer took it (CreateTime), and a receiver's batching plus a
# busy broker's append can take longer than that. A wait that ended while its evidence was on
# its way would alert with part of it (a plaintext hop named by its address alone: seen with
# 0.25 s on a loaded 2-core machine). The cost: verdicts this much later than in one process.
LATE_SECS: Final = 1.0
# How long the broker may hold a fetch for more data. It adds to the time between two pieces of
# evidence about one request (waits are counted from when a hop is evaluated): aiokafka's 500 ms
# would eat most of plaintext_hop's attribution wait.
FETCH_WAIT_MS: Final = 50


def partition_of(hop: Hop, partitions: int) -> int:
    """The partition a receiver produced ``hop`` to: Kafka's default partitioner (murmur2) over
    its correlation key (:func:`meshaudit.wire.hops.correlation_key`)."""
    return partition(wire.correlation_key(hop), partitions)


class Catchup(NamedTuple):
    """How a member reads a partition it gained, until it judges: records older than ``since_ms``
    are skipped; then records before ``judge_from`` (the committed offset), or with no committed
    offset those older than ``judge_after_ms``, are replayed (indexed, not judged); the first
    record past that ends the catch-up."""

    since_ms: int
    judge_from: int | None
    judge_after_ms: int

    def phase(self, offset: int, timestamp_ms: int) -> str:
        if timestamp_ms < self.since_ms and (self.judge_from is None or offset < self.judge_from):
            return "skip"
        if self.judge_from is not None:
            return "replay" if offset < self.judge_from else "judge"
        return "replay" if timestamp_ms < self.judge_after_ms else "judge"


def consumer_options(cfg: DistributedConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {
        **connection(cfg),
        "group_id": cfg.group_id,
        "client_id": "meshaudit-evaluator",
        "enable_auto_commit": False,  # committed after the verdicts (at-least-once)
        "auto_offset_reset": "earliest",  # a seek past the log's start: its first record
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": max(100, cfg.session_timeout_ms // 3),
        "rebalance_timeout_ms": cfg.session_timeout_ms,
        "max_partition_fetch_bytes": cfg.fetch_max_bytes,
        "fetch_max_bytes": cfg.fetch_max_bytes,
        "fetch_max_wait_ms": FETCH_WAIT_MS,
    }
    return opts


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type hints
    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.evaluator.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.evaluator.assigned(set(assigned))


class Evaluator(Alone):
    """One member of the evaluator group. It is also the pipeline's
    :class:`~meshaudit.pipeline.Peers`: none (all evidence about a request is in its partition),
    but learn mode's baseline, which the members share (``runtime/baseline_topic.py``)."""

    baseline_shared = True

    def __init__(
        self, config: Config, policy: Policy, config_path: str | None, overrides: dict[str, str] | None = None
    ) -> None:
        self.cfg = config.distributed
        self.sinks = build_sinks(config.sinks)
        self.pipeline = Pipeline(config, policy, config_path, self, self.dispatch, overrides)
        self.tasks = CoreTasks()
        self.consumer: AIOKafkaConsumer | None = None
        self.owned: set[TopicPartition] = set()
        self.partitions = 0  # of the topic, for ``partition_of``
        self.positions: dict[TopicPartition, int] = {}  # the next offset to read, per owned partition
        self.catchup: dict[TopicPartition, Catchup] = {}
        # Per owned partition: (clock when evaluated, next offset) of judged records, oldest first;
        # an entry is committed once every wait it may have started is over (``settle_secs``).
        self.pending: dict[TopicPartition, deque[tuple[float, int]]] = {}
        self.committed: dict[TopicPartition, int] = {}
        # Settled offsets waiting for stage 2's records of their verdicts (``commit_settled``):
        # (stage 2's next record number when they settled, offsets), oldest first.
        self.to_commit: deque[tuple[int, dict[TopicPartition, int]]] = deque()
        self.seen_at: dict[TopicPartition, float] = {}  # the time of the last record read, per partition
        self.rebalancing = False
        self._clock = time.time()
        self.state = "not started"
        self.joined = False
        r = config.rules.unexpected_edge
        self.shared: SharedBaseline | None = None
        if r.enabled and r.mode == "learn":
            self.shared = SharedBaseline(config, lambda: self.engine, self.clock)
        self.stage2 = Stage2(self.cfg, self)  # per-edge and alert windows across the group

    @property
    def engine(self) -> Engine:
        return self.pipeline.engine

    # --- Peers: none -----------------------------------------------------------------------------
    def attach(self, pipeline: Any) -> None:
        pipeline.engine.agg.align()  # alert ids by data time: the same in every member
        pipeline.engine.split(lateness(pipeline.config.engine.tick_ms))  # stage 2 across the group

    def share(self, engine: Engine) -> None:
        self.stage2.collect(engine)  # deltas and violations to the edges topic

    def periodic(self, engine: Engine) -> None:
        engine.take_tally()  # no /graph here: taken, so it does not grow

    # --- alerts and health -----------------------------------------------------------------------
    def dispatch(self, alerts: list[Alert]) -> None:
        dispatch_to(self.sinks, alerts)

    def _consumer_state(self) -> str:
        if self.joined:
            return "ok"
        if not self.stage2.ready.is_set():
            return f"waiting for the edges topic (stage 2): {self.stage2.state}"
        return self.state

    def readiness(self) -> tuple[dict[str, str], dict[str, str]]:
        dead = {**self.pipeline.core.dead(), **self.tasks.dead()}
        gates = {
            "engine": "; ".join(f"{k} {v}" for k, v in dead.items()) or "ok",
            "consumer": self._consumer_state(),
            **({"baseline": self.shared.state} if self.shared is not None else {}),
        }
        gates_, sinks = readiness_of(gates, self.sinks)
        sinks["edges_topic"] = self.stage2.state
        return gates_, sinks

    def liveness(self) -> dict[str, str]:
        return {**self.pipeline.core.dead(), **self.tasks.dead()}

    def clock(self) -> float:
        """The evaluator's now, for ticks and commits: the time (receivers' clock: records carry
        their produce time) up to which every owned partition has been read. A caught-up
        partition is read up to its last fetch response (less ``LATE_SECS``), one behind up to
        its last record read. It stands still while a rebalance is under way and while a
        partition is behind, and never goes back: a wait for evidence (a span's grace, a
        plaintext hop's wait for its client) does not end while the evidence may sit unread in
        the topic, whether the consumer is behind, catching up after a failover or paused by a
        rebalance. Hops are evaluated at their records' time (``take``)."""
        consumer = self.consumer
        if consumer is None or self.rebalancing or not self.joined:
            return self._clock
        mark = time.time()
        for tp in self.owned:
            high = consumer.highwater(tp)
            polled = consumer.last_poll_timestamp(tp)
            if high is not None and polled is not None and self.positions.get(tp, 0) >= high:
                mark = min(mark, polled / 1000 - LATE_SECS)
                continue
            seen = self.seen_at.get(tp)
            if seen is None:  # not read yet: hold
                return self._clock
            mark = min(mark, seen)
        self._clock = max(self._clock, mark)
        return self._clock

    def settle_secs(self) -> float:
        """How long after its evaluation a record has had every verdict it can cause."""
        return self.engine.longest_wait() + 2 * self.pipeline.config.engine.tick_ms / 1000 + SETTLE_MARGIN_SECS

    # --- rebalance -------------------------------------------------------------------------------
    async def revoked(self, revoked: set[TopicPartition]) -> None:
        """Before a rebalance: commit what has settled in the partitions going back to the group
        (the next owner starts there). Their state stays until the new assignment says which
        partitions are really lost (an eager rebalance revokes every partition first)."""
        self.rebalancing = True
        await self.commit_settled(only=revoked)

    async def assigned(self, assigned: set[TopicPartition]) -> None:
        """The new assignment: forget what was lost, keep what stays, plan a catch-up for what
        was gained. The plans are made first (they ask the brokers); the state changes and seeks
        come after, with no await between them: records the consumer returns meanwhile for a
        gained partition are not taken (its position is set again after), so none is judged
        before the records its catch-up replays."""
        consumer = self.consumer
        assert consumer is not None
        metrics.EVALUATOR_REBALANCES.inc()
        topic_partitions = consumer.partitions_for_topic(self.cfg.hops_topic) or set()
        self.partitions = max(len(topic_partitions), self.partitions)
        lost = self.owned - assigned
        kept = {tp for tp in assigned & self.owned if tp in self.positions}
        anew = await forgotten(consumer, kept, self.committed)
        kept -= anew
        gained = sorted(assigned - kept)
        self.owned -= lost
        if lost:
            self._forget(lost)
        for tp in anew:  # what this member read and committed there belongs to a log that is gone
            self.pending.pop(tp, None)
            self.committed.pop(tp, None)
            for _, offsets in self.to_commit:
                offsets.pop(tp, None)
        plans = await self._plan(consumer, gained) if gained else {}
        for tp in kept:  # state and position stay (the consumer resets positions on a rebalance)
            consumer.seek(tp, self.positions[tp])
        for tp, (plan, start) in plans.items():
            self.catchup[tp] = plan
            self.positions[tp] = start
            self.seen_at.pop(tp, None)
            consumer.seek(tp, start)
        self.owned = set(assigned)
        metrics.EVALUATOR_PARTITIONS.set(len(assigned))
        self.joined = True
        self.state = "ok"
        self.rebalancing = False

    def _forget(self, lost: set[TopicPartition]) -> None:
        """Partitions now another member's: their waiting hops go unjudged, and what this member
        kept about reading them."""
        if self.partitions:
            ids = {tp.partition for tp in lost}
            n = self.partitions
            released = self.engine.release(lambda h: partition_of(h, n) in ids)
            metrics.EVALUATOR_RELEASED.inc(released)
            log.info(
                "Partitions moved to another evaluator: %s; %d hops waiting for their evidence were dropped "
                "unjudged (their records are judged again by the new owner).",
                sorted(ids),
                released,
            )
        for tp in lost:
            self.seen_at.pop(tp, None)
            self.pending.pop(tp, None)
            self.positions.pop(tp, None)
            self.catchup.pop(tp, None)
            self.committed.pop(tp, None)

    async def _plan(
        self, consumer: AIOKafkaConsumer, gained: list[TopicPartition]
    ) -> dict[TopicPartition, tuple[Catchup, int]]:
        """Where to start reading each gained partition, and from where to judge (``Catchup``)."""
        now_ms = int(time.time() * 1000)
        ttl_ms = int(self.engine.corr.ttl * 1000)
        committed: dict[TopicPartition, int | None] = {}
        for tp in gained:
            committed[tp] = await consumer.committed(tp)
        # With a committed offset, the TTL before now is replayed up to it; without one (a new
        # group, or an owner that died before its first commit) the last TTL is judged, after
        # the TTL before it is replayed.
        since = {tp: now_ms - (ttl_ms if committed[tp] is not None else 2 * ttl_ms) for tp in gained}
        found = await consumer.offsets_for_times(since)
        ends = await consumer.end_offsets(gained)
        plans: dict[TopicPartition, tuple[Catchup, int]] = {}
        for tp in gained:
            c = committed[tp]
            hit = found.get(tp)
            start = hit.offset if hit is not None else ends[tp]
            if c is not None:
                start = min(start, c)
            plans[tp] = (Catchup(since[tp], c, now_ms - ttl_ms), start)
            log.info(
                "Partition %d gained: replaying from offset %d (the last %.0f s), judging from %s.",
                tp.partition,
                start,
                self.engine.corr.ttl,
                f"the committed offset {c}" if c is not None else "records of the last TTL (no committed offset)",
            )
        return plans

    # --- consuming -------------------------------------------------------------------------------
    async def _connect(self) -> AIOKafkaConsumer:
        """The consumer, subscribed; retried until the brokers answer (the process stays up and
        says why on /readyz meanwhile)."""
        while True:
            consumer = AIOKafkaConsumer(**consumer_options(self.cfg))
            consumer.subscribe([self.cfg.hops_topic], listener=_Listener(self))
            self.consumer = consumer
            try:
                await consumer.start()
                self.state = "joining the group"
                log.info("Evaluator consuming %s as a member of group %s.", self.cfg.hops_topic, self.cfg.group_id)
                return consumer
            except kerrors.KafkaError as exc:
                self.state = f"cannot reach the brokers: {exc}"
                log.error("Evaluator cannot reach the brokers %s: %s; retrying.", self.cfg.bootstrap_servers, exc)
                await consumer.stop()
                await asyncio.sleep(RETRY_SECS)

    async def _consume(self) -> None:
        # No hop is judged before its violations can go out (stage 2's topic: the hops wait in
        # theirs meanwhile, retained) and before the learned baseline is read.
        if not self.stage2.ready.is_set():
            self.state = "waiting for the edges topic (stage 2)"
            await self.stage2.ready.wait()
        if self.shared is not None:
            self.state = "waiting for the learned baseline"
            await self.shared.ready.wait()
        consumer = await self._connect()
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=self.cfg.fetch_max_records)
            except kerrors.KafkaError as exc:  # the client reconnects by itself
                ERRORS.record("consume", exc, "fetching hops from the brokers")
                await asyncio.sleep(0.5)
                continue
            if batches:
                self.take(batches, time.time())

    def take(self, batches: dict[TopicPartition, Sequence[Any]], now: float) -> None:
        """One fetch: replay what rebuilds state, index evidence copies, judge the rest, note what
        to commit. No await: a rebalance cannot come between the engine calls and the positions
        they move."""
        replay: list[Hop] = []
        judge: list[Hop] = []
        evidence: list[Hop] = []
        claims: list[Claim] = []  # senders' (log_source_mismatch): judged like hops, never replayed
        judged_to: dict[TopicPartition, int] = {}
        latest = 0
        for tp, records in batches.items():
            if tp not in self.owned:
                continue
            plan = self.catchup.get(tp)
            for rec in records:
                self.positions[tp] = rec.offset + 1
                latest = max(latest, rec.timestamp)
                if plan is not None:
                    phase = plan.phase(rec.offset, rec.timestamp)
                    if phase == "skip":
                        continue
                    # Evidence copies are replayed too (the previous owner had them indexed), a
                    # record of claims is not (its previous owner judged them).
                    if phase == "replay":
                        replay.extend(self._decode(rec.value)[0])
                        continue
                    del self.catchup[tp]  # caught up: judged from here on
                    plan = None
                hops, copies = self._decode(rec.value, claims)
                if copies:
                    evidence.extend(hops[len(hops) - copies :])
                    del hops[len(hops) - copies :]
                judge.extend(hops)
                judged_to[tp] = rec.offset + 1
            if records:
                self.seen_at[tp] = records[-1].timestamp / 1000
        # Evaluated at the time the last of these records was produced (receive time at the
        # receivers): waits start then, and end by ``clock``.
        now = max(latest / 1000, self._clock) if latest else now
        if replay:
            metrics.EVALUATOR_HOPS.labels("replay").inc(len(replay))
            try:
                self.engine.replay(replay, now)
            except Exception as exc:
                ERRORS.record("evaluate", exc, f"replaying {len(replay)} hops")
        if evidence:  # before the hops judged with it: a span joins its copied access log at once
            metrics.EVALUATOR_HOPS.labels("evidence").inc(len(evidence))
            try:
                self.engine.evidence(evidence, now)
            except Exception as exc:
                ERRORS.record("evaluate", exc, f"indexing {len(evidence)} evidence copies")
        if claims:
            self.pipeline.claims(claims, now)
        if judge:
            metrics.EVALUATOR_HOPS.labels("judge").inc(len(judge))
            for i in range(0, len(judge), MAX_BATCH):
                self.pipeline.evaluate(judge[i : i + MAX_BATCH], now)
        for tp, offset in judged_to.items():
            self.pending.setdefault(tp, deque()).append((now, offset))

    def _decode(self, value: bytes | None, claims: list[Claim] | None = None) -> tuple[list[Hop], int]:
        """A record's hops and how many of them, at the end, are evidence copies; with ``claims``,
        a record of senders' claims (no hops) adds them to it."""
        if not value:
            return [], 0
        try:
            hops, copies = wire.decode_split(value)
            if not hops and claims is not None:
                claims.extend(wire.decode_claims(value))
            return hops, copies
        except wire.WireError as exc:
            metrics.EVALUATOR_UNDECODABLE.inc()
            log.warning("Skipped a record of %s that is not a hop batch: %s", self.cfg.hops_topic, exc)
            return [], 0

    # --- committing ------------------------------------------------------------------------------
    async def commit_settled(self, only: set[TopicPartition] | None = None) -> None:
        """Commit, per owned partition, the offset past the last judged record whose verdicts are
        all out (``settle_secs`` after its evaluation, by ``clock``)."""
        consumer = self.consumer
        if consumer is None:
            return
        limit = self.clock() - self.settle_secs()
        settled: dict[TopicPartition, int] = {}
        for tp, queue in self.pending.items():
            if only is not None and tp not in only:
                continue
            offset = None
            while queue and queue[0][0] <= limit:
                offset = queue.popleft()[1]
            if offset is not None:
                settled[tp] = offset
        # Their verdicts are out, but violations and window counts travel on stage 2's topic: an
        # offset is committed once every record made so far there is acknowledged (else a crash
        # would lose what those records carried, with their hops no longer to be judged again).
        if settled:
            self.to_commit.append((self.stage2.next_seq, settled))
        offsets: dict[TopicPartition, int] = {}
        done = self.stage2.done_below()
        while self.to_commit and self.to_commit[0][0] <= done:
            for tp, offset in self.to_commit.popleft()[1].items():
                if tp in self.owned and offset > max(self.committed.get(tp, -1), offsets.get(tp, -1)):
                    offsets[tp] = offset
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except kerrors.KafkaError as exc:  # committed later, or judged again by the next owner
            ERRORS.record("consume", exc, "committing offsets")
            return
        self.committed.update(offsets)

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.commit_interval_ms / 1000)
            await self.commit_settled()

    # --- lifecycle -------------------------------------------------------------------------------
    def reload(self) -> None:
        if self.reload_pipeline():
            log.info("Configuration reloaded from %s; windows, waits and indexes are kept.", self.pipeline.config_path)

    async def run(self) -> int:
        p = self.pipeline
        cfg = p.config
        loop = asyncio.get_running_loop()
        if not await start_sinks(self.sinks):
            return 1
        p.clock = self.clock
        p.start()
        runners: list[web.AppRunner] = []
        try:
            app = health.build_app(self.readiness, liveness=self.liveness)
            p.bound["metrics"] = await serve_http(app, cfg.listen.metrics, runners)
        except OSError as exc:
            log.error("Cannot listen: %s", exc)
            await self._shutdown(runners)
            return 1
        metrics.init_series([*(r.name for r in p.engine.rule_classes), "config_invalid"])
        for phase in ("replay", "judge", "evidence"):
            metrics.EVALUATOR_HOPS.labels(phase)
        if self.shared is not None:
            self.tasks.start(self.shared.run(), "baseline")
        self.tasks.start(self._consume(), "consumer")
        self.tasks.start(self._commit_loop(), "commit")
        self.tasks.start(self.stage2.run(), "edges")
        self.tasks.start(self.stage2.commit_loop(), "edges_commit")
        tune_gc()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        out = "stdout" if cfg.sinks.jsonl.path == "-" else cfg.sinks.jsonl.path
        print(
            f"meshaudit {__version__} running as an evaluator.\n"
            f"  hops from Kafka                       -> topic {self.cfg.hops_topic} at "
            f"{', '.join(self.cfg.bootstrap_servers)}, group {self.cfg.group_id}\n"
            f"  per-edge and alert windows (stage 2)  -> topic {self.cfg.edges_topic}, the same group\n"
            f"  metrics and health                    -> http://{p.bound['metrics']}/metrics, /healthz, /readyz\n"
            f"  alerts (JSON lines)                   -> {out}",
            file=sys.stderr,
            flush=True,
        )
        await p.stopped()
        log.info("Stopping: consuming first, then the waits end, offsets are committed, then the sinks.")
        await self._shutdown(runners)
        return p.exit_code

    async def _shutdown(self, runners: list[web.AppRunner]) -> None:
        """Stop fetching; commit what has settled; leave the group (the partitions move at once);
        then the engine and the sinks. The records judged in the last ``settle_secs`` stay
        uncommitted: their waits count in the evaluator's clock, which stands still once nothing is
        fetched (waiting longer would end none of them), and their partitions' next owners judge
        them again with all the evidence (alerts raised twice carry the same ids)."""
        deadline = time.monotonic() + SHUTDOWN_SECS
        await self.tasks.stop()
        self.pipeline.tick(self.clock())  # the last counts handed out
        await self.stage2.flush(deadline - 3)  # the records of what settled, before it is committed
        if self.consumer is not None:
            await self.commit_settled()
            try:
                await self.consumer.stop()
            except kerrors.KafkaError as exc:
                log.warning("Leaving the consumer group failed (its members notice after the session timeout): %s", exc)
        await self.stage2.stop(deadline - 2)
        await self.pipeline.stop()
        await asyncio.gather(*(s.shutdown(deadline) for s in self.sinks))
        for r in runners:
            await r.cleanup()


def run_evaluator(config: Config, policy: Policy, path: str | None, overrides: dict[str, str]) -> int:
    import uvloop

    async def main() -> int:
        return await Evaluator(config, policy, path, overrides).run()

    return uvloop.run(main())
