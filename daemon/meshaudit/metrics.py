"""Every Prometheus metric meshaudit exports, in one registry.

Naming: prefix ``meshaudit_``, counters end ``_total``, base units (seconds, bytes), and
bounded label sets only (receiver, kind, reason, rule, severity, sink, store). Never a label
per request, path or service pair.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import version

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)

from meshaudit import __version__

# A counter's `_created` series doubles what a scrape carries and no dashboard reads it: off,
# unless MESHAUDIT_METRICS_CREATED=1 asks for it.
if os.environ.get("MESHAUDIT_METRICS_CREATED", "") != "1":
    disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

REGISTRY = CollectorRegistry(auto_describe=True)
BUILD = Info("meshaudit_build", "What this daemon is built of (the value is always 1).", registry=REGISTRY)
BUILD.info(
    {
        "version": __version__,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": version("protobuf"),
    }
)
# process_cpu_seconds_total, process_resident_memory_bytes, open fds, ... (with workers: N, summed
# over the processes, but for the start time and the fd limit, which are the coordinator's)
ProcessCollector(registry=REGISTRY)

# --- receivers ---------------------------------------------------------------------------
RECEIVED = Counter(
    "meshaudit_received_total",
    "Items received, by receiver (envoy_als, otlp_grpc, otlp_http) and kind (http, tcp, span, log).",
    ["receiver", "kind"],
    registry=REGISTRY,
)
REJECTED = Counter(
    "meshaudit_rejected_total",
    "Items or requests rejected as invalid, by receiver and reason.",
    ["receiver", "reason"],
    registry=REGISTRY,
)
DROPPED = Counter(
    "meshaudit_dropped_total",
    "Items received but not evaluated, by receiver and reason (queue_full, ...).",
    ["receiver", "reason"],
    registry=REGISTRY,
)
MESSAGES = Counter(
    "meshaudit_messages_total",
    "Transport messages received (ALS stream messages, OTLP export requests), by receiver.",
    ["receiver"],
    registry=REGISTRY,
)
STORE_FLOOD_TOP = Gauge(
    "meshaudit_store_flood_top_observer",
    "The observer whose own waiting hops a store evicted most (its fair share full) in the last second; "
    "one label set per store at a time, 0 once the flood stops.",
    ["store", "observer"],
    registry=REGISTRY,
)
POLICY_EXCEPTION_MATCHES = Counter(
    "meshaudit_policy_exception_matches_total",
    "Violations a policy exception covered (not alerted), by exception name (bounded by the policy).",
    ["exception"],
    registry=REGISTRY,
)
POLICY_EXCEPTION_REQUESTS = Counter(
    "meshaudit_policy_exception_requests_total",
    "Requests (or connections) a policy exception covered: each once, however many of its rules it broke.",
    ["exception"],
    registry=REGISTRY,
)
POLICY_EXCEPTIONS_EXPIRED = Counter(
    "meshaudit_policy_exceptions_expired_total",
    "Policy exceptions that reached their expires date and stopped applying, by exception name.",
    ["exception"],
    registry=REGISTRY,
)
STREAMS_OPENED = Counter("meshaudit_als_streams_opened_total", "Envoy access-log streams opened.", registry=REGISTRY)
STREAMS_ACTIVE = Gauge("meshaudit_als_streams_active", "Envoy access-log streams open now.", registry=REGISTRY)
INGEST_QUEUE_DEPTH = Gauge("meshaudit_ingest_queue_batches", "Hop batches waiting for the engine.", registry=REGISTRY)
INGEST_QUEUE_ENTRIES = Gauge(
    "meshaudit_ingest_queue_entries",
    "Entries (hops) waiting for the engine; bounded by receivers.ingest_queue_entries.",
    registry=REGISTRY,
)
INGEST_QUEUE_BYTES = Gauge(
    "meshaudit_ingest_queue_bytes",
    "Wire bytes of the messages whose entries wait for the engine; bounded by receivers.ingest_queue_bytes.",
    registry=REGISTRY,
)

# --- engine --------------------------------------------------------------------------------
ENGINE_ERRORS = Counter(
    "meshaudit_engine_errors_total",
    "Failures caught in the engine, tick, dispatch, peers or stats path, by stage: the batch or tick "
    "was skipped and the loop went on (a bug: the first of each kind is logged with its traceback).",
    ["stage"],
    registry=REGISTRY,
)
HOPS_EVALUATED = Counter("meshaudit_hops_evaluated_total", "Hops evaluated by the rule engine.", registry=REGISTRY)
VIOLATIONS = Counter(
    "meshaudit_violations_total",
    "Rule violations observed (before aggregation), by rule.",
    ["rule"],
    registry=REGISTRY,
)
ALERTS = Counter(
    "meshaudit_alerts_total",
    "Alerts emitted (after aggregation and suppression), by rule and severity.",
    ["rule", "severity"],
    registry=REGISTRY,
)
STORE_ITEMS = Gauge("meshaudit_store_items", "Items held in a bounded window store.", ["store"], registry=REGISTRY)
STORE_EVICTIONS = Counter(
    "meshaudit_store_evictions_total",
    "Items removed from a window store, by store and reason (expired, capacity).",
    ["store", "reason"],
    registry=REGISTRY,
)
LOOP_LAG = Histogram(
    "meshaudit_event_loop_lag_seconds",
    "How late the event loop ran a periodic timer: a saturated daemon shows here first.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
CONFIG_RELOADS = Counter(
    "meshaudit_config_reloads_total",
    "Configuration reloads on SIGHUP, by result (ok, invalid).",
    ["result"],
    registry=REGISTRY,
)

# --- sinks -----------------------------------------------------------------------------------
SINK_SENT = Counter(
    "meshaudit_sink_sent_total", "Alerts acknowledged by the sink's backend.", ["sink"], registry=REGISTRY
)
SINK_FAILED = Counter("meshaudit_sink_failed_total", "Delivery attempts that failed.", ["sink"], registry=REGISTRY)
SINK_RETRIED = Counter(
    "meshaudit_sink_retried_total", "Delivery attempts that were retries.", ["sink"], registry=REGISTRY
)
SINK_SPOOLED = Counter(
    "meshaudit_sink_spooled_total", "Alerts written to the sink's on-disk spool.", ["sink"], registry=REGISTRY
)
SINK_DROPPED = Counter(
    "meshaudit_sink_dropped_total",
    "Alerts a sink gave up on, by reason (queue_full, spool_full, spool_error, spool_corrupt, permanent_error, "
    "shutdown).",
    ["sink", "reason"],
    registry=REGISTRY,
)
SINK_QUEUE_DEPTH = Gauge(
    "meshaudit_sink_queue_alerts",
    "Alerts a sink holds in memory (its queue, or with a spool the copy of the spool's newest alerts).",
    ["sink"],
    registry=REGISTRY,
)
SINK_SPOOL_DEPTH = Gauge(
    "meshaudit_sink_spool_alerts", "Alerts waiting in a sink's on-disk spool.", ["sink"], registry=REGISTRY
)
SINK_SPOOL_BYTES = Gauge("meshaudit_sink_spool_bytes", "Size of a sink's on-disk spool.", ["sink"], registry=REGISTRY)
SINK_READY = Gauge(
    "meshaudit_sink_ready", "1 when the sink can deliver, 0 when it cannot.", ["sink"], registry=REGISTRY
)
SINK_LATENCY = Histogram(
    "meshaudit_sink_delivery_seconds",
    "From alert emitted to backend acknowledgement.",
    ["sink"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0),
    registry=REGISTRY,
)
SINK_IDEMPOTENCE_FALLBACKS = Counter(
    "meshaudit_sink_idempotence_fallbacks_total",
    "Times a Kafka broker refused the idempotent producer and the sink fell back to acks=all alone.",
    ["sink"],
    registry=REGISTRY,
)

# --- workers: N (the coordinator's own) ---------------------------------------------------------------
WORKER_RESTARTS = Counter(
    "meshaudit_worker_restarts_total",
    "Worker processes that exited unexpectedly and were started again (workers: N).",
    registry=REGISTRY,
)
WORKERS_READY = Gauge("meshaudit_workers_ready", "Worker processes listening now (workers: N).", registry=REGISTRY)
PEER_QUERIES = Counter(
    "meshaudit_peer_queries_total",
    "Decisions a worker deferred to the other workers (evidence they may hold), by result (answered, timeout).",
    ["result"],
    registry=REGISTRY,
)

# --- the receiver role (distributed mode): hops produced to the hops topic ------------------------
HOPS_PRODUCED = Counter(
    "meshaudit_hops_produced_total",
    "Hops produced to the hops topic and acknowledged by the broker (receiver role).",
    registry=REGISTRY,
)
HOP_RECORDS_PRODUCED = Counter(
    "meshaudit_hop_records_produced_total",
    "Records (one HopBatch for one partition each) acknowledged by the broker (receiver role).",
    registry=REGISTRY,
)
HOP_EVIDENCE_COPIES = Counter(
    "meshaudit_hop_evidence_copies_total",
    "Evidence copies produced besides hops (receiver role): an inbound entry that logged a trace, or a client "
    "span, copied to its trace id's partition when its request id's is another (README, Distributed mode).",
    registry=REGISTRY,
)
HOP_BYTES_PRODUCED = Counter(
    "meshaudit_hop_produced_bytes_total",
    "Bytes of the records acknowledged by the broker, before compression (receiver role).",
    registry=REGISTRY,
)
HOP_PRODUCE_LATENCY = Histogram(
    "meshaudit_hop_produce_seconds",
    "From a record handed to the producer to the broker's acknowledgement (receiver role).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
HOP_IN_FLIGHT_BYTES = Gauge(
    "meshaudit_hop_in_flight_bytes",
    "Bytes of records produced and not yet acknowledged, failed ones waiting to be sent again included "
    "(at most distributed.max_in_flight_bytes; receiver role).",
    registry=REGISTRY,
)
HOP_PRODUCE_ERRORS = Counter(
    "meshaudit_hop_produce_errors_total",
    "Produce attempts of a record that failed, by reason (timeout, broker, connection, too_large, other); "
    "the record is sent again, but for too_large (receiver role).",
    ["reason"],
    registry=REGISTRY,
)
HOPS_UNPRODUCED = Counter(
    "meshaudit_hops_unproduced_total",
    "Hops taken from the ingest queue and never produced, by reason (too_large: one hop over "
    "distributed.max_record_bytes; encode: not encodable; shutdown: still unacknowledged at the stop "
    "deadline) (receiver role).",
    ["reason"],
    registry=REGISTRY,
)
HOPS_TOPIC_UP = Gauge(
    "meshaudit_hops_topic_up",
    "1 while the receiver produces to the hops topic (connected, nothing failing), 0 while it cannot.",
    registry=REGISTRY,
)
SOURCE_CLAIMS_UNFORWARDED = Counter(
    "meshaudit_source_claims_unforwarded_total",
    "Senders' mismatched claims (log_source_mismatch) a receiver found and never produced to the hops "
    "topic, by reason (as hops_unproduced_total: too_large, encode, shutdown); no evaluator alerts on them "
    "(receiver role).",
    ["reason"],
    registry=REGISTRY,
)
HOP_PRODUCE_ERROR_REASONS = ("timeout", "broker", "connection", "too_large", "other")
HOPS_UNPRODUCED_REASONS = ("too_large", "encode", "shutdown")

# --- engine: the alert budget (issue 10) -----------------------------------------------------------
ALERTS_SUPPRESSED = Counter(
    "meshaudit_alerts_suppressed_total",
    "Alerts held back by the alert budget (engine.alert_budget_per_window), by rule; each budget window "
    "that held any back ends with one alert_budget_exceeded alert.",
    ["rule"],
    registry=REGISTRY,
)

# --- unexpected_edge in learn mode: the learned baseline's state file -------------------------------
BASELINE_WRITES = Counter(
    "meshaudit_baseline_writes_total",
    "Writes of the learned baseline to rules.unexpected_edge.state_file, by result (ok, error: disk full, "
    "I/O error, read-only; the daemon goes on and tries again).",
    ["result"],
    registry=REGISTRY,
)
BASELINE_LOADS = Counter(
    "meshaudit_baseline_loads_total",
    "Reads of the learned baseline's state file at start, by result (loaded; missing: learning; corrupt: "
    "refused, learning again).",
    ["result"],
    registry=REGISTRY,
)

# --- the evaluator role (distributed mode) ----------------------------------------------------------
EVALUATOR_PARTITIONS = Gauge(
    "meshaudit_evaluator_partitions",
    "Partitions of the hops topic this evaluator owns now (its share of the consumer group).",
    registry=REGISTRY,
)
BASELINE_TOPIC_RECORDS = Counter(
    "meshaudit_baseline_topic_records_total",
    "Learn mode in the distributed mode: records of the shared baseline topic read, produced, or skipped as "
    "invalid (evaluator role).",
    ["result"],
    registry=REGISTRY,
)
EVALUATOR_HOPS = Counter(
    "meshaudit_evaluator_hops_total",
    "Hops consumed by phase: replay (rebuilding state after gaining a partition, never judged), judge, or "
    "evidence (evidence copies: indexed, never judged).",
    ["phase"],
    registry=REGISTRY,
)
EVALUATOR_REBALANCES = Counter(
    "meshaudit_evaluator_rebalances_total",
    "Partition assignments this evaluator received from the consumer group.",
    registry=REGISTRY,
)
EVALUATOR_RELEASED = Counter(
    "meshaudit_evaluator_released_total",
    "Hops waiting for evidence that were dropped unjudged when their partition moved to another member "
    "(which judges them again from the committed offset).",
    registry=REGISTRY,
)
EVALUATOR_EDGES_PARTITIONS = Gauge(
    "meshaudit_evaluator_edges_partitions",
    "Partitions of the edges topic (stage 2: the (rule, source, destination) keys it judges) this evaluator owns now.",
    registry=REGISTRY,
)
WINDOW_DELTAS_LATE = Counter(
    "meshaudit_worker_window_deltas_late_total",
    "workers: N: a worker's per-edge window counts that reached the coordinator after their window "
    "had closed there (lateness: two ticks and 2 s), dropped.",
    registry=REGISTRY,
)
EVALUATOR_EDGES = Counter(
    "meshaudit_evaluator_edges_records_total",
    "Records of the edges topic (stage 2: per-edge window deltas and violations, keyed by rule|source|"
    "destination) by what became of them: produced, judge (absorbed), replay (absorbed rebuilding a gained "
    "partition, raising nothing), late (a delta whose window had closed), undecodable, unproduced (dropped "
    "at the bound on records waiting for the broker).",
    ["what"],
    registry=REGISTRY,
)
EVALUATOR_UNDECODABLE = Counter(
    "meshaudit_evaluator_undecodable_total",
    "Records of the hops topic that are not a valid hop batch (skipped and committed past).",
    registry=REGISTRY,
)

# --- series that exist from the start ---------------------------------------------------------
# A labelled counter's series appears with its first event, already at 1 (or 150): Prometheus's
# increase() and rate() see no increase in it, so an alert rule on the first burst of rejects, or
# on the first critical alert, would never fire. The series the daemon knows up front are created
# at 0 when it starts.
RECEIVERS = ("envoy_als", "otlp_grpc", "otlp_http")
REJECT_REASONS = (
    "undecodable", "too_large", "too_many_entries", "no_identifier", "clamped_time", "busy", "invalid_id",
    "unsupported_peer_metadata", "internal_error", "timeout", "too_many_connections", "method_not_allowed",
    "not_found", "unsupported_encoding", "unsupported_media_type", "bad_request",
    # TLS and sender authentication (receivers.tls, enforce_sources): README, Security
    "no_client_certificate", "untrusted_certificate", "expired_certificate", "tls_handshake_failed",
    "unauthenticated", "tls_version", "source_mismatch",
)  # fmt: skip
SEVERITY_NAMES = ("info", "warning", "high", "critical")
SINK_DROP_REASONS = ("queue_full", "spool_full", "spool_error", "spool_corrupt", "permanent_error", "shutdown")


def init_series(rules: list[str]) -> None:
    """Create at 0 the series of every receiver's rejects and drops, and of every rule's
    violations, alerts (by severity) and alerts held back by the budget; ``rules``: the rule
    names alerts may carry."""
    for receiver in RECEIVERS:
        DROPPED.labels(receiver, "queue_full")
        for reason in REJECT_REASONS:
            REJECTED.labels(receiver, reason)
    for rule in rules:
        VIOLATIONS.labels(rule)
        ALERTS_SUPPRESSED.labels(rule)
        for severity in SEVERITY_NAMES:
            ALERTS.labels(rule, severity)


def init_sink_series(sink: str) -> None:
    """Create at 0 the series of a sink's dropped alerts, one per reason."""
    for reason in SINK_DROP_REASONS:
        SINK_DROPPED.labels(sink, reason)
