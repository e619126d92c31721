"""A throwaway certificate authority generated at run time: per-service certificates with SPIFFE
URI SANs (``spiffe://<trust domain>/ns/<ns>/sa/<sa>``, the identities Istio gives its workloads,
for the e2e mesh), and certificates for a host name or address (a TLS broker on 127.0.0.1, its
clients). Keys live only in the run directory; nothing here is ever committed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def spiffe_id(namespace: str, service_account: str, trust_domain: str = "cluster.local") -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path
    spiffe: str  # the SPIFFE id; empty for a host certificate


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def host_san(host: str) -> x509.GeneralName:
    """An IP address SAN, or a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class CertificateAuthority:
    """A self-signed ECDSA P-256 root that issues short-lived workload certificates."""

    def __init__(
        self,
        directory: Path,
        trust_domain: str = "cluster.local",
        common_name: str = "meshlab throwaway root CA",
        cert_name: str = "root-cert.pem",
    ) -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlab"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        self._name = name
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = directory / cert_name
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, namespace: str, service_account: str, hosts: tuple[str, ...] = ()) -> CertFiles:
        """A workload certificate for ``spiffe://<td>/ns/<namespace>/sa/<service_account>``,
        usable both as TLS server and client (sidecars do both). ``hosts``: DNS names and IP
        addresses it also serves under (the daemon's, for clients that check the host name)."""
        uri = spiffe_id(namespace, service_account, self.trust_domain)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri), *(host_san(h) for h in hosts)]
        files = self._sign(f"{service_account}.{namespace}", sans)
        return CertFiles(cert=files[0], key=files[1], spiffe=uri)

    def issue_host(self, stem: str, host: str = "127.0.0.1") -> CertFiles:
        """A certificate for ``host`` (an IP address SAN, or a DNS name), usable both as TLS
        server and client; files ``<stem>-cert-chain.pem`` and ``<stem>-key.pem``."""
        cert, key = self._sign(stem, [host_san(host)])
        return CertFiles(cert=cert, key=key, spiffe="")

    @property
    def pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def _sign(self, stem: str, sans: list[x509.GeneralName], expired: bool = False) -> tuple[Path, Path]:
        """A leaf certificate for ``sans`` (valid for 12 hours, or ``expired`` yesterday)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        if expired:
            now -= dt.timedelta(days=1)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlab")]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=12))
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        cert_path = self.directory / f"{stem}-cert-chain.pem"
        key_path = self.directory / f"{stem}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
        return cert_path, key_path
