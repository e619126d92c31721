"""Introspection a reviewer can trust: what each rule runs with and where every value came from
(``meshaudit rules``), and what the policy decides about one request (``meshaudit policy
explain``). Pure: it returns data; ``meshaudit.cli`` prints it.

Nothing here decides on its own. Effective options are the engine's (``load_explained``, from
``CompiledPolicy.rule_section``); edges, routes, exceptions and the overrides for a destination
are asked of the compiled policy with the engine's own calls (``edge_allowed``,
``narrow_edge_allows``, ``route_check``, ``Exceptions.covering``, ``dst_setting``), and the
``allowing_*`` calls that name the deciding entry share their loops. Rules that judge how a
request went (its TLS, its answer, its traces) cannot be decided from the policy alone: for
those the explanation says under which condition they fire, with the thresholds that apply to
the destination.
"""

from __future__ import annotations

import datetime
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from meshaudit.config import EdgeRule, RouteRule
from meshaudit.engine.api import RuleConfig
from meshaudit.engine.exceptions import CompiledException, Exceptions
from meshaudit.engine.policy import CompiledPolicy
from meshaudit.engine.rules import REGISTRY
from meshaudit.engine.rules.error_burst import ErrorBurstConfig
from meshaudit.engine.rules.excessive_retries import ExcessiveRetriesConfig
from meshaudit.engine.rules.missing_access_log import MissingAccessLogConfig
from meshaudit.engine.rules.route_mismatch import RouteMismatchConfig
from meshaudit.engine.rules.unexpected_edge import UnexpectedEdgeConfig
from meshaudit.engine.rules.weak_tls import WeakTlsConfig, older_than
from meshaudit.loading import Explained, OptionOrigin
from meshaudit.model import ALS_HTTP, ALS_TCP, INBOUND, Hop, Identity
from meshaudit.naming import Namer
from meshaudit.policyfile import Origin
from meshaudit.tls import SUITES, VERSIONS

# --- meshaudit rules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionView:
    name: str
    value: Any  # JSON-ready: cipher suites by IANA name, sets as sorted lists
    origin: OptionOrigin


@dataclass(frozen=True)
class DestinationOverride:
    """A policy override of the rule for some destinations (later ones over earlier ones)."""

    to: list[str]
    options: dict[str, Any]
    origin: Origin


@dataclass(frozen=True)
class RuleView:
    name: str
    options: list[OptionView]  # enabled, severity, then the rule's own options in its model's order
    destinations: list[DestinationOverride]

    def option(self, name: str) -> OptionView:
        return next(o for o in self.options if o.name == name)


def _suite(code: int) -> str:
    names = SUITES.get(code)
    return names[0] if names else f"0x{code:04X}"


def _value(name: str, value: Any) -> Any:
    """An option's value as a reviewer (and JSON) reads it."""
    if name == "allowed_ciphers":
        return [_suite(c) for c in sorted(value)]
    if isinstance(value, frozenset | set):
        return sorted(value)
    return value


def rules_view(x: Explained) -> list[RuleView]:
    """Every rule, in registry order, with its effective options and their origins, then the
    policy's overrides for a destination."""
    prov = x.provenance
    out: list[RuleView] = []
    for cls in REGISTRY:
        section = prov.sections[cls.name]
        origins = prov.options[cls.name]
        options = [OptionView(n, _value(n, getattr(section, n)), origins[n]) for n in type(section).model_fields]
        destinations = [
            DestinationOverride(list(o.to), o.options(), prov.policy.overrides[i])
            for i, o in enumerate(x.policy.overrides)
            if o.rule == cls.name and o.to is not None
        ]
        out.append(RuleView(cls.name, options, destinations))
    return out


# --- meshaudit policy explain ----------------------------------------------------------------------


class RequestError(ValueError):
    """A request ``policy explain`` cannot build (the message says why)."""


@dataclass(frozen=True)
class Request:
    """The request or connection to explain, as given on the command line."""

    source: str
    destination: str
    method: str | None = None
    path: str | None = None
    protocol: Literal["http", "tcp"] | None = None
    port: int | None = None
    user_agent: str | None = None
    source_address: str | None = None
    status: int | None = None
    tls_version: str | None = None  # a version, or "plaintext"


Decision = Literal["alert", "allow", "depends", "not_judged", "disabled"]


