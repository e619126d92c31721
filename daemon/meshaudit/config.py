"""Typed, strict configuration: one frozen model per section, defaults in one place (here),
unknown keys are errors naming the key, the file and the line.

Loading a file (``meshaudit.loading.load``) returns a :class:`Config` or raises
:class:`ConfigError` whose message is ready to print. The policy (what traffic is allowed) may live
inline under ``policy:`` or in its own files (``policy_file:``, ``policy_files:``, relative to the
config file) so a security team can own and review it (``meshaudit.policyfile``).
"""

from __future__ import annotations

import datetime
import ipaddress
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_validator,
)

from meshaudit.engine.rules import REGISTRY, RULE_NAMES
from meshaudit.sinks.jsonl import JsonlConfig
from meshaudit.sinks.kafka import KafkaConfig
from meshaudit.sinks.mqtt import MqttConfig
from meshaudit.sinks.secrets import TlsConfig as KafkaTlsConfig


class ConfigError(Exception):
    """A configuration that cannot be used; the message names file, line and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


class ListenConfig(_Strict):
    grpc: str = Field("127.0.0.1:4317", description="Envoy ALS + OTLP/gRPC traces and logs.")
    http: str = Field("127.0.0.1:4318", description="OTLP/HTTP: /v1/traces and /v1/logs.")
    metrics: str = Field("127.0.0.1:9464", description="/metrics, /healthz, /readyz.")

    _check = field_validator("grpc", "http", "metrics")(_host_port)


def _readable(path: str) -> str:
    """A file the daemon must read at start: checked at load, so a typo is a configuration error
    naming the key, not a failure later."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in head and not head.lstrip().startswith(b"-----BEGIN"):
        raise ValueError(f"{path!r} is not a PEM file (no -----BEGIN line at its start)")
    return path


class ReceiversTlsConfig(_Strict):
    """TLS (and, with a client CA, mutual TLS) on the gRPC port (ALS, OTLP) and on OTLP/HTTP.
    The files are read again when they change on disk (new connections get the new ones), so a
    rotation by cert-manager or Istio needs no restart."""

    cert_file: Annotated[str, AfterValidator(_readable)] = Field(description="The server's certificate chain (PEM).")
    key_file: Annotated[str, AfterValidator(_readable)] = Field(description="Its private key (PEM).")
    client_ca_file: Annotated[str, AfterValidator(_readable)] | None = Field(
        None, description="CA certificates (PEM) client certificates must chain to; needed unless client_auth is none."
    )
    client_auth: Literal["none", "request", "require"] = Field(
        "require",
        description="none: no client certificate (TLS only, no sender identity); require: the TLS handshake "
        "refuses a client without a valid certificate; request: a certificate is asked for and verified "
        "when given, and the application refuses a client without one (UNAUTHENTICATED / 401, counted). "
        "grpcio cannot make a certificate optional: on the gRPC port request acts as require.",
    )
    min_version: Literal["TLSv1.2", "TLSv1.3"] = Field("TLSv1.2", description="The oldest TLS version accepted.")

    @model_validator(mode="after")
    def _ca_for_client_auth(self) -> ReceiversTlsConfig:
        if self.client_auth != "none" and self.client_ca_file is None:
            raise ValueError(f"client_auth {self.client_auth} needs client_ca_file (or set client_auth: none)")
        if self.client_auth == "none" and self.client_ca_file is not None:
            raise ValueError("client_ca_file is read only with client_auth request or require")
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"cert_file and key_file do not load as a pair: {exc}") from None
        return self


