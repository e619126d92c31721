"""Mesh naming conventions: who is who, from the strings Envoy and Istio put on the wire.

- Istio node id ``sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local``; node cluster ``<svc>.<ns>``.
- Clusters ``inbound|<port>||`` and ``outbound|<port>|<subset>|<svc>.<ns>.svc.cluster.local``;
  ``PassthroughCluster`` and ``BlackHoleCluster`` are traffic leaving the mesh.
- SPIFFE URI SAN ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``.

Plain Envoy without Istio works too: the node cluster is the service name, or config maps it.
Every parser here is cached: the inputs repeat (one node per stream, few clusters).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from meshaudit.model import INBOUND, OUTBOUND, UNKNOWN, Identity, identity

if TYPE_CHECKING:  # rules import the naming conventions, and the configuration imports the rules
    from meshaudit.config import MeshConfig

PASSTHROUGH = "PassthroughCluster"
BLACKHOLE = "BlackHoleCluster"


@lru_cache(maxsize=65_536)
def parse_spiffe(uri: str) -> tuple[str | None, str | None]:
    """``spiffe://td/ns/<ns>/sa/<sa>`` -> (namespace, service account); (None, None) if not."""
    if not uri.startswith("spiffe://"):
        return None, None
    parts = uri[9:].split("/")
    ns = sa = None
    for i in range(1, len(parts) - 1, 2):
        if parts[i] == "ns":
            ns = parts[i + 1]
        elif parts[i] == "sa":
            sa = parts[i + 1]
    return ns, sa


def cluster_direction(cluster: str) -> int:
    if cluster.startswith("inbound|"):
        return INBOUND
    if cluster.startswith("outbound|") or cluster in (PASSTHROUGH, BLACKHOLE):
        return OUTBOUND
    return UNKNOWN


@lru_cache(maxsize=65_536)
def outbound_cluster_target(cluster: str) -> tuple[str | None, str | None]:
    """``outbound|9080||reviews.default.svc.cluster.local`` -> ("reviews", "default")."""
    if not cluster.startswith("outbound|"):
        return None, None
    fqdn = cluster.rsplit("|", 1)[-1]
    if not fqdn:
        return None, None
    labels = fqdn.split(".")
    if len(labels) >= 2:
        return labels[0], labels[1]
    return labels[0], None


# cluster name -> ``cluster_of``'s answer; the decoders read it directly, once per entry or span
CLUSTERS: dict[str, tuple[str, int, Identity | None]] = {}


def cluster_of(cluster: str) -> tuple[str, int, Identity | None]:
    """A cluster name's one copy (entries and spans repeat a few names), its direction
    (``cluster_direction``) and the service an outbound cluster names (else None), worked out
    once per name (``CLUSTERS``, bounded: emptied at 10 000 names)."""
    found = CLUSTERS.get(cluster)
    if found is None:
        svc, ns = outbound_cluster_target(cluster)
        found = (cluster, cluster_direction(cluster), identity(svc, ns) if svc else None)
        if len(CLUSTERS) >= 10_000:
            CLUSTERS.clear()
        CLUSTERS[cluster] = found
    return found


def cluster_port(cluster: str) -> int | None:
    """The port of an Istio cluster name: ``inbound|9000||`` or ``outbound|9000||db.data...``."""
    parts = cluster.split("|", 2)
    if len(parts) < 3 or parts[0] not in ("inbound", "outbound") or not parts[1].isdigit():
        return None
    return int(parts[1])


def strip_pod_hash(pod: str) -> str:
    """``reviews-v1-5d8f7c9b6-x2kq4`` -> ``reviews-v1`` (Deployment pods); other names unchanged."""
    parts = pod.split("-")
    if len(parts) >= 3 and len(parts[-1]) == 5 and 8 <= len(parts[-2]) <= 10:
        return "-".join(parts[:-2])
    return pod


def _ip_of(addr: str) -> str:
    """``10.0.0.1:5000`` -> ``10.0.0.1``; ``[fe80::1]:5000`` -> ``fe80::1``; a bare IP unchanged.
    An unbracketed IPv6 address is left whole: its last group cannot be told from a port."""
    if addr.startswith("["):
        end = addr.find("]")
        return addr[1:end] if end > 0 else addr
    if addr.count(":") == 1:
        return addr.rsplit(":", 1)[0]
    return addr


