"""Per-edge counts of the hops the engine evaluates, for the service graph and reports
(``meshaudit.views.graph``, which documents what each counter means). The engine counts every batch
(:meth:`EdgeTally.add`); missing_access_log reports each traced request it judged
(:meth:`EdgeTally.traced`); the process serving ``/graph`` takes the counts once a second."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any, Final

from meshaudit.engine.outcome import failed
from meshaudit.model import INBOUND, Hop, Identity, slot_attempts

# Counters of one edge, in this order, in a tally record (after the two identities) and in a ring.
OUT, OUT_FAIL, RETRIES, IN, IN_MTLS, IN_TLS, IN_FAIL, TRACED, TRACED_LOGGED = range(9)
COUNTERS: Final = 9
# Latency histogram: upper bounds in ms (the last bin is everything above), for each side.
BOUNDS_MS: Final = (1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)
BINS: Final = len(BOUNDS_MS) + 1
LAT_OUT: Final = COUNTERS  # first bin of the source side's histogram
LAT_IN: Final = COUNTERS + BINS
LIVE_WIDTH: Final = COUNTERS + 2 * BINS
# Durations read per edge and side between two drains (one second): every one of the first
# ``LATENCY_ALL``, then one in ``LATENCY_EVERY`` (a lazy field of an access-log entry costs ~0.7 us).
LATENCY_ALL: Final = 8
LATENCY_EVERY: Final = 32
_S, _D = LIVE_WIDTH, LIVE_WIDTH + 1  # a tally record: [*counters, *out bins, *in bins, src, dst]

EdgeCounts = tuple[Identity, Identity, list[int]]  # one edge of a tally: source, destination, LIVE_WIDTH ints


class EdgeTally:
    """Per-edge counts of the hops evaluated since the last :meth:`take`. Not thread-safe; one
    per engine. ``corr`` names a plaintext hop's client (``Correlation.source_of``)."""

    __slots__ = ("_by_dst", "_by_src", "enabled")

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        # The same records twice: by source then destination key, and by destination then
        # source key. A batch comes from one sidecar, which is the destination of its inbound
        # entries and the source of the others: one dict lookup a hop finds its edge.
        self._by_src: dict[str, dict[str, list[Any]]] = {}
        self._by_dst: dict[str, dict[str, list[Any]]] = {}

    def _record(self, src: Identity, dst: Identity) -> list[Any]:
        by_dst = self._by_src.get(src.key)
        if by_dst is None:
            by_dst = self._by_src[src.key] = {}
        rec = by_dst.get(dst.key)
        if rec is None:
            rec = by_dst[dst.key] = [*([0] * LIVE_WIDTH), src, dst]
            by_src = self._by_dst.get(dst.key)
            if by_src is None:
                by_src = self._by_dst[dst.key] = {}
            by_src[src.key] = rec
        return rec

    def add(self, hops: Sequence[Hop], corr: Any) -> None:
        """Count a batch of access-log entries (spans are counted through :meth:`traced`)."""
        if not self.enabled:
            return
        source_of = corr.source_of
        record = self._record
        by_src, by_dst = self._by_src, self._by_dst
        bounds = BOUNDS_MS
        bisect_left = bisect.bisect_left
        # the counters' indexes as locals: this loop runs for every entry
        c_in, c_mtls, c_tls, c_in_fail, lat_in = IN, IN_MTLS, IN_TLS, IN_FAIL, LAT_IN
        c_out, c_retries, c_out_fail, lat_out = OUT, RETRIES, OUT_FAIL, LAT_OUT
        lat_all, lat_every = LATENCY_ALL, LATENCY_EVERY
        me: Identity | None = None
        into: dict[str, list[Any]] = {}
        out_of: dict[str, list[Any]] = {}
        for h in hops:
            o = h.observer_service
            if o is not me:  # once per run of one sidecar's entries
                me = o
                into = by_dst.get(o.key) or by_dst.setdefault(o.key, {})
                out_of = by_src.get(o.key) or by_src.setdefault(o.key, {})
            status: int = h.status
            if h.direction == INBOUND:
                src = h.src
                peer = h.peer_principal
                if peer is None:  # no certificate names the client: its sidecar's entry may
                    src = source_of(h) or src
                dst = h.dst
                rec = into.get(src.key) if dst is o else None
                if rec is None:
                    rec = record(src, dst)
                n = rec[c_in] = rec[c_in] + 1
                if peer is not None:
                    rec[c_mtls] += 1
                elif h.tls_version is not None:
                    rec[c_tls] += 1
                if not 0 < status < 500 and h.method is not None and failed(h):
                    rec[c_in_fail] += 1
                if n <= lat_all or not n % lat_every:
                    ms = h.duration_ms
                    if ms is not None:
                        rec[lat_in + bisect_left(bounds, ms)] += 1
            else:
                src = h.src
                dst = h.dst
                rec = out_of.get(dst.key) if src is o else None
                if rec is None:
                    rec = record(src, dst)
                n = rec[c_out] = rec[c_out] + 1
                try:
                    attempts: int = slot_attempts(h)
                except AttributeError:  # a lazy field not read yet
                    attempts = h.attempts
                if attempts > 1:
                    rec[c_retries] += attempts - 1
                if not 0 < status < 500 and h.method is not None and failed(h):
                    rec[c_out_fail] += 1
                if n <= lat_all or not n % lat_every:
                    ms = h.duration_ms
                    if ms is not None:
                        rec[lat_out + bisect_left(bounds, ms)] += 1

    def traced(self, src: Identity, dst: Identity, logged: bool) -> None:
        """A traced request to a mesh destination, judged: its sidecar logged it, or not."""
        if not self.enabled:
            return
        rec = self._record(src, dst)
        rec[TRACED] += 1
        if logged:
            rec[TRACED_LOGGED] += 1

    def take(self) -> list[EdgeCounts]:
        """What was counted since the last call, per edge: (source, destination, counters and
        latency bins: ``LIVE_WIDTH`` ints). Picklable (``workers: N`` sends it)."""
        edges, self._by_src, self._by_dst = self._by_src, {}, {}
        return [(r[_S], r[_D], r[:_S]) for by_dst in edges.values() for r in by_dst.values() if any(r[:_S])]
