"""JSON-lines sink: one alert record per line, to stdout (the default) or a file; on a terminal
(``format: auto``) or with ``format: text``, one readable line per alert instead.

A line is written and flushed before the alert counts as sent; with ``fsync: true`` the
file is also synced, for a file that must survive a host crash. The output is local, so there
is no spool by default (``spool_dir: null``); set one for a file on a disk that may fill up.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from typing import BinaryIO, Literal

import orjson
from pydantic import Field

from meshaudit.sinks.base import Sink, SinkConfigBase
from meshaudit.sinks.queue import Outgoing
from meshaudit.sinks.text import readable


class JsonlConfig(SinkConfigBase):
    path: str = Field("-", description='"-" for stdout, else a file opened for append.')
    format: Literal["auto", "json", "text"] = Field(
        "auto", description="json: the alert record; text: one readable line; auto: text on a terminal, else json."
    )
    fsync: bool = False
    spool_dir: str | None = Field(None, description="No spool by default: the output is local.")


class JsonlSink(Sink):
    def __init__(self, config: JsonlConfig, name: str = "jsonl") -> None:
        super().__init__(name, config)
        self._cfg = config
        self._out: BinaryIO | None = None
        self._text = False  # readable lines instead of records (decided when the output opens)

    async def _connect(self) -> None:
        if self._out is not None:
            return
        if self._cfg.path == "-":
            self._out = sys.stdout.buffer
        else:
            # Held open for the sink's life; opening a local file once is not worth a thread hop.
            self._out = open(self._cfg.path, "ab")  # noqa: SIM115, ASYNC230
        fmt = self._cfg.format
        self._text = fmt == "text" or (fmt == "auto" and self._out.isatty())

    async def _send(self, items: Sequence[Outgoing]) -> None:
        out = self._out
        if out is None:
            raise ConnectionError("output not open")
        # A local write of a few short lines: doing it inline is cheaper than a thread hop,
        # except with fsync, which may block for milliseconds.
        if self._text:
            colour = out.isatty()
            out.write("".join(readable(orjson.loads(i.payload), colour) + "\n" for i in items).encode())
        else:
            out.write(b"".join(item.payload + b"\n" for item in items))
        out.flush()
        if self._cfg.fsync and out is not sys.stdout.buffer:
            await asyncio.to_thread(os.fsync, out.fileno())

    async def _close(self) -> None:
        out, self._out = self._out, None
        if out is not None and out is not sys.stdout.buffer:
            out.close()
