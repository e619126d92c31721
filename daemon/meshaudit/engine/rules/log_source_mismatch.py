"""log_source_mismatch: an authenticated sender whose telemetry claims to come from a workload it
may not speak for: an ALS stream whose node (node id, node metadata, node cluster) names another
namespace or service account than the sender's certificate, or an OTLP export whose resource
(``service.name``, ``service.namespace``, ``k8s.namespace.name``) names one. The policy's
``sources:`` lets an identity speak for whole namespaces (a collector that forwards).

The receivers judge, once per stream or export (``meshaudit.engine.sources``), and hand the
mismatches here as claims; no hop pays for it. Source: the authenticated sender (its SPIFFE id);
destination: the workload it claimed to be; the detail says what it claimed and whether the data
was evaluated or rejected (``receivers.enforce_sources``). Without mutual TLS or a trusted
sidecar's x-forwarded-client-cert there is no authenticated sender, and this rule sees nothing.
"""

from __future__ import annotations

from meshaudit.engine.api import Rule, RuleConfig, Severity
from meshaudit.engine.sources import Claim
from meshaudit.model import Hop, identity


class LogSourceMismatchConfig(RuleConfig):
    severity: Severity = "critical"


class LogSourceMismatch(Rule[LogSourceMismatchConfig]):
    name = "log_source_mismatch"
    Config = LogSourceMismatchConfig
    summary = "{src} sent telemetry claiming to be {dst}, which it may not speak for"

    hops = "none"  # its input is the receivers' claims, not hops

    def on_hops(self, hops: list[Hop], now: float) -> None:
        """Never called: the core hands hops only to rules that judge them."""

    def on_claims(self, claims: list[Claim], now: float) -> None:
        namer = self.ctx.namer
        for c in claims:
            src = namer.principal(c.principal)
            claimed = c.claimed
            dst = identity(claimed.service or claimed.service_account, claimed.namespace)
            if self.exempt(src, dst, None):
                continue
            done = f"{c.entries} entries rejected (enforce_sources)" if c.rejected else f"{c.entries} entries evaluated"
            how = "client certificate" if c.via == "mtls" else "x-forwarded-client-cert from the daemon's sidecar"
            detail = f"{c.receiver} data from {c.principal} ({how}) claimed {claimed.text}: {c.why}; {done}"
            self.violation(src, dst, None, detail, c.when)
