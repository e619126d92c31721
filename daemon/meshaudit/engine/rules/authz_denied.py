"""authz_denied: requests and connections the mesh denied by policy: an HTTP 403 from Envoy's RBAC
filter (``response_code_details`` ``rbac_access_denied_matched_policy[<policy>]``), a TCP
connection its RBAC filter closed (``connection_termination_details``, same words), or an
ext_authz denial (the ``UAEX`` response flag). The matched policy (Istio's
``ns[<ns>]-policy[<name>]-rule[<n>]``) goes into the alert's detail.

Not an application's own 403 (``via_upstream``), and not the source sidecar's entry of a request
its destination denied (it reads ``403 via_upstream``): the denying sidecar's entry is the one
that counts. Hot path: an HTTP entry answered below 400 is passed over on its status (read at
decode); a TCP entry costs one lazy read (flags and termination details together, ``AlsTcpHop``).
"""

from __future__ import annotations

from meshaudit.engine.api import Rule, RuleConfig, Severity
from meshaudit.engine.enforcement import denial
from meshaudit.model import Hop


class AuthzDeniedConfig(RuleConfig):
    severity: Severity = "warning"


class AuthzDenied(Rule[AuthzDeniedConfig]):
    name = "authz_denied"
    Config = AuthzDeniedConfig
    summary = "Traffic from {src} to {dst} was denied by mesh policy"

    def on_hops(self, hops: list[Hop], now: float) -> None:
        corr = self.ctx.corr
        for h in hops:
            if h.method is not None and h.status < 400:  # read at decode: no lazy read
                continue
            how = denial(h)
            if how is None:
                continue
            src = corr.named_source(h) or h.src
            if self.exempt(src, h.dst, h):
                continue
            what = f"{h.method} {h.path} answered {h.status}" if h.method is not None else "TCP connection closed"
            self.violation(src, h.dst, h, f"{what}: denied by {how}", h.start)
