"""Was a request the policy forbids actually stopped? What the mesh did with one request or
connection: denied by policy (Envoy's RBAC filter, an ext_authz service) or served.

Envoy writes a denial in three places: an HTTP RBAC denial is a 403 whose response code details
are ``rbac_access_denied_matched_policy[<policy>]`` (Istio names the policy
``ns[<ns>]-policy[<name>]-rule[<n>]``; ``none`` when no policy matched a deny-by-default); a TCP
RBAC denial closes the connection with those words in its connection termination details; an
ext_authz denial (HTTP or TCP) sets the ``UAEX`` response flag. An application's own 403 says
``via_upstream`` and is served, not denied.

The sidecar that denies a request is the destination's (inbound). The source's sidecar logs the
same request as an answer from its upstream (HTTP ``403 via_upstream``) or a connection that was
closed (TCP): its entry cannot tell a denial from a served request, so :class:`Enforcement` lets
such an entry wait ``wait_secs`` for the destination sidecar's entry of the same request, whose
verdict decides (and the aggregator counts the request once, as denied, when the denying entry
arrives only later). Everything here reads lazy Hop fields: call it on violations, or after a
cheap check, never on every healthy entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from meshaudit.engine.store import TTLStore
from meshaudit.model import INBOUND, OUTBOUND, Hop, Identity

if TYPE_CHECKING:
    from meshaudit.engine.api import Rule

RBAC_DENIED: Final = "rbac_access_denied_matched_policy["
DENIAL_WAIT_MS: Final = 1500  # both sidecars flush their access logs every second by default
EXT_AUTHZ_FLAG: Final = "UAEX"


def rbac_policy(details: str) -> str | None:
    """The matched policy inside ``rbac_access_denied_matched_policy[...]``; None if not an RBAC denial."""
    if not details.startswith(RBAC_DENIED):
        return None
    inner = details[len(RBAC_DENIED) :]
    return inner[:-1] if inner.endswith("]") else inner


def denial(h: Hop) -> str | None:
    """How the mesh denied this request or connection, for the alert's detail (``RBAC policy
    ns[default]-policy[deny-admin]-rule[0]``, ``ext_authz``); None when its entry shows no denial.
    An HTTP request is judged only if answered with status 400 or more (one lazy read first)."""
    if h.method is None:  # TCP: the termination details, then the flags
        policy = rbac_policy(h.connection_termination_details)
        if policy is not None:
            return f"RBAC policy {policy}"
        return "ext_authz" if EXT_AUTHZ_FLAG in h.response_flags else None
    if h.status < 400:
        return None
    if h.status == 403:
        policy = rbac_policy(h.response_code_details)
        if policy is not None:
            return f"RBAC policy {policy}"
    return "ext_authz" if EXT_AUTHZ_FLAG in h.response_flags else None


def undecided(h: Hop) -> bool:
    """A source sidecar's entry of a request to a mesh service whose own sidecar may have denied
    it: HTTP answered 400 or more by the upstream, or any TCP connection. Only the destination
    sidecar's entry can tell."""
    if h.direction != OUTBOUND or not h.upstream_cluster.startswith("outbound|"):
        return False
    if h.method is None:
        return True
    return h.status >= 400 and h.response_code_details == "via_upstream"


class Enforcement:
    """For a rule whose violations are requests the policy forbids (unexpected_edge,
    unexpected_path): emits each with whether the mesh blocked it, at the rule's ``severity``
    when blocked and its ``severity_when_served`` when served. A source sidecar's undecided entry
    waits for the destination sidecar's entry of the same request (request id, or the TCP client
    socket); when that entry comes (whether or not it is itself a violation) its verdict decides,
    and when the wait ends without it the request counts as served (the destination may have no
    sidecar at all, and then nothing denied it)."""

    def __init__(self, rule: Rule[Any]) -> None:
        """``rule``: one whose options have ``denial_wait_ms`` (the wait; ``configure`` reads it)."""
        self.rule = rule
        max_items = rule.ctx.max_items
        name = rule.name
        # seq -> (the waiting outbound hop, source, destination, detail)
        self.pending: TTLStore[int, tuple[Hop, Identity, Identity, str]] = TTLStore(
            f"{name}_pending_verdict", 0.0, max_items, self._expired
        )
        self.by_key: TTLStore[str, int] = TTLStore(f"{name}_pending_verdict_keys", 0.0, max_items)
        # Request ids and client sockets a destination sidecar's entry already decided (judged as
        # a violation here): the source sidecar's entry of the same request adds nothing.
        self.decided: TTLStore[str, bool] = TTLStore(f"{name}_decided_requests", rule.ctx.corr.ttl, max_items)
        for s in (self.pending, self.by_key, self.decided):
            rule.store(s)
        self._seq = 0
        self.configure()

    def configure(self) -> None:
        """The wait from the rule's options (again on a reload: waiting entries keep their deadlines)."""
        self.wait = self.pending.ttl = self.by_key.ttl = self.rule.cfg.denial_wait_ms / 1000

    def judge(self, h: Hop, src: Identity, dst: Identity, detail: str, now: float) -> None:
        """``h`` breaks the rule: emit it with its verdict, or let it wait for the destination
        sidecar's entry (``resolve`` and the wait's end decide it)."""
        den = denial(h)
        key = h.request_id or h.conn
        if h.direction == INBOUND:
            # Only a request whose source entry cannot tell (TCP, HTTP 4xx/5xx) needs to be
            # remembered: a served forbidden flood does not fill the store.
            if key and (h.method is None or h.status >= 400):
                self.decided.put(key, True, now)
        elif den is None and key and undecided(h):
            if key in self.decided:
                return  # the destination's sidecar logged it first: that entry counted
            if self.wait > 0:
                self._seq += 1
                h.detach()
                self.pending.add(self._seq, (h, src, dst, detail), now)
                self.by_key.put(key, self._seq, now)
                return
        self._emit(h, src, dst, detail, den)

    def resolve(self, hops: list[Hop]) -> None:
        """After a batch was judged, while source sidecars' entries wait: a destination
        sidecar's entry of the same request decides. If it was itself a violation it counted
        already (the waiting entry is dropped); else its verdict is the waiting entry's."""
        pending = self.pending
        by_key = self.by_key
        for h in hops:
            if h.direction != INBOUND:
                continue
            key = h.request_id or h.conn
            if not key:
                continue
            seq = by_key.pop(key)
            if seq is None:
                continue
            waiting = pending.pop(seq)
            if waiting is not None and key not in self.decided:
                w, src, dst, detail = waiting
                self._emit(w, src, dst, detail, denial(h))
            if not len(pending):
                return

    def _emit(self, h: Hop, src: Identity, dst: Identity, detail: str, den: str | None) -> None:
        if den is None:
            severity = self.rule.setting("severity_when_served", dst)
            self.rule.violation(src, dst, h, detail, h.start, severity, blocked=False)
        else:
            severity = self.rule.setting("severity", dst)
            self.rule.violation(src, dst, h, f"{detail}; denied by {den}", h.start, severity, blocked=True)

    def _expired(self, seq: int, item: tuple[Hop, Identity, Identity, str], now: float) -> None:
        h, src, dst, detail = item
        key = h.request_id or h.conn
        if key and self.by_key.get(key) == seq:
            self.by_key.pop(key)
        self._emit(h, src, dst, detail, None)

    def tick(self, now: float) -> None:
        self.pending.expire(now)
        self.by_key.expire(now)
        self.decided.expire(now)
