"""Who may send telemetry for whom: an authenticated sender (a SPIFFE id, from its client
certificate or a trusted sidecar's ``x-forwarded-client-cert``) against what its data claims.

A workload speaks for itself: its own trust domain, namespace and service account (with
``mesh.service_account_is_service``, the service named after that account). The policy's
``sources:`` lets an identity speak for every workload of some namespaces (a collector or gateway
that forwards). What the data claims comes from an ALS stream's node (node id, node metadata
``NAMESPACE`` / ``SERVICE_ACCOUNT``, node cluster ``<svc>.<ns>``) or an OTLP resource
(``service.name``, ``service.namespace``, ``k8s.namespace.name``).

The receivers judge once per stream (ALS) and once per resource of an export (OTLP), with the
answer cached per (sender, claim): never per entry. A mismatch becomes a :class:`Claim`, which
the rule log_source_mismatch turns into an alert; with ``receivers.enforce_sources`` the data
is also rejected.
"""

from __future__ import annotations

import fnmatch
import re
from typing import TYPE_CHECKING, Final

from meshaudit.naming import parse_spiffe

if TYPE_CHECKING:
    from meshaudit.config import MeshConfig, SourceRule

_CACHE_LIMIT: Final = 10_000


class Claimed:
    """What a stream or a resource says it is: namespace, service account and service, each None
    when it does not say."""

    __slots__ = ("namespace", "service", "service_account", "text")

    def __init__(self, namespace: str | None, service_account: str | None, service: str | None, text: str) -> None:
        self.namespace = namespace
        self.service_account = service_account
        self.service = service
        self.text = text  # what it claimed, as the alert shows it

    @property
    def key(self) -> tuple[str | None, str | None, str | None]:
        return self.namespace, self.service_account, self.service

    @property
    def empty(self) -> bool:
        return self.namespace is None and self.service_account is None and self.service is None


class Claim:
    """A sender that claimed what it may not (the rule's input): ``principal`` the authenticated
    SPIFFE id, ``via`` how it was authenticated (``mtls`` or ``xfcc``), ``claimed`` what it said,
    ``receiver`` and ``entries`` what it sent (``rejected``: not evaluated), ``why`` the reason."""

    __slots__ = ("claimed", "entries", "principal", "receiver", "rejected", "via", "when", "why")

    def __init__(
        self,
        principal: str,
        via: str,
        claimed: Claimed,
        why: str,
        receiver: str,
        entries: int,
        rejected: bool,
        when: float,
    ) -> None:
        self.principal = principal
        self.via = via
        self.claimed = claimed
        self.why = why
        self.receiver = receiver
        self.entries = entries
        self.rejected = rejected
        self.when = when


def _glob(patterns: list[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class SourceRules:
    """The policy's ``sources:`` compiled, and the judgement, cached per (sender, claim)."""

    def __init__(self, rules: list[SourceRule]) -> None:
        self.rules = [(_glob(r.identities), _glob(r.namespaces)) for r in rules]
        self._cache: dict[tuple[str, tuple[str | None, str | None, str | None]], str | None] = {}

    def mismatch(self, principal: str, claimed: Claimed, mesh: MeshConfig) -> str | None:
        """None when ``principal`` may speak for ``claimed``; else why not (for the alert)."""
        key = (principal, claimed.key)
        found = self._cache.get(key, "?")
        if found != "?":
            return found
        why = self._judge(principal, claimed, mesh)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = why
        return why

    def _judge(self, principal: str, c: Claimed, mesh: MeshConfig) -> str | None:
        if c.empty:
            return None  # it claims nothing: nothing to contradict
        ns, sa = parse_spiffe(principal)
        own_domain = principal.startswith(f"spiffe://{mesh.trust_domain}/")
        if own_domain and ns is not None and sa is not None:
            same_ns = c.namespace is None or c.namespace == ns
            if c.service_account is not None:
                same_sa = c.service_account == sa
            elif c.service is not None and mesh.service_account_is_service:
                same_sa = c.service == sa
            else:
                same_sa = True
            if same_ns and same_sa:
                return None
        for ids, namespaces in self.rules:
            if ids.fullmatch(principal) and c.namespace is not None and namespaces.fullmatch(c.namespace):
                return None
        if not own_domain or ns is None or sa is None:
            return f"{principal} is not a workload identity of trust domain {mesh.trust_domain}"
        if c.namespace is not None and c.namespace != ns:
            return f"namespace {c.namespace} is not the sender's ({ns}) and no sources entry allows it"
        return "the workload is not the sender's service account and no sources entry allows it"


def claimed_by_node(node_id: str, node_cluster: str, metadata: dict[str, str]) -> Claimed:
    """An ALS stream's claim: Istio's node id ``sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local``,
    node metadata ``NAMESPACE`` / ``SERVICE_ACCOUNT``, node cluster ``<svc>.<ns>``."""
    ns = metadata.get("NAMESPACE") or None
    sa = metadata.get("SERVICE_ACCOUNT") or None
    parts = node_id.split("~")
    if ns is None and len(parts) == 4:
        ns = parts[2].partition(".")[2] or parts[3].split(".", 1)[0] or None
    svc, _, cluster_ns = node_cluster.partition(".")
    ns = ns or cluster_ns or None
    text = f"node {node_id or '-'} (cluster {node_cluster or '-'}"
    if sa:
        text += f", service account {sa}"
    return Claimed(ns, sa, svc or None, text + ")")


def claimed_by_resource(service_name: str | None, namespace: str | None, k8s_namespace: str | None) -> Claimed:
    """An OTLP resource's claim. Envoy's tracer names its service ``<svc>.<ns>``."""
    svc = service_name
    ns = namespace or k8s_namespace
    if svc and ns is None and "." in svc:
        svc, _, ns = svc.partition(".")
    elif svc and ns and svc.endswith("." + ns):
        svc = svc[: -len(ns) - 1]
    shown = [f"service.name {service_name}" if service_name else ""]
    if namespace:
        shown.append(f"service.namespace {namespace}")
    if k8s_namespace:
        shown.append(f"k8s.namespace.name {k8s_namespace}")
    return Claimed(ns or None, None, svc or None, "resource " + ", ".join(s for s in shown if s))
