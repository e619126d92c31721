"""Stage 1 state shared by every rule: what the access logs showed recently, keyed by
correlation key (request id, trace id, the TCP client socket). Pairs both sidecars' entries of a
request (so a plaintext hop's client is named) and joins spans with access logs. A function of
the last TTL seconds of input only: bounded stores, no history.

The indexes are shared fairly among observers (``FairShare`` in engine/store.py): the outbound
entries by the sidecar that logged them (its workload), the logged ids by its service. One
sidecar flooding the index with entries nothing pairs evicts its own, never the client entry
that names another request's sender or the logged id that answers another service's span.
"""

from __future__ import annotations

from typing import Any

from meshaudit.engine.fpmap import IdMap
from meshaudit.engine.store import GenStore, PairStore
from meshaudit.model import OUTBOUND, SPAN, Hop, Identity, slot_trace_id


class PeerMetadata:
    """Istio's peer metadata on an entry (filter state ``downstream_peer``, Istio >= 1.24) names
    the client without its sidecar's entry. Reading it is a lazy read per entry, so while no entry
    of this mesh has carried it, one entry in ``SAMPLE`` is read; once one has, every entry asked
    about is read for ``HOLD_SECS``. Shared by the rules that name a client from it."""

    SAMPLE = 256
    HOLD_SECS = 60.0

    __slots__ = ("countdown", "until")

    def __init__(self) -> None:
        self.until = float("-inf")
        self.countdown = 0

    def client(self, h: Hop, now: float) -> Identity | None:
        if now >= self.until:
            if self.countdown > 0:
                self.countdown -= 1
                return None
            self.countdown = self.SAMPLE
        peer: Identity | None = h.downstream_peer
        if peer is not None:
            self.until = now + self.HOLD_SECS
        return peer


def sidecar(client: Identity) -> str:
    """Who logged an outbound entry: its source is the sidecar's own workload (one pod), else
    its service."""
    return f"{client.workload}.{client.namespace}" if client.workload else client.key


