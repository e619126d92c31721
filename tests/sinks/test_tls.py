"""The Kafka and MQTT sinks over real TLS endpoints: TLS and mutual TLS deliver to a real
consumer, and a broker whose certificate comes from another CA is refused: nothing goes there,
the sink says why and reports not ready, and what it accepted stays spooled until a broker it
trusts is back.

Mosquitto serves TLS itself. Tansu does not, so socat terminates TLS in front of it on the port
Tansu advertises (see ``infra.brokers``). Certificates come from throwaway CAs made here: the
trusted one signs the brokers' and the client's certificates, another one a rogue broker's.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from infra.brokers import Mosquitto, ServerTls, Tansu, TlsTerminator, free_port
from infra.pki import CertFiles, CertificateAuthority
from meshaudit.model import Alert
from meshaudit.sinks.kafka import KafkaConfig, KafkaSink
from meshaudit.sinks.mqtt import MqttConfig, MqttSink

from sinks.support import (
    KafkaReader,
    assert_same_ids_in_key_order,
    make_alert,
    metric,
    mqtt_reader,
    stop_all,
    tls_options,
    unique,
    wait_for,
)

pytestmark = pytest.mark.integration

# Both sinks retry quickly here: a test waits for a recovery, not for the production backoff.
FAST = {"retry_initial_ms": 50, "retry_max_ms": 300, "attempt_timeout_ms": 5000}


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority  # the CA the sinks trust
    server: CertFiles  # a broker's certificate from it (for 127.0.0.1)
    client: CertFiles  # the sinks' client certificate from it (mutual TLS)
    other_ca: CertificateAuthority  # a CA nobody configured
    rogue: CertFiles  # a broker certificate for 127.0.0.1 from the other CA

    def tls(self, client_cert: bool = False) -> dict[str, str]:
        """The sinks' ``tls`` option: trust our CA; with ``client_cert``, present the client's."""
        opts = {"ca_file": str(self.ca.cert_path)}
        if client_cert:
            opts |= {"cert_file": str(self.client.cert), "key_file": str(self.client.key)}
        return opts

    def server_tls(self, mutual: bool = False, rogue: bool = False) -> ServerTls:
        cert = self.rogue if rogue else self.server
        return ServerTls(cert.cert, cert.key, self.ca.cert_path, require_client_cert=mutual)

    def context(self, ca: CertificateAuthority | None = None) -> ssl.SSLContext:
        """A reader's TLS context: trusts ``ca`` (ours by default), presents the client certificate."""
        ctx = ssl.create_default_context(cafile=str((ca or self.ca).cert_path))
        ctx.load_cert_chain(self.client.cert, self.client.key)
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertificateAuthority(tmp_path / "pki", common_name="meshaudit test CA")
    other = CertificateAuthority(tmp_path / "pki-other", common_name="some other CA")
    return Pki(ca, ca.issue_host("broker"), ca.issue_host("meshaudit"), other, other.issue_host("rogue"))


def ids(payloads: list[bytes]) -> list[str]:
    return [orjson.loads(p)["id"] for p in payloads]


# --- Kafka: Tansu behind a TLS terminator ---------------------------------------------------------

TansuFactory = Callable[..., Tansu]
TerminatorFactory = Callable[..., TlsTerminator]


def kafka_sink(bootstrap: str, topic: str, spool: Path, tls: dict[str, str], **opts: object) -> KafkaSink:
    cfg = KafkaConfig.model_validate(
        {"bootstrap_servers": [bootstrap], "topic": topic, "spool_dir": str(spool), "tls": tls, **FAST, **opts}
    )
    return KafkaSink(cfg, name=unique("kafka-tls"))


def tls_tansu(
    tansu_factory: TansuFactory, tls_terminator_factory: TerminatorFactory, server: ServerTls
) -> TlsTerminator:
    """A Tansu reached only through TLS: it advertises the terminator's port."""
    port = free_port()
    broker = tansu_factory(advertised_port=port)
    return tls_terminator_factory(broker.port, server, port=port)


async def kafka_topics(bootstrap: str, ctx: ssl.SSLContext) -> set[str]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, **tls_options(ctx))
    await consumer.start()
    try:
        topics: set[str] = await consumer.topics()
        return topics
    finally:
        await consumer.stop()


