"""What the OTLP decoders refuse or correct before the engine sees it (issue 10, defect 7):
ids of the wrong size (protobuf and JSON, camelCase and snake_case), too many entries, JSON
nested too deeply, and times that cannot be right. New names are imported inside the tests, so
each test fails on its own against code that lacks them."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from meshaudit.config import MeshConfig
from meshaudit.model import Hop
from meshaudit.naming import Namer
from meshaudit.receivers.otlp import decode as d

NAMER = Namer(MeshConfig())
TRACE = "5b8efff798038103d269b633813fc60c"
SPAN = "eee19b7ec3c1b174"


def _spans(*spans: dict[str, Any]) -> Any:
    req = d.ExportTraceServiceRequest()
    d.parse_json(orjson.dumps({"resourceSpans": [{"scopeSpans": [{"spans": list(spans)}]}]}), req)
    return req


def _check(**kw: Any) -> Any:
    return d.Check(**kw)


def test_snake_case_json_ids_are_hex_like_camel_case() -> None:
    # Was: "trace_id" went to the protobuf parser as base64, a 24-byte id, accepted.
    req = _spans({"trace_id": TRACE, "span_id": SPAN, "kind": 2})
    out: list[Hop] = []
    assert d.decode_traces(req, NAMER, out) == 1
    assert out[0].trace_id == TRACE and out[0].span_id == SPAN


def test_json_ids_of_the_wrong_size_are_invalid_id() -> None:
    for body in ({"trace_id": TRACE[:30], "span_id": SPAN}, {"traceId": TRACE, "spanId": SPAN + "00"}):
        with pytest.raises(d.OtlpRejected) as info:
            _spans(body)
        assert info.value.reason == "invalid_id"


def test_protobuf_ids_of_the_wrong_size_are_refused() -> None:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    for tid, sid in ((b"\x01" * 12, b"\x02" * 8), (b"", b"\x02" * 8), (b"\x01" * 16, b"\x02" * 9)):
        official = trace_service_pb2.ExportTraceServiceRequest()
        sp = official.resource_spans.add().scope_spans.add().spans.add()
        sp.trace_id, sp.span_id = tid, sid
        req = d.ExportTraceServiceRequest.FromString(official.SerializeToString())
        with pytest.raises(d.OtlpRejected) as info:
            d.decode_traces(req, NAMER, [])
        assert info.value.reason == "invalid_id", (tid, sid)


def test_an_export_over_max_entries_is_refused_before_decoding() -> None:
    req = _spans(*({"traceId": TRACE, "spanId": SPAN} for _ in range(3)))
    out: list[Hop] = []
    with pytest.raises(d.OtlpRejected) as info:
        d.decode_traces(req, NAMER, out, _check(max_entries=2))
    assert info.value.reason == "too_many_entries" and out == []


def test_json_nested_1000_deep_is_an_error_not_a_recursion_error() -> None:
    body = b'{"a":' * 1000 + b"1" + b"}" * 1000
    with pytest.raises(d.OtlpJsonError) as info:
        d.parse_json(body, d.ExportTraceServiceRequest())
    assert info.value.reason == "undecodable"


def test_implausible_times_take_the_receive_time_and_are_counted() -> None:
    now = 1_800_000_000.0
    req = _spans(
        {"traceId": TRACE, "spanId": SPAN, "startTimeUnixNano": str(2**64 - 1)},  # the year 2554
        {"traceId": TRACE, "spanId": SPAN, "startTimeUnixNano": "0"},  # no time at all
        {"traceId": TRACE, "spanId": SPAN, "startTimeUnixNano": str(int((now - 5) * 1e9))},
    )
    out: list[Hop] = []
    check = _check(now=now, max_skew=3600)
    d.decode_traces(req, NAMER, out, check)
    assert [h.start for h in out] == [now, now, pytest.approx(now - 5)]
    assert check.clamped == 2


def test_a_log_record_without_time_takes_observed_then_receive_time_uncounted() -> None:
    now = 1_800_000_000.0
    req = d.ExportLogsServiceRequest()
    body = {
        "resourceLogs": [
            {"scopeLogs": [{"logRecords": [{"observedTimeUnixNano": str(int((now - 1) * 1e9))}, {"traceId": TRACE}]}]}
        ]
    }
    d.parse_json(orjson.dumps(body), req)
    out: list[Hop] = []
    check = _check(now=now, max_skew=3600)
    assert d.decode_logs(req, NAMER, out, check) == 2
    assert [h.start for h in out] == [pytest.approx(now - 1), now]
    assert check.clamped == 0
