"""Kafka sink against a real Tansu broker: records, keys, headers, idempotence, topic checks."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest
from infra.brokers import Tansu, free_port
from meshaudit.sinks.base import FatalSinkError
from meshaudit.sinks.kafka import KafkaConfig, KafkaSink

from sinks.support import (
    KafkaReader,
    assert_same_ids_in_key_order,
    create_topic,
    make_alert,
    metric,
    stop_all,
    unique,
    wait_for,
)

pytestmark = pytest.mark.integration


def kafka_sink(bootstrap: str, topic: str, spool: Path, **opts: object) -> KafkaSink:
    cfg = KafkaConfig.model_validate(
        {"bootstrap_servers": [bootstrap], "topic": topic, "spool_dir": str(spool), **opts}
    )
    return KafkaSink(cfg, name=unique("kafka"))


async def test_alerts_arrive_with_key_headers_and_json(tansu: Tansu, tmp_path: Path) -> None:
    topic = unique("alerts")
    sink = kafka_sink(tansu.bootstrap, topic, tmp_path, create_topic=True, compression="gzip")
    await sink.start()
    try:
        assert sink.ready
        alerts = [make_alert(i, dst=f"svc{i % 4}", severity=("high", "warning")[i % 2]) for i in range(40)]
        for a in alerts:
            sink.offer(a)
        async with KafkaReader(tansu.bootstrap, topic) as reader:
            await wait_for(lambda: len(reader.records) >= 40, 15, "40 records on Kafka")
        by_id = {a.id: a for a in alerts}
        assert sorted(reader.ids()) == sorted(by_id)
        for rec in reader.records:
            value = orjson.loads(rec.value)
            alert = by_id[value["id"]]
            assert value == alert.to_json()
            assert rec.key.decode() == f"plaintext_hop|{alert.source.key}|{alert.destination.key}"
            assert rec.headers == {"rule": b"plaintext_hop", "severity": alert.severity.encode()}
        # one key, one partition: the per-pair order consumers rely on
        parts: dict[bytes, set[int]] = {}
        for rec in reader.records:
            parts.setdefault(rec.key, set()).add(rec.partition)
        assert all(len(p) == 1 for p in parts.values())
        assert metric("meshaudit_sink_sent_total", sink.name) == 40
        assert metric("meshaudit_sink_delivery_seconds_count", sink.name) == 40
        # write-ahead: every alert went through the spool, and left it once acknowledged
        assert metric("meshaudit_sink_spooled_total", sink.name) == 40
        await wait_for(lambda: metric("meshaudit_sink_spool_alerts", sink.name) == 0, 5, "an empty spool")
    finally:
        await stop_all(sink)


async def test_idempotence_auto_falls_back_with_a_warning_and_delivers(
    tansu: Tansu, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Tansu answers InitProducerId with UnknownError (-1): it refuses the idempotent producer.
    topic = unique("alerts")
    await create_topic(tansu.bootstrap, topic)
    sink = kafka_sink(tansu.bootstrap, topic, tmp_path, idempotence="auto")
    with caplog.at_level(logging.WARNING, logger="meshaudit.sinks.kafka"):
        await sink.start()
    try:
        assert sink.ready and not sink.idempotent
        assert "refused the idempotent producer" in caplog.text
        assert metric("meshaudit_sink_idempotence_fallbacks_total", sink.name) == 1
        alert = make_alert(1)
        sink.offer(alert)
        async with KafkaReader(tansu.bootstrap, topic) as reader:
            await wait_for(lambda: len(reader.records) == 1, 10, "the record")
        assert reader.ids() == [alert.id]
    finally:
        await stop_all(sink)


async def test_idempotence_true_refuses_to_start_with_a_clear_error(tansu: Tansu, tmp_path: Path) -> None:
    topic = unique("alerts")
    await create_topic(tansu.bootstrap, topic)
    sink = kafka_sink(tansu.bootstrap, topic, tmp_path, idempotence=True)
    with pytest.raises(FatalSinkError, match=r"refused the idempotent producer .*idempotence: auto"):
        await sink.start()
    await stop_all(sink)  # still safe after a failed start
    assert not sink.ready


async def test_a_missing_topic_is_a_clear_error_then_delivers_once_created(
    tansu: Tansu, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topic = unique("missing")
    sink = kafka_sink(tansu.bootstrap, topic, tmp_path, retry_max_ms=300)
    with caplog.at_level(logging.ERROR, logger="meshaudit.sinks"):
        await sink.start()
    try:
        assert not sink.ready
        assert f"Kafka topic '{topic}' does not exist" in sink.ready_reason
        assert "create_topic: true" in caplog.text
        alerts = [make_alert(i) for i in range(5)]
        for a in alerts:
            sink.offer(a)
        assert sink.spool is not None and len(sink.spool) == 5  # kept on disk meanwhile
        await create_topic(tansu.bootstrap, topic)
        async with KafkaReader(tansu.bootstrap, topic) as reader:
            await wait_for(lambda: len(reader.records) == 5, 15, "the spooled records")
        assert reader.ids() == [a.id for a in alerts]  # in order
        assert sink.ready
    finally:
        await stop_all(sink)


async def test_a_broker_down_at_start_up_is_not_fatal_and_gets_the_spool_later(
    tansu_factory: object, tmp_path: Path
) -> None:
    port = free_port()
    topic = unique("late")
    sink = kafka_sink(f"127.0.0.1:{port}", topic, tmp_path, create_topic=True, retry_max_ms=500)
    await sink.start()
    try:
        assert not sink.ready and "cannot connect" in sink.ready_reason
        alerts = [make_alert(i) for i in range(20)]
        for a in alerts:
            sink.offer(a)
        assert metric("meshaudit_sink_spooled_total", sink.name) == 20
        broker: Tansu = tansu_factory(port=port)  # type: ignore[operator]
        await wait_for(lambda: sink.ready, 15, "the sink to connect")
        async with KafkaReader(broker.bootstrap, topic) as reader:
            await wait_for(lambda: len(reader.records) == 20, 15, "the spooled records")
        assert_same_ids_in_key_order(reader, alerts)
        await wait_for(lambda: sink.spool is not None and len(sink.spool) == 0, 5, "an empty spool")
        assert metric("meshaudit_sink_spool_alerts", sink.name) == 0
    finally:
        await stop_all(sink)