class ReceiversConfig(_Strict):
    tls: ReceiversTlsConfig | None = Field(
        None, description="Absent: plaintext (a warning is logged when listening beyond loopback)."
    )
    trust_forwarded_client_cert: bool = Field(
        False,
        description="Behind the daemon's own Istio sidecar: take a sender's identity from the "
        "x-forwarded-client-cert header (URI= of the element the nearest proxy appended), only on "
        "connections from loopback.",
    )
    enforce_sources: bool = Field(
        False,
        description="Reject (count, do not evaluate) telemetry whose authenticated sender may not speak for "
        "what it claims (log_source_mismatch), and telemetry without an identity.",
    )
    ingest_queue_entries: int = Field(
        100_000,
        ge=1,
        description="Entries (access-log entries, spans, log records) waiting for the engine, at most; "
        "past it ALS entries are dropped and counted, OTLP callers are told to retry.",
    )
    ingest_queue_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="Wire bytes of the messages whose entries wait for the engine, at most (same as above).",
    )
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_entries_per_message: int = Field(
        100_000,
        ge=1,
        description="Entries (ALS entries, OTLP spans or log records) one message may carry; a message with "
        "more is rejected whole and counted (reason too_many_entries) before any entry is decoded.",
    )
    grpc_max_connection_age_secs: float = Field(
        300, gt=0, description="Envoy's ALS streams never end; closing them lets clients rebalance."
    )
    grpc_max_connection_age_grace_secs: float = Field(30, ge=0)
    # Bounds on what a client can hold or send (README "Limits").
    http_header_timeout_ms: int = Field(
        10_000,
        ge=100,
        description="OTLP/HTTP: a connection must send a complete request head this soon after it opens or "
        "after its previous response; otherwise it is closed (counted reason=timeout unless it was idle).",
    )
    http_body_timeout_ms: int = Field(
        30_000, ge=100, description="OTLP/HTTP: a request body must arrive whole this soon (else 408, counted)."
    )
    http_max_connections: int = Field(
        1000, ge=1, description="OTLP/HTTP connections open at once; more are closed at once and counted."
    )
    grpc_max_concurrent_streams: int = Field(100, ge=1, description="gRPC streams one connection may open at once.")
    grpc_keepalive_time_secs: float = Field(
        60, gt=0, description="The server pings a quiet gRPC connection this often."
    )
    grpc_keepalive_timeout_secs: float = Field(20, gt=0, description="An unanswered ping closes the connection.")
    grpc_min_ping_interval_secs: float = Field(
        10, ge=0, description="A client pinging more often than this (without data) gets a strike."
    )
    grpc_max_ping_strikes: int = Field(2, ge=0, description="Strikes before the connection is closed (GOAWAY).")
    max_clock_skew_secs: float = Field(
        86_400,
        gt=0,
        description="An OTLP span or log time further than this from the receive time is replaced by the "
        "receive time and counted (reason=clamped_time).",
    )

    @model_validator(mode="after")
    def _one_message_fits(self) -> ReceiversConfig:
        if self.ingest_queue_entries < self.max_entries_per_message:
            raise ValueError("ingest_queue_entries must be at least max_entries_per_message")
        if self.ingest_queue_bytes < self.max_message_bytes:
            raise ValueError("ingest_queue_bytes must be at least max_message_bytes")
        if self.enforce_sources and not self.authenticates:
            raise ValueError(
                "enforce_sources needs authenticated senders: tls with client_auth request or require, "
                "or trust_forwarded_client_cert"
            )
        return self

    @property
    def authenticates(self) -> bool:
        """Whether senders carry an identity (mutual TLS, or a trusted sidecar's XFCC)."""
        return (self.tls is not None and self.tls.client_auth != "none") or self.trust_forwarded_client_cert


class WorkloadRef(_Strict):
    service: str
    namespace: str | None = None
    workload: str | None = None


class MeshConfig(_Strict):
    trust_domain: str = "cluster.local"
    service_account_is_service: bool = Field(
        True, description="Name a SPIFFE peer's service after its service account (Istio's usual layout)."
    )
    addresses: dict[str, WorkloadRef] = Field(
        default_factory=dict, description="Address (ip or ip:port) -> workload, the last resort for naming."
    )
    clusters: dict[str, WorkloadRef] = Field(
        default_factory=dict, description="Envoy node cluster -> workload, for plain Envoy without Istio."
    )
    log_name_direction: dict[str, Literal["inbound", "outbound"]] = Field(
        default_factory=dict, description="ALS log_name -> direction, for Envoy without Istio cluster names."
    )


class EngineConfig(_Strict):
    suppress_secs: int = Field(
        300,
        ge=1,
        description="Aggregation window: the first violation of a (rule, source, destination) alerts at "
        "once; later ones in this window are counted, and one summary alert closes the window.",
    )
    examples: int = Field(3, ge=0, le=20)
    tick_ms: int = Field(200, ge=10)
    store_max_items: int = Field(200_000, ge=100, description="Upper bound of every window store.")
    alert_budget_per_window: int = Field(
        1000,
        ge=1,
        description="At most this many alerts per suppress_secs across all keys; the excess is counted "
        "(meshaudit_alerts_suppressed_total) and reported in one alert_budget_exceeded alert per window.",
    )


