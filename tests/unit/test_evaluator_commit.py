"""The evaluator commits a hops offset only once the stage-2 records of its verdicts are
acknowledged: violations and window counts travel on the edges topic, so a hops offset committed
before them would, on a crash, lose what they carried (the hops past it are never judged again).
The broker here is a stand-in that records commits: a hops topic that takes commits while the
edges topic does not acknowledge is a split a real single broker cannot be made to show."""

from __future__ import annotations

from collections import deque

from aiokafka import TopicPartition
from meshaudit.config import Config, Policy
from meshaudit.runtime.evaluator import Evaluator


class Commits:
    """What the evaluator's consumer is asked to commit."""

    def __init__(self) -> None:
        self.done: list[dict[TopicPartition, int]] = []

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.done.append(dict(offsets))


async def test_an_offset_waits_for_the_edges_records_of_its_verdicts() -> None:
    ev = Evaluator(Config(), Policy(), None)
    consumer = Commits()
    ev.consumer = consumer  # aiokafka has no types: any object that commits
    tp = TopicPartition("meshaudit.hops", 0)
    ev.owned = {tp}
    ev._clock = 1_000.0  # long past every wait
    ev.stage2.pending.append((ev.stage2.next_seq, b"k", b"v"))  # a violation's record, not acknowledged
    ev.stage2.next_seq += 1
    ev.pending[tp] = deque([(0.0, 5)])
    await ev.commit_settled()
    assert consumer.done == [] and ev.committed == {}
    ev.stage2.pending.popleft()  # the broker acknowledged it
    await ev.commit_settled()
    assert consumer.done == [{tp: 5}] and ev.committed == {tp: 5}


async def test_with_nothing_on_the_edges_topic_offsets_commit_at_once() -> None:
    ev = Evaluator(Config(), Policy(), None)
    consumer = Commits()
    ev.consumer = consumer  # aiokafka has no types: any object that commits
    tp = TopicPartition("meshaudit.hops", 3)
    ev.owned = {tp}
    ev._clock = 1_000.0
    ev.pending[tp] = deque([(0.0, 7), (999.9, 9)])  # the second one's waits are not over
    await ev.commit_settled()
    assert consumer.done == [{tp: 7}]