@dataclass(frozen=True)
class Setting:
    """An option as it applies to the destination: the rule's own, or a destination override's."""

    value: Any
    override: Origin | None = None  # the policy override for the destination that set it


@dataclass(frozen=True)
class Covering:
    """An exception that covers the request for a rule."""

    name: str
    reason: str
    origin: Origin | None
    expires: datetime.date | None = None


@dataclass(frozen=True)
class Ref:
    """A policy entry that bears on an answer without deciding it, e.g. the edges the source has."""

    what: str
    origin: Origin


@dataclass(frozen=True)
class RuleAnswer:
    """What one rule would do with the request.

    ``alert``: it fires (unless ``exception`` covers it); ``allow``: it does not; ``depends``: it
    fires only on what the request's TLS, answer or traces show (``why`` says what); and
    ``not_judged``: the rule has nothing to check here."""

    rule: str
    decision: Decision
    why: str
    decided_by: Origin | None = None  # the edge or route that decided
    related: list[Ref] = field(default_factory=list)  # the source's edges, the destination's routes
    severity: Setting | None = None
    severity_when_served: Setting | None = None
    exception: Covering | None = None  # the first exception that covers it (alert, depends)
    expired: Covering | None = None  # an exception that would cover it but has expired


@dataclass
class Explanation:
    source: Identity
    destination: Identity
    protocol: Literal["http", "tcp"]
    method: str | None
    path: str | None
    port: int | None
    tls_version: str | None
    answers: list[RuleAnswer]
    notes: list[str] = field(default_factory=list)
    verdict: str = ""


def party(text: str, namer: Namer) -> Identity:
    """A party as the policy names it: ``svc.ns`` or ``svc``, a SPIFFE id (its service too with
    ``mesh.service_account_is_service``), an IP address (``ip[:port]``, named by
    ``mesh.addresses``), or a host outside the mesh (three or more labels:
    ``<svc>.<ns>.svc.cluster.local`` is the service)."""
    text = text.strip()
    if not text or any(ch in text for ch in "*?[]@ "):
        raise RequestError(f"{text!r} is not a party (svc.ns, svc, spiffe://..., or an IP address), not a pattern")
    if text.startswith("spiffe://"):
        return namer.principal(text)
    if _is_address(text):
        return namer.address(text)
    labels = text.split(".")
    if len(labels) == 1:
        return namer.service(text, None)
    if len(labels) == 2:
        return namer.service(labels[0], labels[1])
    return namer.requested(text, None)


def _is_address(text: str) -> bool:
    host = text
    if text.startswith("["):
        host = text[1 : text.find("]")]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def synthetic_hop(req: Request, src: Identity, dst: Identity, now: float) -> Hop:
    """The request as the destination's sidecar would log it (inbound): what rules and
    exceptions read of it. A port makes its cluster ``inbound|<port>||`` (edges for ports)."""
    http = req.protocol == "http" or (req.protocol is None and (req.method is not None or req.path is not None))
    if req.protocol == "tcp" and (req.method is not None or req.path is not None):
        raise RequestError("--method and --path describe an HTTP request: not with --protocol tcp")
    if req.source_address is not None and not _is_address(req.source_address):
        raise RequestError(f"--source-address {req.source_address!r} is not IP[:PORT]")
    return Hop(
        ALS_HTTP if http else ALS_TCP, "meshaudit-policy-explain", dst, INBOUND, src, dst, now,
        tls_version=None if req.tls_version in (None, "plaintext") else req.tls_version,
        peer_principal=src.principal, method=(req.method or "GET").upper() if http else None,
        path=(req.path or "/") if http else None, status=req.status or 0,
        upstream_cluster=f"inbound|{req.port}||" if req.port is not None else "",
        user_agent=req.user_agent, source_address=req.source_address,
    )  # fmt: skip