def _rules_config() -> type[BaseModel]:
    """``rules:``, one section per registered rule, each the rule's own config model."""
    fields: dict[str, Any] = {r.name: (r.Config, r.Config()) for r in REGISTRY}
    model: type[BaseModel] = create_model("RulesConfig", __base__=_Strict, **fields)
    return model


if TYPE_CHECKING:
    RulesConfig = Any  # built from the registry below; each section is that rule's own model
else:
    RulesConfig = _rules_config()


def _known_rules(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in RULE_NAMES]
    if unknown:
        raise ValueError(f"unknown rule {unknown[0]!r}; rules are: {', '.join(sorted(RULE_NAMES))}")
    return names


class EdgeRule(_Strict):
    from_: list[str] = Field(alias="from", min_length=1, description="Source patterns.")
    to: list[str] = Field(min_length=1, description="Destination patterns.")
    protocol: Literal["http", "tcp"] | None = Field(None, description="Only requests (http) or connections (tcp).")
    ports: list[Annotated[int, Field(ge=1, le=65535)]] | None = Field(
        None, description="Only to these destination ports (the port of the Envoy cluster: inbound|9000||)."
    )


class RouteAllow(_Strict):
    methods: list[str] = Field(default_factory=lambda: ["*"])
    paths: list[str] = Field(min_length=1)

    @field_validator("methods")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [m.upper() for m in v]


class RouteRule(_Strict):
    to: list[str] = Field(min_length=1)
    allow: list[RouteAllow] = Field(min_length=1)


class Exemption(_Strict):
    """The form before ``exceptions`` (inline ``policy.exemptions`` only): rule, source,
    destination and path. Each one runs as an exception named ``exemptions[<n>]``."""

    rules: list[str] = Field(min_length=1)
    from_: list[str] = Field(default_factory=lambda: ["*"], alias="from")
    to: list[str] = Field(default_factory=lambda: ["*"])
    paths: list[str] = Field(default_factory=lambda: ["*"])
    reason: str = ""

    _rules = field_validator("rules")(_known_rules)


def _as_list(v: Any) -> Any:
    """A matcher may be one value or a list of them."""
    return [v] if isinstance(v, str | int) else v


def _cidr(v: str) -> str:
    try:
        ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise ValueError(f"not an IP network: {v!r} (e.g. 10.0.0.0/8, fd00::/8, 10.1.2.3)") from None
    return v


def _status_pattern(v: int | str) -> int | str:
    if isinstance(v, int):
        if not 100 <= v <= 599:
            raise ValueError(f"not an HTTP status: {v}")
        return v
    if len(v) == 3 and v[0] in "12345" and v[1:].lower() == "xx":
        return v.lower()
    raise ValueError(f"not a status or a class of them: {v!r} (e.g. 404, 5xx)")


def _http_methods(v: list[str]) -> list[str]:
    return [m.upper() for m in v]


Str1 = Annotated[str, Field(min_length=1)]
Patterns = Annotated[list[Str1], BeforeValidator(_as_list)]


