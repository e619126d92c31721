"""identity_mismatch: a workload presenting a certificate that is not its own.

The destination sidecar's inbound entry shows the peer certificate's SPIFFE id
(``peer_principal``; ``x-forwarded-client-cert``'s ``URI=`` when only that was logged). Who
really sent the request is named, best first, by the client sidecar's outbound entry of the same
request (same ``x-request-id``; for TCP the same client socket: ``ctx.corr.source_of``), else by
Istio's peer metadata on the inbound entry (filter state ``downstream_peer``, Istio >= 1.24).
When that workload may not present that id, a certificate is used by the wrong workload.

What a workload may present: its own service account ``spiffe://<mesh.trust_domain>/ns/<ns>/sa/<sa>``
(with ``mesh.service_account_is_service`` the service name is the SA, so namespace and SA are
compared; without it, the namespace and trust domain), the identity its peer metadata names, and
what ``policy.identities`` adds for it (globs, by service pattern).

Pairing: the two sidecars flush independently, so the inbound entry may come first. In one
process an HTTP request pairs from whichever entry comes second: the shared correlation index of
outbound entries by request id names the client; an inbound entry that came first leaves the
certificate it showed, by (destination service, request id), for the correlation TTL
(``identity_shown_by_request_id``). A TCP connection waits, up to
``pairing_wait_ms``, for the client's entry by client socket, as a small record (the presented
id, the observer), not the hop: detaching a hop from its message costs as much as decoding it.
With no client entry and no peer metadata there is no evidence and nothing is alerted; with
``workers: N`` every unpaired inbound entry waits here, and the client's entry may have reached
another worker, which is asked at the end of the wait (``finish``).
"""

from __future__ import annotations

import fnmatch
import re

from pydantic import Field

from meshaudit.engine.api import Deferred, EngineContext, PeerAnswer, PeerQuery, Rule, RuleConfig, Severity
from meshaudit.engine.fpmap import IdMap
from meshaudit.engine.matchers import PartyMatcher
from meshaudit.engine.store import GenStore, PairStore, TTLStore
from meshaudit.model import INBOUND, OUTBOUND, SPAN, SPAN_KIND_CLIENT, Hop, Identity

_CACHE_LIMIT = 100_000

# What an inbound entry waiting for its client's entry keeps: presented SPIFFE id, observer (node
# id; ``dst_of`` names the destination), origin, receive time, request id, client socket. Strings
# and numbers only: the garbage collector stops tracking such a tuple, and ~1e5 of them wait at
# full load (with a party in it, every full collection walked them all: 3x the rule's cost).
Waiting = tuple[str, str, int, float, str | None, str | None]
Short = tuple[str, str]  # presented id, observer: what one process keeps
WaitKey = tuple[str, str] | str  # (request id, destination key), or the client socket


def _observer(w: Short) -> str:
    """Whose entry waits: the store is shared fairly among observers."""
    return w[1]


PAIRED = "the client sidecar's entry of the same request"
SPAN_CLAIM = "its own client span of the same request (service.name)"
CLAIM_HOLD_SECS = 60.0  # after a client span with a request id: keep every certificate for spans
PEER_METADATA = "Istio peer metadata (downstream_peer)"
REMOTE = "the client sidecar's entry of the same request (at another worker)"


class IdentityMismatchConfig(RuleConfig):
    severity: Severity = "critical"
    pairing_wait_ms: int = Field(
        1500,
        ge=0,
        description="How long an inbound mTLS TCP entry (or, with workers, any inbound mTLS entry) whose "
        "client entry has not come yet waits for it; with none by then, nothing is alerted. HTTP "
        "requests in one process pair through the request-id index for its TTL.",
    )


