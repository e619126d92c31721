"""A stand-in collector for checking the harness without the daemon: it accepts Envoy's
gRPC access-log streams and OTLP traces (gRPC and HTTP) on 127.0.0.1 and keeps what arrived,
decoded, so a test can see that each sidecar really logs and traces, and what it sends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from meshaudit._proto.envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from meshlab.procs import free_ports


@dataclass
class Entry:
    node_id: str
    log_name: str
    kind: str  # "http" or "tcp"
    message: Any  # HTTPAccessLogEntry or TCPAccessLogEntry


@dataclass
class CapturedSpan:
    service: str
    span: Any  # opentelemetry.proto.trace.v1.Span

    def attr(self, key: str) -> str | None:
        for kv in self.span.attributes:
            if kv.key == key:
                return str(kv.value.string_value)
        return None


@dataclass
class Captured:
    lock: threading.Lock = field(default_factory=threading.Lock)
    entries: list[Entry] = field(default_factory=list)
    spans: list[CapturedSpan] = field(default_factory=list)
    otlp_http_requests: int = 0
    otlp_grpc_requests: int = 0

    def add_spans(self, req: Any) -> None:
        with self.lock:
            for rs in req.resource_spans:
                service = next((kv.value.string_value for kv in rs.resource.attributes if kv.key == "service.name"), "")
                for ss in rs.scope_spans:
                    self.spans.extend(CapturedSpan(service, s) for s in ss.spans)


class _Als(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, store: Captured) -> None:
        self.store = store

    def StreamAccessLogs(self, request_iterator: Iterator[Any], context: Any) -> Any:
        node_id = log_name = ""
        for msg in request_iterator:
            if msg.HasField("identifier"):  # only on a stream's first message
                node_id, log_name = msg.identifier.node.id, msg.identifier.log_name
            with self.store.lock:
                for e in msg.http_logs.log_entry:
                    self.store.entries.append(Entry(node_id, log_name, "http", e))
                for e in msg.tcp_logs.log_entry:
                    self.store.entries.append(Entry(node_id, log_name, "tcp", e))
        return als_pb2.StreamAccessLogsResponse()


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, store: Captured) -> None:
        self.store = store

    def Export(self, request: Any, context: Any) -> Any:
        self.store.add_spans(request)
        with self.store.lock:
            self.store.otlp_grpc_requests += 1
        return trace_service_pb2.ExportTraceServiceResponse()


class CaptureCollector:
    def __init__(self) -> None:
        self.grpc_port, self.http_port = free_ports(2)
        self.data = Captured()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(_Als(self.data), self._grpc)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self.data), self._grpc)
        self._grpc.add_insecure_port(f"127.0.0.1:{self.grpc_port}")
        store = self.data

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/v1/traces":
                    req = trace_service_pb2.ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    store.add_spans(req)
                    with store.lock:
                        store.otlp_http_requests += 1
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self._http = ThreadingHTTPServer(("127.0.0.1", self.http_port), Handler)
        self._http.daemon_threads = True
        self._http_thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def start(self) -> CaptureCollector:
        self._grpc.start()
        self._http_thread.start()
        return self

    def stop(self) -> None:
        self._grpc.stop(grace=0.5).wait(2)
        self._http.shutdown()
        self._http.server_close()

    def entries(self) -> list[Entry]:
        with self.data.lock:
            return list(self.data.entries)

    def spans(self) -> list[CapturedSpan]:
        with self.data.lock:
            return list(self.data.spans)