class PolicyException(_Strict):
    """Traffic a rule does not alert on, with a reason a reviewer can judge. Every matcher that
    is set must match (an unset one matches anything); within one matcher, any value may."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$", description="Unique; the metric label.")
    rules: list[str] = Field(min_length=1, description="The rules it covers.")
    reason: str = Field(min_length=1)
    expires: datetime.date | None = Field(None, description="From this day (UTC) on it no longer applies.")
    from_: Patterns | None = Field(None, alias="from", description="Source patterns (as in edges).")
    to: Patterns | None = Field(None, description="Destination patterns.")
    methods: Annotated[Patterns | None, AfterValidator(lambda v: _http_methods(v) if v else v)] = None
    paths: Patterns | None = Field(None, description="Path globs (`*` crosses `/`; the query is ignored).")
    not_paths: Patterns | None = Field(None, description="... except these paths.")
    user_agent: Patterns | None = Field(None, description="User-Agent globs, e.g. kube-probe/*.")
    source_cidr: Annotated[list[Annotated[str, AfterValidator(_cidr)]], BeforeValidator(_as_list)] | None = None
    response_codes: (
        Annotated[list[Annotated[int | str, AfterValidator(_status_pattern)]], BeforeValidator(_as_list)] | None
    ) = None
    protocol: Annotated[list[Literal["http", "tcp"]], BeforeValidator(_as_list)] | None = None

    _rules = field_validator("rules")(_known_rules)


# Options a destination's override may set: the severity of every rule, and what each rule reads
# when it judges one destination's traffic (per-edge windows: their thresholds, not their length).
PER_DESTINATION: dict[str, frozenset[str]] = {
    name: frozenset({"severity", "severity_when_served", "min_ratio", "min_requests", "min_retries"})
    & set(cls.Config.model_fields)
    for name, cls in ((r.name, r) for r in REGISTRY)
}


class RuleOverride(BaseModel):
    """A rule's options set by the policy (a security team's file), for all traffic or for a
    destination (``to``): ``{rule: error_burst, to: [payments.*], min_ratio: 0.2}``. Over the
    configuration's ``rules.<name>``; later overrides over earlier ones."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    rule: str
    to: Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_as_list)] | None = None

    _rule = field_validator("rule")(lambda v: _known_rules([v])[0])

    @model_validator(mode="after")
    def _options_of_the_rule(self) -> RuleOverride:
        options = dict(self.__pydantic_extra__ or {})
        cls = next(r for r in REGISTRY if r.name == self.rule)
        known = set(cls.Config.model_fields) - {"enabled"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"{self.rule} has no option {unknown[0]!r} (options: {', '.join(sorted(known))})")
        if not options:
            raise ValueError("an override sets at least one option of its rule")
        if self.to is not None:
            fixed = sorted(set(options) - PER_DESTINATION[self.rule])
            if fixed:
                allowed = ", ".join(sorted(PER_DESTINATION[self.rule]))
                raise ValueError(f"{fixed[0]!r} is set for all traffic only (for a destination: {allowed})")
        cls.Config.model_validate(options)  # the values, as the rule's own section checks them
        return self

    def options(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})


class TlsPolicy(_Strict):
    """What TLS the mesh must use (weak_tls): over ``rules.weak_tls``."""

    min_version: Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"] | None = None
    allowed_ciphers: list[str | int] | None = None

    @model_validator(mode="after")
    def _as_weak_tls_reads_them(self) -> TlsPolicy:
        cls = next(r for r in REGISTRY if r.name == "weak_tls")
        cls.Config.model_validate({k: v for k, v in self.model_dump().items() if v is not None})
        return self


def _spiffe_glob(v: str) -> str:
    if not v.startswith("spiffe://"):
        raise ValueError(f"not a SPIFFE id pattern: {v!r} (e.g. spiffe://cluster.local/ns/observability/sa/*)")
    return v


class SourceRule(_Strict):
    """log_source_mismatch: identities that may send telemetry for workloads other than their own
    (a collector or gateway that forwards), and for which namespaces."""

    identities: Annotated[list[Annotated[str, AfterValidator(_spiffe_glob)]], BeforeValidator(_as_list)] = Field(
        min_length=1, description="SPIFFE id globs of the senders."
    )
    namespaces: Patterns = Field(min_length=1, description="Namespace globs they may send for (any service).")
    reason: str = ""


