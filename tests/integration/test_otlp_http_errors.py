"""OTLP/HTTP refusals (issue 10, defect 7): each one a google.rpc.Status in the request's
encoding, with the status code of the OTLP/HTTP spec, and counted by reason."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from infra.daemon import Daemon, deep_merge, running

from integration.conftest import CONFIG
from integration.test_otlp import _post

PB, JSON = "application/x-protobuf", "application/json"
TRACE, SPAN = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"


@pytest.fixture
def d(tmp_path: Path) -> Iterator[Daemon]:
    with running(tmp_path, deep_merge(CONFIG, {"receivers": {"max_entries_per_message": 5}})) as dd:
        yield dd


def _status(body: bytes, ctype: str) -> tuple[int, str]:
    if ctype == JSON:
        got = orjson.loads(body)
        return int(got.get("code", 0)), str(got["message"])
    from google.rpc import status_pb2

    st = status_pb2.Status.FromString(body)
    return st.code, st.message


def _spans_json(*spans: dict[str, Any]) -> bytes:
    return orjson.dumps({"resourceSpans": [{"scopeSpans": [{"spans": list(spans)}]}]})


def _spans_pb(n: int, trace_id: bytes = bytes.fromhex(TRACE)) -> bytes:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    req = trace_service_pb2.ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for _ in range(n):
        sp = ss.spans.add()
        sp.trace_id, sp.span_id = trace_id, bytes.fromhex(SPAN)
    return bytes(req.SerializeToString())


CASES: list[tuple[str, bytes, str, dict[str, str], int, str]] = [
    ("corrupt gzip", b"\x1f\x8b\x08\x00garbage-garbage", PB, {"Content-Encoding": "gzip"}, 400, "undecodable"),
    ("gzip labelled deflate", gzip.compress(_spans_pb(1)), PB, {"Content-Encoding": "deflate"}, 400, "undecodable"),
    ("JSON nested 1000 deep", b'{"a":' * 1000 + b"1" + b"}" * 1000, JSON, {}, 400, "undecodable"),
    ("br", b"\x0b\x00\x80", PB, {"Content-Encoding": "br"}, 415, "unsupported_encoding"),
    ("zstd", b"\x28\xb5\x2f\xfd", PB, {"Content-Encoding": "zstd"}, 415, "unsupported_encoding"),
    ("compress", b"x", JSON, {"Content-Encoding": "compress"}, 415, "unsupported_encoding"),
    ("12-byte trace id", _spans_pb(1, b"\x01" * 12), PB, {}, 400, "invalid_id"),
    (
        "snake_case 30-digit trace_id",
        _spans_json({"trace_id": TRACE[:30], "span_id": SPAN}),
        JSON,
        {},
        400,
        "invalid_id",
    ),
    ("6 spans, 5 allowed", _spans_pb(6), PB, {}, 400, "too_many_entries"),
    ("form", b"a=b", "application/x-www-form-urlencoded", {}, 415, "unsupported_media_type"),
]


def test_every_refusal_is_a_status_in_the_request_encoding_and_counted(d: Daemon) -> None:
    want: dict[str, int] = {}
    for name, body, ctype, headers, code, reason in CASES:
        status, resp = _post(d, "/v1/traces", body, ctype, **headers)
        assert status == code, (name, status, resp)
        answer = JSON if ctype == JSON else PB
        rpc_code, message = _status(resp, answer)
        assert rpc_code in (3, 8) and message, (name, rpc_code, message)
        want[reason] = want.get(reason, 0) + 1
    for reason, n in want.items():
        assert d.metric("meshaudit_rejected_total", receiver="otlp_http", reason=reason) == n, reason
    # Accepted: a zlib "deflate" body, and 5 spans (the limit).
    assert _post(d, "/v1/traces", zlib.compress(_spans_pb(5)), PB, **{"Content-Encoding": "deflate"})[0] == 200
    assert d.metric("meshaudit_received_total", receiver="otlp_http", kind="span") == 5


def test_implausible_span_time_is_clamped_and_counted(d: Daemon) -> None:
    body = _spans_json({"traceId": TRACE, "spanId": SPAN, "startTimeUnixNano": str(2**64 - 1)})
    assert _post(d, "/v1/traces", body, JSON)[0] == 200
    assert d.metric("meshaudit_rejected_total", receiver="otlp_http", reason="clamped_time") == 1
    assert d.metric("meshaudit_received_total", receiver="otlp_http", kind="span") == 1


async def test_a_refused_request_does_not_break_the_next_one_on_a_kept_alive_connection(d: Daemon) -> None:
    """An exporter sends its next export on the same connection: when the server closes a
    connection after refusing a body, its answer says "Connection: close", so the client opens a
    new one instead of meeting a reset. One connection at a time, every request answered."""
    import aiohttp

    bad: list[tuple[bytes, dict[str, str]]] = [
        (b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}),  # torn gzip: the body cannot be read
        (b"x" * 100, {"Content-Encoding": "br"}),  # refused before the body is read
        (b"\xff\xfe", {}),  # undecodable protobuf, body read whole
    ]
    answers = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for _ in range(20):
            for body, headers in bad:
                for payload, hdrs in ((body, headers), (b"", {})):
                    async with session.post(
                        f"http://{d.http}/v1/traces", data=payload, headers={"Content-Type": PB, **hdrs}
                    ) as resp:
                        await resp.read()
                        answers.append(resp.status)
    assert sorted(set(answers)) == [200, 400, 415]
    assert answers.count(200) == 60
