"""Istio-like Envoy sidecar bootstraps, and the Envoy processes that run them.

Names follow what a daemon sees from an Istio sidecar: node id
``sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local``, node cluster ``<svc>.<ns>``, clusters
``inbound|<port>||`` and ``outbound|<port>||<svc>.<ns>.svc.cluster.local``, route configs named
after the port (outbound ``9080``, inbound ``inbound|9080||``), ``BlackHoleCluster`` for hosts
outside the registry. Every sidecar streams HTTP and TCP access logs with Envoy's gRPC access
loggers (``buffer_flush_interval`` 0.2 s) and spans with ``envoy.tracers.opentelemetry`` to the
collector. Each access logger carries a runtime filter on ``meshlab.access_log_percent`` so a
test can silence one sidecar's access logs through its admin API while it keeps serving.

Optional features, each declared per service or per peer (see ``meshlab.mesh``): TLS parameters
(``tls_maximum_protocol_version``, ``cipher_suites``) on either side of a hop, Istio-style
AuthorizationPolicies as RBAC filters with policies named ``ns[<ns>]-policy[<name>]-rule[0]`` (an
HTTP denial is a 403 whose ``response_code_details`` is
``rbac_access_denied_matched_policy[<that name>]``; on a TCP listener the connection is closed and
``connection_termination_details`` says the same), a ``retry_policy`` on an outbound route, an
outbound route that serves only some path prefixes (other paths: NR, 404), and Istio's
REGISTRY_ONLY ``block_all`` virtual host as a ``direct_response`` 502 instead of the default
route to ``BlackHoleCluster``.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# `mypy tests/e2e` alone does not see tests/ as a root; the full `mypy` run checks these imports.
from infra.pki import CertFiles  # type: ignore[import-not-found,unused-ignore]
from infra.tools import envoy_binary as tools_envoy_binary  # type: ignore[import-not-found,unused-ignore]

from meshlab.procs import Proc, ProcGroup, http_ok, wait_until

HTTP_SERVICE_PORT = 9080  # the logical (Kubernetes Service) ports cluster names carry
TCP_SERVICE_PORT = 5432
ALS_FLUSH = "0.2s"
SPAN_FLUSH_MS = 200  # runtime tracing.opentelemetry.flush_interval_ms (Envoy's default is 5000)
SILENCE_KEY = "meshlab.access_log_percent"
HTTP_LOG_NAME = "http_envoy_accesslog"
TCP_LOG_NAME = "tcp_envoy_accesslog"
COLLECTOR_CLUSTER = "meshaudit_collector"
REQUEST_HEADERS_TO_LOG = ["traceparent", "tracestate", "x-b3-traceid", "x-b3-spanid", "x-request-id"]


def envoy_binary() -> Path:
    """The Envoy ELF binary: ``$ENVOY_BINARY`` if set, else the one ``make tools`` installed."""
    if os.environ.get("ENVOY_BINARY"):
        return Path(os.environ["ENVOY_BINARY"])
    return Path(tools_envoy_binary())


@dataclass(frozen=True)
class Upstream:
    """A peer this sidecar sends to: its service, where its sidecar listens, whether to originate
    mTLS (and with which TLS parameters), and how the outbound route to it behaves."""

    service: str
    namespace: str
    port: int  # the peer sidecar's inbound listener on 127.0.0.1
    tls: bool
    spiffe: str
    tls_max: str | None = None  # tls_maximum_protocol_version, e.g. "TLSv1_2" (Envoy's client default)
    ciphers: tuple[str, ...] = ()  # cipher_suites offered for TLS <= 1.2 (empty: Envoy's defaults)
    retries: int = 0  # > 0: a retry_policy on the route, retry_on 5xx, num_retries this
    paths: tuple[str, ...] = ()  # path prefixes the route serves; others get no route (NR, 404)

    @property
    def fqdn(self) -> str:
        return f"{self.service}.{self.namespace}.svc.cluster.local"


@dataclass(frozen=True)
class AuthorizationPolicy:
    """An Istio AuthorizationPolicy with one rule, as istiod translates it for the destination's
    sidecar: an RBAC policy named ``ns[<ns>]-policy[<name>]-rule[0]`` whose principals are the
    SPIFFE ids of ``from_services`` (any caller when empty) and whose permissions are the path
    prefixes ``paths`` (any request when empty). DENY policies run before ALLOW ones."""

    name: str
    action: Literal["ALLOW", "DENY"] = "DENY"
    from_services: tuple[str, ...] = ()  # "name" (the destination's namespace) or "name.namespace"
    paths: tuple[str, ...] = ()

    def rbac_name(self, namespace: str) -> str:
        return f"ns[{namespace}]-policy[{self.name}]-rule[0]"


@dataclass
class SidecarSpec:
    service: str
    namespace: str
    pod: str
    certs: CertFiles
    ca_cert: Path
    admin_port: int
    collector_port: int
    app_port: int
    inbound_port: int
    outbound_port: int
    inbound_mode: Literal["strict", "permissive"] = "permissive"
    http_upstreams: list[Upstream] = field(default_factory=list)
    tcp_app_port: int | None = None
    tcp_inbound_port: int | None = None
    tcp_upstreams: dict[int, Upstream] = field(default_factory=dict)  # local outbound port -> peer
    inbound_ciphers: tuple[str, ...] = ()  # the inbound TLS cipher_suites (empty: Envoy's defaults)
    authz: tuple[AuthorizationPolicy, ...] = ()  # RBAC on the inbound HTTP listener
    unknown_hosts: Literal["blackhole", "direct_response"] = "blackhole"  # the block_all virtual host
    trust_domain: str = "cluster.local"
    # mTLS to the collector (the daemon) with this workload's own certificate; None: plaintext.
    # ``collector_spiffe`` is the daemon's identity, the one SAN the sidecar accepts from it.
    collector_certs: CertFiles | None = None
    collector_spiffe: str = ""
    # The workload that really runs this sidecar, when its node claims another (``service``, ``pod``):
    # a forged sidecar. Names its files and process; empty: ``service``.
    workload: str = ""
    # More collectors (receivers) beside ``collector_port``: the collector cluster then has every
    # one as an endpoint, health-checked (see ``collector_cluster``), as a Service of receivers.
    more_collector_ports: tuple[int, ...] = ()

    @property
    def runs_as(self) -> str:
        return self.workload or self.service

    @property
    def node_id(self) -> str:
        return f"sidecar~127.0.0.1~{self.pod}.{self.namespace}~{self.namespace}.svc.cluster.local"

    @property
    def node_cluster(self) -> str:
        return f"{self.service}.{self.namespace}"


def _addr(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _static_cluster(name: str, port: int | None, **extra: Any) -> dict[str, Any]:
    endpoints = [{"endpoint": {"address": _addr(port)}}] if port is not None else []
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
        **extra,
    }


def _runtime_filter() -> dict[str, Any]:
    return {
        "runtime_filter": {
            "runtime_key": SILENCE_KEY,
            "percent_sampled": {"numerator": 100, "denominator": "HUNDRED"},
            # Independent of x-request-id, so "0" silences every entry, not a hash bucket.
            "use_independent_randomness": True,
        }
    }


def _common_log_config(log_name: str) -> dict[str, Any]:
    return {
        "log_name": log_name,
        "transport_api_version": "V3",
        "grpc_service": {"envoy_grpc": {"cluster_name": COLLECTOR_CLUSTER}},
        "buffer_flush_interval": ALS_FLUSH,
    }


def _http_access_log() -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.access_loggers.http_grpc",
            "filter": _runtime_filter(),
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                "common_config": _common_log_config(HTTP_LOG_NAME),
                "additional_request_headers_to_log": REQUEST_HEADERS_TO_LOG,
            },
        }
    ]


def _tcp_access_log() -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.access_loggers.tcp_grpc",
            "filter": _runtime_filter(),
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.TcpGrpcAccessLogConfig",
                "common_config": _common_log_config(TCP_LOG_NAME),
            },
        }
    ]


def _tracing(spec: SidecarSpec) -> dict[str, Any]:
    return {
        "random_sampling": {"value": 100},
        "custom_tags": [
            {"tag": "istio.canonical_service", "literal": {"value": spec.service}},
            {"tag": "istio.namespace", "literal": {"value": spec.namespace}},
        ],
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": COLLECTOR_CLUSTER}, "timeout": "1s"},
                "service_name": spec.node_cluster,
            },
        },
    }


def _rbac_filters(spec: SidecarSpec, tcp: bool = False) -> list[dict[str, Any]]:
    """One RBAC filter per action present, DENY first (as istiod orders them): HTTP filters
    ``envoy.filters.http.rbac``, or for a TCP listener network filters ``envoy.filters.network.rbac``
    with the policies that name no paths (a denied connection is closed, and its access log says
    so in ``connection_termination_details``)."""
    from infra.pki import spiffe_id  # type: ignore[import-not-found,unused-ignore]

    out: list[dict[str, Any]] = []
    for action in ("DENY", "ALLOW"):
        policies: dict[str, Any] = {}
        for p in spec.authz:
            if p.action != action or (tcp and p.paths):
                continue
            principals: list[dict[str, Any]] = []
            for src in p.from_services:
                name, _, ns = src.partition(".")
                uri = spiffe_id(ns or spec.namespace, name, spec.trust_domain)
                principals.append({"authenticated": {"principal_name": {"exact": uri}}})
            permissions = [{"url_path": {"path": {"prefix": prefix}}} for prefix in p.paths]
            policies[p.rbac_name(spec.namespace)] = {
                "permissions": permissions or [{"any": True}],
                "principals": principals or [{"any": True}],
            }
        if policies and tcp:
            out.append(
                {
                    "name": "envoy.filters.network.rbac",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
                        "stat_prefix": "tcp.",
                        "rules": {"action": action, "policies": policies},
                    },
                }
            )
        elif policies:
            out.append(
                {
                    "name": "envoy.filters.http.rbac",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                        "rules": {"action": action, "policies": policies},
                    },
                }
            )
    return out


def _hcm(spec: SidecarSpec, stat_prefix: str, route_config: dict[str, Any], inbound: bool) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "stat_prefix": stat_prefix,
        "route_config": route_config,
        "http_filters": [
            *(_rbac_filters(spec) if inbound else []),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
        "tracing": _tracing(spec),
        "access_log": _http_access_log(),
        "use_remote_address": False,
        "normalize_path": True,
        "request_id_extension": {
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                "use_request_id_for_trace_sampling": True,
            }
        },
    }
    if inbound:
        hcm["forward_client_cert_details"] = "APPEND_FORWARD"
        hcm["set_current_client_cert_details"] = {"subject": True, "dns": True, "uri": True}
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
            ".HttpConnectionManager",
            **hcm,
        },
    }


def _tcp_proxy(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": stat_prefix,
            "cluster": cluster,
            "access_log": _tcp_access_log(),
        },
    }


def _downstream_tls(spec: SidecarSpec, trust_domain: str) -> dict[str, Any]:
    """Terminate mTLS: require a client certificate from the mesh CA with a SPIFFE id."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_params": {
                    "tls_minimum_protocol_version": "TLSv1_2",
                    **({"cipher_suites": list(spec.inbound_ciphers)} if spec.inbound_ciphers else {}),
                },
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(spec.certs.cert)},
                        "private_key": {"filename": str(spec.certs.key)},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(spec.ca_cert)},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"prefix": f"spiffe://{trust_domain}/"}}
                    ],
                },
            },
        },
    }