class Policy(_Strict):
    """What traffic is allowed. Patterns are shell globs matched against a party's
    ``service.namespace``, service, SPIFFE principal, workload or address."""

    lists: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Named lists of patterns (services, SPIFFE ids, CIDRs, paths, user agents), used as @name "
        "wherever a pattern goes; expanded when the policy is loaded.",
    )
    mesh_services: list[str] = Field(
        default_factory=list,
        description="Services that must have sidecars (missing_access_log); services whose sidecar "
        "has been seen are added automatically.",
    )
    edges: list[EdgeRule] | None = Field(None, description="None: no edge policy (unexpected_edge idle).")
    routes: list[RouteRule] = Field(default_factory=list)
    exceptions: list[PolicyException] = Field(default_factory=list)
    overrides: list[RuleOverride] = Field(default_factory=list)
    tls: TlsPolicy | None = None
    exemptions: list[Exemption] = Field(default_factory=list, description="The form before exceptions (inline).")
    sources: list[SourceRule] = Field(
        default_factory=list,
        description="log_source_mismatch: senders that may speak for other workloads (beyond their own "
        "namespace and service account), and for which namespaces.",
    )
    identities: dict[str, list[str]] = Field(
        default_factory=dict,
        description="identity_mismatch: service pattern (as in edges: svc.ns, svc) -> SPIFFE ids (globs) that "
        "service may present besides its own service account (a canary's, a gateway's own account).",
    )

    @field_validator("identities")
    @classmethod
    def _spiffe_patterns(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for service, ids in v.items():
            if not ids:
                raise ValueError(f"{service!r}: give at least one SPIFFE id pattern")
        return v


class SinksConfig(_Strict):
    jsonl: JsonlConfig = JsonlConfig()
    kafka: KafkaConfig | None = Field(None, description="Absent: no Kafka sink.")
    mqtt: MqttConfig | None = Field(None, description="Absent: no MQTT sink.")


class GraphConfig(_Strict):
    """The live service graph (``/graph``, ``/graph.json``) and what ``meshaudit report`` reads."""

    enabled: bool = Field(True, description="Count traffic per edge for /graph and reports.")
    max_edges: int = Field(
        1000, ge=1, description="Edges kept; past it the edge seen longest ago goes (counted in /graph.json)."
    )
    history_bucket_secs: int = Field(
        300, ge=1, description="Reports see each edge's counts in buckets of this length ..."
    )
    history_hours: float = Field(
        24, gt=0, le=24 * 31, description="... for this long (about 20 KB an edge at the defaults)."
    )
    top_edges: int = Field(100, ge=1, description="/graph draws the busiest this many edges; the rest are counted.")


class DistributedConfig(_Strict):
    """The distributed mode (``meshaudit run --role receiver|evaluator``): receivers produce the hops
    they decode to a Kafka topic, partitioned by correlation key; evaluators consume it (README,
    "Distributed mode"). Restart-only. One process needs none of it."""

    # --- shared by both roles, then the receiver's producer -------------------------------------
    bootstrap_servers: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:9092"], min_length=1, description="HOST:PORT of brokers."
    )
    hops_topic: str = Field("meshaudit.hops", min_length=1, description="The topic of hop batches.")
    baseline_topic: str = Field(
        "meshaudit.baseline",
        min_length=1,
        description="Learn mode: the compacted topic (one partition) through which the evaluators share the "
        "learned baseline; created compacted with create_topic.",
    )
    client_id: str = Field("meshaudit", min_length=1, description="Shown in broker logs and quotas.")
    tls: KafkaTlsConfig | None = Field(None, description="TLS to the brokers; absent: plaintext.")
    create_topic: bool = Field(
        False, description="Create the hops topic (receivers) and the edges topic (evaluators) when missing."
    )
    partitions: int = Field(12, ge=1, description="Partitions of a topic created by create_topic.")
    replication_factor: int = Field(1, ge=1, description="Replicas of a topic created by create_topic.")
    retention_ms: int | None = Field(
        None,
        ge=60_000,
        description="retention.ms of a topic created by create_topic: how long hops stay for evaluators that "
        "were down to judge (at least the correlation TTL, which a partition's new owner replays); absent: "
        "the broker's default.",
    )
    max_hops_per_record: int = Field(
        500, ge=1, le=65_536, description="Hops in one record (one HopBatch, one partition), at most."
    )
    max_record_bytes: int = Field(
        1024 * 1024,
        ge=64 * 1024,
        description="Bytes of one record, at most (the broker's message.max.bytes must allow it); a larger "
        "batch is split, a single hop larger than this is dropped and counted.",
    )
    linger_ms: int = Field(5, ge=0, description="Wait this long to batch records into one produce request.")
    max_in_flight_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024 * 1024,
        description="Bytes of records produced and not yet acknowledged, at most; at the bound the receiver "
        "stops taking from its ingest queue (ALS entries are then dropped and counted, OTLP told to retry).",
    )
    compression: Literal["none", "gzip"] = Field("none", description="Record batch compression.")
    request_timeout_ms: int = Field(
        10_000, ge=1000, description="A produce request unanswered this long fails and its records are sent again."
    )

    # --- the evaluator role ---
    edges_topic: str = Field(
        "meshaudit.edges",
        min_length=1,
        description="Stage 2's topic: each evaluator's per-edge window deltas and violations, keyed by "
        "rule|source|destination, consumed by the same group (each key judged by one evaluator).",
    )
    edges_partitions: int = Field(12, ge=1, description="Partitions of an edges topic created by create_topic.")
    edges_retention_ms: int | None = Field(
        None,
        ge=60_000,
        description="retention.ms of an edges topic created by create_topic: at least the longest per-edge "
        "window plus suppress_secs (replayed when a partition moves); absent: the broker's default.",
    )
    group_id: str = Field(
        "meshaudit-evaluators",
        min_length=1,
        description="The evaluators' consumer group: its members share the partitions.",
    )
    session_timeout_ms: int = Field(
        10_000,
        ge=1000,
        le=300_000,
        description="A member silent this long leaves the group and its partitions move (the failover time); "
        "heartbeats are sent every third of it.",
    )
    commit_interval_ms: int = Field(1000, ge=100, description="Offsets are committed this often.")
    fetch_max_records: int = Field(
        100, ge=1, le=100_000, description="Records (hop batches) taken per fetch: the bound on one engine pass."
    )
    fetch_max_bytes: int = Field(
        16 * 1024 * 1024, ge=1024 * 1024, description="Bytes one fetch may bring, over all partitions."
    )

    @model_validator(mode="after")
    def _records_fit(self) -> DistributedConfig:
        if self.max_in_flight_bytes < self.max_record_bytes:
            raise ValueError("max_in_flight_bytes must be at least max_record_bytes")
        return self


