"""plaintext_hop: an inbound entry (the destination's sidecar) whose downstream connection had
no TLS, from a source not exempted by policy. HTTP and TCP.

Only the inbound side can tell: the outbound entry's downstream is the local app, which always
talks plaintext to its own sidecar. A plaintext hop has no peer certificate, so the source is
named from the client sidecar's entry of the same request (request id, or the connection's
client socket for TCP), else from Istio's peer metadata on the entry (``downstream_peer``),
else from the address map; when neither is known yet, the entry waits
up to ``attribution_wait_ms`` for the client sidecar's entry (the two sidecars flush
independently) and then alerts with the bare address. With ``workers: N`` the client's entry
may have reached another worker: at the end of the wait the workers are asked first.
"""

from __future__ import annotations

from pydantic import Field

from meshaudit.engine.api import Deferred, EngineContext, PeerAnswer, PeerQuery, Rule, RuleConfig, Severity
from meshaudit.model import INBOUND, OUTBOUND, Hop, Identity


class PlaintextHopConfig(RuleConfig):
    severity: Severity = "high"
    attribution_wait_ms: int = Field(
        1500,
        ge=0,
        description="How long a plaintext inbound entry with no known source waits for the client "
        "sidecar's entry of the same request before it alerts with the address alone.",
    )


class PlaintextHop(Rule[PlaintextHopConfig]):
    name = "plaintext_hop"
    Config = PlaintextHopConfig
    summary = "Plaintext traffic from {src} to {dst}: the destination sidecar saw no TLS"

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self.pending = self.parking("plaintext_pending_attribution", 0.0, self._expired, self._forget_keys)
        # Waiting hops (their key in pending) by the keys a client sidecar's entry will carry. By
        # (request id, destination key): forwarded request ids are shared by a page's calls. An
        # entry goes with its hop (attributed, expired, evicted or released), so these hold at
        # most what pending holds: plain dicts, not stores with their own expiry (which cost as
        # much again as pending's, ~2 % of the daemon's time under load).
        self.by_rid: dict[tuple[str, str], int] = {}
        self.by_conn: dict[str, int] = {}
        self._seq = 0
        self.configure()

    def configure(self) -> None:
        self.wait = self.cfg.attribution_wait_ms / 1000
        self.pending.ttl = self.wait

    def _check(self, h: Hop, src: Identity) -> None:
        if not self.exempt(src, h.dst, h):
            what = "TCP connection" if h.method is None else "request"
            where = h.upstream_cluster or h.observer
            # The socket names the client when nothing else does (the source is its IP alone).
            sock = f" from {h.conn}" if h.conn and src.service is None and src.principal is None else ""
            self.violation(src, h.dst, h, f"{what} arrived without TLS at {where}{sock}", h.start)

    def on_hops(self, hops: list[Hop], now: float) -> None:
        corr = self.ctx.corr
        pending = self.pending
        waiting_rids, waiting_conns = self.by_rid, self.by_conn
        for h in hops:
            if h.direction == OUTBOUND:
                # a client sidecar's entry of a waiting hop? (a membership test: most are not)
                rid, conn = h.request_id, h.conn
                if (rid and (rid, h.dst.key) in waiting_rids) or (conn and conn in waiting_conns):
                    self._attribute(h)
                continue
            if h.direction != INBOUND or h.tls_version is not None:
                continue
            src = corr.source_of(h)
            if src is None:
                # Istio's peer metadata on the entry names the client without waiting (sampled
                # while this mesh's entries do not carry it: a lazy read per entry)
                src = corr.peer_metadata.client(h, now)
            if src is None:
                if h.src.service is None and self.wait > 0:
                    self._seq += 1
                    pending.park(self._seq, h, now)
                    if h.request_id:
                        self.by_rid[h.request_id, h.dst.key] = self._seq
                    if h.conn:
                        self.by_conn[h.conn] = self._seq
                    continue
                src = h.src
            self._check(h, src)

    def _attribute(self, out: Hop) -> None:
        """A client sidecar's entry names the source of a waiting plaintext hop."""
        key = self.by_rid.get((out.request_id, out.dst.key)) if out.request_id else None
        if key is None and out.conn:
            key = self.by_conn.get(out.conn)
        if key is not None:
            h = self.pending.pop(key)
            if h is not None:
                self._forget_keys(key, h)
                self._check(h, out.src)
            else:  # not waiting (every way out of pending forgets its keys: never, but never kept)
                if out.request_id:
                    self.by_rid.pop((out.request_id, out.dst.key), None)
                if out.conn:
                    self.by_conn.pop(out.conn, None)

    def _expired(self, key: int, h: Hop, now: float) -> None:
        self._forget_keys(key, h)
        if self.ctx.peers:  # the client's entry may have reached another worker: ask first
            q = PeerQuery(h.request_id, None, h.dst.key, h.start, h.conn, None)
            self.ctx.deferred.append(Deferred(self, h, q))
        else:
            self._check(h, h.src)

    def _forget_keys(self, key: int, h: Hop) -> None:
        """A waiting hop's wait ended (``key``: its key in pending): its entries by request id and
        by socket go, unless a later hop's took their place."""
        pair = (h.request_id, h.dst.key) if h.request_id else None
        if pair and self.by_rid.get(pair) == key:
            del self.by_rid[pair]
        if h.conn and self.by_conn.get(h.conn) == key:
            del self.by_conn[h.conn]

    def finish(self, hop: Hop, answer: PeerAnswer) -> None:
        self._check(hop, answer.source or hop.src)

    def on_tick(self, now: float) -> None:
        self.pending.expire(now)
