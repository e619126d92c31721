"""A seeded mutator of wire inputs: valid ALS, OTLP protobuf and OTLP/JSON bodies, changed the way
an attacker (or a broken client) would change them. Deterministic for a seed, so a failure can be
replayed with ``MESHAUDIT_FUZZ_SEED``.

Byte-level mutations find decoder faults; structured ones reach deeper: times outside any
calendar, ids of the wrong length, control characters and huge strings in names, many empty
entries, deeply nested JSON.
"""

from __future__ import annotations

import gzip
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from infra import als
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

INTERESTING_INTS = (0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 10**12, -(10**12), 2**53)
INTERESTING_VARINTS = (b"\xff" * 9 + b"\x01", b"\x80" * 10, b"\xff\xff\xff\xff\x0f", b"\x00")
NASTY_STRINGS = (
    "",
    "a\nINFO meshaudit: forged line",
    "\x1b[31mred\x1b[0m",
    "\u2028\u2029\x00",
    "x" * 70_000,
    "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local\r\n",
    "spiffe://cluster.local/ns/../sa/\u202e",
)


@dataclass
class HttpInput:
    path: str
    body: bytes
    content_type: str
    headers: dict[str, str]


def als_templates() -> list[bytes]:
    """Serialized StreamAccessLogsMessages as an Istio sidecar sends them."""
    ident = als.identifier("reviews")
    http = als.http_message(
        [
            als.inbound_http("frontend", path="/reviews/1", request_id="r-1"),
            als.inbound_http(None, path="/x", remote="10.0.0.7:41000"),
            als.outbound_http("ratings", upstream_local="10.0.0.1:5555"),
        ],
        ident,
    )
    tcp = als.tcp_message(
        [als.tcp_entry(cluster="inbound|5432||", tls=False), als.tcp_entry(cluster="outbound|5432||db.default.svc")],
        ident,
    )
    return [http.SerializeToString(), tcp.SerializeToString()]


def _traces_json(trace_id: str = "5b8efff798038103d269b633813fc60c", span_id: str = "eee19b7ec3c1b174") -> Any:
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "reviews"}}]},
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": trace_id,
                                "spanId": span_id,
                                "kind": 2,
                                "name": "GET /reviews/1",
                                "startTimeUnixNano": "1700000000000000000",
                                "endTimeUnixNano": "1700000000100000000",
                                "attributes": [
                                    {"key": "http.request.method", "value": {"stringValue": "GET"}},
                                    {"key": "url.path", "value": {"stringValue": "/reviews/1"}},
                                    {"key": "guid:x-request-id", "value": {"stringValue": "r-1"}},
                                ],
                            }
                        ]
                    }
                ],
            }
        ]
    }


def _logs_json() -> Any:
    return {
        "resourceLogs": [
            {
                "resource": {"attributes": [{"key": "node_name", "value": {"stringValue": "ratings-1"}}]},
                "scopeLogs": [
                    {
                        "logRecords": [
                            {
                                "timeUnixNano": "1700000000000000000",
                                "traceId": "5b8efff798038103d269b633813fc60c",
                                "attributes": [
                                    {"key": "upstream_cluster", "value": {"stringValue": "inbound|9080||"}},
                                    {"key": "downstream_remote_address", "value": {"stringValue": "10.0.0.5:4000"}},
                                ],
                            }
                        ]
                    }
                ],
            }
        ]
    }


def otlp_templates() -> dict[str, bytes]:
    """Serialized OTLP export requests (protobuf), keyed by signal."""
    from google.protobuf import json_format

    traces = trace_service_pb2.ExportTraceServiceRequest()
    json_format.ParseDict(_traces_json(), traces)
    logs = logs_service_pb2.ExportLogsServiceRequest()
    json_format.ParseDict(_logs_json(), logs)
    return {"traces": traces.SerializeToString(), "logs": logs.SerializeToString()}


