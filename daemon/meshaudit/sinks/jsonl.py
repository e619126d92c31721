"""JSON-lines sink: one alert record per line, to stdout (the default) or a file.

A line is written and flushed before the alert counts as sent; with ``fsync: true`` the
file is also synced, for a file that must survive a host crash.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import BinaryIO

from pydantic import Field

from meshaudit.model import Alert
from meshaudit.sinks.base import Sink, SinkConfigBase


class JsonlConfig(SinkConfigBase):
    path: str = Field("-", description='"-" for stdout, else a file opened for append.')
    fsync: bool = False


class JsonlSink(Sink):
    def __init__(self, config: JsonlConfig, name: str = "jsonl") -> None:
        super().__init__(name, config)
        self._cfg = config
        self._out: BinaryIO | None = None

    async def _connect(self) -> None:
        if self._out is not None:
            return
        if self._cfg.path == "-":
            self._out = sys.stdout.buffer
        else:
            self._out = open(self._cfg.path, "ab")  # noqa: SIM115 - held open for the sink's life

    async def _send(self, alert: Alert) -> None:
        out = self._out
        if out is None:
            raise ConnectionError("output not open")
        # A local write of one short line: doing it inline is cheaper than a thread hop,
        # except with fsync, which may block for milliseconds.
        out.write(alert.encode() + b"\n")
        out.flush()
        if self._cfg.fsync and out is not sys.stdout.buffer:
            await asyncio.to_thread(os.fsync, out.fileno())

    async def _close(self) -> None:
        out, self._out = self._out, None
        if out is not None and out is not sys.stdout.buffer:
            out.close()
