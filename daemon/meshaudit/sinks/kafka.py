"""Kafka sink (aiokafka): one record per alert on topic ``meshaudit.alerts`` (configurable),
key ``rule|source|destination`` (all alerts of one pair land on one partition, in order),
value the JSON alert, headers ``rule`` and ``severity``.

No loss is a setting we turn on: ``acks=all`` always, and the idempotent producer when the
broker grants it. ``idempotence: auto`` asks for it and, when the broker refuses (an old broker,
a missing IdempotentWrite ACL, or Tansu, which answers InitProducerId with UnknownError), logs a
warning, counts ``meshaudit_sink_idempotence_fallbacks_total`` and produces with acks=all alone;
``idempotence: true`` refuses to start instead. Without idempotence a retried batch may be
written twice; consumers deduplicate by alert id either way (at-least-once).

At start-up the topic must exist (a clear error names it otherwise) unless ``create_topic`` is
set; a broker that cannot be reached is logged and retried while alerts go to the spool. aiokafka
says only that no bootstrap server could be reached; the sink then dials each itself, TLS
handshake included, so the error names the cause (refused, a certificate from another CA, a
client certificate the broker requires).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence
from typing import Any, Literal

from aiokafka import AIOKafkaProducer
from aiokafka import errors as kerrors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pydantic import Field, model_validator

from meshaudit import metrics
from meshaudit.sinks.base import FatalSinkError, PermanentError, Sink, SinkConfigBase
from meshaudit.sinks.queue import Outgoing
from meshaudit.sinks.secrets import TlsConfig, _Strict, read_secret

log = logging.getLogger("meshaudit.sinks.kafka")


class SaslConfig(_Strict):
    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    username: str
    password_file: str | None = Field(None, description="File holding the password.")
    password_env: str | None = Field(None, description="Environment variable holding the password.")

    @model_validator(mode="after")
    def _one_password(self) -> SaslConfig:
        if bool(self.password_file) == bool(self.password_env):
            raise ValueError("set exactly one of password_file or password_env")
        return self


class KafkaConfig(SinkConfigBase):
    bootstrap_servers: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:9092"], min_length=1, description="HOST:PORT of brokers."
    )
    topic: str = Field("meshaudit.alerts", min_length=1)
    client_id: str = Field("meshaudit", min_length=1, description="Shown in broker logs and quotas.")
    idempotence: bool | Literal["auto"] = Field(
        "auto", description="auto: use it when the broker grants it; true: required; false: off."
    )
    compression: Literal["none", "gzip"] = Field("none", description="Record batch compression.")
    linger_ms: int = Field(5, ge=0, description="Wait this long to batch records together.")
    create_topic: bool = Field(False, description="Create the topic at start-up when it is missing.")
    topic_partitions: int = Field(3, ge=1, description="Partitions of a topic created by create_topic.")
    topic_replication_factor: int = Field(1, ge=1, description="Replicas of a topic created by create_topic.")
    tls: TlsConfig | None = Field(None, description="TLS to the brokers; absent: plaintext.")
    sasl: SaslConfig | None = Field(None, description="SASL authentication; absent: none.")


class TopicMissing(Exception):
    """The topic does not exist and the sink may not create it."""


class BrokersUnreachable(ConnectionError):
    """No bootstrap server could be reached; the message says why, server by server."""


# How long the diagnosis of a failed bootstrap may dial one server, and then wait for a TLS 1.3
# server's verdict on our certificate (it comes after the handshake, with the first read).
DIAL_SECS = 2.0
TLS_VERDICT_SECS = 0.3


class KafkaSink(Sink):
    def __init__(self, config: KafkaConfig, name: str = "kafka") -> None:
        super().__init__(name, config)
        self._cfg = config
        self._producer: Any = None
        # Decided once per process: a broker that refused idempotence is not asked again at
        # every reconnect (each refusal costs a round trip and an error line in aiokafka's log).
        self._idempotent = config.idempotence is not False
        self._fallbacks = metrics.SINK_IDEMPOTENCE_FALLBACKS.labels(name)
        self._topic_checked = False

    @property
    def idempotent(self) -> bool:
        """Whether records are produced with the idempotent producer."""
        return self._idempotent

    def _client_options(self) -> dict[str, Any]:
        cfg = self._cfg
        opts: dict[str, Any] = {
            "bootstrap_servers": cfg.bootstrap_servers,
            "client_id": cfg.client_id,
            # Bounded by our own attempt timeout too; this lets aiokafka give up a request itself.
            "request_timeout_ms": cfg.attempt_timeout_ms,
        }
        protocol = "PLAINTEXT"
        if cfg.tls is not None:
            protocol = "SSL"
            opts["ssl_context"] = cfg.tls.context()
        if cfg.sasl is not None:
            protocol = "SASL_SSL" if cfg.tls is not None else "SASL_PLAINTEXT"
            opts["sasl_mechanism"] = cfg.sasl.mechanism
            opts["sasl_plain_username"] = cfg.sasl.username
            opts["sasl_plain_password"] = read_secret("password", cfg.sasl.password_file, cfg.sasl.password_env)
        opts["security_protocol"] = protocol
        return opts

    def _make_producer(self, options: dict[str, Any]) -> Any:
        cfg = self._cfg
        return AIOKafkaProducer(
            **options,
            acks="all",
            enable_idempotence=self._idempotent,
            compression_type=None if cfg.compression == "none" else cfg.compression,
            linger_ms=cfg.linger_ms,
        )

    async def _connect(self) -> None:
        options = self._client_options()
        producer = self._make_producer(options)
        self._producer = producer
        try:
            await self._start(producer, options)
        except kerrors.BrokerResponseError as exc:
            # Bootstrap failures are KafkaConnectionError; a broker *answer* here comes from
            # InitProducerId, i.e. the broker refusing to give us a producer id.
            if not self._idempotent:
                raise
            await self._close()
            if self._cfg.idempotence is True:
                raise FatalSinkError(
                    f"the Kafka broker refused the idempotent producer ({type(exc).__name__}) and "
                    "idempotence is true; set idempotence: auto to fall back to acks=all without it"
                ) from exc
            log.warning(
                "Kafka broker refused the idempotent producer (%s); producing with acks=all without "
                "idempotence, so a retried batch may be written twice (consumers deduplicate by id).",
                type(exc).__name__,
            )
            self._fallbacks.inc()
            self._idempotent = False
            producer = self._make_producer(options)
            self._producer = producer
            await self._start(producer, options)
        if not self._topic_checked:
            await self._check_topic(producer, options)
            self._topic_checked = True

    async def _start(self, producer: Any, options: dict[str, Any]) -> None:
        try:
            await producer.start()
        except kerrors.KafkaConnectionError as exc:
            servers = self._cfg.bootstrap_servers
            causes = await asyncio.gather(*(_dial(s, options.get("ssl_context")) for s in servers))
            found = [f"{server}: {cause}" for server, cause in zip(servers, causes, strict=True) if cause]
            if not found:  # every server takes a connection: aiokafka's own words are all we have
                raise
            raise BrokersUnreachable(f"cannot reach the Kafka brokers ({'; '.join(found)})") from exc

    async def _check_topic(self, producer: Any, options: dict[str, Any]) -> None:
        # A metadata request for all topics never auto-creates one (a request naming the topic
        # may, on brokers with auto.create.topics.enable).
        cluster = await producer.client.fetch_all_metadata()
        topic = self._cfg.topic
        if topic in cluster.topics():
            return
        if not self._cfg.create_topic:
            raise TopicMissing(
                f"Kafka topic {topic!r} does not exist on {','.join(self._cfg.bootstrap_servers)}; "
                "create it or set create_topic: true"
            )
        admin = AIOKafkaAdminClient(**options)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, self._cfg.topic_partitions, self._cfg.topic_replication_factor)])
            log.info(
                "Kafka topic %s created with %d partitions (create_topic is on).",
                topic,
                self._cfg.topic_partitions,
            )
        except kerrors.TopicAlreadyExistsError:
            pass  # another instance created it first
        finally:
            await admin.close()

    async def _send(self, items: Sequence[Outgoing]) -> None:
        producer = self._producer
        if producer is None:
            raise ConnectionError("producer not started")
        topic = self._cfg.topic
        pending = []
        for item in items:
            try:
                fut = await producer.send(
                    topic,
                    value=item.payload,
                    key=item.key.encode(),
                    headers=[("rule", item.rule.encode()), ("severity", item.severity.encode())],
                )
            except (kerrors.MessageSizeTooLargeError, kerrors.RecordTooLargeError) as exc:
                raise PermanentError(str(exc) or type(exc).__name__, item) from exc
            pending.append((item, fut))
        for item, fut in pending:
            try:
                await fut
            except (
                kerrors.MessageSizeTooLargeError,
                kerrors.RecordTooLargeError,
                kerrors.InvalidTopicError,
                kerrors.CorruptRecordException,
            ) as exc:
                raise PermanentError(str(exc) or type(exc).__name__, item) from exc

    async def _probe(self) -> None:
        # One metadata round trip: proves a broker answers, without producing anything.
        producer = self._producer
        if producer is None:
            raise ConnectionError("producer not started")
        await producer.client.fetch_all_metadata()

    async def _close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()


async def _dial(server: str, ctx: ssl.SSLContext | None) -> str | None:
    """Why a connection to ``server`` (``HOST:PORT``), and its TLS handshake with ``ctx``, fails;
    None when it succeeds."""
    host, _, port = server.rpartition(":")
    host = host.strip("[]")  # [::1]:9092
    try:
        async with asyncio.timeout(DIAL_SECS):
            reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
        try:
            if ctx is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TLS_VERDICT_SECS):
                        await reader.read(1)  # a Kafka broker says nothing first: only an alert comes
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    except ssl.SSLError as exc:
        return f"TLS: {exc}"
    except TimeoutError:
        return f"no answer within {DIAL_SECS:g} s"
    except (OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    return None
