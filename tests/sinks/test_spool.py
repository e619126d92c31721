"""The on-disk spool on its own: order, acknowledgement, restart, damage, size cap, a full disk."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from infra.disk import SmallDisk
from meshaudit.sinks.spool import HEADER, Spool


def _fill(spool: Spool, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        stored, dropped = spool.append(f"alert-{i:05d}".encode())
        assert stored and not dropped


def _drain(spool: Spool, batch: int = 7) -> list[bytes]:
    out: list[bytes] = []
    while recs := spool.peek(batch):
        out += [r.payload for r in recs]
        spool.ack(recs[-1].end)
    return out


def test_records_come_back_in_order_across_segments_and_leave_only_when_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=256)
    _fill(spool, 100)
    assert spool.depth == 100
    assert len(list(tmp_path.glob("*.seg"))) > 5
    first = spool.peek(3)
    assert [r.payload for r in first] == [b"alert-00000", b"alert-00001", b"alert-00002"]
    assert spool.peek(3) == first  # not acknowledged: handed out again
    spool.ack(first[-1].end)
    assert spool.depth == 97
    assert _drain(spool) == [f"alert-{i:05d}".encode() for i in range(3, 100)]
    assert spool.depth == 0 and spool.size_bytes == 0
    assert not list(tmp_path.glob("*.seg"))  # acknowledged segments are deleted
    _fill(spool, 2, 100)  # and the spool keeps working afterwards
    assert _drain(spool) == [b"alert-00100", b"alert-00101"]
    spool.close()


def test_a_restart_replays_exactly_the_unacknowledged_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=300)
    _fill(spool, 50)
    recs = spool.peek(20)
    spool.ack(recs[-1].end)
    del spool  # no close(): the process died; the cursor file is what ack() left
    again = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=300)
    assert again.depth == 30
    _fill(again, 5, 50)
    assert _drain(again) == [f"alert-{i:05d}".encode() for i in range(20, 55)]


def test_a_torn_record_at_the_end_is_cut_off_and_the_rest_survives(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    _fill(spool, 10)
    spool.close()
    (seg,) = tmp_path.glob("*.seg")
    data = seg.read_bytes()
    seg.write_bytes(data[:-4])  # a crash in the middle of the last write
    again = Spool(tmp_path, max_bytes=1 << 20)
    assert again.corrupt_dropped == 1
    assert _drain(again) == [f"alert-{i:05d}".encode() for i in range(9)]


def test_a_flipped_byte_fails_the_checksum(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    _fill(spool, 10)
    spool.close()
    (seg,) = tmp_path.glob("*.seg")
    data = bytearray(seg.read_bytes())
    record = HEADER.size + len(b"alert-00000")
    data[5 * record + HEADER.size + 2] ^= 0xFF  # inside the sixth payload
    seg.write_bytes(bytes(data))
    again = Spool(tmp_path, max_bytes=1 << 20)
    assert again.corrupt_dropped == 1
    assert _drain(again) == [f"alert-{i:05d}".encode() for i in range(5)]


def test_full_spool_drop_oldest_keeps_the_newest(tmp_path: Path) -> None:
    record = HEADER.size + len(b"alert-00000")
    spool = Spool(tmp_path, max_bytes=10 * record, policy="drop_oldest", segment_bytes=4 * record)
    _fill(spool, 10)
    stored, dropped = spool.append(b"alert-00010")
    assert (stored, dropped) == (True, 1)
    assert spool.size_bytes <= 10 * record
    assert _drain(spool) == [f"alert-{i:05d}".encode() for i in range(1, 11)]


def test_full_spool_drop_newest_refuses_the_new_record(tmp_path: Path) -> None:
    record = HEADER.size + len(b"alert-00000")
    spool = Spool(tmp_path, max_bytes=10 * record, policy="drop_newest")
    _fill(spool, 10)
    assert spool.append(b"alert-00010") == (False, 1)
    assert _drain(spool) == [f"alert-{i:05d}".encode() for i in range(10)]


def test_a_write_the_full_disk_cuts_short_leaves_no_torn_record(small_disk: SmallDisk) -> None:
    """A record that straddles a page when the disk fills is written in part by the kernel: the
    append must fail and leave the segment as it was, so the records after it read back whole."""
    spool = Spool(small_disk.path / "s", max_bytes=1 << 20)
    big = [bytes([65 + i]) * 3000 for i in range(3)]
    assert spool.append(big[0]) == (True, 0)  # 3010 bytes: its page has about 1 KiB left
    small_disk.fill()
    with pytest.raises(OSError) as err:
        spool.append(big[1])  # the first KiB fits in that page, the rest does not
    assert err.value.errno == errno.ENOSPC
    assert spool.depth == 1
    small_disk.free()
    assert spool.append(big[2]) == (True, 0)
    assert _drain(spool) == [big[0], big[2]]
    spool.close()
    again = Spool(small_disk.path / "s", max_bytes=1 << 20)
    assert again.corrupt_dropped == 0 and again.depth == 0
