"""The bounded hand-off from receivers to the engine.

Receivers decode a transport message into hops and ``offer`` them; the engine task ``get``s
batches. The queue is bounded in entries (hops: ``receivers.ingest_queue_entries``) and in the
wire bytes of the messages they came from (``receivers.ingest_queue_bytes``), because a batch
can be one entry or a hundred thousand. A batch that would pass either bound is refused: an
ALS batch is then dropped and counted (Envoy never retries ALS), while OTLP callers answer
"retry later" (RESOURCE_EXHAUSTED / 429) so their exporters resend. An empty queue takes any one
batch, so a batch larger than a bound is never refused forever; receivers cap a message's
entries (``receivers.max_entries_per_message``) and bytes (``max_message_bytes``) below the bounds.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Final

from meshaudit import metrics
from meshaudit.model import Hop

SATURATED: Final = 0.9  # /readyz: not ready at or above this share of either bound
MAX_CLAIMS: Final = 1000  # log_source_mismatch claims waiting for the engine (one per stream or export)


class IngestQueue:
    def __init__(self, max_entries: int, max_bytes: int = 2**62, max_message_entries: int | None = None) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # receivers.max_entries_per_message: receivers reject a message with more before decoding it
        self.max_message_entries = max_entries if max_message_entries is None else max_message_entries
        self._q: collections.deque[tuple[list[Hop], int]] = collections.deque()
        self._nonempty = asyncio.Event()
        self.entries = 0
        self.bytes = 0
        self.closed = False
        # Senders that claimed what they may not (meshaudit.engine.sources.Claim), for
        # log_source_mismatch: beside the hops, so that no hop pays for them.
        self.claims: list[Any] = []

    def offer(self, hops: list[Hop], *, nbytes: int = 0) -> bool:
        """Enqueue without waiting; False when it would pass a bound, or closed (the caller counts
        the drop). ``nbytes``: the wire size of what the hops were decoded from."""
        if self.closed:
            return False
        n = len(hops)
        if self._q and (self.entries + n > self.max_entries or self.bytes + nbytes > self.max_bytes):
            return False
        self._q.append((hops, nbytes))
        self.entries += n
        self.bytes += nbytes
        self._nonempty.set()
        return True

    def claim(self, claim: Any) -> None:
        """A sender's mismatched claim for the engine; past MAX_CLAIMS waiting, dropped (counted)."""
        if len(self.claims) >= MAX_CLAIMS:
            metrics.DROPPED.labels(claim.receiver, "queue_full").inc()
            return
        self.claims.append(claim)
        self._nonempty.set()

    def take_claims(self) -> list[Any]:
        out, self.claims = self.claims, []
        return out

    async def get(self) -> list[Hop]:
        """The next batch of hops; an empty list when only claims wait (``take_claims``)."""
        while not self._q and not self.claims:
            self._nonempty.clear()
            await self._nonempty.wait()
        return self._take() if self._q else []

    def get_nowait(self) -> list[Hop] | None:
        return self._take() if self._q else None

    def _take(self) -> list[Hop]:
        hops, nbytes = self._q.popleft()
        self.entries -= len(hops)
        self.bytes -= nbytes
        return hops

    def qsize(self) -> int:
        """Batches waiting; also publishes the queue's gauges."""
        n = len(self._q)
        metrics.INGEST_QUEUE_DEPTH.set(n)
        metrics.INGEST_QUEUE_ENTRIES.set(self.entries)
        metrics.INGEST_QUEUE_BYTES.set(self.bytes)
        return n

    def saturation(self) -> str:
        """ "ok", or why the queue counts as saturated (for /readyz)."""
        if self.entries >= SATURATED * self.max_entries:
            return f"saturated: {self.entries} of {self.max_entries} entries waiting"
        if self.bytes >= SATURATED * self.max_bytes:
            return f"saturated: {self.bytes} of {self.max_bytes} bytes waiting"
        return "ok"
