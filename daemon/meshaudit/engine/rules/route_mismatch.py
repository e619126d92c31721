"""route_mismatch: requests the mesh could not route, or sent out of it: Envoy's response flags
NR (no route found) and NC (no cluster found); a host outside the service registry, which Istio
(``outboundTrafficPolicy: REGISTRY_ONLY``) answers for HTTP from its ``block_all`` route (502,
``response_code_details: direct_response``, no upstream cluster) and for TCP by
``BlackHoleCluster``; and, with ``allow_passthrough: false``, traffic to ``PassthroughCluster``.

The destination is the service the request asked for when its authority names a mesh host, else
that host without its port (TCP: the address the app connected to). Seen mostly in the source's
sidecar (outbound); an inbound entry with NR (the destination's sidecar had no route) counts
too, its destination being that sidecar's service. Not an application's own 404 (``via_upstream``,
no NR flag). Hot path: an entry routed to a cluster (every healthy one) is passed over on its
cluster, read at decode: no lazy read.
"""

from __future__ import annotations

from pydantic import Field

from meshaudit.engine.api import Rule, RuleConfig, Severity
from meshaudit.model import INBOUND, Hop, Identity
from meshaudit.naming import BLACKHOLE, PASSTHROUGH


class RouteMismatchConfig(RuleConfig):
    severity: Severity = "warning"
    allow_passthrough: bool = Field(
        True,
        description="false: traffic sent to PassthroughCluster (out of the mesh, unregistered host) is a violation.",
    )


_OUT_OF_MESH = frozenset((PASSTHROUGH, BLACKHOLE))


def _has_flag(flags: str, flag: str) -> bool:
    return flag in flags.split(",")


class RouteMismatch(Rule[RouteMismatchConfig]):
    name = "route_mismatch"
    Config = RouteMismatchConfig
    summary = "Traffic from {src} to {dst} that the mesh could not route or sent out of the mesh"

    def on_hops(self, hops: list[Hop], now: float) -> None:
        allow_passthrough = self.cfg.allow_passthrough
        for h in hops:
            cluster = h.upstream_cluster
            # Routed to a cluster: nothing to see (every healthy entry; NR, NC and block_all have
            # none). A free check: the cluster is read at decode.
            if cluster and cluster not in _OUT_OF_MESH:
                continue
            if cluster == PASSTHROUGH:
                if allow_passthrough:
                    continue
                why = "sent out of the mesh through PassthroughCluster (allow_passthrough: false)"
            elif h.method is not None:  # HTTP
                if h.status < 400:  # the one lazy read of a healthy request
                    continue
                flags = h.response_flags
                if flags and _has_flag(flags, "NR"):
                    why = "no route found (NR)"
                elif flags and _has_flag(flags, "NC"):
                    why = "no cluster found (NC)"
                elif h.status == 502 and not cluster and h.response_code_details == "direct_response":
                    route = h.route_name or "(unnamed)"
                    why = f"host outside the service registry: answered by route {route} (502 direct_response)"
                else:
                    continue
            elif cluster == BLACKHOLE:
                why = "host outside the service registry: BlackHoleCluster"
            else:  # TCP
                flags = h.response_flags
                if not flags:
                    continue
                if _has_flag(flags, "NR"):
                    why = "no route found (NR)"
                elif _has_flag(flags, "NC"):
                    why = "no cluster found (NC)"
                else:
                    continue
            self._found(h, why)

    def _found(self, h: Hop, why: str) -> None:
        ctx = self.ctx
        if h.direction == INBOUND:  # the destination's sidecar had no route for it
            src = ctx.corr.named_source(h) or h.src
            dst: Identity = h.observer_service
        else:
            src = h.src
            authority = h.authority
            dst = ctx.namer.requested(authority, h.observer_service.namespace) if authority else h.dst
        if self.exempt(src, dst, h):
            return
        what = f"{h.method} {h.authority or ''}{h.path or ''}" if h.method is not None else "TCP connection"
        self.violation(src, dst, h, f"{what}: {why}", h.start)
