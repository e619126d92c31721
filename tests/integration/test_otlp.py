"""Spans from the real OpenTelemetry SDK exporters (gRPC and HTTP) and OTLP logs: the
missing_access_log rule, and the OTLP/HTTP status codes."""

from __future__ import annotations

import gzip
import time
import urllib.error
import urllib.request
from typing import Any

import orjson
from infra import als
from infra.daemon import Daemon
from infra.otlp import client_span, server_span
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2


def _rules(alerts: list[dict[str, Any]]) -> list[str]:
    return [a["rule"] for a in alerts]


async def test_span_without_access_log_alerts_after_grace(daemon: Daemon) -> None:
    # reviews' sidecar is known (it logs), but this request bypassed it: only the app traced it.
    await als.stream(
        daemon.grpc, [als.http_message([als.inbound_http("frontend", path="/reviews/1")], als.identifier("reviews"))]
    )
    t0 = time.monotonic()
    trace_id, _ = server_span(GrpcSpanExporter(endpoint=daemon.grpc, insecure=True), "reviews", "/reviews/9")
    got = daemon.wait_alerts(lambda a: "missing_access_log" in _rules(a), timeout=5)
    elapsed = time.monotonic() - t0
    assert _rules(got) == ["missing_access_log"], got
    a = got[0]
    assert a["destination"]["service"] == "reviews"
    assert a["evidence"]["examples"][0]["trace_id"] == trace_id
    assert elapsed < 1.0 + 1.0 + 0.5  # grace (1 s) + 1 s, with margin for the exporter
    assert daemon.metric("meshaudit_received_total", receiver="otlp_grpc", kind="span") == 1


async def test_span_matched_by_traceparent_in_access_log_raises_nothing(daemon: Daemon) -> None:
    _trace_id, tp = server_span(HttpSpanExporter(endpoint=f"http://{daemon.http}/v1/traces"), "reviews", "/reviews/3")
    entry = als.inbound_http("frontend", path="/reviews/3", traceparent=tp)
    await als.stream(daemon.grpc, [als.http_message([entry], als.identifier("reviews"))])
    assert daemon.wait_alerts(lambda a: False, timeout=2.0) == []
    assert daemon.metric("meshaudit_received_total", receiver="otlp_http", kind="span") == 1


async def test_span_for_service_without_sidecar_is_not_a_violation(daemon: Daemon) -> None:
    server_span(GrpcSpanExporter(endpoint=daemon.grpc, insecure=True), "batch-job", "/run")
    assert daemon.wait_alerts(lambda a: False, timeout=2.0) == []


