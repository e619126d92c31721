"""Certificates made in the test with ``cryptography``: a throwaway CA, the daemon's server
certificate (``localhost`` and ``127.0.0.1``), and SPIFFE workload certificates, valid, from
another CA, or expired. Written as PEM files under the test's directory; nothing is committed."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path

    @property
    def cert_bytes(self) -> bytes:
        return self.cert.read_bytes()

    @property
    def key_bytes(self) -> bytes:
        return self.key.read_bytes()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class CA:
    """A self-signed root that issues leaf certificates into ``directory``."""

    def __init__(self, directory: Path, name: str = "test root CA") -> None:
        self.directory = directory
        self.name = name
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False),  # sign, certs, CRLs
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        slug = name.replace(" ", "-")
        self.cert_path = directory / f"{slug}.pem"
        self.cert_path.write_bytes(self.pem)

    @property
    def pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        stem: str,
        *,
        uri: str | None = None,
        dns: str | None = None,
        expired: bool = False,
    ) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        sans: list[x509.GeneralName] = []
        if uri:
            sans.append(x509.UniformResourceIdentifier(uri))
        if dns:
            sans += [x509.DNSName(dns), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        start, end = (
            (now - dt.timedelta(days=2), now - dt.timedelta(days=1))
            if expired
            else (now - dt.timedelta(hours=1), now + dt.timedelta(hours=6))
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns or stem)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        out = Pem(self.directory / f"{stem}.pem", self.directory / f"{stem}-key.pem")
        out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out.key.write_bytes(_key_pem(key))
        out.key.chmod(0o600)
        return out

    def server(self, stem: str = "server") -> Pem:
        return self.issue(stem, dns="localhost")

    def workload(self, service_account: str, namespace: str = "default", expired: bool = False) -> Pem:
        uri = f"spiffe://cluster.local/ns/{namespace}/sa/{service_account}"
        return self.issue(f"{service_account}.{namespace}{'-expired' if expired else ''}", uri=uri, expired=expired)


def serial_of(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number