class _Explainer:
    def __init__(self, x: Explained, req: Request, now: float) -> None:
        self.x = x
        self.req = req
        self.origins = x.provenance.policy
        self.sections = x.provenance.sections
        namer = Namer(x.config.mesh)
        self.src = party(req.source, namer)
        self.dst = party(req.destination, namer)
        self.hop = synthetic_hop(req, self.src, self.dst, now)
        self.policy = CompiledPolicy(x.policy)
        # Exceptions as the running engine holds them today (expired ones dropped) and as
        # written (to say that one would cover the request but has expired).
        self.policy.exceptions.clock(now)
        self.written = Exceptions(x.policy.exceptions, x.policy.exemptions)
        self.expiry = {e.name: e.expires for e in x.policy.exceptions if e.expires is not None}

    # --- what every firing rule is told ---------------------------------------------------------
    def setting(self, rule: str, name: str) -> Setting:
        """As Rule.setting reads it: the last override for a matching destination, else the
        rule's effective section."""
        found = self.policy.dst_setting(rule, name, self.dst)
        if found is not None:
            return Setting(found[0], self.origins.overrides[found[1]])
        return Setting(getattr(self.sections[rule], name))

    def _covering(self, x: CompiledException | None) -> Covering | None:
        if x is None:
            return None
        return Covering(x.name, x.reason, self.origins.exceptions.get(x.name), self.expiry.get(x.name))

    def answer(
        self,
        rule: str,
        decision: Decision,
        why: str,
        decided_by: Origin | None = None,
        related: list[Ref] | None = None,
    ) -> RuleAnswer:
        if decision not in ("alert", "depends"):
            return RuleAnswer(rule, decision, why, decided_by, related or [])
        section = self.sections[rule]
        served = self.setting(rule, "severity_when_served") if hasattr(section, "severity_when_served") else None
        active = self.policy.exceptions.covering(rule, self.src, self.dst, self.hop)
        # none active covers it, but one as written does: that one has expired
        written = self.written.covering(rule, self.src, self.dst, self.hop) if active is None else None
        return RuleAnswer(
            rule, decision, why, decided_by, related or [], self.setting(rule, "severity"), served,
            self._covering(active), self._covering(written),
        )  # fmt: skip

    # --- rule by rule ---------------------------------------------------------------------------
    def explain(self) -> Explanation:
        hop = self.hop
        answers: list[RuleAnswer] = []
        for cls in REGISTRY:
            if cls.hops == "none":  # about who sends telemetry (log_source_mismatch), never about a request
                continue
            section = self.sections[cls.name]
            if not section.enabled:
                at = self.x.provenance.options[cls.name]["enabled"].at  # where it was switched off
                answers.append(RuleAnswer(cls.name, "disabled", "enabled: false", at))
                continue
            judge = getattr(self, cls.name, None)
            if judge is None:  # a rule this module does not know yet: say what it is about
                answers.append(self.answer(cls.name, "depends", f"judged on what the traffic shows: {cls.summary}"))
            else:
                answers.append(judge(section))
        out = Explanation(
            self.src, self.dst, "http" if hop.method is not None else "tcp", hop.method, hop.path, self.req.port,
            self.req.tls_version, answers,
        )  # fmt: skip
        out.notes = self.notes(answers)
        out.verdict = verdict(answers)
        return out

    def unexpected_edge(self, cfg: UnexpectedEdgeConfig) -> RuleAnswer:
        src, dst, hop = self.src, self.dst, self.hop
        name = "unexpected_edge"
        if cfg.mode == "learn":
            kept = f", kept in {cfg.state_file}" if cfg.state_file else ""
            why = (
                f"learn mode: the learned baseline decides (the edges seen in the first {cfg.learn_secs} s{kept}); "
                f"{src.key} -> {dst.key} alerts if it is not among them"
            )
            return self.answer(name, "depends", why)
        if not self.policy.has_edges:
            return self.answer(name, "not_judged", "the policy has no edges: the rule has nothing to check")
        if src.service is None and src.principal is None:
            why = (
                f"the source {src.key} is a bare address: the rule judges a request once a certificate, the client "
                "sidecar's entry or mesh.addresses names its source (plaintext_hop covers the rest)"
            )
            return self.answer(name, "not_judged", why)
        allowed = self.policy.edge_allowed(src, dst) or self.policy.narrow_edge_allows(src, dst, hop)
        found = self.policy.allowing_edge(src, dst, hop)
        if allowed != (found is not None):  # one decision, two calls: they share their loops
            raise AssertionError(f"edge_allowed and allowing_edge disagree on {src.key} -> {dst.key}")
        edges = self.x.policy.edges or []
        if found is None:
            theirs = [
                Ref(f"the source's edge {_edge(edges[i])}", self.origins.edges[i]) for i in self.policy.edges_from(src)
            ]
            why = f"no edge allows {src.key} -> {dst.key}"
            if any(e.protocol or e.ports for e in edges):  # some edges judge the protocol and port: name them
                port = f"port {self.req.port}" if self.req.port else "no port"
                why += f" ({'HTTP' if hop.method is not None else 'TCP'}, {port})"
            return self.answer(name, "alert", why, related=theirs)
        i, narrow = found
        what = f"allowed by the edge {_edge(edges[i])}"
        if narrow:
            what += " (an edge for a protocol or ports decided)"
        return self.answer(name, "allow", what, self.origins.edges[i])

    def unexpected_path(self, cfg: RuleConfig) -> RuleAnswer:
        dst, hop, name = self.dst, self.hop, "unexpected_path"
        method = hop.method
        if method is None:
            return self.answer(name, "not_judged", "a TCP connection: only HTTP requests have paths to check")
        check = self.policy.route_check(dst)
        if check is None:
            return self.answer(name, "not_judged", f"no route covers {dst.key}: its paths are not checked")
        allowed = (check.get(method) or check[None])(hop.path)
        found = self.policy.allowing_route(dst, method, hop.path)
        if allowed != (found is not None):
            raise AssertionError(f"route_check and allowing_route disagree on {method} {hop.path}")
        routes = self.x.policy.routes
        if found is None:
            theirs = [
                Ref(f"the destination's route {_route(routes[i])}", self.origins.routes[i])
                for i in self.policy.covering_routes(dst)
            ]
            why = f"{method} {hop.path} is allowed by none of the routes of {dst.key}"
            return self.answer(name, "alert", why, related=theirs)
        i, j = found
        allow = routes[i].allow[j]
        why = (
            f"allowed by the route to {_list(routes[i].to)}: methods {_list(allow.methods)}, paths {_list(allow.paths)}"
        )
        return self.answer(name, "allow", why, self.origins.routes[i])

    def plaintext_hop(self, cfg: RuleConfig) -> RuleAnswer:
        tls, dst = self.req.tls_version, self.dst.key
        if tls is None:
            return self.answer("plaintext_hop", "depends", f"fires if it arrives at {dst}'s sidecar without TLS")
        if tls == "plaintext":
            return self.answer("plaintext_hop", "alert", f"it arrives at {dst}'s sidecar without TLS")
        return self.answer("plaintext_hop", "allow", f"it arrives over {tls}")

    def weak_tls(self, cfg: WeakTlsConfig) -> RuleAnswer:
        tls, name = self.req.tls_version, "weak_tls"
        suites = f"allowed_ciphers ({len(cfg.allowed_ciphers)} suites)"
        if tls == "plaintext":
            return self.answer(name, "not_judged", "no TLS at all: plaintext_hop's case")
        if tls is None:
            why = (
                f"fires if {self.dst.key}'s sidecar accepts TLS older than {cfg.min_version} or a suite not in {suites}"
            )
            return self.answer(name, "depends", why)
        if older_than(tls, cfg.min_version):
            return self.answer(name, "alert", f"{tls} is older than min_version {cfg.min_version}")
        return self.answer(
            name, "depends", f"{tls} meets min_version {cfg.min_version}; fires if its suite is not in {suites}"
        )

    def missing_access_log(self, cfg: MissingAccessLogConfig) -> RuleAnswer:
        listed = " (listed in mesh_services)" if self.policy.mesh_services(self.dst) else ""
        why = (
            f"fires if traces show it reaching {self.dst.key}{listed} with no access log from that sidecar "
            f"within grace_ms {cfg.grace_ms}"
        )
        return self.answer("missing_access_log", "depends", why)

    def route_mismatch(self, cfg: RouteMismatchConfig) -> RuleAnswer:
        why = "fires if the mesh cannot route it (NR, NC) or the host is outside the service registry (REGISTRY_ONLY)"
        if not cfg.allow_passthrough:
            why += ", or it leaves the mesh through PassthroughCluster (allow_passthrough: false)"
        return self.answer("route_mismatch", "depends", why)

    def authz_denied(self, cfg: RuleConfig) -> RuleAnswer:
        how = "an RBAC 403" if self.hop.method is not None else "RBAC closing the connection"
        return self.answer("authz_denied", "depends", f"fires if the mesh denies it: {how}, or ext_authz (UAEX)")

    def identity_mismatch(self, cfg: RuleConfig) -> RuleAnswer:
        src = self.src
        if src.service is None:
            return self.answer("identity_mismatch", "not_judged", f"the source {src.key} names no service to compare")
        why = (
            f"fires if the client presents a certificate {src.key} may not present (not its own service account, "
            "nor one policy.identities lists for it)"
        )
        return self.answer("identity_mismatch", "depends", why)

    def excessive_retries(self, cfg: ExcessiveRetriesConfig) -> RuleAnswer:
        if self.hop.method is None:
            return self.answer("excessive_retries", "not_judged", "a TCP connection: only HTTP retries are counted")
        retries, ratio = (
            self.setting("excessive_retries", "min_retries"),
            self.setting("excessive_retries", "min_ratio"),
        )
        why = (
            f"fires if the source sidecar retries requests to {self.dst.key} at least {_v(retries)} times and "
            f"{_v(ratio)} per request in a {cfg.window_secs} s window"
        )
        return self.answer("excessive_retries", "depends", why)

    def error_burst(self, cfg: ErrorBurstConfig) -> RuleAnswer:
        if self.hop.method is None:
            return self.answer("error_burst", "not_judged", "a TCP connection: only HTTP requests are counted")
        ratio, least = self.setting("error_burst", "min_ratio"), self.setting("error_burst", "min_requests")
        why = (
            f"fires if at least {_v(ratio)} of at least {_v(least)} requests from {self.src.key} to {self.dst.key} "
            f"fail upstream (5xx, UF/UH/UO/UT/UC/UR/URX) in a {cfg.window_secs} s window"
        )
        return self.answer("error_burst", "depends", why)

    # --- what the answers cannot see --------------------------------------------------------------
    def notes(self, answers: list[RuleAnswer]) -> list[str]:
        req, hop = self.req, self.hop
        out: list[str] = []
        if hop.method is not None and (req.method is None or req.path is None):
            out.append(f"no {'--method' if req.method is None else '--path'} given: {hop.method} {hop.path} assumed")
        firing = {a.rule for a in answers if a.decision in ("alert", "depends")}
        unset = {
            "user_agent": ("--user-agent", req.user_agent is None),
            "source_cidr": ("--source-address", hop.source_address is None and self.src.address is None),
            "response_codes": ("--status", req.status is None),
        }
        for key, (flag, missing) in unset.items():
            names = [x.name for x in self.x.policy.exceptions if getattr(x, key) is not None and firing & set(x.rules)]
            if missing and names:
                out.append(f"{', '.join(names)} match on {key}: give {flag} to check them")
        if req.port is None and any(e.ports for e in self.x.policy.edges or ()):
            out.append("no --port given: edges for ports do not match")
        return out