def _post(daemon: Daemon, path: str, body: bytes, ctype: str, **headers: str) -> tuple[int, bytes]:
    req = urllib.request.Request(
        f"http://{daemon.http}{path}", data=body, method="POST", headers={"Content-Type": ctype, **headers}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_otlp_json_logs_from_envoy_otel_access_logger(daemon: Daemon) -> None:
    """An Envoy OpenTelemetry access-log record (OTLP/JSON, hex ids) of a plaintext inbound hop."""
    body = {
        "resourceLogs": [
            {
                "resource": {
                    "attributes": [
                        {"key": "node_name", "value": {"stringValue": als.node_id("ratings")}},
                        {"key": "cluster_name", "value": {"stringValue": "ratings.default"}},
                    ]
                },
                "scopeLogs": [
                    {
                        "logRecords": [
                            {
                                "timeUnixNano": str(time.time_ns()),
                                "traceId": "5b8efff798038103d269b633813fc60c",
                                "spanId": "eee19b7ec3c1b174",
                                "body": {"stringValue": "GET /ratings/1 200"},
                                "attributes": [
                                    {"key": "upstream_cluster", "value": {"stringValue": "inbound|9080||"}},
                                    {"key": "downstream_tls_version", "value": {"stringValue": "-"}},
                                    {"key": "downstream_remote_address", "value": {"stringValue": "10.3.3.3:999"}},
                                    {"key": "http.request.method", "value": {"stringValue": "GET"}},
                                    {"key": "url.path", "value": {"stringValue": "/ratings/1"}},
                                    {"key": "response_code", "value": {"intValue": "200"}},
                                    {"key": "some.future.attribute", "value": {"stringValue": "ignored"}},
                                ],
                            }
                        ]
                    }
                ],
            }
        ],
        "someUnknownTopLevelField": True,
    }
    status, resp = _post(daemon, "/v1/logs", orjson.dumps(body), "application/json")
    assert status == 200, resp
    got = daemon.wait_alerts(bool, timeout=5)
    assert _rules(got) == ["plaintext_hop"]
    assert got[0]["destination"]["service"] == "ratings"
    assert got[0]["evidence"]["examples"][0]["trace_id"] == "5b8efff798038103d269b633813fc60c"
    assert daemon.metric("meshaudit_received_total", receiver="otlp_http", kind="log") == 1


def test_otlp_http_protobuf_gzip_logs_accepted(daemon: Daemon) -> None:
    req = logs_service_pb2.ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.scope_logs.add().log_records.add().body.string_value = "hello"
    status, _ = _post(
        daemon,
        "/v1/logs",
        gzip.compress(req.SerializeToString()),
        "application/x-protobuf",
        **{"Content-Encoding": "gzip"},
    )
    assert status == 200


def test_otlp_http_bad_input_gets_clear_errors_and_is_counted(daemon: Daemon) -> None:
    status, body = _post(daemon, "/v1/traces", b"\xff\xfe garbage", "application/x-protobuf")
    assert status == 400 and b"cannot decode" in body
    status, body = _post(
        daemon,
        "/v1/traces",
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "not-hex"}]}]}]}',
        "application/json",
    )
    assert status == 400 and b"not a hex id" in body
    status, body = _post(daemon, "/v1/traces", b"{not json", "application/json")
    assert status == 400 and b"invalid JSON" in body
    status, body = _post(daemon, "/v1/traces", b"a=b", "application/x-www-form-urlencoded")
    assert status == 415
    status, body = _post(daemon, "/v1/traces", b"\0" * (5 * 1024 * 1024), "application/x-protobuf")
    assert status == 413
    assert daemon.metric("meshaudit_rejected_total", receiver="otlp_http", reason="undecodable") == 3
    assert daemon.metric("meshaudit_rejected_total", receiver="otlp_http", reason="unsupported_media_type") == 1
    assert daemon.metric("meshaudit_rejected_total", receiver="otlp_http", reason="too_large") == 1
    # Still serving.
    status, _ = _post(daemon, "/v1/traces", b"{}", "application/json")
    assert status == 200


async def test_a_client_span_names_a_workload_presenting_another_certificate(daemon: Daemon) -> None:
    """batch-job (no sidecar) called reviews with payments' certificate. The destination sidecar's
    entry shows the certificate; batch-job's own span (real SDK, over OTLP/HTTP), carrying the
    request id, names the sender: identity_mismatch, naming batch-job."""
    rid = "8a1b2c3d-0000-4000-8000-00000000beef"
    stolen = als.inbound_http("payments", path="/reviews/1", request_id=rid)
    await als.stream(daemon.grpc, [als.http_message([stolen], als.identifier("reviews"))])
    client_span(HttpSpanExporter(endpoint=f"http://{daemon.http}/v1/traces"), "batch-job", "reviews:9080", rid)
    got = daemon.wait_alerts(lambda a: "identity_mismatch" in _rules(a), timeout=5)
    [a] = [x for x in got if x["rule"] == "identity_mismatch"]
    assert a["source"]["service"] == "batch-job" and a["destination"]["service"] == "reviews"
    assert "sa/payments" in a["evidence"]["detail"] and "client span" in a["evidence"]["detail"]
