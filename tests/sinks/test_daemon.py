"""The sinks inside the real daemon (``meshaudit run`` as a subprocess): violating Envoy access
logs in, alerts out on Kafka and MQTT; SIGTERM flushes; SIGKILL loses nothing spooled; a hanging
backend delays neither the JSON-lines sink nor ingestion; a refused required idempotence stops
start-up with a clear error; alerts are written ahead to the spool, so SIGKILL while Kafka hangs
loses none; a full spool disk silences only that sink."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from infra import als
from infra.brokers import Mosquitto, Tansu, free_port
from infra.daemon import Daemon
from infra.disk import SmallDisk

from sinks.support import KafkaReader, create_topic, mqtt_reader, unique, wait_for

pytestmark = pytest.mark.integration

FAST = {"retry_initial_ms": 100, "retry_max_ms": 1000, "attempt_timeout_ms": 1000, "health_check_secs": 0.5}


def config(**sinks: Any) -> dict[str, Any]:
    return {
        "engine": {"tick_ms": 50},
        "rules": {"plaintext_hop": {"attribution_wait_ms": 50}},
        "sinks": sinks,
    }


async def violate(d: Daemon, n: int, first: int = 0) -> None:
    """n plaintext requests into "reviews", each from its own address: n distinct alerts."""
    entries = [
        als.inbound_http(None, path="/reviews/1", remote=f"10.7.{i // 200}.{i % 200 + 1}:5555")
        for i in range(first, first + n)
    ]
    await als.stream(d.grpc, [als.http_message(entries, als.identifier("reviews"))])


def at_least(n: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda alerts: len(alerts) >= n


def ids(alerts: list[dict[str, Any]]) -> set[str]:
    return {a["id"] for a in alerts}


async def test_alerts_reach_kafka_and_mqtt_and_sigterm_flushes_before_exit_0(
    tansu: Tansu, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    topic = unique("daemon")
    prefix = f"test/{unique('d')}"
    await create_topic(tansu.bootstrap, topic, partitions=2)
    d = Daemon(
        tmp_path,
        config(
            kafka={"bootstrap_servers": [tansu.bootstrap], "topic": topic},
            mqtt={"port": mosquitto.port, "topic_prefix": prefix},
        ),
    ).start()
    try:
        status, body = d.readyz()
        assert status == 200, body
        async with mqtt_reader(mosquitto.port, f"{prefix}/#") as got:
            await violate(d, 60)
            alerts = await asyncio.to_thread(d.wait_alerts, lambda a: len(a) >= 60, 10)
            assert len(alerts) == 60
            d.signal(signal.SIGTERM)  # at once: whatever is still queued must be flushed
            assert await asyncio.to_thread(d.stop) == 0
            await wait_for(lambda: len(got) >= 60, 10, "60 MQTT messages")
        assert {orjson.loads(m.payload)["id"] for m in got} == ids(alerts)
        assert {str(m.topic) for m in got} == {f"{prefix}/plaintext_hop/reviews"}
        async with KafkaReader(tansu.bootstrap, topic) as reader:
            await wait_for(lambda: len(reader.records) >= 60, 10, "60 Kafka records")
        assert set(reader.ids()) == ids(alerts)
        assert "delivery failed" not in d.stderr()
    finally:
        d.stop()


async def test_sigkill_with_alerts_in_the_spool_then_restart_delivers_them(
    tansu_factory: Callable[..., Tansu], tmp_path: Path
) -> None:
    port = free_port()  # no broker yet: every alert goes to the spool
    topic = unique("crash")
    cfg = config(kafka={"bootstrap_servers": [f"127.0.0.1:{port}"], "topic": topic, **FAST})
    d = Daemon(tmp_path, cfg).start()
    try:
        status, body = d.readyz(verbose=True)
        assert status == 200 and body["sinks"]["kafka"] != "ok", body  # a sink down never stops ingestion
        await violate(d, 40)
        alerts = await asyncio.to_thread(d.wait_alerts, lambda a: len(a) >= 40, 10)
        assert len(alerts) == 40
        await wait_for(lambda: d.metric("meshaudit_sink_spool_alerts", sink="kafka") == 40, 5, "40 spooled")
        d.kill()  # SIGKILL: no shutdown code runs
    finally:
        d.stop()
    broker = tansu_factory(port=port)
    await create_topic(broker.bootstrap, topic)
    again = Daemon(tmp_path, cfg).start()  # same working directory: same spool
    try:
        await wait_for(lambda: again.readyz(verbose=True)[1]["sinks"]["kafka"] == "ok", 15, "Kafka to be connected")
        async with KafkaReader(broker.bootstrap, topic) as reader:
            await wait_for(lambda: len(set(reader.ids())) >= 40, 15, "the spooled alerts on Kafka")
        assert set(reader.ids()) == ids(alerts)
        await wait_for(lambda: again.metric("meshaudit_sink_spool_alerts", sink="kafka") == 0, 5, "empty spool")
        assert again.stop() == 0
    finally:
        again.stop()


async def test_a_hanging_kafka_delays_neither_ingestion_nor_the_jsonl_sink(silent_server: int, tmp_path: Path) -> None:
    cfg = config(kafka={"bootstrap_servers": [f"127.0.0.1:{silent_server}"], **FAST})
    d = Daemon(tmp_path, cfg).start()
    try:
        t0 = time.monotonic()
        await violate(d, 30)
        alerts = await asyncio.to_thread(d.wait_alerts, lambda a: len(a) >= 30, 5)
        elapsed = time.monotonic() - t0
        assert len(alerts) == 30
        # attribution_wait_ms (50) + ticks: well under a second unless something stalls
        assert elapsed < 2.0, f"JSON lines took {elapsed:.2f}s"
        status, body = d.readyz(verbose=True)
        assert status == 200 and body["sinks"]["kafka"] != "ok", body
        assert d.metric("meshaudit_received_total", receiver="envoy_als", kind="http") == 30
        print(f"\nhanging Kafka: 30 alerts in the JSON-lines file {elapsed * 1000:.0f} ms after sending")
        t0 = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - t0 < 12  # the shutdown deadline bounds a hanging sink
    finally:
        d.stop()


async def test_required_idempotence_refused_stops_start_up_with_a_clear_error(tansu: Tansu, tmp_path: Path) -> None:
    topic = unique("idem")
    await create_topic(tansu.bootstrap, topic)
    d = Daemon(tmp_path, config(kafka={"bootstrap_servers": [tansu.bootstrap], "topic": topic, "idempotence": True}))
    with pytest.raises(RuntimeError, match=r"exited with [1-9]") as err:
        d.start()
    d.stop()
    assert "refused the idempotent producer" in str(err.value)
    assert "idempotence: auto" in str(err.value)


async def test_sigkill_while_kafka_hangs_loses_no_alert(tansu_factory: Callable[..., Tansu], tmp_path: Path) -> None:
    """Kafka frozen (SIGSTOP) with the default 10 s attempt timeout: the alerts of the next
    seconds must already be on disk, not in memory, when the daemon is killed well before the
    timeout; the next start delivers every one."""
    broker = tansu_factory()
    topic = unique("hang")
    await create_topic(broker.bootstrap, topic, partitions=2)
    cfg = config(kafka={"bootstrap_servers": [broker.bootstrap], "topic": topic, "attempt_timeout_ms": 10_000})
    d = Daemon(tmp_path, cfg, name="first").start()
    try:
        assert d.readyz()[0] == 200
        await violate(d, 20)  # a delivery that works first: the producer is connected and idle
        await asyncio.to_thread(d.wait_alerts, lambda a: len(a) >= 20, 10)
        async with KafkaReader(broker.bootstrap, topic) as reader:
            await wait_for(lambda: len(set(reader.ids())) >= 20, 10, "the first 20 alerts on Kafka")
        broker.pause()
        t0 = time.monotonic()
        for first in range(20, 620, 150):  # 600 distinct alerts, several engine batches
            await violate(d, 150, first)
        alerts = await asyncio.to_thread(d.wait_alerts, lambda a: len(a) >= 620, 10)
        assert len(alerts) == 620
        killed_after = time.monotonic() - t0
        assert killed_after < 8, f"too slow to stay inside the 10 s attempt timeout ({killed_after:.1f} s)"
        d.kill()  # SIGKILL: no shutdown code runs
    finally:
        d.stop()
        broker.resume()
    again = Daemon(tmp_path, cfg, name="second").start()  # same working directory: same spool
    try:
        async with KafkaReader(broker.bootstrap, topic) as reader:
            with contextlib.suppress(AssertionError):
                await wait_for(lambda: ids(alerts) <= set(reader.ids()), 15, "every alert on Kafka")
        lost = ids(alerts) - set(reader.ids())
        print(f"\nSIGKILL {killed_after:.1f} s into a Kafka hang: {len(lost)} of {len(alerts)} alerts lost")
        assert not lost, f"{len(lost)} of {len(alerts)} alerts the first daemon emitted never reached Kafka"
        assert again.stop() == 0
    finally:
        again.stop()


async def test_a_full_spool_disk_silences_only_that_sink_and_it_recovers(
    tansu: Tansu, mosquitto: Mosquitto, small_disk: SmallDisk, tmp_path: Path
) -> None:
    """Kafka and MQTT spool to a real 256 KiB filesystem that fills up (ENOSPC): their alerts
    are dropped and counted as spool_error and they report not ready, while the engine goes on
    alerting and the JSON-lines sink goes on delivering; with room again they deliver again."""
    topic = unique("enospc")
    prefix = f"test/{unique('e')}"
    await create_topic(tansu.bootstrap, topic)
    spool = str(small_disk.path)
    cfg = config(
        kafka={"bootstrap_servers": [tansu.bootstrap], "topic": topic, "spool_dir": spool, **FAST},
        mqtt={"port": mosquitto.port, "topic_prefix": prefix, "spool_dir": spool, **FAST},
    )
    d = Daemon(tmp_path, cfg).start()
    try:
        assert d.readyz()[0] == 200
        async with mqtt_reader(mosquitto.port, f"{prefix}/#") as got:
            await violate(d, 20)
            before = await asyncio.to_thread(d.wait_alerts, lambda a: len(a) >= 20, 10)
            await wait_for(lambda: len(got) >= 20, 10, "the first 20 alerts on MQTT")
            # delivered and acknowledged: both spools are empty
            await wait_for(lambda: d.metric("meshaudit_sink_spool_alerts") == 0, 10, "empty spools")

            small_disk.fill()
            await violate(d, 25, 20)  # two rounds: the engine keeps alerting after the first
            await asyncio.to_thread(d.wait_alerts, lambda a: len(a) >= 45, 10)
            await violate(d, 25, 45)
            during = await asyncio.to_thread(d.wait_alerts, lambda a: len(a) >= 70, 10)
            assert len(during) == 70, "the JSON-lines sink stopped delivering"
            for sink in ("kafka", "mqtt"):
                assert d.metric("meshaudit_sink_dropped_total", sink=sink, reason="spool_error") == 50
                assert d.metric("meshaudit_sink_ready", sink=sink) == 0
            # Still able to receive (/readyz 200): sink health is detail, not readiness.
            status, body = d.readyz(verbose=True)
            assert status == 200, body
            assert body["sinks"]["kafka"] == "spool write failed: No space left on device"
            assert body["sinks"]["mqtt"] == "spool write failed: No space left on device"
            assert body["sinks"]["jsonl"] == "ok"
            assert d.metric("meshaudit_sink_dropped_total", sink="jsonl") == 0

            small_disk.free()
            await violate(d, 10, 70)
            after = await asyncio.to_thread(d.wait_alerts, lambda a: len(a) >= 80, 10)
            await wait_for(
                lambda: set(d.readyz(verbose=True)[1]["sinks"].values()) == {"ok"}, 10, "both sinks ready again"
            )
            await wait_for(lambda: len(got) >= 30, 10, "the alerts after the disk had room on MQTT")
        mqtt_ids = {orjson.loads(m.payload)["id"] for m in got}
        async with KafkaReader(tansu.bootstrap, topic) as reader:
            await wait_for(lambda: len(set(reader.ids())) >= 30, 10, "the alerts after the disk had room on Kafka")
        delivered = ids(before) | ids(after[70:])
        assert set(reader.ids()) == delivered
        assert mqtt_ids == delivered
        assert "Traceback" not in d.stderr()
        assert d.stop() == 0
    finally:
        d.stop()


async def test_a_full_spool_disk_while_kafka_is_down_stops_neither_the_engine_nor_jsonl(
    small_disk: SmallDisk, tmp_path: Path
) -> None:
    """Kafka down (every alert for it must be spooled) and its spool disk full: the write errors
    stay inside the Kafka sink."""
    cfg = config(kafka={"bootstrap_servers": [f"127.0.0.1:{free_port()}"], "spool_dir": str(small_disk.path), **FAST})
    d = Daemon(tmp_path, cfg).start()
    try:
        small_disk.fill()
        for first in range(0, 90, 30):  # three engine rounds: each after the previous one failed to spool
            await violate(d, 30, first)
            alerts = await asyncio.to_thread(d.wait_alerts, at_least(first + 30), 10)
        assert len(alerts) == 90, "the JSON-lines sink stopped getting alerts"
        assert d.metric("meshaudit_sink_dropped_total", sink="kafka", reason="spool_error") == 90
        assert d.metric("meshaudit_engine_errors_total") == 0
        status, body = d.readyz(verbose=True)
        assert status == 200 and body["sinks"]["kafka"] == "spool write failed: No space left on device"
        assert body["sinks"]["jsonl"] == "ok"
        assert d.stop() == 0
    finally:
        d.stop()
