"""The loopback mesh: services, each a tiny app plus a sidecar Envoy, wired like Istio.

:func:`default_topology` is the mesh the end-to-end tests and ``make demo`` use. A
:class:`Mesh` generates the CA and certificates, allocates ports, starts apps and sidecars,
waits until every one is ready, and stops them all (by PID) on :meth:`Mesh.stop`. Traffic
helpers ask an app (through its control port) to call a peer, so requests in the mesh are
always app -> own sidecar -> peer sidecar -> peer app, as in a cluster.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from infra.pki import CertFiles, CertificateAuthority  # type: ignore[import-not-found,unused-ignore]

from meshlab.envoy import AccessLogStats, AuthorizationPolicy, Envoy, SidecarSpec, Upstream, dump_logs
from meshlab.procs import Proc, ProcGroup, child_env, free_ports, http_ok, wait_until

MESHLAB_PARENT = Path(__file__).resolve().parents[1]  # tests/e2e, so children can import meshlab


def _app_up(control_url: str, app: Proc) -> bool:
    return http_ok(control_url) or not app.alive()  # a dead app ends the wait too


# Envoy's server default cipher list (TLS <= 1.2) leaves out CBC suites; a "legacy" inbound
# side that still accepts one, for a client that offers nothing better. Certificates here are
# ECDSA, so the CBC suite is ECDHE-ECDSA-AES128-SHA (IANA 0xC009).
CBC_CIPHER = "ECDHE-ECDSA-AES128-SHA"
LEGACY_INBOUND_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    CBC_CIPHER,
)


@dataclass(frozen=True)
class Peer:
    service: str
    tls: bool = True  # False: the caller's sidecar sends plaintext (a DestinationRule with tls: DISABLE)
    # A DestinationRule's tls settings: e.g. tls_max="TLSv1_2", ciphers=(CBC_CIPHER,) for a client
    # stuck on a weak suite (the destination's inbound side must accept it: ServiceSpec.inbound_ciphers).
    tls_max: str | None = None
    ciphers: tuple[str, ...] = ()
    retries: int = 0  # a VirtualService retry policy: retry_on 5xx, this many retries
    paths: tuple[str, ...] = ()  # a VirtualService matching only these path prefixes (others: NR)


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    namespace: str = "default"
    inbound: Literal["strict", "permissive"] = "permissive"
    otel: Literal["grpc", "http"] | None = None  # OpenTelemetry SDK in the app, and its OTLP transport
    peers: tuple[Peer, ...] = ()
    tcp_server: bool = False  # the app echoes lines on a TCP port behind a TCP inbound listener
    tcp_peers: tuple[Peer, ...] = ()
    direct_peers: tuple[str, ...] = ()  # peers whose app port this app may call, skipping sidecars
    inbound_ciphers: tuple[str, ...] = ()  # the inbound TLS cipher_suites (empty: Envoy's defaults)
    authz: tuple[AuthorizationPolicy, ...] = ()  # Istio AuthorizationPolicies on this service
    # Hosts outside the registry: "blackhole" (route to BlackHoleCluster: UH, 503) or, as istiod
    # configures REGISTRY_ONLY, "direct_response" (the block_all route answers 502 itself).
    unknown_hosts: Literal["blackhole", "direct_response"] = "blackhole"
    # The service account whose certificate (and key) this workload's sidecar presents: another
    # workload's, for an impostor (a stolen key). None: its own.
    cert_sa: str | None = None
    # A forged sidecar: its node (id, cluster, metadata) and its spans claim to be this service's
    # sidecar (the same pod), while it sends them to the daemon with its own workload certificate.
    claims: str | None = None

    @property
    def key(self) -> str:
        return f"{self.name}.{self.namespace}"


def default_topology() -> list[ServiceSpec]:
    """frontend (OTel SDK over OTLP/HTTP) calls reviews, ratings, details, inventory and orders;
    reviews (OTel SDK over OTLP/gRPC) calls ratings and the TCP service db. frontend -> ratings and
    reviews -> db are plaintext; details accepts only mTLS (STRICT); the rest are PERMISSIVE.

    checkout calls payments over TLS 1.2 with a CBC suite only (payments still accepts it),
    orders with a retry policy, catalog through a route that serves only ``/catalog/``, and
    details and ratings, and db over mTLS; hosts outside the registry get istiod's block_all 502.
    catalog denies ``/catalog/internal/`` to everyone, details and db (TCP) deny checkout (RBAC). impostor's sidecar
    presents reviews' certificate (a stolen key) when it calls ratings. forger's sidecar claims to be
    ratings' (its node and its spans say ratings) but sends its telemetry with forger's certificate."""
    return [
        ServiceSpec(
            "frontend",
            otel="http",
            peers=(Peer("reviews"), Peer("ratings", tls=False), Peer("details"), Peer("inventory"), Peer("orders")),
            direct_peers=("reviews",),
        ),
        ServiceSpec(
            "reviews",
            otel="grpc",
            peers=(Peer("ratings"),),
            tcp_peers=(Peer("db", tls=False),),
        ),
        ServiceSpec("ratings"),
        ServiceSpec(
            "details",
            inbound="strict",
            authz=(AuthorizationPolicy("deny-checkout", from_services=("checkout",)),),
        ),
        ServiceSpec("inventory"),
        ServiceSpec(
            "db", tcp_server=True, authz=(AuthorizationPolicy("db-deny-checkout", from_services=("checkout",)),)
        ),
        ServiceSpec(
            "checkout",
            peers=(
                Peer("payments", tls_max="TLSv1_2", ciphers=(CBC_CIPHER,)),
                Peer("orders", retries=3),
                Peer("catalog", paths=("/catalog/",)),
                Peer("details"),
                Peer("ratings"),
            ),
            tcp_peers=(Peer("db"),),
            unknown_hosts="direct_response",
        ),
        ServiceSpec("payments", inbound_ciphers=LEGACY_INBOUND_CIPHERS),
        ServiceSpec("orders"),
        ServiceSpec("catalog", authz=(AuthorizationPolicy("deny-internal", paths=("/catalog/internal/",)),)),
        ServiceSpec("impostor", peers=(Peer("ratings"),), cert_sa="reviews"),
        ServiceSpec("forger", claims="ratings"),
    ]


def pod_name(service: str, namespace: str = "default") -> str:
    return f"{service}-v1-{zlib.crc32(f'{service}.{namespace}'.encode()) % 100000:05d}"


# The daemon's identity in the mesh: the SAN every sidecar and SDK app accepts from it over mTLS.
DAEMON_SPIFFE = "spiffe://cluster.local/ns/meshaudit/sa/meshaudit"


def daemon_tls(ca: CertificateAuthority) -> dict[str, str]:
    """The daemon's ``receivers.tls`` for a mesh of ``ca``: a server certificate for
    :data:`DAEMON_SPIFFE` that also names localhost and 127.0.0.1, and the mesh CA as the client CA
    (as Istio's root CA): every stream and export then names its sender (client_auth require)."""
    server = ca.issue("meshaudit", "meshaudit", hosts=("localhost", "127.0.0.1"))
    return {"cert_file": str(server.cert), "key_file": str(server.key), "client_ca_file": str(ca.cert_path)}


@dataclass(frozen=True)
class Collector:
    """Where a workload sends its telemetry: a daemon's (or a receiver's) gRPC port (ALS, OTLP/gRPC)
    and OTLP/HTTP port."""

    grpc_port: int
    http_port: int


@dataclass
class Service:
    spec: ServiceSpec
    pod: str
    app_port: int
    control_port: int
    inbound_port: int
    outbound_port: int
    admin_port: int
    tcp_app_port: int | None = None
    tcp_inbound_port: int | None = None
    tcp_outbound: dict[str, int] = field(default_factory=dict)
    envoy: Envoy | None = None
    app: Proc | None = None

    @property
    def sidecar(self) -> Envoy:
        assert self.envoy is not None
        return self.envoy


class Mesh:
    def __init__(
        self,
        run_dir: Path,
        collector_grpc_port: int,
        collector_http_port: int,
        topology: list[ServiceSpec] | None = None,
        base_id_start: int = 0,
        ca: CertificateAuthority | None = None,
        collector_spiffe: str | None = None,
        sidecar_collectors: Mapping[str, Collector] | None = None,
        app_collectors: Mapping[str, Collector] | None = None,
        collector_pool: tuple[Collector, ...] = (),
    ) -> None:
        """``ca``: the mesh CA (made here when None); ``collector_spiffe``: send to the daemon over
        mTLS, every sidecar and SDK app with its own workload certificate, accepting only this
        identity of the daemon (whose server certificate ``ca`` issued); None: plaintext.
        ``sidecar_collectors`` / ``app_collectors``: service -> where its sidecar (access logs,
        Envoy's spans) / its SDK app (spans) sends instead of the collector ports (pinning each
        workload to one of several receivers). ``collector_pool``: receivers every sidecar's
        collector cluster lists too, health-checked, beside its own collector (a Service of
        receivers: Envoy moves to another when one dies)."""
        self.run_dir = run_dir
        self.collector_grpc_port = collector_grpc_port
        self.collector_http_port = collector_http_port
        default = Collector(collector_grpc_port, collector_http_port)
        self._sidecar_collectors = dict(sidecar_collectors or {})
        self._app_collectors = dict(app_collectors or {})
        self._default_collector = default
        self._collector_pool = collector_pool
        self.topology = topology or default_topology()
        # Unique Envoy --base-id per instance; offset by the collector port so concurrent meshes differ.
        self.base_id_start = base_id_start or (collector_grpc_port % 5000) * 10
        self.group = ProcGroup()
        self.services: dict[str, Service] = {}
        self.ca: CertificateAuthority | None = ca
        self.collector_spiffe = collector_spiffe
        self._certs: dict[tuple[str, str], CertFiles] = {}  # (namespace, service account) -> files
        self.touched: set[str] = set()  # services whose sidecar carried traffic (calls, TCP, probes)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> Mesh:
        try:
            self._start(timeout)
        except BaseException:
            self.dump_logs()
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.ca is None:
            self.ca = CertificateAuthority(self.run_dir / "pki")
        # All ports in one allocation (no duplicates among them); apps bind theirs before the
        # Envoys start, so an Envoy's outgoing connections cannot take an app's port meanwhile.
        counts = [5 + (2 if spec.tcp_server else 0) + len(spec.tcp_peers) for spec in self.topology]
        pool = iter(free_ports(sum(counts)))
        for spec, n in zip(self.topology, counts, strict=True):
            ports = [next(pool) for _ in range(n)]
            svc = Service(
                spec=spec,
                pod=pod_name(spec.claims or spec.name, spec.namespace),
                app_port=ports[0],
                control_port=ports[1],
                inbound_port=ports[2],
                outbound_port=ports[3],
                admin_port=ports[4],
            )
            rest = ports[5:]
            if spec.tcp_server:
                svc.tcp_app_port, svc.tcp_inbound_port = rest[0], rest[1]
                rest = rest[2:]
            for peer, port in zip(spec.tcp_peers, rest, strict=True):
                svc.tcp_outbound[peer.service] = port
            self.services[spec.name] = svc

        for svc in self.services.values():
            svc.app = self._start_app(svc)
        for i, svc in enumerate(self.services.values()):
            svc.envoy = Envoy.start(self._sidecar_spec(svc), self.run_dir, self.group, self.base_id_start + i)
        deadline = time.monotonic() + timeout
        for svc in self.services.values():
            svc.sidecar.wait_ready(max(1.0, deadline - time.monotonic()))
            control = f"http://127.0.0.1:{svc.control_port}/healthz"
            app = svc.app
            assert app is not None
            if not wait_until(partial(_app_up, control, app), max(1.0, deadline - time.monotonic())):
                raise RuntimeError(f"app {svc.spec.name} did not start\n{app.log_tail()}")
            if not app.alive():
                raise RuntimeError(f"app {svc.spec.name} exited\n{app.log_tail()}")
        # Readiness comes from each Envoy's admin /ready, never from connecting to a listener: a
        # probe connection through a TCP proxy would itself be a (plaintext) hop in the audit.

    def stop(self) -> None:
        self.group.stop_all()

    def __enter__(self) -> Mesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- wiring --------------------------------------------------------------------------------
    def sidecar_collector(self, service: str) -> Collector:
        """Where ``service``'s sidecar streams its access logs and spans."""
        return self._sidecar_collectors.get(service, self._default_collector)

    def app_collector(self, service: str) -> Collector:
        """Where ``service``'s SDK app exports its spans."""
        return self._app_collectors.get(service, self._default_collector)

    def _upstream(self, peer: Peer, tcp: bool) -> Upstream:
        target = self.services[peer.service]
        assert self.ca is not None
        from infra.pki import spiffe_id  # type: ignore[import-not-found,unused-ignore]

        port = target.tcp_inbound_port if tcp else target.inbound_port
        assert port is not None, f"{peer.service} has no {'TCP' if tcp else 'HTTP'} inbound listener"
        return Upstream(
            service=target.spec.name,
            namespace=target.spec.namespace,
            port=port,
            tls=peer.tls,
            spiffe=spiffe_id(target.spec.namespace, target.spec.name, self.ca.trust_domain),
            tls_max=peer.tls_max,
            ciphers=peer.ciphers,
            retries=peer.retries,
            paths=peer.paths,
        )

    def certs(self, namespace: str, service_account: str) -> CertFiles:
        """The certificate of one service account, issued once: an impostor shares the very files
        (a stolen key), and no sidecar's files are rewritten while another Envoy reads them."""
        assert self.ca is not None
        key = (namespace, service_account)
        if key not in self._certs:
            self._certs[key] = self.ca.issue(namespace, service_account)
        return self._certs[key]

    def _sidecar_spec(self, svc: Service) -> SidecarSpec:
        assert self.ca is not None
        certs = self.certs(svc.spec.namespace, svc.spec.cert_sa or svc.spec.name)
        return SidecarSpec(
            service=svc.spec.claims or svc.spec.name,
            workload=svc.spec.name if svc.spec.claims else "",
            namespace=svc.spec.namespace,
            pod=svc.pod,
            certs=certs,
            ca_cert=self.ca.cert_path,
            admin_port=svc.admin_port,
            collector_port=self.sidecar_collector(svc.spec.name).grpc_port,
            more_collector_ports=tuple(
                c.grpc_port for c in self._collector_pool if c != self.sidecar_collector(svc.spec.name)
            ),
            app_port=svc.app_port,
            inbound_port=svc.inbound_port,
            outbound_port=svc.outbound_port,
            inbound_mode=svc.spec.inbound,
            http_upstreams=[self._upstream(p, tcp=False) for p in svc.spec.peers],
            tcp_app_port=svc.tcp_app_port,
            tcp_inbound_port=svc.tcp_inbound_port,
            tcp_upstreams={svc.tcp_outbound[p.service]: self._upstream(p, tcp=True) for p in svc.spec.tcp_peers},
            inbound_ciphers=svc.spec.inbound_ciphers,
            authz=svc.spec.authz,
            unknown_hosts=svc.spec.unknown_hosts,
            trust_domain=self.ca.trust_domain,
            # To the daemon every workload speaks as itself, an impostor too: its stolen key is
            # for the hop it forges (identity_mismatch), not for its own telemetry. A forged
            # sidecar too: its node claims another service, its certificate says who it is.
            collector_certs=self.certs(svc.spec.namespace, svc.spec.name) if self.collector_spiffe else None,
            collector_spiffe=self.collector_spiffe or "",
        )

    def _start_app(self, svc: Service) -> Proc:
        otel: dict[str, str] | None = None
        collector = self.app_collector(svc.spec.name)
        if svc.spec.otel == "grpc":
            otel = {"protocol": "grpc", "endpoint": f"127.0.0.1:{collector.grpc_port}"}
        elif svc.spec.otel == "http":
            otel = {"protocol": "http", "endpoint": f"http://127.0.0.1:{collector.http_port}/v1/traces"}
        if otel is not None and self.collector_spiffe:
            assert self.ca is not None
            own = self.certs(svc.spec.namespace, svc.spec.name)
            host = f"localhost:{collector.grpc_port}"
            url = f"https://localhost:{collector.http_port}/v1/traces"
            otel.update(
                endpoint=host if otel["protocol"] == "grpc" else url,
                ca=str(self.ca.cert_path),
                cert=str(own.cert),
                key=str(own.key),
            )
        cfg = {
            "service": svc.spec.name,
            "namespace": svc.spec.namespace,
            "pod": svc.pod,
            "app_port": svc.app_port,
            "control_port": svc.control_port,
            "tcp_app_port": svc.tcp_app_port,
            "outbound_port": svc.outbound_port,
            "tcp_outbound": svc.tcp_outbound,
            "direct": {p: self.services[p].app_port for p in svc.spec.direct_peers},
            "otel": otel,
        }
        path = self.run_dir / f"app-{svc.spec.key}.json"
        path.write_text(json.dumps(cfg, indent=2))
        return self.group.start(
            f"app-{svc.spec.name}",
            [sys.executable, "-m", "meshlab.app", str(path)],
            self.run_dir / f"app-{svc.spec.key}.log",
            env=child_env([MESHLAB_PARENT]),
        )

    # --- traffic -----------------------------------------------------------------------------
    def _control(self, service: str, path: str, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        svc = self.services[service]
        req = urllib.request.Request(
            f"http://127.0.0.1:{svc.control_port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            result: dict[str, Any] = json.load(resp)
        return result

    def call(
        self,
        src: str,
        dst: str,
        path: str,
        method: str = "GET",
        count: int = 1,
        via: Literal["sidecar", "direct"] = "sidecar",
        headers: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """``src``'s app calls ``dst`` ``count`` times; returns one result per call
        (``status``, ``request_id``, ``trace_id``, ``body``)."""
        body = {"peer": dst, "method": method, "path": path, "via": via, "count": count, "headers": headers or {}}
        if via == "sidecar":
            self.touched.update(s for s in (src, dst) if s in self.services)
        results: list[dict[str, Any]] = self._control(src, "/call", body)["results"]
        return results

    def tcp(self, src: str, dst: str, payload: str = "ping", count: int = 1) -> list[dict[str, Any]]:
        """``src``'s app opens ``count`` TCP connections to ``dst`` through its sidecar."""
        self.touched.update((src, dst))
        results: list[dict[str, Any]] = self._control(src, "/tcp", {"peer": dst, "payload": payload, "count": count})[
            "results"
        ]
        return results

    def probe(self, dst: str, path: str = "/healthz") -> int:
        """A kubelet-style probe: plaintext HTTP from outside the mesh to ``dst``'s sidecar."""
        port = self.services[dst].inbound_port
        self.touched.add(dst)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status)

    # --- introspection -------------------------------------------------------------------------
    @property
    def envoys(self) -> list[Envoy]:
        return [s.sidecar for s in self.services.values() if s.envoy is not None]

    def envoy(self, service: str) -> Envoy:
        return self.services[service].sidecar

    def access_log_stats(self) -> dict[str, AccessLogStats]:
        """service -> its sidecar's gRPC access-logger counters, from the admin stats."""
        return {name: svc.sidecar.access_log_stats() for name, svc in self.services.items()}

    def wait_access_logs_stable(self, quiet_secs: float = 0.6, timeout: float = 10.0) -> dict[str, AccessLogStats]:
        """Wait until no sidecar's access-log counters change for ``quiet_secs`` (Envoy's
        ``timer_flushed`` keeps ticking, so the counters themselves are what to watch)."""
        last = self.access_log_stats()
        stable_since = time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.access_log_stats()
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since >= quiet_secs:
                break
        return last

    def dead(self) -> list[str]:
        return [p.name for p in self.group.dead()]

    def dump_logs(self, out: Any = None) -> None:
        stream = out or sys.stderr
        dump_logs(self.envoys, stream)
        for svc in self.services.values():
            if svc.app is not None:
                print(f"\n===== app {svc.spec.key} ({svc.app.log_path}) =====", file=stream)
                print(svc.app.log_tail(5000), file=stream)
