"""Learn mode across the evaluators of the distributed mode: one baseline, shared through a
compacted topic (``distributed.baseline_topic``, one partition, ``cleanup.policy=compact``).

Each evaluator learns from the hops of its own partitions; an edge that only another member saw
while learning must not alert here afterwards. So every member:

- **at start**, before it judges any hop, reads the whole topic (every edge any member learned,
  and the routes with ``learn_routes``) and seeds its engine with it. The window opened at the
  first edge learned anywhere (the least ``first_seen`` in the topic) and is over once the
  evaluator's clock (the receivers' time, as every wait) is ``learn_secs`` past it: a member
  started after that, or again, learns nothing and alerts at once on an edge not in the baseline;
- **once a second**, produces what its engine learned (one record per edge, keyed by it, so
  compaction keeps one per edge), reads what the others produced and merges it into its engine,
  and ends the learning window when its clock says so;
- keeps, with ``state_file``, the merged baseline in that file too (written when the window
  ends and again for edges learned by others just before), for ``meshaudit baseline export``.

The topic holds at most ``engine.store_max_items`` edges (more are not learned, as in one
process). Records are ours but the topic is reachable by whoever may write to the cluster's
Kafka: one that is not a baseline record is skipped and counted
(``baseline_topic_records_total{result="invalid"}``).

After the window ends a member may still receive, within a second or two, an edge another
member learned just before the end: the rule holds requests on unknown edges for a few seconds
after the end (``HOLD_SECS`` in unexpected_edge) and judges them against the merged baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any, Final

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import errors as kerrors

from meshaudit import metrics
from meshaudit.baseline import Baseline, BaselineFile
from meshaudit.config import Config
from meshaudit.engine.api import Edge, Route
from meshaudit.engine.core import Engine, Facts
from meshaudit.guard import ERRORS
from meshaudit.runtime.kafka import connection, ensure_topic

log = logging.getLogger("meshaudit")

EVERY_SECS: Final = 1.0  # learned edges out, the others' in, the window checked
RETRY_SECS: Final = 2.0  # between attempts to reach the brokers
MAX_NAME: Final = 4096  # bytes of a party key or a route field in a record


def edge_record(edge: Edge) -> tuple[bytes, bytes]:
    """The record of one learned edge: keyed by the edge (compaction keeps one per edge)."""
    src, dst, first_seen = edge
    return orjson.dumps(["edge", src, dst]), orjson.dumps({"first_seen": first_seen})


def route_record(route: Route) -> tuple[bytes, bytes]:
    dst, method, path = route
    return orjson.dumps(["route", dst, method, path]), b"{}"


def parse(key: bytes | None, value: bytes | None) -> Edge | Route:
    """An edge ``(src, dst, first_seen)`` or a route ``(dst, method, path)``; ValueError else."""
    if not key or len(key) > 3 * MAX_NAME or value is None or len(value) > 1024:
        raise ValueError("not a baseline record")
    k = orjson.loads(key)
    if not isinstance(k, list) or not all(isinstance(x, str) and x for x in k[1:]):
        raise ValueError("not a baseline key")
    if k[:1] == ["edge"] and len(k) == 3:
        v = orjson.loads(value)
        t = v.get("first_seen") if isinstance(v, dict) else None
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
            raise ValueError("an edge without a first_seen time")
        return k[1], k[2], float(t)
    if k[:1] == ["route"] and len(k) == 4:
        return k[1], k[2], k[3]
    raise ValueError("not a baseline key")


class SharedBaseline:
    """The evaluator's side of the shared baseline (a core task: :meth:`run`)."""

    def __init__(self, config: Config, engine: Callable[[], Engine], clock: Callable[[], float]) -> None:
        self.config = config
        self.cfg = config.distributed
        self._engine = engine  # the running engine (a reload keeps it)
        self.clock = clock
        limit = config.engine.store_max_items
        self.baseline = Baseline(limit, limit)
        self.over = False
        self.ready = asyncio.Event()  # the topic was read to its end and the engine seeded
        self.state = "reading the learned baseline"
        r = config.rules.unexpected_edge
        self.learn_secs = float(r.learn_secs)
        self.file = BaselineFile(r.state_file) if r.state_file is not None else None
        self._unsent: list[tuple[bytes, bytes]] = []  # learned here, not acknowledged yet
        self.tp = TopicPartition(self.cfg.baseline_topic, 0)

    # --- connection ------------------------------------------------------------------------------
    async def _connect(self) -> tuple[AIOKafkaConsumer, AIOKafkaProducer]:
        """Both clients started and the topic there (created with ``create_topic``); retried."""
        while True:
            opts = connection(self.cfg)
            consumer = AIOKafkaConsumer(
                **opts, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=100
            )
            producer = AIOKafkaProducer(**opts, acks="all", linger_ms=0)
            try:
                await consumer.start()
                await producer.start()
                await ensure_topic(
                    producer, self.cfg, self.cfg.baseline_topic, 1, {"cleanup.policy": "compact"}, "compacted"
                )
                consumer.assign([self.tp])
                await consumer.seek_to_beginning(self.tp)
                return consumer, producer
            except asyncio.CancelledError:
                await self._close(consumer, producer)
                raise
            except Exception as exc:
                await self._close(consumer, producer)
                self.state = f"cannot read the learned baseline from {self.cfg.baseline_topic}: {exc}"
                log.error("Evaluator %s; retrying.", self.state)
                await asyncio.sleep(RETRY_SECS)

    @staticmethod
    async def _close(consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        for client in (consumer, producer):
            with contextlib.suppress(Exception):
                await client.stop()

    # --- the loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        consumer, producer = await self._connect()
        try:
            end = (await consumer.end_offsets([self.tp]))[self.tp]
            while await consumer.position(self.tp) < end:
                self._read(await consumer.getmany(self.tp, timeout_ms=500))
            self._seed()
            while True:
                await asyncio.sleep(EVERY_SECS)
                await self._send(producer)
                self._merge(self._read(await consumer.getmany(self.tp, timeout_ms=0)))
                self._window()
        finally:
            await self._close(consumer, producer)

    def _read(self, batches: dict[TopicPartition, list[Any]]) -> tuple[list[Edge], bool]:
        """Records into the baseline; the edges new to it, and whether a route was new."""
        new: list[Edge] = []
        routes = False
        for records in batches.values():
            for rec in records:
                try:
                    item = parse(rec.key, rec.value)
                except ValueError as exc:
                    metrics.BASELINE_TOPIC_RECORDS.labels("invalid").inc()
                    log.warning("Skipped a record of %s at offset %d: %s", self.cfg.baseline_topic, rec.offset, exc)
                    continue
                metrics.BASELINE_TOPIC_RECORDS.labels("read").inc()
                if isinstance(item[2], float):
                    edge: Edge = (item[0], item[1], item[2])
                    if self.baseline.add_edge(*edge):
                        new.append(edge)
                elif self.baseline.routes.add(item[0], item[1], str(item[2])):
                    routes = True
        return new, routes

    def _started(self) -> float | None:
        """When the learning window opened: the first edge any member learned."""
        return min(self.baseline.edges.values(), default=None)

    def _seed(self) -> None:
        started = self._started()
        self.over = started is not None and self.clock() - started >= self.learn_secs
        edges = [(s, d, t) for (s, d), t in self.baseline.edges.items()]
        self._engine().seed(edges, self.over)
        self.ready.set()
        self.state = "ok"
        log.info(
            "Learned baseline read from %s: %d edges%s.",
            self.cfg.baseline_topic,
            len(edges),
            ", learning is over" if self.over else "; learning goes on",
        )

    async def _send(self, producer: AIOKafkaProducer) -> None:
        edges, routes = self._engine().take_learned()
        for edge in edges:
            self.baseline.add_edge(*edge)
        for route in routes:
            self.baseline.routes.add(*route)
        self._unsent += [edge_record(e) for e in edges] + [route_record(r) for r in routes]
        if not self._unsent:
            return
        try:
            sent = [
                await producer.send(self.cfg.baseline_topic, value, key=key, partition=0) for key, value in self._unsent
            ]
            await asyncio.gather(*sent)
        except kerrors.KafkaError as exc:  # kept, sent again next time (a record twice is harmless)
            ERRORS.record("consume", exc, f"producing {len(self._unsent)} learned edges and routes")
            return
        metrics.BASELINE_TOPIC_RECORDS.labels("produced").inc(len(self._unsent))
        self._unsent = []

    def _merge(self, read: tuple[list[Edge], bool]) -> None:
        new, routes = read
        if new:
            facts = Facts()
            facts.learned = new
            self._engine().absorb(facts, self.clock())
        if self.over and (new or routes) and self.file is not None:
            self.file.request()  # learned elsewhere just before the window ended: saved again

    def _window(self) -> None:
        now = self.clock()
        started = self._started()
        if not self.over and started is not None and now - started >= self.learn_secs:
            self.over = True
            self._engine().seed((), True)
            log.info(
                "Learning window over: %d edges learned by the evaluators; edges not among them alert from now on.",
                len(self.baseline),
            )
            if self.file is not None:
                self.file.request()
        f = self.file
        if f is not None and f.pending:
            f.flush(lambda: self.baseline, now)