def _v(s: Setting) -> str:
    return f"{s.value} (for this destination)" if s.override is not None else str(s.value)


def _list(items: list[str] | list[int]) -> str:
    return f"[{', '.join(str(i) for i in items)}]"


def _edge(e: EdgeRule) -> str:
    only = [f"protocol {e.protocol}"] if e.protocol else []
    only += [f"ports {_list(e.ports)}"] if e.ports else []
    return f"from {_list(e.from_)} to {_list(e.to)}" + (f", {', '.join(only)}" if only else "")


def _route(r: RouteRule) -> str:
    allows = "; ".join(f"{_list(a.methods)} {_list(a.paths)}" for a in r.allow)
    return f"to {_list(r.to)}: {allows}"


def verdict(answers: list[RuleAnswer]) -> str:
    """One line: which rules would alert, at what severity, and whether an exception covers it."""
    parts: list[str] = []
    for a in answers:
        if a.decision != "alert":
            continue
        if a.exception is not None:
            parts.append(f"{a.rule} would fire but exception {a.exception.name} covers it: no alert")
            continue
        sev = a.severity.value if a.severity else "?"
        how = f"{sev} if denied, {a.severity_when_served.value} if served" if a.severity_when_served else sev
        parts.append(f"{a.rule} would alert ({how}); covered by no exception")
    depends = sum(a.decision == "depends" for a in answers)
    line = "; ".join(parts) or "no rule alerts on it from the policy alone"
    if depends:
        line += f". {depends} {'rule depends' if depends == 1 else 'rules depend'} on how it is made and answered"
    return line


def explain(x: Explained, req: Request, now: float | None = None) -> Explanation:
    """What each rule would do with ``req`` under the loaded configuration and policy. Raises
    :class:`RequestError` on a request it cannot build."""
    if req.tls_version not in (None, "plaintext", *VERSIONS):
        raise RequestError(f"--tls-version {req.tls_version!r}: one of {', '.join(VERSIONS)} or plaintext")
    return _Explainer(x, req, time.time() if now is None else now).explain()