def _upstream_tls(spec: SidecarSpec, peer: Upstream, service_port: int) -> dict[str, Any]:
    """Originate mTLS with this sidecar's certificate, accepting only the peer's SPIFFE id."""
    params: dict[str, Any] = {}
    if peer.tls_max:
        params["tls_maximum_protocol_version"] = peer.tls_max
    if peer.ciphers:
        params["cipher_suites"] = list(peer.ciphers)
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": f"outbound_.{service_port}_._.{peer.fqdn}",
            "common_tls_context": {
                **({"tls_params": params} if params else {}),
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(spec.certs.cert)},
                        "private_key": {"filename": str(spec.certs.key)},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(spec.ca_cert)},
                    "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer.spiffe}}],
                },
            },
        },
    }


def _collector_tls(spec: SidecarSpec) -> dict[str, Any]:
    """Originate mTLS to the daemon as Istio's sidecar would to a meshed collector: the workload's
    own certificate, the mesh CA, the daemon's SPIFFE id, HTTP/2 by ALPN (gRPC)."""
    assert spec.collector_certs is not None
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "localhost",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(spec.collector_certs.cert)},
                        "private_key": {"filename": str(spec.collector_certs.key)},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(spec.ca_cert)},
                    "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": spec.collector_spiffe}}],
                },
            },
        },
    }