class Correlation:
    """What the access logs showed recently, shared by all rules. Bounded stores only."""

    def __init__(self, ttl: float, max_items: int, horizon: float = 0.0) -> None:
        # request_id -> client-side (outbound) hop, for naming the source of an inbound hop
        # (the client's interned Identity, not the Hop: a Hop keeps many unique strings alive)
        # (request id, destination service key) -> the client. The destination is part of the key:
        # applications forward x-request-id (bookinfo's do), so every call a request causes
        # shares it, and only the destination tells them apart.
        # Both outbound indexes keep a key's hash, not the key (``fingerprints``): a minute of
        # request ids and sockets kept alive slowed every entry (engine/_fpmap.c).
        self.outbound_by_rid: GenStore[tuple[str, str], Identity] = GenStore(
            "outbound_by_request_id", ttl, max_items, sidecar, fingerprints=True
        )
        # connection key -> outbound hop (pairs TCP entries, which have no request id)
        self.outbound_by_conn: GenStore[str, Identity] = GenStore(
            "outbound_by_conn", ttl, max_items, sidecar, fingerprints=True
        )
        # (observer service, request id) and (observer service, trace id) the access logs showed:
        # a span's access log (missing_access_log, and a peer's question with ``workers: N``).
        self.logged_rid: PairStore[str, str, bool] = PairStore("logged_request_ids", ttl, max_items)
        # trace id -> the client the logging sidecar saw (names a traced request's source)
        self.logged_trace: PairStore[str, str, Identity] = PairStore("logged_trace_ids", ttl, max_items)
        # service key -> last time its sidecar logged anything; bounded by the number of services
        self.sidecar_last_log: GenStore[str, float] = GenStore("sidecar_last_log", 86_400, max_items)
        # The logged_* stores serve only span joins. They are written from start-up for one TTL
        # (a tracer that has not sent yet) and then while a span arrived within the horizon
        # (``span_index_horizon_secs``, at least a TTL): a mesh that sends no spans stops paying
        # for them a minute after start (~0.7 us of an entry's ~6 us). When spans resume after a
        # longer pause, spans that started before the index did cannot be joined (their access
        # logs may have come while it was off): missing_access_log judges those against
        # ``sidecar_last_log`` instead.
        self.peer_metadata = PeerMetadata()
        self.ttl = ttl
        self.horizon = max(ttl, horizon)
        self.index_logged_until: float | None = None  # None: not started yet
        self.logged_since = float("-inf")
        self.spans_at = float("-inf")  # when this process last received a span itself
        self.stores: list[GenStore[Any, Any] | PairStore[Any, Any, Any]] = [
            self.outbound_by_rid,
            self.outbound_by_conn,
            self.logged_rid,
            self.logged_trace,
            self.sidecar_last_log,
        ]

    def saw_spans(self, now: float, remote: bool = False) -> None:
        """A span arrived (``remote``: at another worker): keep (or start again) indexing what
        the access logs showed."""
        until = self.index_logged_until
        if until is not None and now >= until:
            self.logged_since = now
        self.index_logged_until = max(until or now, now + self.horizon)
        if not remote:
            self.spans_at = now

    def judgeable(self, span_start: float) -> bool:
        """Whether a span's access log, if it came, was indexed (1 s allowed for clock skew)."""
        return span_start >= self.logged_since + 1.0

    def index(self, hops: list[Hop], now: float) -> None:
        # One pass, written in place into each store's current generation; capacity checked once
        # per batch. The span-join stores are grouped by the observer's service (not its node
        # id: any replica's sidecar logging the request satisfies a span of that service); a
        # batch comes from one stream, so the group changes once per run of one observer. Trace
        # ids only from the entries a server span can be joined to (not outbound: an
        # application's server span is its own sidecar's inbound entry; a client sidecar's
        # entry of the same trace is another request).
        by_rid = self.outbound_by_rid.writable()
        by_conn = self.outbound_by_conn.writable()
        observers = self.sidecar_last_log.writable()
        if self.index_logged_until is None:
            self.index_logged_until = now + self.ttl
        logged = now < self.index_logged_until
        logged_rid, logged_trace = self.logged_rid, self.logged_trace
        rids: IdMap[str, bool] = {}  # the groups being written (placeholders until one is)
        traces: IdMap[str, Identity] = {}
        nr = nt = added_r = added_t = 0
        last = None
        for h in hops:
            if h.origin == SPAN:
                continue
            svc = h.observer_service.key
            if svc is not last:  # batches come from one stream: once per run
                observers[svc] = now
                if logged:
                    added_r += len(rids) - nr
                    added_t += len(traces) - nt
                    rids, traces = logged_rid.writable(svc), logged_trace.writable(svc)
                    nr, nt = len(rids), len(traces)
                last = svc
            rid = h.request_id
            if h.direction == OUTBOUND:
                if rid:
                    by_rid[rid, h.dst.key] = h.src
                if h.conn:
                    by_conn[h.conn] = h.src
                if logged and rid:
                    rids[rid] = True
            elif logged:
                if rid:
                    rids[rid] = True
                try:
                    tid = slot_trace_id(h)
                except AttributeError:  # a lazy field not read yet
                    tid = h.trace_id
                if tid:
                    traces[tid] = h.src
        self.outbound_by_rid.settle(now)
        self.outbound_by_conn.settle(now)
        self.sidecar_last_log.settle(now)
        if logged:
            logged_rid.settle(now, added_r + len(rids) - nr)
            logged_trace.settle(now, added_t + len(traces) - nt)

    def source_of(self, h: Hop) -> Identity | None:
        """The client of an inbound hop, from the client sidecar's entry of the same request."""
        if h.request_id:
            src = self.outbound_by_rid.get((h.request_id, h.dst.key))
            if src is not None:
                return src
        if h.conn:
            return self.outbound_by_conn.get(h.conn)
        return None

    def named_source(self, h: Hop) -> Identity | None:
        """The hop's source when it is named (a service or a certificate), else the client
        sidecar's entry's; None while the client's entry has not come."""
        src = h.src
        if src.service is None and src.principal is None:
            return self.source_of(h)
        return src