async def deliver_to_kafka(
    sink: KafkaSink, endpoint: str, topic: str, ctx: ssl.SSLContext, alerts: list[Alert]
) -> None:
    """Start the sink, offer the alerts and read them back through the TLS endpoint."""
    await sink.start()
    assert sink.ready, sink.ready_reason
    for a in alerts:
        sink.offer(a)
    async with KafkaReader(endpoint, topic, ctx) as reader:
        await wait_for(lambda: len(reader.records) >= len(alerts), 15, f"{len(alerts)} records over TLS")
    assert_same_ids_in_key_order(reader, alerts)
    assert metric("meshaudit_sink_sent_total", sink.name) == len(alerts)


async def test_kafka_sink_delivers_over_tls(
    pki: Pki, tansu_factory: TansuFactory, tls_terminator_factory: TerminatorFactory, tmp_path: Path
) -> None:
    endpoint = tls_tansu(tansu_factory, tls_terminator_factory, pki.server_tls())
    topic = unique("alerts")
    sink = kafka_sink(endpoint.address, topic, tmp_path, pki.tls(), create_topic=True)
    try:
        await deliver_to_kafka(sink, endpoint.address, topic, pki.context(), [make_alert(i) for i in range(10)])
    finally:
        await stop_all(sink)


async def test_kafka_sink_delivers_over_mutual_tls_and_without_its_certificate_is_refused(
    pki: Pki, tansu_factory: TansuFactory, tls_terminator_factory: TerminatorFactory, tmp_path: Path
) -> None:
    endpoint = tls_tansu(tansu_factory, tls_terminator_factory, pki.server_tls(mutual=True))
    topic = unique("alerts")
    sink = kafka_sink(endpoint.address, topic, tmp_path / "a", pki.tls(client_cert=True), create_topic=True)
    anonymous = kafka_sink(endpoint.address, topic, tmp_path / "b", pki.tls())
    try:
        await deliver_to_kafka(sink, endpoint.address, topic, pki.context(), [make_alert(i) for i in range(10)])
        # The broker really asks for the certificate: the same sink without one gets nowhere.
        await anonymous.start()
        assert not anonymous.ready
        assert "certificate required" in anonymous.ready_reason, anonymous.ready_reason
    finally:
        await stop_all(sink, anonymous)


async def test_kafka_sink_refuses_a_broker_certificate_from_another_ca_and_keeps_the_alerts(
    pki: Pki, tansu_factory: TansuFactory, tls_terminator_factory: TerminatorFactory, tmp_path: Path
) -> None:
    port = free_port()
    trusted, rogue = tansu_factory(advertised_port=port), tansu_factory(advertised_port=port)
    impostor = tls_terminator_factory(rogue.port, pki.server_tls(rogue=True), port=port)
    topic = unique("alerts")
    sink = kafka_sink(impostor.address, topic, tmp_path, pki.tls(client_cert=True), create_topic=True)
    await sink.start()
    try:
        assert not sink.ready
        assert "cannot reach the Kafka brokers" in sink.ready_reason
        assert "certificate verify failed: unable to get local issuer certificate" in sink.ready_reason
        assert metric("meshaudit_sink_ready", sink.name) == 0
        alerts = [make_alert(i) for i in range(5)]
        for a in alerts:
            sink.offer(a)
        await wait_for(lambda: metric("meshaudit_sink_failed_total", sink.name) >= 2, 10, "failed attempts")
        assert not sink.ready and metric("meshaudit_sink_sent_total", sink.name) == 0
        assert sink.spool is not None and len(sink.spool) == 5  # accepted, kept
        assert topic not in await kafka_topics(impostor.address, pki.context(pki.other_ca))  # nothing went there
        # The trusted broker takes the address back: the spooled alerts arrive, in order.
        impostor.stop()
        endpoint = tls_terminator_factory(trusted.port, pki.server_tls(), port=port)
        await wait_for(lambda: sink.ready, 15, "the sink to connect to the trusted broker")
        async with KafkaReader(endpoint.address, topic, pki.context()) as reader:
            await wait_for(lambda: len(reader.records) >= 5, 15, "the spooled records")
        assert_same_ids_in_key_order(reader, alerts)
        spool = sink.spool
        await wait_for(lambda: len(spool) == 0, 5, "an empty spool")
    finally:
        await stop_all(sink)


# --- MQTT: Mosquitto's own TLS listener ------------------------------------------------------------

MosquittoFactory = Callable[..., Mosquitto]