def _inbound_filter_chains(
    spec: SidecarSpec, network_filter: dict[str, Any], trust_domain: str, tcp: bool = False
) -> list[dict[str, Any]]:
    filters = [*(_rbac_filters(spec, tcp=True) if tcp else []), network_filter]
    chains: list[dict[str, Any]] = [
        {
            "filter_chain_match": {"transport_protocol": "tls"},
            "transport_socket": _downstream_tls(spec, trust_domain),
            "filters": filters,
        }
    ]
    if spec.inbound_mode == "permissive":
        # Istio PERMISSIVE: the same port also accepts plaintext (probes, legacy clients).
        chains.append({"filter_chain_match": {"transport_protocol": "raw_buffer"}, "filters": filters})
    return chains


# The collector cluster with several receivers: how Envoy leaves one that died. Its access-log
# streams and span exports go to a host the load balancer picks among the healthy ones; an
# active gRPC health check (grpc.health.v1, which the receivers serve: SERVING while ready) marks
# a receiver that stops answering unhealthy after one failed check, so the next stream (Envoy
# opens one at its next flush after the old one broke) goes to another; outlier detection
# ejects a host whose connections fail (local-origin failures) before the next check does.
COLLECTOR_HEALTH_INTERVAL = "0.5s"


def collector_cluster(ports: tuple[int, ...], tls: dict[str, Any] | None) -> dict[str, Any]:
    """The collector cluster: HTTP/2 to ``ports`` (TLS when ``tls``), health-checked and with
    outlier detection when there is more than one."""
    extra: dict[str, Any] = {
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        **({"transport_socket": tls} if tls is not None else {}),
    }
    if len(ports) > 1:
        extra["health_checks"] = [
            {
                "timeout": "0.5s",
                "interval": COLLECTOR_HEALTH_INTERVAL,
                "no_traffic_interval": COLLECTOR_HEALTH_INTERVAL,
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "grpc_health_check": {},  # the server ("" service): SERVING while /readyz is ready
            }
        ]
        extra["outlier_detection"] = {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "interval": "0.5s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 100,
        }
    cluster = _static_cluster(COLLECTOR_CLUSTER, ports[0], **extra)
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": _addr(port)}} for port in ports
    ]
    return cluster


