"""Delivery guarantees every sink shares, checked against real brokers: a 20 s outage loses
nothing, a full spool drops per policy and keeps going, a hanging backend stalls nobody else,
shutdown flushes or spools."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from infra.brokers import Mosquitto, Tansu, free_port
from meshaudit.model import Alert
from meshaudit.sinks.jsonl import JsonlConfig, JsonlSink
from meshaudit.sinks.kafka import KafkaConfig, KafkaSink
from meshaudit.sinks.mqtt import MqttConfig, MqttSink
from meshaudit.sinks.spool import HEADER

from sinks.support import (
    KafkaReader,
    assert_same_ids_in_key_order,
    create_topic,
    make_alert,
    metric,
    mqtt_reader,
    stop_all,
    unique,
    wait_for,
)

pytestmark = pytest.mark.integration

OUTAGE_SECS = 20.0
FAST = {"retry_initial_ms": 100, "retry_max_ms": 1000, "attempt_timeout_ms": 1500, "health_check_secs": 0.5}


async def test_a_20s_outage_of_kafka_and_mqtt_loses_no_alert(
    tansu_factory: Callable[..., Tansu], mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    """Tansu frozen (SIGSTOP: a broker that stops answering) and Mosquitto stopped (SIGTERM: a
    broker that goes away), both for 20 s while alerts keep coming; all arrive afterwards."""
    tansu = tansu_factory()
    topic = unique("outage")
    await create_topic(tansu.bootstrap, topic, partitions=3)
    mosq = mosquitto_factory(persistence=True)
    reader_id = unique("reader")
    async with mqtt_reader(mosq.port, "meshaudit/alerts/#", client_id=reader_id, clean=False):
        pass  # a persistent session: Mosquitto queues for it while it is away, across the restart
    kafka = KafkaSink(
        KafkaConfig.model_validate(
            {"bootstrap_servers": [tansu.bootstrap], "topic": topic, "spool_dir": str(tmp_path), **FAST}
        ),
        name=unique("kafka"),
    )
    mqtt = MqttSink(
        MqttConfig.model_validate({"port": mosq.port, "spool_dir": str(tmp_path), **FAST}), name=unique("mqtt")
    )
    await kafka.start()
    await mqtt.start()
    produced: list[Alert] = []
    stop_producing = asyncio.Event()

    async def produce() -> None:
        n = 0
        while not stop_producing.is_set():
            alert = make_alert(n, dst=f"svc{n % 5}")
            produced.append(alert)
            kafka.offer(alert)
            mqtt.offer(alert)
            n += 1
            await asyncio.sleep(0.05)

    try:
        producer = asyncio.create_task(produce())
        await asyncio.sleep(1.0)
        before = len(produced)
        tansu.pause()
        mosq.stop()
        down_at = time.monotonic()
        await wait_for(lambda: not kafka.ready and not mqtt.ready, 5, "both sinks to report not ready")
        await asyncio.sleep(OUTAGE_SECS - (time.monotonic() - down_at))
        during = len(produced) - before
        spooled_kafka = metric("meshaudit_sink_spooled_total", kafka.name)
        spooled_mqtt = metric("meshaudit_sink_spooled_total", mqtt.name)
        tansu.resume()
        mosq.start()
        up_at = time.monotonic()
        await asyncio.sleep(1.0)
        stop_producing.set()
        await producer
        want = {a.id for a in produced}
        async with mqtt_reader(mosq.port, "meshaudit/alerts/#", client_id=reader_id, clean=False) as got:
            await wait_for(
                lambda: kafka.spool is not None and not len(kafka.spool) and kafka.ready, 30, "Kafka to catch up"
            )
            kafka_done = time.monotonic() - up_at
            await wait_for(lambda: mqtt.spool is not None and not len(mqtt.spool) and mqtt.ready, 30, "MQTT")
            mqtt_done = time.monotonic() - up_at
            late = {orjson.loads(m.payload)["id"] for m in got}
            await wait_for(
                lambda: want - {a.id for a in produced[:before]} <= {orjson.loads(m.payload)["id"] for m in got},
                15,
                "every alert produced during and after the outage on MQTT",
            )
            late = {orjson.loads(m.payload)["id"] for m in got}
        async with KafkaReader(tansu.bootstrap, topic) as reader:
            await wait_for(lambda: set(reader.ids()) >= want, 15, "every alert on Kafka")
        # Nothing lost, nothing foreign; order per key (per partition) kept.
        assert_same_ids_in_key_order(reader, produced)
        assert want - {a.id for a in produced[:before]} <= late
        assert during > 300 and spooled_kafka > 0 and spooled_mqtt > 0
        print(
            f"\noutage {OUTAGE_SECS:.0f}s: {len(produced)} alerts ({during} during the outage); "
            f"caught up {kafka_done:.1f}s (Kafka) and {mqtt_done:.1f}s (MQTT) after the brokers came back; "
            f"spooled {spooled_kafka:.0f} (Kafka), {spooled_mqtt:.0f} (MQTT); "
            f"Kafka duplicates {len(reader.records) - len(set(reader.ids()))}"
        )
        assert metric("meshaudit_sink_dropped_total", kafka.name, reason="spool_full") == 0
    finally:
        stop_producing.set()
        await stop_all(kafka, mqtt)


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
async def test_a_full_spool_drops_per_policy_counts_it_and_keeps_going(
    policy: str, tansu_factory: Callable[..., Tansu], tmp_path: Path
) -> None:
    port = free_port()  # nothing listens yet: the sink is down from the start
    topic = unique("full")
    alerts = [make_alert(i) for i in range(40)]
    record = HEADER.size + len(alerts[0].encode()) + 80  # + the spool's key line, generously
    cap = 10 * record
    sink = KafkaSink(
        KafkaConfig.model_validate(
            {
                "bootstrap_servers": [f"127.0.0.1:{port}"],
                "topic": topic,
                "create_topic": True,
                "spool_dir": str(tmp_path),
                "spool_max_bytes": cap,
                "spool_full_policy": policy,
                **FAST,
            }
        ),
        name=unique("kafka"),
    )
    await sink.start()
    try:
        for a in alerts:
            sink.offer(a)
        assert sink.spool is not None
        kept = len(sink.spool)
        assert 5 <= kept < 40
        assert metric("meshaudit_sink_dropped_total", sink.name, reason="spool_full") == 40 - kept
        assert metric("meshaudit_sink_spool_bytes", sink.name) <= cap
        expected = alerts[:kept] if policy == "drop_newest" else alerts[-kept:]
        broker = tansu_factory(port=port)
        await wait_for(lambda: sink.ready and not len(sink.spool or []), 15, "the spool to drain")
        async with KafkaReader(broker.bootstrap, topic) as reader:
            await wait_for(lambda: len(reader.records) >= kept, 10, "the kept alerts")
        assert_same_ids_in_key_order(reader, expected)
        # and the sink goes on: a new alert is delivered as usual
        extra = make_alert(99)
        sink.offer(extra)
        async with KafkaReader(broker.bootstrap, topic) as reader:
            await wait_for(lambda: extra.id in reader.ids(), 10, "a later alert")
    finally:
        await stop_all(sink)


async def test_a_hanging_backend_delays_neither_the_jsonl_sink_nor_the_caller(
    silent_server: int, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    out = tmp_path / "alerts.jsonl"
    jsonl = JsonlSink(JsonlConfig(path=str(out)), name=unique("jsonl"))
    opts = {"spool_dir": str(tmp_path), "attempt_timeout_ms": 1000}
    kafka = KafkaSink(
        KafkaConfig.model_validate({"bootstrap_servers": [f"127.0.0.1:{silent_server}"], **opts}),
        name=unique("kafka"),
    )
    mqtt = MqttSink(MqttConfig.model_validate({"port": silent_server, **opts}), name=unique("mqtt"))
    await jsonl.start()
    t0 = time.monotonic()
    await asyncio.gather(kafka.start(), mqtt.start())
    assert time.monotonic() - t0 < 2.0  # start-up waits at most attempt_timeout_ms
    assert not kafka.ready and not mqtt.ready
    try:
        worst = 0.0
        alerts = [make_alert(i) for i in range(300)]
        t0 = time.monotonic()
        for a in alerts:
            t = time.perf_counter()
            for s in (kafka, mqtt, jsonl):
                s.offer(a)
            worst = max(worst, time.perf_counter() - t)
            await asyncio.sleep(0)
        await wait_for(lambda: out.exists() and len(out.read_bytes().splitlines()) == 300, 2, "all JSON lines")
        jsonl_secs = time.monotonic() - t0
        assert [orjson.loads(line)["id"] for line in out.read_bytes().splitlines()] == [a.id for a in alerts]
        assert worst < 0.05, f"offer() took {worst * 1000:.1f} ms"  # generous: a shared 2-core CI box
        assert kafka.spool is not None and len(kafka.spool) == 300
        assert mqtt.spool is not None and len(mqtt.spool) == 300
        print(
            f"\nhanging backends: 300 alerts in the JSON-lines file after {jsonl_secs * 1000:.0f} ms; "
            f"slowest offer() to three sinks {worst * 1e6:.0f} us"
        )
    finally:
        t0 = time.monotonic()
        await stop_all(jsonl, kafka, mqtt, secs=2.0)
        assert time.monotonic() - t0 < 4.0


async def test_shutdown_flushes_to_a_live_broker_and_spools_for_a_dead_one(tansu: Tansu, tmp_path: Path) -> None:
    topic = unique("flush")
    await create_topic(tansu.bootstrap, topic)
    live = KafkaSink(
        KafkaConfig.model_validate(
            {"bootstrap_servers": [tansu.bootstrap], "topic": topic, "spool_dir": str(tmp_path)}
        ),
        name=unique("kafka"),
    )
    await live.start()
    alerts = [make_alert(i) for i in range(500)]
    for a in alerts:
        live.offer(a)
    await live.shutdown(time.monotonic() + 10)  # at once: the queue is still full
    await live.shutdown(time.monotonic() + 10)  # safe twice
    async with KafkaReader(tansu.bootstrap, topic) as reader:
        await wait_for(lambda: len(reader.records) >= 500, 10, "500 records")
    assert_same_ids_in_key_order(reader, alerts)
    assert metric("meshaudit_sink_sent_total", live.name) == 500

    # A broker gone at shutdown: the queue goes to the spool, and the next start delivers it.
    port = free_port()
    spool = tmp_path / "dead"
    cfg = KafkaConfig.model_validate(
        {"bootstrap_servers": [f"127.0.0.1:{port}"], "topic": topic, "spool_dir": str(spool), **FAST}
    )
    dead = KafkaSink(cfg, name="kafka-dead")
    await dead.start()
    later = [make_alert(1000 + i) for i in range(50)]
    for a in later:
        dead.offer(a)
    await dead.shutdown(time.monotonic() + 1)
    assert metric("meshaudit_sink_dropped_total", "kafka-dead", reason="shutdown") == 0
    assert list((spool / "kafka-dead").glob("*.seg"))
    again = KafkaSink(cfg.model_copy(update={"bootstrap_servers": [tansu.bootstrap]}), name="kafka-dead")
    await again.start()
    try:
        async with KafkaReader(tansu.bootstrap, topic) as reader:
            await wait_for(lambda: len(reader.records) >= 550, 10, "the spooled alerts after a restart")
        assert_same_ids_in_key_order(reader, alerts + later)
    finally:
        await stop_all(again)
