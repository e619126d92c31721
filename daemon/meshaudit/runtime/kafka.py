"""What the distributed mode's Kafka clients share (the receiver's producer, the evaluator's
consumer, stage 2's topic, the shared baseline's): how they connect, how a topic of theirs is
checked and created, and what a consumer does when the brokers lost its group's offsets."""

from __future__ import annotations

import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as kerrors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from meshaudit.config import DistributedConfig

log = logging.getLogger("meshaudit")


def connection(cfg: DistributedConfig, role: str = "") -> dict[str, Any]:
    """Every client's connection options: the brokers, ``client_id`` (with ``role`` after it, as
    brokers' logs and quotas see it) and TLS (absent: plaintext)."""
    opts: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": cfg.client_id + role,
        "security_protocol": "PLAINTEXT",
    }
    if cfg.tls is not None:
        opts["security_protocol"] = "SSL"
        opts["ssl_context"] = cfg.tls.context()
    return opts


async def ensure_topic(
    client: Any, cfg: DistributedConfig, name: str, partitions: int, configs: dict[str, str], what: str
) -> None:
    """``name`` exists on the brokers ``client`` (a started producer) reaches, or is created with
    ``partitions``, ``cfg.replication_factor`` and the topic ``configs`` when ``cfg.create_topic``
    is on (another process creating it first is as good); LookupError when it is missing and may
    not be created. A metadata request for all topics never auto-creates one."""
    cluster = await client.client.fetch_all_metadata()
    if name in cluster.topics():
        return
    if not cfg.create_topic:
        raise LookupError(f"Kafka topic {name!r} does not exist; create it or set create_topic: true")
    admin = AIOKafkaAdminClient(**connection(cfg))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, cfg.replication_factor, topic_configs=configs)])
        log.info("Kafka topic %s created with %d partitions, %s (create_topic is on).", name, partitions, what)
    except kerrors.TopicAlreadyExistsError:
        pass  # another process created it first
    finally:
        await admin.close()


async def forgotten(
    consumer: AIOKafkaConsumer, kept: set[TopicPartition], mine: dict[TopicPartition, int]
) -> set[TopicPartition]:
    """Kept partitions whose committed offset the group no longer has (none, or lower than this
    member committed, ``mine``): the brokers lost the group's state, and with it, as a broker
    that lost its data, maybe the log, re-created from offset 0. Positions in the old log would
    skip as many records of the new one: the caller reads such a partition again as a gained one
    with no committed offset (what was judged twice alerts with the same ids)."""
    out: set[TopicPartition] = set()
    for tp in kept:
        ours = mine.get(tp)
        if ours is None:
            continue
        theirs = await consumer.committed(tp)
        if theirs is None or theirs < ours:
            out.add(tp)
            log.warning(
                "Partition %d of %s: the group's committed offset is %s, this evaluator committed %d: the "
                "brokers lost the group's state (and maybe the log); reading it again as a partition gained.",
                tp.partition,
                tp.topic,
                "gone" if theirs is None else theirs,
                ours,
            )
    return out
