"""The learned baseline's state file (``meshaudit.baseline``): save and load, the checksum and the
version, refusing a damaged file with a message that says what is wrong, the atomic write, and
disk errors that never reach the daemon (a real full or read-only tmpfs; an I/O error mocked)."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from infra.disk import SmallDisk
from meshaudit import baseline, metrics
from meshaudit.baseline import Baseline, BaselineError, BaselineFile, checksum

T0 = 1_800_000_000.0


def sample() -> Baseline:
    b = Baseline()
    b.add_edge("frontend.default", "reviews.default", T0)
    b.add_edge("reviews.default", "ratings.default", T0 + 5.25)
    b.add_edge("spiffe://cluster.local/ns/x/sa/y", "10.0.0.9", T0 + 7)
    b.routes.add("reviews.default", "GET", "/reviews/1")
    b.routes.add("reviews.default", "POST", "/reviews")
    return b


def counter(c: Any, result: str) -> float:
    return float(c.labels(result)._value.get())


def rewrite(path: Path, change: Any, resign: bool = False) -> None:
    """Edit the saved document; ``resign``: compute its checksum again (a well-formed file of
    another version or format)."""
    doc = orjson.loads(path.read_bytes())
    change(doc)
    if resign:
        doc.pop("sha256", None)
        doc["sha256"] = checksum(doc)
    path.write_bytes(orjson.dumps(doc))


def test_save_then_load_gives_the_same_baseline(tmp_path: Path) -> None:
    f = tmp_path / "baseline.json"
    baseline.save(sample(), f, T0 + 60)
    got = baseline.load(f)
    assert got is not None
    assert got.edges == sample().edges
    assert got.routes.by_dst == {"reviews.default": {("GET", "/reviews/1"), ("POST", "/reviews")}}
    assert got.written == T0 + 60
    assert (f.stat().st_mode & 0o777) == 0o600  # the mesh's topology: readable by the daemon's user only
    assert [p.name for p in tmp_path.iterdir()] == ["baseline.json"]  # no temporary file left


def test_the_file_is_the_documented_format(tmp_path: Path) -> None:
    f = tmp_path / "baseline.json"
    baseline.save(sample(), f, T0 + 60)
    doc = orjson.loads(f.read_bytes())
    sha = doc.pop("sha256")
    assert doc == {
        "format": "meshaudit-baseline",
        "version": 1,
        "written": T0 + 60,
        "edges": [
            {"from": "frontend.default", "to": "reviews.default", "first_seen": T0},
            {"from": "reviews.default", "to": "ratings.default", "first_seen": T0 + 5.25},
            {"from": "spiffe://cluster.local/ns/x/sa/y", "to": "10.0.0.9", "first_seen": T0 + 7},
        ],
        "routes": {"reviews.default": {"allow": [["GET", "/reviews/1"], ["POST", "/reviews"]], "dropped": 0}},
    }
    assert sha == checksum(doc)
    # The same baseline always gives the same bytes (sorted edges and keys).
    again = tmp_path / "again.json"
    baseline.save(sample(), again, T0 + 60)
    assert again.read_bytes() == f.read_bytes()


def test_a_missing_file_is_an_empty_start_not_an_error(tmp_path: Path) -> None:
    assert baseline.load(tmp_path / "nothing-yet.json") is None


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-40]), "not valid JSON"),
        (lambda f: f.write_bytes(b""), "not valid JSON"),
        (lambda f: f.write_bytes(b"[1, 2]"), 'no "format": "meshaudit-baseline" field'),
        (lambda f: f.write_text('{"edges": []}'), 'no "format": "meshaudit-baseline" field'),
        (lambda f: rewrite(f, lambda d: d["edges"][0].update(to="ratings.default")), "checksum mismatch"),
        (lambda f: rewrite(f, lambda d: d.pop("sha256")), 'no "sha256" field'),
        (lambda f: rewrite(f, lambda d: d.update(version=2), resign=True), "format version 2 is not supported"),
        (lambda f: rewrite(f, lambda d: d.update(version="1"), resign=True), "format version '1' is not supported"),
        (lambda f: rewrite(f, lambda d: d["edges"][0].pop("first_seen"), resign=True), "malformed baseline"),
        (lambda f: rewrite(f, lambda d: d["edges"][1].update(to=7), resign=True), "edges[1] must have string"),
        (lambda f: rewrite(f, lambda d: d.update(routes=[]), resign=True), "malformed baseline"),
    ],
)
def test_a_damaged_file_is_refused_naming_the_file_and_what_is_wrong(tmp_path: Path, damage: Any, says: str) -> None:
    f = tmp_path / "baseline.json"
    baseline.save(sample(), f, T0)
    damage(f)
    with pytest.raises(BaselineError) as exc:
        baseline.load(f)
    assert str(exc.value).startswith(f"{f}: "), exc.value
    assert says in str(exc.value), exc.value


def test_a_flipped_bit_is_a_checksum_mismatch(tmp_path: Path) -> None:
    f = tmp_path / "baseline.json"
    baseline.save(sample(), f, T0)
    data = bytearray(f.read_bytes())
    i = data.index(b"ratings")
    data[i] ^= 0x01  # "ratings" -> "satings": still valid JSON
    f.write_bytes(bytes(data))
    with pytest.raises(BaselineError, match="checksum mismatch"):
        baseline.load(f)


def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "a-directory.json"
    d.mkdir()
    with pytest.raises(BaselineError, match="cannot read"):
        baseline.load(d)


def test_a_crash_before_the_rename_leaves_the_old_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "baseline.json"
    baseline.save(sample(), f, T0)
    before = f.read_bytes()
    bigger = sample()
    bigger.add_edge("new.default", "reviews.default", T0 + 100)

    def crash(src: str, dst: str) -> None:
        assert Path(src).read_bytes() != before  # the new content was written, fsynced, not renamed yet
        raise OSError(errno.EIO, "simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        baseline.save(bigger, f, T0 + 200)
    monkeypatch.undo()
    assert f.read_bytes() == before
    got = baseline.load(f)
    assert got is not None and got.edges == sample().edges
    assert [p.name for p in tmp_path.iterdir()] == ["baseline.json"]  # the temporary file is gone


def test_routes_are_bounded_per_destination_and_drops_counted() -> None:
    b = Baseline()
    for i in range(baseline.ROUTES_PER_DESTINATION + 7):
        b.routes.add("reviews.default", "GET", f"/reviews/{i}")
    b.routes.add("ratings.default", "GET", "/ratings/1")
    assert len(b.routes.by_dst["reviews.default"]) == baseline.ROUTES_PER_DESTINATION
    assert b.routes.dropped == {"reviews.default": 7}
    assert b.routes.evicted_capacity == 7
    assert len(b.routes) == baseline.ROUTES_PER_DESTINATION + 1
    assert not b.routes.add("reviews.default", "GET", "/reviews/0")  # known: neither new nor dropped
    assert b.routes.dropped == {"reviews.default": 7}


def test_an_edge_keeps_the_first_time_it_was_seen() -> None:
    b = Baseline(max_edges=2)
    assert b.add_edge("a", "b", T0 + 5)
    assert not b.add_edge("a", "b", T0 + 9)
    assert not b.add_edge("a", "b", T0 + 1)  # seen earlier elsewhere (another worker)
    assert b.edges[("a", "b")] == T0 + 1
    assert b.add_edge("a", "c", T0)
    assert not b.add_edge("a", "d", T0)  # full
    assert len(b) == 2


# --- BaselineFile: how the daemon uses the file -----------------------------------------------------------------
def test_a_corrupt_file_is_logged_counted_and_kept_until_the_next_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "baseline.json"
    f.write_text('{"format": "meshaudit-baseline", "version": 1, "edges": [')
    corrupt = f.read_bytes()
    before = counter(metrics.BASELINE_LOADS, "corrupt")
    keeper = BaselineFile(f)
    with caplog.at_level(logging.INFO, "meshaudit.baseline"):
        assert keeper.load(600) is None
    assert counter(metrics.BASELINE_LOADS, "corrupt") == before + 1
    (rec,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    msg = rec.getMessage()
    assert str(f) in msg and "not valid JSON" in msg
    assert "empty baseline" in msg and "learning again for 600 s" in msg and f"{f}.corrupt" in msg
    assert f.read_bytes() == corrupt  # untouched until the new baseline is saved
    keeper.request()
    assert keeper.flush(sample, T0)
    assert Path(f"{f}.corrupt").read_bytes() == corrupt
    got = baseline.load(f)
    assert got is not None and got.edges == sample().edges
    assert not keeper.corrupt and not keeper.pending


def test_loaded_and_missing_are_counted(tmp_path: Path) -> None:
    f = tmp_path / "baseline.json"
    missing, loaded = counter(metrics.BASELINE_LOADS, "missing"), counter(metrics.BASELINE_LOADS, "loaded")
    assert BaselineFile(f).load(60) is None
    baseline.save(sample(), f, T0)
    got = BaselineFile(f).load(60)
    assert got is not None and len(got) == 3
    assert counter(metrics.BASELINE_LOADS, "missing") == missing + 1
    assert counter(metrics.BASELINE_LOADS, "loaded") == loaded + 1


def test_a_full_disk_never_raises_is_counted_logged_once_and_retried(
    small_disk: SmallDisk, caplog: pytest.LogCaptureFixture
) -> None:
    f = small_disk.path / "baseline.json"
    baseline.save(sample(), f, T0)
    old = f.read_bytes()
    big = sample()
    for i in range(5000):  # ~500 KiB of JSON: more than the disk holds
        big.add_edge(f"client-{i:05d}.default", "reviews.default", T0 + i)
    keeper = BaselineFile(f)
    errors, oks = counter(metrics.BASELINE_WRITES, "error"), counter(metrics.BASELINE_WRITES, "ok")
    keeper.request()
    with caplog.at_level(logging.ERROR, "meshaudit.baseline"):
        assert not keeper.flush(lambda: big, T0)  # ENOSPC: no exception
        assert not keeper.flush(lambda: big, T0 + 1)  # not retried yet
        assert not keeper.flush(lambda: big, T0 + baseline.RETRY_SECS)  # retried, fails again
    assert counter(metrics.BASELINE_WRITES, "error") == errors + 2
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1, logged  # rate limited
    assert str(f) in logged[0] and "No space left on device" in logged[0] and "goes on" in logged[0]
    assert f.read_bytes() == old  # the old baseline is whole
    assert sorted(p.name for p in small_disk.path.iterdir()) == ["baseline.json"]  # no partial temp file
    # Room again: the next retry writes it.
    assert keeper.pending
    assert keeper.flush(sample, T0 + 2 * baseline.RETRY_SECS)
    assert counter(metrics.BASELINE_WRITES, "ok") == oks + 1


def test_a_read_only_disk_never_raises(small_disk: SmallDisk) -> None:
    f = small_disk.path / "baseline.json"
    keeper = BaselineFile(f)
    errors = counter(metrics.BASELINE_WRITES, "error")
    small_disk.read_only()
    try:
        keeper.request()
        assert not keeper.flush(sample, T0)
    finally:
        small_disk.read_only(False)
    assert counter(metrics.BASELINE_WRITES, "error") == errors + 1
    assert not f.exists()
    assert keeper.flush(sample, T0 + baseline.RETRY_SECS)


def test_an_io_error_on_fsync_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO from a failing device: a fault no real component here produces on demand, so mocked."""
    f = tmp_path / "baseline.json"
    baseline.save(sample(), f, T0)
    old = f.read_bytes()

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", eio)
    keeper = BaselineFile(f)
    keeper.request()
    bigger = sample()
    bigger.add_edge("x.default", "y.default", T0)
    assert not keeper.flush(lambda: bigger, T0)
    monkeypatch.undo()
    assert f.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["baseline.json"]


def test_a_corrupt_file_is_not_replaced_when_its_copy_cannot_be_kept(small_disk: SmallDisk) -> None:
    f = small_disk.path / "baseline.json"
    f.write_bytes(b"x" * 1000)
    keeper = BaselineFile(f)
    assert keeper.load(60) is None
    small_disk.fill()
    keeper.request()
    assert not keeper.flush(sample, T0)
    small_disk.free()
    assert f.read_bytes() == b"x" * 1000  # still the original: no copy, no overwrite
    assert keeper.flush(sample, T0 + baseline.RETRY_SECS)
    assert Path(f"{f}.corrupt").read_bytes() == b"x" * 1000


def test_a_state_file_in_a_missing_directory_is_warned_about_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "not-there" / "baseline.json"
    keeper = BaselineFile(f)
    with caplog.at_level(logging.WARNING, "meshaudit.baseline"):
        assert keeper.load(600) is None
    (msg,) = [r.getMessage() for r in caplog.records]
    assert str(f.parent) in msg and "no such directory" in msg
    keeper.request()
    assert not keeper.flush(sample, T0)  # counted and logged, never raised
    f.parent.mkdir()
    assert keeper.flush(sample, T0 + baseline.RETRY_SECS)