class IdentityMismatch(Rule[IdentityMismatchConfig]):
    name = "identity_mismatch"
    Config = IdentityMismatchConfig
    summary = "Identity mismatch from {src} to {dst}: the client presented a certificate that is not its own"
    hops = "all"  # access-log entries, and client spans that carry the request id

    def __init__(self, ctx: EngineContext) -> None:
        # here, not at the top: config imports the rule registry, and naming imports config
        from meshaudit.naming import parse_spiffe

        super().__init__(ctx)
        self.parse_spiffe = parse_spiffe
        mesh = ctx.config.mesh  # restart-only: the names of the mesh do not change on reload
        self.td_prefix = f"spiffe://{mesh.trust_domain}/"
        self.sa_is_service = mesh.service_account_is_service
        self.wait = self.cfg.pairing_wait_ms / 1000
        # Inbound entries waiting for their client's entry, by (request id, destination key) or
        # client socket. A
        # generational store alone (a dict write per entry, expiry drops a generation whole): the
        # end of a wait is no event. With peers it is (ask the others): an exact TTL store.
        self.waiting: GenStore[WaitKey, Short] | TTLStore[WaitKey, Waiting]
        if ctx.peers:
            self.waiting = TTLStore("identity_awaiting_client", self.wait, ctx.max_items, self._expired)
        else:
            self.waiting = GenStore("identity_awaiting_client", self.wait, ctx.max_items, _observer)
        self.store(self.waiting)
        # One process, HTTP: the certificate a destination sidecar saw on a request whose client
        # entry had not come yet, by (destination service, request id), for the correlation TTL
        # (the client's entry names its sender when it comes).
        self.shown: PairStore[str, str, str] = PairStore("identity_shown_by_request_id", ctx.corr.ttl, ctx.max_items)
        self.store(self.shown)
        # A client span that named the sender of a request before the destination's entry came,
        # by (destination service, request id); while such spans come (``claims_until``), every
        # inbound certificate is kept in ``shown`` for the spans still to come.
        self.claims: PairStore[str, str, Identity] = PairStore("identity_claimed_by_span", ctx.corr.ttl, ctx.max_items)
        self.store(self.claims)
        self.claims_until = float("-inf")
        self.dst_of: dict[str, Identity] = {}  # observer -> the destination it logs inbound entries for
        self.configure()

    def configure(self) -> None:
        self.extra = [
            (PartyMatcher([svc]), re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in ids)))
            for svc, ids in self.ctx.policy.policy.identities.items()
        ]
        self.ok: dict[str, dict[str, bool]] = {}  # client uid -> presented id -> may present it
        self.wait = self.waiting.ttl = self.cfg.pairing_wait_ms / 1000

    # --- who may present what ------------------------------------------------------------------
    def may_present(self, client: Identity, presented: str) -> bool:
        by = self.ok.get(client.uid)
        if by is None:
            if len(self.ok) >= _CACHE_LIMIT:
                self.ok.clear()
            by = self.ok[client.uid] = {}
        found = by.get(presented)
        if found is None:
            if len(by) >= _CACHE_LIMIT:
                by.clear()
            found = by[presented] = self._decide(client, presented)
        return found

    def _decide(self, client: Identity, presented: str) -> bool:
        if client.service is None:  # the client is not named: no judgement
            return True
        if presented == client.principal:  # the identity its own peer metadata names
            return True
        if any(svc(client) and ids.match(presented) for svc, ids in self.extra):
            return True
        if not presented.startswith(self.td_prefix):
            return False
        ns, sa = self.parse_spiffe(presented)
        if ns is None or sa is None:
            return False
        if client.namespace is not None and ns != client.namespace:
            return False
        return sa == client.service if self.sa_is_service else True

    # --- judging --------------------------------------------------------------------------------
    def on_hops(self, hops: list[Hop], now: float) -> None:
        # Runs for every access-log entry: locals, the stores' dicts read in place (a method call
        # per look-up cost a third of the rule). One process: the pair of an HTTP request is found
        # from whichever side comes second (the shared index of outbound entries by request id
        # names the client; ``shown`` keeps the certificate of an inbound entry that came first).
        # TCP (no request id) waits here by client socket; with peers, every wait is here (its
        # end is a question to the others).
        corr = self.ctx.corr
        rid_cur, rid_old = corr.outbound_by_rid.generations()
        shown_store = self.shown
        shown_cur, shown_old = shown_store.generations()
        any_shown = len(shown_store) > 0
        shown_to: IdMap[str, str] = {}  # the group written last, its service, its size then
        shown_svc = None
        added = before = 0
        peers = self.ctx.peers
        waiting = self.waiting
        gen = waiting if isinstance(waiting, GenStore) else None
        exact = waiting if isinstance(waiting, TTLStore) else None
        pending = gen.writable() if gen is not None else None
        waited = len(waiting) > 0
        wait = self.wait > 0
        peer_metadata = corr.peer_metadata
        claims = self.claims
        claimed = len(claims) > 0
        for_spans = now < self.claims_until and not peers  # keep every certificate for spans
        dst_of = self.dst_of
        last_observer = None
        for h in hops:
            d = h.direction
            if d != INBOUND:
                if d != OUTBOUND:
                    continue
                rid = h.request_id
                if h.origin == SPAN:  # an application's client span with the request id names its sender
                    # (an Envoy sidecar's own span says what its outbound entry says already)
                    if h.span_kind == SPAN_KIND_CLIENT and rid and h.observer.startswith("span:") and h.src.service:
                        self._span_claim(h, rid, now)
                    continue
                w: Short | Waiting | None = None
                if rid and any_shown:  # did the destination's entry come first?
                    dk = h.dst.key
                    g = shown_cur.get(dk)
                    shown = g.get(rid) if g is not None else None
                    if shown is None:
                        g = shown_old.get(dk)
                        shown = g.get(rid) if g is not None else None
                    if shown is not None:
                        if not self.may_present(h.src, shown):
                            self._alert(h.src, shown, self._paired_hop(shown, h), PAIRED)
                        continue
                if waited:  # a client sidecar's entry names a waiting entry's sender
                    if exact is not None and rid:
                        w = exact.pop((rid, h.dst.key))
                    if w is None and h.conn:
                        w = waiting.pop(h.conn)
                    if w is not None and not self.may_present(h.src, w[0]):
                        self._alert(h.src, w[0], self._hop(w, h), PAIRED)
                continue
            if h.tls_version is None:  # plaintext: plaintext_hop's
                continue
            presented = h.peer_principal
            if presented is None:
                presented = h.xfcc_uri  # lazy, read only for TLS without a logged certificate
                if presented is None:
                    continue
            rid = h.request_id
            if rid and claimed:  # a client's span named the sender before this entry came
                claim = claims.get(h.observer_service.key, rid)
                if claim is not None and not self.may_present(claim, presented):
                    self._alert(claim, presented, h, SPAN_CLAIM)
            pair = (rid, h.dst.key) if rid else None  # the client's entry of this request to this service
            client = (rid_cur.get(pair) or rid_old.get(pair)) if pair else corr.source_of(h)
            how = PAIRED
            if client is None:
                # No client entry yet. Istio's peer metadata names the sender at once (read while
                # this mesh's entries carry it, else sampled: ``Correlation.peer_metadata``; its
                # skipped samples counted down here, without the call).
                how = PEER_METADATA
                if now >= peer_metadata.until and peer_metadata.countdown > 0:
                    peer_metadata.countdown -= 1
                else:
                    client = peer_metadata.client(h, now)
            if client is not None:
                if not self.may_present(client, presented):
                    self._alert(client, presented, h, how)
                if not (for_spans and rid):
                    continue
            if rid and not peers:  # kept for the client's entry (or span) of the same request
                svc = h.observer_service.key
                if svc is not shown_svc:
                    added += len(shown_to) - before
                    shown_to, shown_svc = shown_store.writable(svc), svc
                    before = len(shown_to)
                shown_to[rid] = presented
                continue
            if not wait:
                continue
            key = pair or h.conn
            if not key:
                continue
            if pending is not None:
                pending[key] = (presented, h.observer)
                continue
            observer = h.observer
            if observer is not last_observer:  # a batch comes from one sidecar: once per batch
                if len(dst_of) >= _CACHE_LIMIT:
                    dst_of.clear()
                dst_of[observer] = h.dst
                last_observer = observer
            if exact is not None:
                exact.put(key, (presented, observer, h.origin, now, rid, h.conn), now)
        if gen is not None:
            gen.settle(now)
        added += len(shown_to) - before
        if added:
            shown_store.settle(now, added)

    def _span_claim(self, span: Hop, rid: str, now: float) -> None:
        """A client span carrying the request id: its service claims to have sent the request.
        Judged against the certificate its destination's entry showed, whichever comes first."""
        dst = span.dst
        if dst.namespace is None:  # the host it called, not a cluster (a sidecar's span): as a service
            dst = self.ctx.namer.requested(dst.key, span.src.namespace)
        self.claims_until = now + CLAIM_HOLD_SECS
        presented = self.shown.get(dst.key, rid)
        if presented is not None:
            if not self.may_present(span.src, presented):
                self._alert(span.src, presented, self._hop((presented, span.observer), span, dst), SPAN_CLAIM)
        elif not self.ctx.peers:
            self.claims.put(dst.key, rid, span.src, now)

    def _paired_hop(self, presented: str, out: Hop) -> Hop:
        return self._hop((presented, out.observer), out)

    def _hop(self, w: Short | Waiting, out: Hop | None, dst: Identity | None = None) -> Hop:
        """The inbound entry a waiting record stands for, for the alert's example: what the
        destination sidecar saw, with the request's method, path and trace from the client's entry
        when there is one (the same request). A short record (one process) takes the rest from
        the client's entry."""
        if len(w) == 2:
            assert out is not None
            presented, observer = w[0], w[1]
            dst = dst or out.dst
            return Hop(
                out.origin,
                observer,
                dst,
                INBOUND,
                self.ctx.namer.principal(presented),
                dst,
                out.start,
                peer_principal=presented,
                method=out.method,
                path=out.path,
                trace_id=out.trace_id,
                request_id=out.request_id,
                conn=out.conn,
            )
        presented, observer, origin, when, rid, conn = w  # the long record
        dst = self.dst_of.get(observer) or self.ctx.namer.node(observer, "")
        return Hop(
            origin,
            observer,
            dst,
            INBOUND,
            self.ctx.namer.principal(presented),
            dst,
            out.start if out is not None else when,
            peer_principal=presented,
            method=out.method if out is not None else None,
            path=out.path if out is not None else None,
            trace_id=out.trace_id if out is not None else None,
            request_id=rid,
            conn=conn,
        )

    def _alert(self, client: Identity, presented: str, h: Hop, how: str) -> None:
        if self.exempt(client, h.dst, h):
            return
        what = "TCP connection" if h.method is None and h.request_id is None else "request"
        self.violation(
            client,
            h.dst,
            h,
            f"{what} presented the certificate {presented}, which {client.key} may not present "
            f"(the sender is named by {how})",
            h.start,
        )

    # --- peers (``workers: N``) -----------------------------------------------------------------
    def _expired(self, key: WaitKey, w: Waiting, now: float) -> None:
        """No client entry came here: with peers, ask whether another worker saw it."""
        h = self._hop(w, None)
        self.ctx.deferred.append(Deferred(self, h, PeerQuery(h.request_id, None, h.dst.key, h.start, h.conn, None)))

    def finish(self, hop: Hop, answer: PeerAnswer) -> None:
        client = answer.source
        presented = hop.peer_principal
        if client is not None and presented is not None and not self.may_present(client, presented):
            self._alert(client, presented, hop, REMOTE)

    def on_tick(self, now: float) -> None:
        self.waiting.expire(now)
        self.shown.expire(now)
        self.claims.expire(now)
