"""Reload on change: the configuration file and its policy files are polled (``os.stat``,
following symlinks) and a change is acted on once it has settled for one more interval.

Polling, not inotify: Kubernetes updates a mounted ConfigMap by swapping a symlink to a new
directory, which watches on the files themselves miss; a stat that follows the link sees it.
A directory of policy files is watched as its listing and each file in it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from pathlib import Path

Signature = tuple[tuple[str, tuple[int, int, int] | None], ...]


def _stat(p: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def signature(paths: Iterable[Path]) -> Signature:
    out: list[tuple[str, tuple[int, int, int] | None]] = []
    for p in paths:
        out.append((str(p), _stat(p)))
        if p.is_dir():
            out.extend((str(f), _stat(f)) for f in sorted(p.iterdir()) if f.suffix in (".yaml", ".yml"))
    return tuple(out)


class FileWatch:
    """The configuration's files (``paths()``: they may change with the configuration) as last
    loaded (``mark``, on every reload), and the watch that reloads when they changed since."""

    def __init__(self, paths: Callable[[], list[Path]]) -> None:
        self.paths = paths
        self.seen: Signature = signature(paths())

    def mark(self) -> None:
        self.seen = signature(self.paths())

    async def run(self, reload: Callable[[], None], interval: float) -> None:
        """Call ``reload`` when the files changed and then stayed the same for one interval (an
        editor's or kubelet's write in several steps reloads once, when done), unless a reload
        (SIGHUP) loaded them as they are already."""
        last = signature(self.paths())
        settling = False
        while True:
            await asyncio.sleep(interval)
            sig = signature(self.paths())
            if sig != last:
                last, settling = sig, True
            elif settling:
                settling = False
                if sig != self.seen:
                    reload()
