"""plaintext_hop: an inbound entry (the destination's sidecar) whose downstream connection had
no TLS, from a source not exempted by policy. HTTP and TCP.

Only the inbound side can tell: the outbound entry's downstream is the local app, which always
talks plaintext to its own sidecar. A plaintext hop has no peer certificate, so the source is
named from the client sidecar's entry of the same request (request id, or the connection's
client socket for TCP), else from the address map; when neither is known yet, the entry waits
up to ``attribution_wait_ms`` for the client sidecar's entry (the two sidecars flush
independently) and then alerts with the bare address. With ``workers: N`` the client's entry
may have reached another worker: at the end of the wait the workers are asked first.
"""

from __future__ import annotations

from meshaudit.engine.core import LOGGED_ORIGINS, Deferred, Emit, EngineContext, PeerAnswer, PeerQuery, Violation
from meshaudit.engine.store import Store, TTLStore
from meshaudit.model import INBOUND, OUTBOUND, Hop, Identity


class PlaintextHop:
    name = "plaintext_hop"

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.config.rules.plaintext_hop
        self.wait = self.cfg.attribution_wait_ms / 1000
        self._emit: Emit | None = None
        self.pending: TTLStore[int, Hop] = TTLStore(
            "plaintext_pending_attribution", self.wait, ctx.max_items, self._expired
        )
        # Waiting hops by the keys a client sidecar's entry will carry; same TTL as pending.
        self.by_rid: TTLStore[str, int] = TTLStore("plaintext_pending_by_request_id", self.wait, ctx.max_items)
        self.by_conn: TTLStore[str, int] = TTLStore("plaintext_pending_by_conn", self.wait, ctx.max_items)
        self._seq = 0

    def stores(self) -> list[Store]:
        return [self.pending, self.by_rid, self.by_conn]

    def _violation(self, h: Hop, src: Identity) -> Violation:
        what = "TCP connection" if h.method is None else "request"
        detail = f"{what} arrived without TLS at {h.upstream_cluster or h.observer}"
        if src.service is None and src.principal is None and h.conn:
            detail += f" from {h.conn}"  # the source is keyed by its IP; the socket is evidence
        return Violation("plaintext_hop", self.cfg.severity, src, h.dst, h, detail, h.start)

    def _check(self, h: Hop, src: Identity, emit: Emit) -> None:
        if not self.ctx.policy.exempt("plaintext_hop", src, h.dst, h.path):
            emit(self._violation(h, src))

    def on_hops(self, hops: list[Hop], now: float, emit: Emit) -> None:
        self._emit = emit
        corr = self.ctx.corr
        pending = self.pending
        for h in hops:
            if h.direction == OUTBOUND:
                if len(pending):
                    self._attribute(h, emit)
                continue
            if h.direction != INBOUND or h.tls_version is not None or h.origin not in LOGGED_ORIGINS:
                continue
            src = corr.source_of(h)
            if src is None:
                if h.src.service is None and self.wait > 0:
                    self._seq += 1
                    h.detach()
                    pending.put(self._seq, h, now)
                    if h.request_id:
                        self.by_rid.put(h.request_id, self._seq, now)
                    if h.conn:
                        self.by_conn.put(h.conn, self._seq, now)
                    continue
                src = h.src
            self._check(h, src, emit)

    def _attribute(self, out: Hop, emit: Emit) -> None:
        """A client sidecar's entry names the source of a waiting plaintext hop."""
        key = self.by_rid.pop(out.request_id) if out.request_id else None
        if key is None and out.conn:
            key = self.by_conn.pop(out.conn)
        if key is not None:
            h = self.pending.pop(key)
            if h is not None:
                self._check(h, out.src, emit)

    def _expired(self, key: int, h: Hop, now: float) -> None:
        if self.ctx.peers:  # the client's entry may have reached another worker: ask first
            q = PeerQuery(h.request_id, None, h.dst.key, h.start, h.conn, None)
            self.ctx.deferred.append(Deferred(self, h, q))
        elif self._emit is not None:
            self._check(h, h.src, self._emit)

    def finish(self, h: Hop, answer: PeerAnswer, emit: Emit) -> None:
        self._check(h, answer.source or h.src, emit)

    def on_tick(self, now: float, emit: Emit) -> None:
        self._emit = emit
        self.pending.expire(now)
        self.by_rid.expire(now)
        self.by_conn.expire(now)
