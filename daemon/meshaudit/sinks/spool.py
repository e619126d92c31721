"""The on-disk spool of one sink: alerts waiting for a backend that is down or behind, kept in
order across restarts, removed only once the backend acknowledged them.

Layout, in ``<spool_dir>/<sink name>/``:

- segment files ``<16 digits>.seg``, append-only, each a run of records
  ``magic (2 bytes) | payload length (u32 BE) | CRC-32 of payload (u32 BE) | payload``;
  the payload is the alert's JSON record (the same bytes every sink sends);
- ``cursor``: the position (segment, offset) of the first record not yet acknowledged,
  replaced atomically (write a temp file, then rename).

A record is read back in order and leaves the spool when :meth:`Spool.ack` moves the cursor
past it; a segment wholly behind the cursor is deleted. A crash can at worst repeat records
acknowledged after the last cursor write (at-least-once) or leave a torn record at the end of
the newest segment, which opening the spool detects by its checksum and cuts off.

Size cap: ``max_bytes`` bounds the bytes of records not yet acknowledged. When an append would
exceed it, the policy decides: ``drop_newest`` refuses the new record, ``drop_oldest`` removes
the oldest records until the new one fits. Either way the caller counts the drop.

Everything here is synchronous and small (appends of a few hundred bytes to the page cache),
so the event loop calls it directly; ``fsync`` is an option for hosts that may lose power.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

log = logging.getLogger("meshaudit.sinks.spool")

MAGIC: Final = b"\xa1\x5e"
HEADER: Final = struct.Struct(">2sII")
SpoolFullPolicy = Literal["drop_oldest", "drop_newest"]


class SpoolCorrupt(Exception):
    """A record whose header or checksum does not match."""

    def __init__(self, message: str, segment: int) -> None:
        super().__init__(message)
        self.segment = segment


@dataclass(frozen=True, order=True)
class Position:
    segment: int
    offset: int


@dataclass(frozen=True)
class Record:
    payload: bytes
    end: Position  # acknowledge up to here to remove this record (and all before it)
    start: Position = Position(0, 0)  # where the record begins


class Spool:
    """Append-only, checksummed, size-capped FIFO of byte records in one directory."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        policy: SpoolFullPolicy = "drop_oldest",
        segment_bytes: int | None = None,
        fsync: bool = False,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.policy = policy
        # Disk use is at most max_bytes plus one segment (the head's acknowledged part).
        self.segment_bytes = segment_bytes or max(4096, min(max_bytes // 8, 8 * 1024 * 1024))
        self.fsync = fsync
        self.corrupt_dropped = 0  # records lost to a bad checksum when opening, for the caller to count
        self._segments: list[int] = []  # ids, oldest first
        self._sizes: dict[int, int] = {}
        self._counts: dict[int, int] = {}  # records per segment not yet behind the cursor
        self._cursor = Position(0, 0)
        self._fd: int | None = None  # the newest segment, open for append
        self._files: dict[int, int] = {}  # read descriptors
        self._records = 0
        self._open()

    # --- state ------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Records not yet acknowledged."""
        return self._records

    @property
    def size_bytes(self) -> int:
        """Bytes of records not yet acknowledged (what the cap bounds)."""
        if not self._segments:
            return 0
        return sum(self._sizes[s] for s in self._segments) - self._cursor.offset

    def __len__(self) -> int:
        return self._records

    @property
    def head(self) -> Position:
        """The position of the oldest record not yet acknowledged (the cursor)."""
        return self._cursor

    @property
    def tail(self) -> Position:
        """The position just after the newest record: where the last append ended."""
        if not self._segments:
            return self._cursor
        seg = self._segments[-1]
        return Position(seg, self._sizes[seg])

    # --- opening and recovery -------------------------------------------------------------------
    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        ids = sorted(int(p.stem) for p in self.directory.glob("*.seg") if p.stem.isdigit())
        cursor = self._load_cursor()
        for seg in ids:
            if seg < cursor.segment:  # left over from a crash between cursor write and unlink
                self._path(seg).unlink(missing_ok=True)
                continue
            start = cursor.offset if seg == cursor.segment else 0
            count, valid_end = self._scan(seg, start)
            size = self._path(seg).stat().st_size
            if valid_end < size:
                log.error(
                    "Spool segment %s has a damaged record at byte %d; dropping its last %d bytes.",
                    self._path(seg),
                    valid_end,
                    size - valid_end,
                )
                self.corrupt_dropped += 1
                with open(self._path(seg), "r+b") as f:
                    f.truncate(valid_end)
                size = valid_end
            self._segments.append(seg)
            self._sizes[seg] = size
            self._counts[seg] = count
            self._records += count
        if self._segments and cursor.segment < self._segments[0]:
            cursor = Position(self._segments[0], 0)
        if not self._segments:
            cursor = Position(cursor.segment, 0)
        self._cursor = cursor
        if self._records:
            log.info(
                "Spool %s holds %d alerts (%d bytes) from before; replaying them in order.",
                self.directory,
                self._records,
                self.size_bytes,
            )

    def _scan(self, seg: int, start: int) -> tuple[int, int]:
        """Count valid records from ``start``; return (count, offset after the last valid one)."""
        count, pos = 0, start
        with open(self._path(seg), "rb") as f:
            f.seek(start)
            while True:
                head = f.read(HEADER.size)
                if len(head) < HEADER.size:
                    return count, pos
                magic, length, crc = HEADER.unpack(head)
                payload = f.read(length) if magic == MAGIC else b""
                if magic != MAGIC or len(payload) < length or zlib.crc32(payload) != crc:
                    return count, pos
                count += 1
                pos += HEADER.size + length

    def _load_cursor(self) -> Position:
        try:
            text = (self.directory / "cursor").read_text().split()
            return Position(int(text[0]), int(text[1]))
        except (OSError, ValueError, IndexError):
            return Position(0, 0)

    def _save_cursor(self) -> None:
        tmp = self.directory / "cursor.tmp"
        with open(tmp, "w") as f:
            f.write(f"{self._cursor.segment} {self._cursor.offset}\n")
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.directory / "cursor")

    def _path(self, seg: int) -> Path:
        return self.directory / f"{seg:016d}.seg"

    # --- writing ---------------------------------------------------------------------------------
    def append(self, payload: bytes) -> tuple[bool, int]:
        """Append one record. Returns (stored, records dropped to make room or refused)."""
        size = HEADER.size + len(payload)
        if size > self.max_bytes:
            return False, 1
        dropped = 0
        while self.size_bytes + size > self.max_bytes:
            if self.policy == "drop_newest" or not self._drop_oldest():
                return False, dropped + 1
            dropped += 1
        if not self._segments or self._sizes[self._segments[-1]] + size > self.segment_bytes:
            self._roll()
        elif self._fd is None:
            # After a restart the newest segment is reopened by the first append.
            self._fd = os.open(self._path(self._segments[-1]), os.O_WRONLY | os.O_APPEND)
        seg = self._segments[-1]
        fd = self._fd
        assert fd is not None
        record = HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        try:
            written = os.write(fd, record)
            if written != size:  # a full disk takes what fits and refuses the rest
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if self.fsync:
                os.fsync(fd)
        except OSError:
            # Whatever part of the record reached the file is cut off again, so the next record
            # starts where the spool's bookkeeping says (a torn record would misalign reads).
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._sizes[seg])
            raise
        self._sizes[seg] += size
        self._counts[seg] += 1
        self._records += 1
        return True, dropped

    def _roll(self) -> None:
        seg = self._segments[-1] + 1 if self._segments else max(self._cursor.segment, 1)
        # Open the new segment first: if that fails (a full disk), nothing here has changed.
        fd = os.open(self._path(seg), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._segments.append(seg)
        self._sizes[seg] = 0
        self._counts[seg] = 0
        if len(self._segments) == 1:
            self._cursor = Position(seg, 0)

    def _drop_oldest(self) -> bool:
        """Remove the oldest unacknowledged record; False when there is none."""
        if not self._records:
            return False
        head = self._read_at(self._cursor)
        if head is None:
            return False
        self._advance(head.end)
        return True

    # --- reading and acknowledging -------------------------------------------------------------
    def peek(self, limit: int) -> list[Record]:
        """Up to ``limit`` of the oldest records, in order, without removing them."""
        return self.read(self._cursor, limit)

    def read(self, pos: Position, limit: int, stop: Position | None = None) -> list[Record]:
        """Up to ``limit`` records from ``pos`` on (not past ``stop``), in order, without removing
        them.

        A record damaged on disk while the daemon ran (its checksum no longer matches) cannot
        be delivered: the rest of its segment is dropped, logged and counted in
        ``corrupt_dropped``, and reading goes on with the next segment.
        """
        out: list[Record] = []
        pos = max(pos, self._cursor)
        while len(out) < limit and (stop is None or pos < stop):
            try:
                rec = self._read_at(pos)
            except SpoolCorrupt as exc:
                if out:  # deliver what precedes the damage first
                    break
                log.error("Spool record damaged (%s); dropping the rest of its segment.", exc)
                self._discard_segment(exc.segment)
                pos = self._cursor
                continue
            if rec is None or (stop is not None and rec.start >= stop):
                break
            out.append(rec)
            pos = rec.end
        return out

    def _read_at(self, pos: Position) -> Record | None:
        while True:
            if pos.segment not in self._sizes:
                later = [s for s in self._segments if s > pos.segment]
                if not later:
                    return None
                pos = Position(later[0], 0)
            if pos.offset < self._sizes[pos.segment]:
                break
            later = [s for s in self._segments if s > pos.segment]
            if not later:
                return None
            pos = Position(later[0], 0)
        fd = self._files.get(pos.segment)
        if fd is None:
            fd = self._files[pos.segment] = os.open(self._path(pos.segment), os.O_RDONLY)
        head = os.pread(fd, HEADER.size, pos.offset)
        if len(head) < HEADER.size:
            raise SpoolCorrupt(f"{self._path(pos.segment)} at byte {pos.offset}: short header", pos.segment)
        magic, length, crc = HEADER.unpack(head)
        payload = os.pread(fd, length, pos.offset + HEADER.size)
        if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
            raise SpoolCorrupt(f"{self._path(pos.segment)} at byte {pos.offset}", pos.segment)
        return Record(payload, Position(pos.segment, pos.offset + HEADER.size + length), pos)

    def ack(self, end: Position) -> None:
        """The backend acknowledged every record before ``end``: remove them for good."""
        if end <= self._cursor:
            return
        self._advance(end)
        self._save_cursor()

    def _advance(self, end: Position) -> None:
        # Count the records passed over, segment by segment, and delete finished segments.
        while self._segments and Position(self._segments[0], 0) <= end:
            seg = self._segments[0]
            start = self._cursor.offset if seg == self._cursor.segment else 0
            stop = end.offset if seg == end.segment else self._sizes[seg]
            passed = self._count_between(seg, start, stop)
            self._counts[seg] -= passed
            self._records -= passed
            if seg == end.segment and (stop < self._sizes[seg] or seg == self._segments[-1]):
                self._cursor = end
                break
            self._remove_segment(seg)
            self._cursor = Position(self._segments[0], 0) if self._segments else Position(seg + 1, 0)
            if seg == end.segment:
                break
        if not self._records and self._segments and self._segments == [self._cursor.segment]:
            # Empty spool: start a fresh segment next time rather than growing a drained one.
            seg = self._segments[0]
            self._remove_segment(seg)
            self._cursor = Position(seg + 1, 0)

    def _count_between(self, seg: int, start: int, stop: int) -> int:
        if stop <= start:
            return 0
        if start == 0 and stop >= self._sizes[seg]:
            return self._counts[seg]
        count, pos = 0, start
        fd = self._files.get(seg)
        if fd is None:
            fd = self._files[seg] = os.open(self._path(seg), os.O_RDONLY)
        while pos < stop:
            _, length, _ = HEADER.unpack(os.pread(fd, HEADER.size, pos))
            pos += HEADER.size + length
            count += 1
        return count

    def _discard_segment(self, seg: int) -> None:
        # The damaged segment may hold records before the cursor already acknowledged, but its
        # remaining count is exact: that is what is lost.
        lost = self._counts[seg]
        self.corrupt_dropped += lost
        self._records -= lost
        self._remove_segment(seg)
        self._cursor = Position(self._segments[0], 0) if self._segments else Position(seg + 1, 0)
        self._save_cursor()

    def _remove_segment(self, seg: int) -> None:
        self._segments.remove(seg)
        del self._sizes[seg]
        del self._counts[seg]
        fd = self._files.pop(seg, None)
        if fd is not None:
            os.close(fd)
        if self._fd is not None and not self._segments:
            os.close(self._fd)
            self._fd = None
        self._path(seg).unlink(missing_ok=True)

    def close(self) -> None:
        """Persist the cursor and close files; safe twice."""
        if self.directory.exists():
            self._save_cursor()
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
