"""Helpers for sink tests: alerts with known ids, metric reads, and real clients that read
back what reached Kafka (a consumer with ``assign()``: no group join) or MQTT."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiomqtt
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from meshaudit import metrics
from meshaudit.model import Alert, alert_id, identity
from meshaudit.sinks.base import Sink


def make_alert(n: int, rule: str = "plaintext_hop", dst: str = "payments", severity: str = "high") -> Alert:
    now = time.time()
    src = identity(service=f"client{n % 3}", namespace="shop")
    dest = identity(service=dst, namespace="shop")
    return Alert(
        id=alert_id(rule, src.key, dest.key, now, n),
        rule=rule,
        severity=severity,
        summary=f"Plaintext request number {n} from {src.key} to {dest.key}.",
        source=src,
        destination=dest,
        count=1,
        first_seen=now,
        last_seen=now,
        window_secs=60,
        examples=[],
        detail=None,
        emitted_at=now,
    )


def unique(prefix: str) -> str:
    """A name no other test uses: sink names label global metrics, topics live in a shared broker."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def metric(name: str, sink: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, {"sink": sink, **labels})
    return value or 0.0


async def wait_for(predicate: Callable[[], bool], secs: float, what: str) -> None:
    end = time.monotonic() + secs
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {secs}s waiting for {what}")
        await asyncio.sleep(0.05)


async def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


@dataclass
class Record:
    key: bytes
    value: bytes
    headers: dict[str, bytes]
    partition: int


def tls_options(ssl_context: ssl.SSLContext | None) -> dict[str, object]:
    """aiokafka client options for TLS with ``ssl_context`` (None: plaintext)."""
    if ssl_context is None:
        return {}
    return {"security_protocol": "SSL", "ssl_context": ssl_context}


class KafkaReader:
    """Reads every partition of a topic from the beginning, live, into ``records``."""

    def __init__(self, bootstrap: str, topic: str, ssl_context: ssl.SSLContext | None = None) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.ssl_context = ssl_context
        self.records: list[Record] = []
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> KafkaReader:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, **tls_options(self.ssl_context)
        )
        await consumer.start()
        self._consumer = consumer
        try:
            await consumer.topics()  # fetches metadata; partitions_for_topic only reads the cache
            parts = consumer.partitions_for_topic(self.topic) or set()
        except BaseException:
            await consumer.stop()
            raise
        if not parts:
            await consumer.stop()
            raise AssertionError(f"topic {self.topic} has no partitions")
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._read(consumer))
        return self

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            for tp, msgs in batches.items():
                for m in msgs:
                    self.records.append(Record(m.key, m.value, {k: bytes(v) for k, v in m.headers}, tp.partition))

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    def ids(self) -> list[str]:
        return [orjson.loads(r.value)["id"] for r in self.records]


@contextlib.asynccontextmanager
async def mqtt_reader(
    port: int,
    topic: str,
    client_id: str | None = None,
    clean: bool = True,
    tls_context: ssl.SSLContext | None = None,
) -> AsyncIterator[list[aiomqtt.Message]]:
    """Subscribe (QoS 1) and collect messages in the yielded list until the block ends."""
    got: list[aiomqtt.Message] = []
    client = aiomqtt.Client("127.0.0.1", port, identifier=client_id, clean_session=clean, tls_context=tls_context)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(client)
        # Leaving after the broker went away raises: the messages are what the test wanted.
        stack.push_async_exit(_ignore_mqtt_errors)
        await client.subscribe(topic, qos=1)

        async def pump() -> None:
            # A broker going away ends the pump quietly; the test sees what arrived until then.
            with contextlib.suppress(aiomqtt.MqttError):
                async for msg in client.messages:
                    got.append(msg)

        task = asyncio.create_task(pump())
        try:
            yield got
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _ignore_mqtt_errors(exc_type: type[BaseException] | None, *_: object) -> bool:
    return exc_type is not None and issubclass(exc_type, aiomqtt.MqttError)


async def started(sink: Sink) -> Sink:
    await sink.start()
    return sink


async def stop_all(*sinks: Sink, secs: float = 5.0) -> None:
    deadline = time.monotonic() + secs
    await asyncio.gather(*(s.shutdown(deadline) for s in sinks))


def assert_same_ids_in_key_order(reader: KafkaReader, alerts: list[Alert]) -> None:
    """Every alert arrived, none other, and alerts of one key (one partition) in offer order."""
    assert sorted(set(reader.ids())) == sorted(a.id for a in alerts)
    for key in {a.key for a in alerts}:
        want = [a.id for a in alerts if a.key == key]
        got = [orjson.loads(r.value)["id"] for r in reader.records if r.key == key.encode()]
        assert list(dict.fromkeys(got)) == want, f"order of key {key}"
