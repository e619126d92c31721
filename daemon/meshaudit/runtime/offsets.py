"""What the evaluator's two consumers (the hops topic, stage 2's edges topic) share about their
committed offsets."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition

log = logging.getLogger("meshaudit")


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