class Namer:
    """Resolves identities from node ids, clusters, principals and addresses, with the
    user's mapping (``mesh:`` config) taking precedence. Caches per input string."""

    def __init__(self, mesh: MeshConfig) -> None:
        self.mesh = mesh
        self._nodes: dict[tuple[str, str], Identity] = {}
        self.principals: dict[str, Identity] = {}  # read directly on the hot path
        self._addresses: dict[str, Identity] = {}
        # Pod IPs learned from Istio node ids, to name the source of plaintext hops.
        self.learned_ips: dict[str, Identity] = {}
        # Namespaces sidecars have shown (bounded with the node cache): tell "<svc>.<ns>" from "a.com".
        self.namespaces: set[str] = set()

    def node(self, node_id: str, node_cluster: str) -> Identity:
        """The workload a sidecar belongs to."""
        key = (node_id, node_cluster)
        found = self._nodes.get(key)
        if found is not None:
            return found
        service = namespace = workload = None
        ip = None
        mapped = self.mesh.clusters.get(node_cluster)
        parts = node_id.split("~")
        if len(parts) == 4:  # Istio: type~ip~pod.ns~ns.svc.cluster.local
            ip = parts[1]
            pod, _, pod_ns = parts[2].partition(".")
            workload = pod or None
            namespace = pod_ns or parts[3].split(".", 1)[0] or None
        if mapped is not None:
            service, namespace = mapped.service, mapped.namespace or namespace
            workload = mapped.workload or workload
        elif node_cluster:
            svc, _, ns = node_cluster.partition(".")
            service = svc
            namespace = ns or namespace
        elif workload:
            service = strip_pod_hash(workload)
        ident = identity(service, namespace, workload, None, None)
        if len(self._nodes) < 100_000:
            self._nodes[key] = ident
            if namespace:
                self.namespaces.add(namespace)
        if ip:
            self.learned_ips[ip] = ident
        return ident

    def principal(self, uri: str) -> Identity:
        """The party named by a peer certificate's URI SAN."""
        found = self.principals.get(uri)
        if found is not None:
            return found
        ns, sa = parse_spiffe(uri)
        service = sa if (sa and self.mesh.service_account_is_service) else None
        ident = identity(service, ns if service else None, None, uri, None)
        if len(self.principals) < 100_000:
            self.principals[uri] = ident
        return ident

    def address(self, addr: str) -> Identity:
        """The party at ``ip:port``: the user's map, then learned pod IPs, else the bare IP.

        An unnamed party is its IP, never its port: a client's ports are ephemeral (one per
        connection), so ``ip:port`` would make every connection of one pod a party of its own
        (an alert each, an identity each). A named party (mapped, or a learned pod IP) keeps the
        address it was seen at; its key is its service. The hop keeps the full socket
        (``Hop.conn``), and plaintext_hop puts it in the alert's detail."""
        found = self._addresses.get(addr)
        if found is not None:
            return found
        ip = _ip_of(addr)
        ref = self.mesh.addresses.get(addr) or self.mesh.addresses.get(ip)
        if ref is not None:
            ident = identity(ref.service, ref.namespace, ref.workload, None, addr)
        else:
            learned = self.learned_ips.get(ip)
            if learned is not None and ip not in ("127.0.0.1", "::1"):
                ident = identity(learned.service, learned.namespace, learned.workload, None, addr)
            else:
                # Not cached: the pod's sidecar may connect later and teach us its IP.
                return identity(None, None, None, None, ip)
        if len(self._addresses) < 100_000:
            self._addresses[addr] = ident
        return ident

    def service(self, name: str, namespace: str | None) -> Identity:
        return identity(name, namespace, None, None, None)

    def requested(self, authority: str, client_namespace: str | None) -> Identity:
        """The party a request asked for by its authority: a mesh service when the host is one
        (``<svc>.<ns>.svc.cluster.local``, ``<svc>.<ns>.svc``, ``<svc>.<ns>`` for a namespace a
        sidecar has shown, or a bare ``<svc>`` in the client's namespace), else the host
        without its port."""
        host = _ip_of(authority) if not authority.startswith("[") else authority[1 : authority.find("]")]
        host = host.rstrip(".").lower()
        labels = host.split(".")
        if len(labels) >= 3 and labels[2] == "svc" and (len(labels) == 3 or ".".join(labels[3:]) == "cluster.local"):
            return self.service(labels[0], labels[1])
        if len(labels) == 2 and labels[1] in self.namespaces:
            return self.service(labels[0], labels[1])
        if len(labels) == 1 and host and ":" not in host and not host.isdigit():  # not an IPv6 address
            return self.service(host, client_namespace)
        return identity(host or None, None, None, None, None)
