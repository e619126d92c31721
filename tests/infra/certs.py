"""Certificates for the receivers' TLS tests, from the one test CA (``infra.pki``): the daemon's
server certificate (``localhost`` and ``127.0.0.1``), and SPIFFE workload certificates, valid,
from another CA, or expired. Written as PEM files under the test's directory; nothing is
committed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from infra.pki import CertificateAuthority, host_san, spiffe_id


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


class CA(CertificateAuthority):
    """A root named ``name`` (two of them in one directory are two files)."""

    def __init__(self, directory: Path, name: str = "test root CA") -> None:
        super().__init__(directory, common_name=name, cert_name=f"{name.replace(' ', '-')}.pem")

    def issue_pem(self, stem: str, *, uri: str | None = None, dns: str | None = None, expired: bool = False) -> Pem:
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)] if uri else []
        if dns:
            sans += [host_san(dns), host_san("127.0.0.1")]
        return Pem(*self._sign(stem, sans, expired))

    def server(self, stem: str = "server") -> Pem:
        return self.issue_pem(stem, dns="localhost")

    def workload(self, service_account: str, namespace: str = "default", expired: bool = False) -> Pem:
        stem = f"{service_account}.{namespace}{'-expired' if expired else ''}"
        return self.issue_pem(stem, uri=spiffe_id(namespace, service_account), expired=expired)


def serial_of(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number
