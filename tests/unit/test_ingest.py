"""The ingest queue is bounded in entries and bytes, not batches; an empty queue takes any one batch."""

from __future__ import annotations

from typing import Any

from meshaudit.receivers.ingest import IngestQueue


def _hops(n: int) -> list[Any]:
    return [object()] * n


def test_bounded_by_entries_and_bytes() -> None:
    q = IngestQueue(max_entries=100, max_bytes=1000)
    assert q.offer(_hops(60), nbytes=100)
    assert not q.offer(_hops(41))  # 101 entries
    assert q.offer(_hops(40))
    assert q.saturation().startswith("saturated: 100 of 100 entries")
    assert q.get_nowait() is not None and q.entries == 40
    assert not q.offer(_hops(1), nbytes=1001)
    assert q.offer(_hops(1), nbytes=900) and q.bytes == 900
    assert q.saturation().startswith("saturated: 900 of 1000 bytes")


def test_an_empty_queue_takes_one_batch_larger_than_a_bound() -> None:
    q = IngestQueue(max_entries=10)
    assert q.offer(_hops(50))
    assert not q.offer(_hops(1))
    assert q.qsize() == 1 and q.get_nowait() is not None and q.entries == 0
    q.closed = True
    assert not q.offer(_hops(1))