def bootstrap(spec: SidecarSpec) -> dict[str, Any]:
    trust_domain = spec.trust_domain
    inbound_cluster = f"inbound|{HTTP_SERVICE_PORT}||"
    listeners: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = [
        collector_cluster(
            (spec.collector_port, *spec.more_collector_ports),
            _collector_tls(spec) if spec.collector_certs is not None else None,
        ),
        _static_cluster(inbound_cluster, spec.app_port),
        _static_cluster("BlackHoleCluster", None),
    ]

    inbound_routes = {
        "name": inbound_cluster,
        "validate_clusters": False,
        "virtual_hosts": [
            {
                "name": f"inbound|http|{HTTP_SERVICE_PORT}",
                "domains": ["*"],
                "routes": [{"name": "default", "match": {"prefix": "/"}, "route": {"cluster": inbound_cluster}}],
            }
        ],
    }
    inbound_tls_inspector = {
        "name": "envoy.filters.listener.tls_inspector",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
        },
    }
    listeners.append(
        {
            "name": "virtualInbound",
            "address": _addr(spec.inbound_port),
            "traffic_direction": "INBOUND",
            "listener_filters": [inbound_tls_inspector],
            "filter_chains": _inbound_filter_chains(
                spec,
                _hcm(spec, f"inbound_0.0.0.0_{HTTP_SERVICE_PORT}", inbound_routes, inbound=True),
                trust_domain,
            ),
        }
    )

    vhosts: list[dict[str, Any]] = []
    for peer in spec.http_upstreams:
        name = f"outbound|{HTTP_SERVICE_PORT}||{peer.fqdn}"
        cluster = _static_cluster(name, peer.port)
        if peer.tls:
            cluster["transport_socket"] = _upstream_tls(spec, peer, HTTP_SERVICE_PORT)
        clusters.append(cluster)
        short = [
            peer.service,
            f"{peer.service}.{peer.namespace}",
            f"{peer.service}.{peer.namespace}.svc",
            peer.fqdn,
        ]
        domains = [*short, *(f"{d}:{HTTP_SERVICE_PORT}" for d in short)]
        action: dict[str, Any] = {"cluster": name}
        if peer.retries:
            action["retry_policy"] = {"retry_on": "5xx", "num_retries": peer.retries}
        vhosts.append(
            {
                "name": f"{peer.fqdn}:{HTTP_SERVICE_PORT}",
                "domains": domains,
                "routes": [
                    {"name": "default", "match": {"prefix": prefix}, "route": action}
                    for prefix in (peer.paths or ("/",))
                ],
            }
        )
    # Hosts outside the registry (Istio REGISTRY_ONLY): by default routed to BlackHoleCluster (no
    # endpoints: UH, 503); istiod itself answers them with a direct_response 502.
    block_all: dict[str, Any] = (
        {"direct_response": {"status": 502}}
        if spec.unknown_hosts == "direct_response"
        else {"route": {"cluster": "BlackHoleCluster"}}
    )
    vhosts.append(
        {
            "name": "block_all",
            "domains": ["*"],
            "routes": [{"name": "block_all", "match": {"prefix": "/"}, **block_all}],
        }
    )
    listeners.append(
        {
            "name": f"0.0.0.0_{HTTP_SERVICE_PORT}",
            "address": _addr(spec.outbound_port),
            "traffic_direction": "OUTBOUND",
            "filter_chains": [
                {
                    "filters": [
                        _hcm(
                            spec,
                            f"outbound_0.0.0.0_{HTTP_SERVICE_PORT}",
                            {
                                "name": str(HTTP_SERVICE_PORT),
                                "validate_clusters": False,
                                "virtual_hosts": vhosts,
                            },
                            inbound=False,
                        )
                    ]
                }
            ],
        }
    )

    if spec.tcp_app_port is not None and spec.tcp_inbound_port is not None:
        tcp_inbound = f"inbound|{TCP_SERVICE_PORT}||"
        clusters.append(_static_cluster(tcp_inbound, spec.tcp_app_port))
        listeners.append(
            {
                "name": f"virtualInbound-tcp-{TCP_SERVICE_PORT}",
                "address": _addr(spec.tcp_inbound_port),
                "traffic_direction": "INBOUND",
                "listener_filters": [inbound_tls_inspector],
                "filter_chains": _inbound_filter_chains(
                    spec, _tcp_proxy(tcp_inbound, tcp_inbound), trust_domain, tcp=True
                ),
            }
        )
    for local_port, peer in spec.tcp_upstreams.items():
        name = f"outbound|{TCP_SERVICE_PORT}||{peer.fqdn}"
        cluster = _static_cluster(name, peer.port)
        if peer.tls:
            cluster["transport_socket"] = _upstream_tls(spec, peer, TCP_SERVICE_PORT)
        clusters.append(cluster)
        listeners.append(
            {
                "name": f"{peer.fqdn}_{TCP_SERVICE_PORT}",
                "address": _addr(local_port),
                "traffic_direction": "OUTBOUND",
                "filter_chains": [{"filters": [_tcp_proxy(name, name)]}],
            }
        )

    return {
        "node": {
            "id": spec.node_id,
            "cluster": spec.node_cluster,
            "metadata": {
                "NAME": spec.pod,
                "NAMESPACE": spec.namespace,
                "WORKLOAD_NAME": spec.pod.rsplit("-", 1)[0],
                "SERVICE_ACCOUNT": spec.service,
                "CLUSTER_ID": "Kubernetes",
                "MESH_ID": trust_domain,
                "LABELS": {"app": spec.service, "service.istio.io/canonical-name": spec.service},
                "INSTANCE_IPS": "127.0.0.1",
            },
        },
        "admin": {"address": _addr(spec.admin_port)},
        "layered_runtime": {
            "layers": [
                {
                    "name": "static",
                    "static_layer": {
                        # Envoy's OpenTelemetry tracer flushes every 5 s and after 5 spans by
                        # default; both are runtime keys, lowered so tests need not wait.
                        "tracing.opentelemetry.flush_interval_ms": SPAN_FLUSH_MS,
                        "tracing.opentelemetry.min_flush_spans": 1,
                    },
                },
                {"name": "admin", "admin_layer": {}},
            ]
        },
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


@dataclass(frozen=True)
class AccessLogStats:
    """Envoy's own word on its gRPC access loggers. In 1.40 ``logs_written`` counts HTTP
    entries only; ``grpc_entries_flushed`` counts every entry (HTTP and TCP) sent on a stream."""

    written: int
    dropped: int
    flushed: int
    flush_failed: int


@dataclass(frozen=True)
class HostStatus:
    """One endpoint of a cluster as Envoy's admin ``/clusters`` shows it."""

    cx_active: int
    rq_active: int
    cx_connect_fail: int
    failed_health_check: bool  # the active health check marked it unhealthy
    ejected: bool  # outlier detection ejected it

    @property
    def healthy(self) -> bool:
        return not (self.failed_health_check or self.ejected)


class Envoy:
    """One running sidecar Envoy, addressed by its admin port."""

    def __init__(self, spec: SidecarSpec, proc: Proc, config_path: Path) -> None:
        self.spec = spec
        self.proc = proc
        self.config_path = config_path

    @classmethod
    def start(cls, spec: SidecarSpec, run_dir: Path, group: ProcGroup, base_id: int) -> Envoy:
        config_path = run_dir / f"envoy-{spec.runs_as}.{spec.namespace}.yaml"
        config_path.write_text(yaml.safe_dump(bootstrap(spec), sort_keys=False))
        argv = [
            str(envoy_binary()),
            "-c",
            str(config_path),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--base-id",
            str(base_id),
            "--log-level",
            os.environ.get("MESHLAB_ENVOY_LOG_LEVEL", "warning"),
            "--service-node",
            spec.node_id,
            "--service-cluster",
            spec.node_cluster,
        ]
        proc = group.start(f"envoy-{spec.runs_as}", argv, run_dir / f"envoy-{spec.runs_as}.{spec.namespace}.log")
        return cls(spec, proc, config_path)

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.spec.admin_port}"

    def ready(self) -> bool:
        return self.proc.alive() and http_ok(f"{self.admin}/ready")

    def wait_ready(self, timeout: float = 15.0) -> None:
        if not wait_until(self.ready, timeout, 0.05):
            raise RuntimeError(
                f"Envoy for {self.spec.runs_as} not ready within {timeout}s\n--- log ---\n{self.proc.log_tail()}"
            )

    def stats(self, filter_regex: str = "") -> dict[str, int]:
        """Counters and gauges from ``/stats?format=json`` (histograms left out)."""
        query = urllib.parse.urlencode({"format": "json", **({"filter": filter_regex} if filter_regex else {})})
        with urllib.request.urlopen(f"{self.admin}/stats?{query}", timeout=2) as resp:
            body = json.load(resp)
        out: dict[str, int] = {}
        for stat in body.get("stats", []):
            if "value" in stat:
                out[str(stat["name"])] = int(stat["value"])
        return out

    def access_log_stats(self) -> AccessLogStats:
        s = self.stats(r"^access_logs\.grpc_access_log\.")
        p = "access_logs.grpc_access_log."
        return AccessLogStats(
            written=s.get(p + "logs_written", 0),
            dropped=s.get(p + "logs_dropped", 0),
            flushed=s.get(p + "grpc_entries_flushed", 0),
            flush_failed=s.get(p + "grpc_entries_flush_failed", 0),
        )

    def cluster_hosts(self, cluster: str = COLLECTOR_CLUSTER) -> dict[int, HostStatus]:
        """Port -> what Envoy says of that endpoint of ``cluster`` (admin ``/clusters``)."""
        with urllib.request.urlopen(f"{self.admin}/clusters?format=json", timeout=2) as resp:
            body = json.load(resp)
        out: dict[int, HostStatus] = {}
        for c in body.get("cluster_statuses", []):
            if c.get("name") != cluster:
                continue
            for h in c.get("host_statuses", []):
                port = int(h["address"]["socket_address"]["port_value"])
                stats = {st["name"]: int(st.get("value", 0)) for st in h.get("stats", [])}
                health = h.get("health_status", {})
                out[port] = HostStatus(
                    cx_active=stats.get("cx_active", 0),
                    rq_active=stats.get("rq_active", 0),
                    cx_connect_fail=stats.get("cx_connect_fail", 0),
                    failed_health_check=bool(health.get("failed_active_health_check")),
                    ejected=bool(health.get("failed_outlier_check")),
                )
        return out

    def set_runtime(self, key: str, value: str) -> None:
        req = urllib.request.Request(
            f"{self.admin}/runtime_modify?{urllib.parse.urlencode({key: value})}", method="POST", data=b""
        )
        with urllib.request.urlopen(req, timeout=2) as resp:
            resp.read()

    def silence_access_logs(self, silent: bool = True) -> None:
        """Stop (or resume) this sidecar's access logs; it keeps proxying and tracing."""
        self.set_runtime(SILENCE_KEY, "0" if silent else "100")

    def describe(self) -> str:
        return f"{self.spec.node_id} admin={self.admin} log={self.proc.log_path}"


def dump_logs(envoys: list[Envoy], out: Any = None) -> None:
    """Print every Envoy's log tail (called when a test fails)."""
    stream = out or sys.stderr
    for e in envoys:
        print(f"\n===== Envoy {e.spec.runs_as}.{e.spec.namespace}: {e.describe()} =====", file=stream)
        print(e.proc.log_tail(), file=stream)
