"""MQTT sink against a real Mosquitto: topics, QoS 1, payloads, reconnect after a restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from infra.brokers import Mosquitto
from meshaudit.sinks.mqtt import MqttConfig, MqttSink, topic_for

from sinks.support import make_alert, metric, mqtt_reader, stop_all, unique, wait_for

pytestmark = pytest.mark.integration


def mqtt_sink(port: int, spool: Path, **opts: object) -> MqttSink:
    cfg = MqttConfig.model_validate({"port": port, "spool_dir": str(spool), **opts})
    return MqttSink(cfg, name=unique("mqtt"))


async def test_alerts_arrive_on_the_rule_and_service_topic_at_qos_1(mosquitto: Mosquitto, tmp_path: Path) -> None:
    prefix = f"test/{unique('p')}"
    sink = mqtt_sink(mosquitto.port, tmp_path, topic_prefix=prefix)
    await sink.start()
    try:
        assert sink.ready
        alerts = [make_alert(i, rule=("plaintext_hop", "unexpected_edge")[i % 2], dst=f"svc{i % 3}") for i in range(12)]
        async with mqtt_reader(mosquitto.port, f"{prefix}/#") as got:
            for a in alerts:
                sink.offer(a)
            await wait_for(lambda: len(got) >= 12, 10, "12 MQTT messages")
        by_id = {a.id: a for a in alerts}
        assert sorted(orjson.loads(m.payload)["id"] for m in got) == sorted(by_id)
        for m in got:
            alert = by_id[orjson.loads(m.payload)["id"]]
            assert str(m.topic) == f"{prefix}/{alert.rule}/{alert.destination.service}"
            assert m.qos == 1
            assert orjson.loads(m.payload) == alert.to_json()
        assert metric("meshaudit_sink_sent_total", sink.name) == 12
    finally:
        await stop_all(sink)


def test_topic_levels_from_data_cannot_add_levels_or_wildcards() -> None:
    assert topic_for("meshaudit/alerts", "plaintext_hop", "pay/ments+#") == "meshaudit/alerts/plaintext_hop/pay_ments__"
    assert topic_for("meshaudit/alerts", "plaintext_hop", None) == "meshaudit/alerts/plaintext_hop/unknown"


async def test_a_restarted_broker_gets_the_alerts_offered_while_it_was_down(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    # The subscriber keeps a persistent session (saved by Mosquitto on SIGTERM), so what the
    # sink replays right after the restart is queued for it even before it reconnects.
    broker = mosquitto_factory(persistence=True)
    reader_id = unique("reader")
    async with mqtt_reader(broker.port, "meshaudit/alerts/#", client_id=reader_id, clean=False):
        pass
    sink = mqtt_sink(broker.port, tmp_path, retry_max_ms=300, health_check_secs=0.2)
    await sink.start()
    try:
        broker.stop()
        await wait_for(lambda: not sink.ready, 5, "the sink to notice the broker is gone")
        assert "health check failed" in sink.ready_reason or "delivery failing" in sink.ready_reason
        alerts = [make_alert(i) for i in range(10)]
        for a in alerts:
            sink.offer(a)
        assert sink.spool is not None and len(sink.spool) == 10
        broker.start()
        async with mqtt_reader(broker.port, "meshaudit/alerts/#", client_id=reader_id, clean=False) as got:
            await wait_for(lambda: len(got) >= 10, 15, "the spooled alerts")
        assert [orjson.loads(m.payload)["id"] for m in got] == [a.id for a in alerts]
        assert sink.ready
        assert metric("meshaudit_sink_spooled_total", sink.name) == 10
    finally:
        await stop_all(sink)