class Config(_Strict):
    listen: ListenConfig = ListenConfig()
    receivers: ReceiversConfig = ReceiversConfig()
    mesh: MeshConfig = MeshConfig()
    engine: EngineConfig = EngineConfig()
    rules: RulesConfig = RulesConfig()
    policy: Policy = Policy()
    policy_file: str | None = Field(None, description="One policy file (relative to this file).")
    policy_files: list[str] = Field(
        default_factory=list,
        description="Policy files, merged in order; a directory stands for its *.yaml/*.yml files by name.",
    )
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    graph: GraphConfig = GraphConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    reload_watch_ms: int = Field(
        1000,
        ge=0,
        description="Poll the config and policy files this often and reload when they changed (0: SIGHUP only).",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Receiver and rule processes sharing the listen ports (SO_REUSEPORT). Above 1, a "
        "coordinator process owns the sinks, the alert windows and /metrics; the workers ask each "
        "other before alerting on evidence another worker may hold (README, Scaling).",
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="The distributed mode's Kafka (meshaudit run --role)."
    )

    @model_validator(mode="after")
    def _one_policy(self) -> Config:
        given = [k for k, set_ in (("policy", self.policy != Policy()), ("policy_file", bool(self.policy_file)),
                                   ("policy_files", bool(self.policy_files))) if set_]  # fmt: skip
        if len(given) > 1:
            raise ValueError(f"set one of policy, policy_file and policy_files, not {' and '.join(given)}")
        return self


Config.model_rebuild()


# Keys a reload cannot apply to a running daemon: the ports, the receivers' bounds and naming, the
# sinks, the processes, and the stores' bounds. A changed one is logged by name and waits for a
# restart; everything else (rules, policy, engine timing, log level, the watch) applies at once.
RESTART_ONLY: tuple[str, ...] = (
    "listen",
    "receivers",
    "mesh",
    "sinks",
    "workers",
    "distributed",
    "engine.store_max_items",
    "graph",
    # what learn mode starts from: the baseline file it loads at start, and what it learns
    "rules.unexpected_edge.mode",
    "rules.unexpected_edge.state_file",
    "rules.unexpected_edge.learn_routes",
)


def changed_keys(old: BaseModel, new: BaseModel, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ (down to the sections' own keys)."""
    out: list[str] = []
    for name in type(new).model_fields:
        a, b = getattr(old, name), getattr(new, name)
        if a == b:
            continue
        key = prefix + name
        if isinstance(a, BaseModel) and isinstance(b, BaseModel) and type(a) is type(b) and name != "policy":
            out.extend(changed_keys(a, b, key + "."))
        else:
            out.append(key)
    return out


def for_reload(running: Config, new: Config) -> tuple[Config, list[str]]:
    """The configuration a reload applies: ``new``, with the running values of the restart-only
    keys; and the restart-only keys that changed (to log by name)."""
    waiting = [k for k in changed_keys(running, new) if any(k == p or k.startswith(p + ".") for p in RESTART_ONLY)]
    applied = new
    for key in RESTART_ONLY:
        applied = _keep(applied, running, key.split("."))
    return applied, waiting


def _keep(new: Any, running: Any, path: list[str]) -> Any:
    """``new`` with the running value at ``path`` (its models copied on the way down)."""
    head, rest = path[0], path[1:]
    value = getattr(running, head)
    if rest:
        value = _keep(getattr(new, head), value, rest)
    return new.model_copy(update={head: value})