def mqtt_sink(port: int, spool: Path, tls: dict[str, str], **opts: object) -> MqttSink:
    cfg = MqttConfig.model_validate({"port": port, "spool_dir": str(spool), "tls": tls, **FAST, **opts})
    return MqttSink(cfg, name=unique("mqtt-tls"))


async def deliver_to_mqtt(sink: MqttSink, broker: Mosquitto, ctx: ssl.SSLContext, alerts: list[Alert]) -> None:
    await sink.start()
    assert sink.ready, sink.ready_reason
    async with mqtt_reader(broker.port, "meshaudit/alerts/#", tls_context=ctx) as got:
        for a in alerts:
            sink.offer(a)
        await wait_for(lambda: len(got) >= len(alerts), 10, f"{len(alerts)} messages over TLS")
    assert ids([m.payload for m in got]) == [a.id for a in alerts]
    assert metric("meshaudit_sink_sent_total", sink.name) == len(alerts)


async def test_mqtt_sink_delivers_over_tls(pki: Pki, mosquitto_factory: MosquittoFactory, tmp_path: Path) -> None:
    broker = mosquitto_factory(tls=pki.server_tls())
    sink = mqtt_sink(broker.port, tmp_path, pki.tls())
    try:
        await deliver_to_mqtt(sink, broker, pki.context(), [make_alert(i) for i in range(10)])
    finally:
        await stop_all(sink)


async def test_mqtt_sink_delivers_over_mutual_tls_and_without_its_certificate_is_refused_at_once(
    pki: Pki, mosquitto_factory: MosquittoFactory, tmp_path: Path
) -> None:
    broker = mosquitto_factory(tls=pki.server_tls(mutual=True))
    sink = mqtt_sink(broker.port, tmp_path / "a", pki.tls(client_cert=True))
    anonymous = mqtt_sink(broker.port, tmp_path / "b", pki.tls())
    try:
        await deliver_to_mqtt(sink, broker, pki.context(), [make_alert(i) for i in range(10)])
        # Over TLS 1.3 the broker's refusal comes after the handshake: the sink reports it with
        # the broker's reason, not as a connection attempt that timed out.
        await anonymous.start()
        assert not anonymous.ready
        reason = anonymous.ready_reason
        assert "closed the connection before accepting it" in reason and "certificate required" in reason, reason
    finally:
        await stop_all(sink, anonymous)


async def test_mqtt_sink_refuses_a_broker_certificate_from_another_ca_and_keeps_the_alerts(
    pki: Pki, mosquitto_factory: MosquittoFactory, tmp_path: Path
) -> None:
    # The trusted broker keeps a persistent session for our subscriber (saved on SIGTERM), so
    # what the sink delivers right after it is back is queued for the subscriber.
    trusted = mosquitto_factory(persistence=True, tls=pki.server_tls())
    reader_id = unique("reader")
    async with mqtt_reader(trusted.port, "meshaudit/alerts/#", reader_id, clean=False, tls_context=pki.context()):
        pass
    trusted.stop()
    impostor = mosquitto_factory(port=trusted.port, tls=pki.server_tls(rogue=True))
    sink = mqtt_sink(impostor.port, tmp_path, pki.tls(client_cert=True))
    try:
        async with mqtt_reader(impostor.port, "#", tls_context=pki.context(pki.other_ca)) as at_impostor:
            await sink.start()
            assert not sink.ready
            assert "certificate verify failed: unable to get local issuer certificate" in sink.ready_reason
            assert metric("meshaudit_sink_ready", sink.name) == 0
            alerts = [make_alert(i) for i in range(5)]
            for a in alerts:
                sink.offer(a)
            await wait_for(lambda: metric("meshaudit_sink_failed_total", sink.name) >= 2, 10, "failed attempts")
            assert not sink.ready and metric("meshaudit_sink_sent_total", sink.name) == 0
            assert sink.spool is not None and len(sink.spool) == 5  # accepted, kept
        assert at_impostor == []  # nothing went there
        impostor.stop()
        trusted.start()
        async with mqtt_reader(
            trusted.port, "meshaudit/alerts/#", reader_id, clean=False, tls_context=pki.context()
        ) as got:
            await wait_for(lambda: len(got) >= 5, 15, "the spooled alerts")
        assert ids([m.payload for m in got]) == [a.id for a in alerts]
        assert sink.ready
    finally:
        await stop_all(sink)
