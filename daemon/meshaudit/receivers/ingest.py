"""The bounded hand-off from receivers to the engine.

Receivers decode a transport message into a list of hops and ``offer`` it; the engine task
``get``s batches. The queue is bounded in batches: when it is full an ALS batch is dropped
and counted (Envoy never retries ALS), while OTLP callers answer "retry later"
(RESOURCE_EXHAUSTED / 429) so their exporters resend.
"""

from __future__ import annotations

import asyncio

from meshaudit import metrics
from meshaudit.model import Hop


class IngestQueue:
    def __init__(self, max_batches: int) -> None:
        self._q: asyncio.Queue[list[Hop]] = asyncio.Queue(maxsize=max_batches)
        self.closed = False

    def offer(self, hops: list[Hop]) -> bool:
        """Enqueue without waiting; False when full or closed (the caller counts the drop)."""
        if self.closed:
            return False
        try:
            self._q.put_nowait(hops)
        except asyncio.QueueFull:
            return False
        return True

    async def get(self) -> list[Hop]:
        return await self._q.get()

    def get_nowait(self) -> list[Hop] | None:
        try:
            return self._q.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def qsize(self) -> int:
        n = self._q.qsize()
        metrics.INGEST_QUEUE_DEPTH.set(n)
        return n
