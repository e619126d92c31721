"""weak_tls: an inbound hop (the destination's sidecar; HTTP or TCP, an ALS entry or an OTLP log
record) whose TLS is older than ``min_version`` or whose cipher suite is not in
``allowed_ciphers``.

It reads what the destination sidecar logged of the downstream connection: ``tls_version`` and
``tls_cipher_suite`` (an IANA code; an OTLP log record's ``downstream_tls_cipher`` name). The
version is read on every entry anyway; the cipher is a lazy field, read only when the version
alone does not settle it: a TLS 1.3 connection logged by Envoy can only carry one of the three
TLS 1.3 suites BoringSSL implements, so when all three are allowed (the default) a TLS 1.3 entry
costs one lookup. Plaintext is plaintext_hop's job; a hop whose version or cipher was not logged
is not judged on what is missing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from meshaudit.engine.api import EngineContext, Rule, RuleConfig, Severity
from meshaudit.model import INBOUND, OTEL_LOG, Hop
from meshaudit.tls import DEFAULT_ALLOWED, ENVOY_TLS13_SUITES, VERSION_RANK, cipher_code, cipher_name


def older_than(version: str, min_version: str) -> bool:
    """Whether TLS ``version`` (as Hop.tls_version spells it) is older than ``min_version``."""
    return VERSION_RANK[version] < VERSION_RANK[min_version]


class WeakTlsConfig(RuleConfig):
    severity: Severity = "high"
    min_version: Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"] = Field(
        "TLSv1.2", description="Inbound TLS older than this alerts."
    )
    allowed_ciphers: frozenset[int] = Field(
        frozenset(cipher_code(c) for c in DEFAULT_ALLOWED),
        description="Cipher suites an inbound connection may use: IANA names (TLS_AES_128_GCM_SHA256), "
        "OpenSSL/Envoy names (ECDHE-RSA-AES128-GCM-SHA256) or codes (0xC02F); any other alerts.",
    )

    @field_validator("allowed_ciphers", mode="before")
    @classmethod
    def _codes(cls, v: Any) -> Any:
        if isinstance(v, (str, int)) or not hasattr(v, "__iter__"):
            raise ValueError("expected a list of cipher suites")
        return frozenset(cipher_code(c) for c in v)


class WeakTls(Rule[WeakTlsConfig]):
    name = "weak_tls"
    Config = WeakTlsConfig
    summary = "Weak TLS from {src} to {dst}: the destination sidecar accepted an old protocol or cipher"

    def __init__(self, ctx: EngineContext) -> None:
        super().__init__(ctx)
        self.configure()

    def configure(self) -> None:
        self.allowed = self.cfg.allowed_ciphers
        # version -> True: below min_version (alert), False: judge the cipher, None: version
        # ok and the cipher needs no read (TLS 1.3 from Envoy with every Envoy TLS 1.3 suite allowed)
        tls13_settled = self.allowed >= ENVOY_TLS13_SUITES
        self.versions: dict[str, bool | None] = {
            v: True if older_than(v, self.cfg.min_version) else (None if v == "TLSv1.3" and tls13_settled else False)
            for v in VERSION_RANK
        }

    def on_hops(self, hops: list[Hop], now: float) -> None:
        versions = self.versions
        allowed = self.allowed
        for h in hops:
            tv = h.tls_version
            if tv is None or h.direction != INBOUND:
                continue
            below = versions.get(tv, False)  # "unknown": the version was not logged, judge the cipher
            if below is None and h.origin != OTEL_LOG:  # the common case: TLS 1.3 from Envoy
                continue
            if below:
                self._alert(h, f"{tv} is older than min_version {self.cfg.min_version}", h.tls_cipher)
                continue
            cipher = h.tls_cipher  # lazy: read only here
            if cipher is not None and cipher not in allowed:
                self._alert(h, "cipher not in allowed_ciphers", cipher)

    def _alert(self, h: Hop, why: str, cipher: int | None) -> None:
        src = h.src
        if src.principal is None and src.service is None:  # TLS without a client certificate
            src = self.ctx.corr.named_source(h) or src
        if self.exempt(src, h.dst, h):
            return
        what = "TCP connection" if h.method is None else "request"
        suite = cipher_name(cipher) if cipher is not None else "cipher not logged"
        where = h.upstream_cluster or h.observer
        self.violation(src, h.dst, h, f"{what} at {where} over {h.tls_version} with {suite}: {why}", h.start)