class Mutator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    # --- bytes ---------------------------------------------------------------------------------
    def mutate(self, data: bytes, others: list[bytes]) -> bytes:
        r = self.rng
        b = bytearray(data)
        for _ in range(r.randint(1, 4)):
            op = r.randrange(8)
            n = len(b)
            if op == 0 and n:  # flip bits
                for _ in range(r.randint(1, 8)):
                    i = r.randrange(n)
                    b[i] ^= 1 << r.randrange(8)
            elif op == 1 and n:  # truncate
                del b[r.randrange(n) :]
            elif op == 2:  # insert random bytes
                i = r.randint(0, n)
                b[i:i] = r.randbytes(r.randint(1, 16))
            elif op == 3 and n:  # delete a range
                i = r.randrange(n)
                del b[i : i + r.randint(1, 32)]
            elif op == 4 and n:  # duplicate a range
                i = r.randrange(n)
                chunk = b[i : i + r.randint(1, 64)]
                j = r.randint(0, n)
                b[j:j] = chunk * r.randint(1, 8)
            elif op == 5 and n:  # an interesting varint somewhere
                i = r.randrange(n)
                v = r.choice(INTERESTING_VARINTS)
                b[i : i + len(v)] = v
            elif op == 6 and others:  # splice with another template
                o = r.choice(others)
                i, j = r.randint(0, n), r.randint(0, len(o))
                b = b[:i] + bytearray(o[j:])
            elif n:  # a random byte
                b[r.randrange(n)] = r.randrange(256)
        return bytes(b)

    # --- structured ALS --------------------------------------------------------------------------
    def als_structured(self) -> bytes:
        """A well-formed message with hostile values."""
        r = self.rng
        kind = r.randrange(6)
        ident = als.identifier("reviews")
        if kind == 0:  # times outside any calendar
            e = als.inbound_http(r.choice(["frontend", None]), path="/t")
            ts = e.common_properties.start_time
            ts.seconds = r.choice(INTERESTING_INTS)
            ts.nanos = r.choice((0, -1, 999_999_999, 2**31 - 1, -(2**31)))
            return bytes(als.http_message([e], ident).SerializeToString())
        if kind == 1:  # hostile names in the identifier
            ident.node.id = r.choice(NASTY_STRINGS)
            ident.node.cluster = r.choice(NASTY_STRINGS)
            ident.log_name = r.choice(NASTY_STRINGS)
            return bytes(als.http_message([als.inbound_http(None, path="/n")], ident).SerializeToString())
        if kind == 2:  # hostile request fields
            e = als.inbound_http(
                None,
                path=r.choice(NASTY_STRINGS),
                request_id=r.choice(NASTY_STRINGS) or "x",
                remote=f"{r.choice(['10.0.0.1', '::1', 'not-an-ip', '999.1.1.1'])}:{r.randrange(70000)}",
                traceparent="00-" + r.choice(["0" * 32, "g" * 32, "a" * 31]) + "-" + "b" * 16 + "-01",
            )
            e.request.request_headers["x"] = r.choice(NASTY_STRINGS)
            return bytes(als.http_message([e], ident).SerializeToString())
        if kind == 3:  # many empty entries in one message
            msg = als.http_message([], ident)
            for _ in range(r.choice((1_000, 20_000, 60_000))):
                msg.http_logs.log_entry.add()
            return bytes(msg.SerializeToString())
        if kind == 4:  # TCP with odd TLS facts
            e = als.tcp_entry(cluster=r.choice(["inbound|1||", "", "outbound|||", "\n"]), tls=True)
            e.common_properties.tls_properties.tls_version = r.randrange(2**31 - 1)
            e.common_properties.tls_properties.tls_cipher_suite.value = r.randrange(2**32)
            return bytes(als.tcp_message([e], ident).SerializeToString())
        # no identifier at all
        return bytes(als.http_message([als.inbound_http(None, path="/i")]).SerializeToString())

    # --- structured OTLP -----------------------------------------------------------------------
    def otlp_json_structured(self, signal: str) -> bytes:
        r = self.rng
        kind = r.randrange(6)
        if kind == 0:  # ids of the wrong length or encoding (snake_case fields take base64 in protobuf JSON)
            body = _traces_json(
                trace_id=r.choice(["ab", "0" * 32, "a" * 34, "g" * 32, ""]), span_id=r.choice(["ab", "z" * 16])
            )
            if r.random() < 0.5:
                span = body["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
                span["trace_id"] = span.pop("traceId")
                span["span_id"] = span.pop("spanId")
            return orjson.dumps(body)
        if kind == 1:  # deeply nested JSON
            depth = r.choice((100, 1_000, 20_000))
            return b'{"resourceSpans":' + b"[" * depth + b"]" * depth + b"}"
        if kind == 2:  # times and numbers out of range
            body = _traces_json() if signal == "traces" else _logs_json()
            text = orjson.dumps(body).replace(
                b'"1700000000000000000"', b'"' + str(r.choice((*INTERESTING_INTS, 2**64, -(2**70)))).encode() + b'"'
            )
            return text
        if kind == 3:  # hostile strings
            body = _traces_json()
            body["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"] = r.choice(NASTY_STRINGS)
            return orjson.dumps(body)
        if kind == 4:  # wrong shapes
            return r.choice([b"[]", b"null", b'"x"', b'{"resourceSpans": 1}', b'{"resourceSpans": [1, 2]}', b"1e999"])
        body = _traces_json() if signal == "traces" else _logs_json()
        return self.mutate(orjson.dumps(body), [])

    def http_input(self, templates: dict[str, bytes]) -> HttpInput:
        r = self.rng
        signal = r.choice(("traces", "logs"))
        path = f"/v1/{signal}"
        if r.random() < 0.5:
            ctype = "application/json"
            body = self.otlp_json_structured(signal)
        else:
            ctype = "application/x-protobuf"
            body = self.mutate(templates[signal], list(templates.values()))
        headers: dict[str, str] = {}
        enc = r.randrange(10)
        encoders: dict[int, tuple[str, Callable[[bytes], bytes]]] = {
            1: ("gzip", gzip.compress),
            2: ("gzip", lambda b: gzip.compress(b)[: max(1, len(b) // 2)]),  # torn gzip
            3: ("deflate", gzip.compress),  # gzip labelled deflate
            4: ("deflate", zlib.compress),
            5: ("br", lambda b: b),
            6: ("zstd", lambda b: b),
            7: ("gzip", lambda b: b),  # not gzip at all
        }
        if enc in encoders:
            name, fn = encoders[enc]
            headers["Content-Encoding"] = name
            body = fn(body)
        if r.random() < 0.05:
            ctype = r.choice(["text/plain", "application/json; charset=utf-16", "", "application/x-protobuf; x=y"])
        return HttpInput(path, body, ctype, headers)
