"""Delivery queues on their own (a real spool in a temporary directory): write-ahead, verdicts
(ack, requeue, drop), one rejected alert in the middle of a batch, the memory mirror's edge, and
the bounded memory queue."""

from __future__ import annotations

from pathlib import Path

from meshaudit.sinks.queue import Batch, MemoryQueue, Outgoing, SpoolQueue
from meshaudit.sinks.spool import Spool

from sinks.support import make_alert, metric, unique


def items(n: int, start: int = 0) -> list[Outgoing]:
    return [Outgoing.from_alert(make_alert(i)) for i in range(start, start + n)]


def spool_queue(path: Path, mirror: int = 100) -> SpoolQueue:
    return SpoolQueue(unique("q"), Spool(path, max_bytes=1 << 20, segment_bytes=2048), mirror_size=mirror)


def drain(queue: SpoolQueue | MemoryQueue, limit: int) -> list[str]:
    got: list[str] = []
    while batch := queue.take(limit):
        got += [i.id for i in batch.items]
        queue.ack(batch)
    return got


def test_every_alert_is_on_disk_when_put_returns(tmp_path: Path) -> None:
    q = spool_queue(tmp_path)
    sent = items(5)
    for i in sent:
        q.put(i)
    # another process opening the same directory (a restart after SIGKILL) finds all of them
    again = Spool(tmp_path, max_bytes=1 << 20)
    assert [Outgoing.from_spool(r.payload) for r in again.peek(10)] == sent
    assert metric("meshaudit_sink_spooled_total", q.sink) == 5


def test_a_requeued_batch_comes_back_first_and_an_acked_one_never(tmp_path: Path) -> None:
    q = spool_queue(tmp_path)
    sent = items(6)
    for i in sent:
        q.put(i)
    first = q.take(4)
    assert q.busy and first.items == sent[:4]
    q.requeue(first)
    assert not q.busy
    again = q.take(4)
    assert again.items == sent[:4]
    q.ack(again)
    assert len(q) == 2
    assert drain(q, 4) == [i.id for i in sent[4:]]
    assert len(q) == 0 and metric("meshaudit_sink_spool_alerts", q.sink) == 0


def test_one_alert_rejected_for_good_in_mid_batch_is_dropped_and_the_others_keep_their_order(
    tmp_path: Path,
) -> None:
    q = spool_queue(tmp_path)
    sent = items(5)
    for i in sent:
        q.put(i)
    batch = q.take(5)
    bad, rest = batch.split(batch.items[2])
    q.drop(bad, "permanent_error")
    q.requeue(rest)
    assert drain(q, 5) == [sent[i].id for i in (0, 1, 3, 4)]
    assert metric("meshaudit_sink_dropped_total", q.sink, reason="permanent_error") == 1
    assert len(q) == 0


def test_alerts_beyond_the_memory_mirror_are_read_back_from_disk_in_order(tmp_path: Path) -> None:
    q = spool_queue(tmp_path, mirror=3)
    sent = items(10)
    for i in sent:
        q.put(i)
    assert metric("meshaudit_sink_queue_alerts", q.sink) == 3
    first = q.take(100)  # the disk part: a batch never mixes disk and mirror
    assert first.items == sent[:7]
    q.ack(first)
    assert q.take(100).items == sent[7:]


def test_a_restart_replays_from_disk_what_the_last_process_did_not_ack(tmp_path: Path) -> None:
    q = spool_queue(tmp_path)
    sent = items(8)
    for i in sent:
        q.put(i)
    q.ack(q.take(3))
    # no close: the process died; a new one reads the rest from disk
    again = spool_queue(tmp_path)
    (later,) = items(1, 100)
    again.put(later)
    assert drain(again, 4) == [i.id for i in sent[3:]] + [later.id]


def test_the_memory_queue_drops_what_it_cannot_hold_and_what_is_left_at_shutdown(tmp_path: Path) -> None:
    q = MemoryQueue(unique("m"), size=4)
    sent = items(6)
    for i in sent:
        q.put(i)
    assert metric("meshaudit_sink_dropped_total", q.sink, reason="queue_full") == 2
    batch = q.take(3)
    assert batch.items == sent[:3] and len(q) == 4
    q.put(sent[5])  # the batch out still counts against the bound
    assert metric("meshaudit_sink_dropped_total", q.sink, reason="queue_full") == 3
    assert q.close(deliver_by_now=True) == 4  # the batch out included
    assert metric("meshaudit_sink_dropped_total", q.sink, reason="shutdown") == 4
    assert isinstance(Batch([]), Batch) and not Batch([])
