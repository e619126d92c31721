"""TLS on the receivers and who is sending: certificates reloaded when their files change, the
authenticated sender of each ALS stream and OTLP request, and the refusals counted.

**TLS.** The gRPC port uses ``grpc.dynamic_ssl_server_credentials``: gRPC core calls the fetcher
at each new connection's handshake, and the fetcher hands it new certificates (and a new client
CA) only when a file's inode, size or modification time changed. OTLP/HTTP builds an
``ssl.SSLContext`` per change, checked at each new connection. A rotation that leaves the files
unreadable or the key not matching the certificate keeps the previous ones (logged).

**What is counted** (``meshaudit_rejected_total{receiver,reason}``). OTLP/HTTP runs its own TLS
handshake (``asyncio.sslproto`` over the accepted connection), so every handshake refusal is
counted by what went wrong: ``no_client_certificate``, ``untrusted_certificate`` (another CA),
``expired_certificate``, ``tls_handshake_failed`` (anything else: an old protocol version, plain
HTTP on the TLS port, a timeout). gRPC core refuses handshakes before Python sees the
connection: those refusals are not counted (gRPC core logs them itself). What the application
sees on both ports is counted: a client without a certificate under ``client_auth: request``
(OTLP/HTTP only: grpcio cannot ask for an optional certificate, so on the gRPC port ``request``
acts as ``require``), a certificate without a SPIFFE id, a sender without an identity under
``enforce_sources`` (``unauthenticated``), and, on gRPC, a connection below ``min_version``
TLSv1.3 (``tls_version``: gRPC core's own floor is TLS 1.2).

**Who is sending** (:class:`Sender`). The client certificate's SPIFFE URI SAN; or, with
``receivers.trust_forwarded_client_cert`` and only on a connection from loopback (the daemon's
own sidecar), the ``URI=`` of the last element of ``x-forwarded-client-cert``, the one the
nearest proxy appended.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import grpc

from meshaudit.engine.sources import Claim, Claimed, SourceRules
from meshaudit.logsafe import RateLimited, wire
from meshaudit.receivers.envoy_als.decode import XFCC_HEADER, parse_xfcc

if TYPE_CHECKING:
    from meshaudit.config import MeshConfig, ReceiversConfig, ReceiversTlsConfig
    from meshaudit.receivers.ingest import IngestQueue

log = logging.getLogger("meshaudit.receivers.tls")
_bad = RateLimited(log)

# meshaudit_rejected_total reasons this module adds
HANDSHAKE_REASONS: Final = (
    "no_client_certificate", "untrusted_certificate", "expired_certificate", "tls_handshake_failed",
)  # fmt: skip
AUTH_REASONS: Final = ("unauthenticated", "tls_version", "source_mismatch")


class Sender:
    """The authenticated sender of a stream or request: its SPIFFE id, how it was authenticated
    (``mtls``: its own client certificate; ``xfcc``: the daemon's sidecar said so) and its peer
    address as the daemon saw it."""

    __slots__ = ("peer", "principal", "via")

    def __init__(self, principal: str, via: str, peer: str) -> None:
        self.principal = principal
        self.via = via
        self.peer = peer

    def __repr__(self) -> str:
        return f"Sender({self.principal!r}, {self.via})"


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8 (Istio's sidecar connects to the app from 127.0.0.6) and ::1."""
    if not host:
        return False
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def grpc_peer_host(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` -> ``127.0.0.1``; ``ipv6:[::1]:5000`` -> ``::1``."""
    _, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0]
    return host.strip("[]")


def warn_plaintext(addresses: dict[str, str], receivers: ReceiversConfig) -> None:
    """A receiver listening beyond loopback without TLS: anyone who reaches the port can send
    telemetry as any workload. Behind the daemon's own sidecar that is the sidecar's job."""
    if receivers.tls is not None:
        return
    for name, addr in addresses.items():
        host = addr.rpartition(":")[0]
        if is_loopback(host):
            continue
        if receivers.trust_forwarded_client_cert:
            log.warning(
                "The %s receiver listens on %s without TLS and trusts x-forwarded-client-cert from loopback: "
                "only the daemon's own sidecar (STRICT mTLS) may reach this port.",
                name,
                addr,
            )
        else:
            log.warning(
                "The %s receiver listens on %s without TLS: anyone who reaches it can read what is sent and send "
                "telemetry as any workload. Set receivers.tls (README, Security).",
                name,
                addr,
            )


# --- certificate files, reloaded when they change -----------------------------------------------------
def _signature(paths: tuple[str, ...]) -> tuple[tuple[int, int, int], ...] | None:
    """(inode, size, mtime) of each file, following symlinks (a Kubernetes Secret's ``..data``
    swap changes the inode); None when one cannot be read now."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            return None
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class TlsFiles:
    """The certificate, key and client CA files, and whether they changed since last read."""

    def __init__(self, cfg: ReceiversTlsConfig) -> None:
        self.cfg = cfg
        self.paths = tuple(p for p in (cfg.cert_file, cfg.key_file, cfg.client_ca_file) if p)
        self.seen = _signature(self.paths)
        self.loads = 0  # successful (re)loads, the first included

    def changed(self) -> bool:
        sig = _signature(self.paths)
        return sig is not None and sig != self.seen

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """The files' bytes, checked to load as a pair (raises ValueError saying why not)."""
        sig = _signature(self.paths)
        cfg = self.cfg
        try:
            with open(cfg.cert_file, "rb") as f:
                cert = f.read()
            with open(cfg.key_file, "rb") as f:
                key = f.read()
            ca = None
            if cfg.client_ca_file:
                with open(cfg.client_ca_file, "rb") as f:
                    ca = f.read()
            self.context_of(cert, key, ca)  # the pair loads, the CA parses
        except (OSError, ssl.SSLError) as exc:
            self.seen = sig  # judged: not tried again until the files change again
            raise ValueError(str(exc)) from None
        self.seen = sig
        self.loads += 1
        return cert, key, ca

    def context_of(self, cert: bytes, key: bytes, ca: bytes | None) -> ssl.SSLContext:
        """An OTLP/HTTP server context from the files' bytes (``load_cert_chain`` reads files
        only: the bytes go through a private temporary directory)."""
        import tempfile

        cfg = self.cfg
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if cfg.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
        with tempfile.TemporaryDirectory(prefix="meshaudit-tls-") as d:
            cpath, kpath = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
            fd = os.open(kpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
            with open(cpath, "wb") as f:
                f.write(cert)
            ctx.load_cert_chain(cpath, kpath)
        if ca is not None:
            ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
            ctx.verify_mode = ssl.CERT_REQUIRED if cfg.client_auth == "require" else ssl.CERT_OPTIONAL
        else:
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def _rotation_failed(what: str, exc: Exception) -> None:
    _bad.warning(
        f"reload:{what}",
        "TLS files changed but cannot be used (%s); the %s receiver keeps the previous certificates.",
        wire(exc),
        what,
    )


def grpc_credentials(cfg: ReceiversTlsConfig) -> grpc.ServerCredentials:
    """Server credentials whose certificates (and client CA) follow the files."""
    files = TlsFiles(cfg)
    cert, key, ca = files.read()

    def config_of(cert: bytes, key: bytes, ca: bytes | None) -> Any:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> Any:
        # gRPC core calls this at each new connection's handshake, on one of its threads; None
        # keeps the current certificates.
        try:
            if not files.changed():
                return None
            new = config_of(*files.read())
        except Exception as exc:  # never into gRPC core: the current certificates stay
            _rotation_failed("gRPC", exc)
            return None
        log.info("TLS certificates reloaded for the gRPC receiver (%s).", cfg.cert_file)
        return new

    return grpc.dynamic_ssl_server_credentials(
        config_of(cert, key, ca), fetch, require_client_authentication=cfg.client_auth != "none"
    )


class HttpTls:
    """The OTLP/HTTP server's SSL context, rebuilt for new connections when the files change."""

    def __init__(self, cfg: ReceiversTlsConfig) -> None:
        self.cfg = cfg
        self.files = TlsFiles(cfg)
        self._ctx = self.files.context_of(*self.files.read())

    def context(self) -> ssl.SSLContext:
        if self.files.changed():
            try:
                self._ctx = self.files.context_of(*self.files.read())
                log.info("TLS certificates reloaded for the OTLP/HTTP receiver (%s).", self.cfg.cert_file)
            except ValueError as exc:
                _rotation_failed("OTLP/HTTP", exc)
        return self._ctx


def handshake_reason(exc: BaseException) -> str:
    """The ``rejected_total`` reason of a failed server-side TLS handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in (10, 9):  # X509_V_ERR_CERT_HAS_EXPIRED, _CERT_NOT_YET_VALID
            return "expired_certificate"
        return "untrusted_certificate"
    if isinstance(exc, ssl.SSLError) and exc.reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED"):
        return "no_client_certificate"
    return "tls_handshake_failed"


def spiffe_of_peercert(cert: dict[str, Any] | None) -> str | None:
    """The first SPIFFE URI SAN of ``SSLObject.getpeercert()``."""
    if not cert:
        return None
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI" and str(value).startswith("spiffe://"):
            return str(value)
    return None


def xfcc_sender(value: str | None, peer_host: str, peer: str) -> Sender | None:
    """The sender a trusted sidecar forwarded: only from loopback."""
    if not value or not is_loopback(peer_host):
        return None
    uri = parse_xfcc(value)[1]
    return Sender(uri, "xfcc", peer) if uri and uri.startswith("spiffe://") else None


class GrpcAuth:
    """The sender of a gRPC stream or call, or the reason it is refused."""

    def __init__(self, receivers: ReceiversConfig) -> None:
        tls = receivers.tls
        self.tls = tls is not None
        self.mutual = tls is not None and tls.client_auth != "none"
        self.tls13 = tls is not None and tls.min_version == "TLSv1.3"
        self.xfcc = receivers.trust_forwarded_client_cert
        self.enforce = receivers.enforce_sources
        self.active = self.tls or self.xfcc

    def sender(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Sender | None, str | None]:
        """(sender, None), (None, None) for an unauthenticated sender that is let through, or
        (None, reason) for one to refuse with UNAUTHENTICATED (counted under ``reason``)."""
        if not self.active:
            return None, None
        peer = context.peer()
        if self.tls:
            ac = context.auth_context()
            if self.tls13:
                version = ac.get("ssl_tls_version")
                if version and version[0] != b"TLSv1.3":
                    return None, "tls_version"
            if self.mutual:
                ids = ac.get("peer_spiffe_id") or [u for u in ac.get("peer_uri", ()) if u.startswith(b"spiffe://")]
                if ids:
                    return Sender(ids[0].decode("utf-8", "replace"), "mtls", peer), None
                return None, "unauthenticated"  # a certificate without a SPIFFE id
        if self.xfcc:
            value = next((str(v) for k, v in context.invocation_metadata() or () if k == XFCC_HEADER), None)
            found = xfcc_sender(value, grpc_peer_host(peer), peer)
            if found is not None:
                return found, None
        return None, ("unauthenticated" if self.enforce else None)


class SourceCheck:
    """Judges what an authenticated sender claims (``meshaudit.engine.sources``) and hands each
    mismatch to the engine as a :class:`Claim` for log_source_mismatch. ``judge`` returns whether
    the data is to be rejected (``enforce_sources``)."""

    def __init__(self, queue: IngestQueue, mesh: MeshConfig, rules: Callable[[], SourceRules], enforce: bool) -> None:
        self.queue = queue
        self.mesh = mesh
        self.rules = rules  # the running policy's: a reload applies to the next judgement
        self.enforce = enforce

    def judge(self, sender: Sender, claimed: Claimed, receiver: str, entries: int) -> bool:
        why = self.rules().mismatch(sender.principal, claimed, self.mesh)
        if why is None:
            return False
        _bad.warning(
            f"mismatch:{receiver}",
            "%s sent %s as %s (%s): %s; %s.",
            wire(sender.principal),
            receiver,
            wire(claimed.text),
            sender.via,
            why,
            "rejected (enforce_sources)" if self.enforce else "evaluated",
        )
        self.queue.claim(
            Claim(sender.principal, sender.via, claimed, why, receiver, entries, self.enforce, time.time())
        )
        return self.enforce
