"""A tiny mesh workload: ``python -m meshlab.app CONFIG.json``.

It answers HTTP on its app port (what its sidecar's inbound listener forwards to), optionally
echoes lines on a TCP port, and takes orders on a separate control port that is not part of
the mesh: ``POST /call`` makes it call a peer, through its sidecar's outbound listener (as a
meshed app does, plain HTTP with a ``Host`` header) or straight to the peer's app port
(skipping both sidecars); ``POST /tcp`` opens a TCP connection through its sidecar.

Apps propagate ``x-request-id``, ``traceparent`` and ``tracestate`` on calls they make while
serving (``x-meshlab-forward: <peer> <METHOD> <path>``), as Istio asks of applications. With
``otel`` set, the app uses the OpenTelemetry SDK: SERVER spans for requests it serves, CLIENT
spans for calls it makes, exported over OTLP (gRPC or HTTP) to the collector.

A failing upstream on demand: a request whose path has a ``status/<code>`` segment pair (e.g.
``GET /orders/status/503``) is answered with that status (400-599), so a test can make a service
fail for some paths while it serves the others.
"""

from __future__ import annotations

import http.client
import itertools
import json
import signal
import socket
import socketserver
import sys
import threading
import uuid
from contextlib import AbstractContextManager, nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def status_for(path: str) -> int:
    """200, or the code a ``.../status/<code>/...`` path asks for (400-599)."""
    parts = path.split("?", 1)[0].split("/")
    for name, code in itertools.pairwise(parts):
        if name == "status" and code.isdigit() and 400 <= int(code) <= 599:
            return int(code)
    return 200


PROPAGATED = ("x-request-id", "traceparent", "tracestate", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled")


class Tracing:
    """The OpenTelemetry SDK wiring for one app (or nothing, for an untraced app)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.enabled = bool(cfg.get("otel"))
        self._provider: Any = None
        self._tracer: Any = None
        if not self.enabled:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        otel = cfg["otel"]
        tls = "ca" in otel  # mTLS to the collector with the workload's own certificate
        if otel["protocol"] == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            if tls:
                import grpc

                with open(otel["ca"], "rb") as ca, open(otel["key"], "rb") as key, open(otel["cert"], "rb") as cert:
                    creds = grpc.ssl_channel_credentials(ca.read(), key.read(), cert.read())
                exporter: Any = GrpcExporter(endpoint=otel["endpoint"], insecure=False, credentials=creds, timeout=2)
            else:
                exporter = GrpcExporter(endpoint=otel["endpoint"], insecure=True, timeout=2)
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

            files: dict[str, Any] = {}
            if tls:
                import requests

                # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE from the environment win over a
                # session's own verify (its trust_env): the mesh CA must not lose to the system's.
                session = requests.Session()
                session.trust_env = False
                files = {
                    "certificate_file": otel["ca"],
                    "client_certificate_file": otel["cert"],
                    "client_key_file": otel["key"],
                    "session": session,
                }
            exporter = HttpExporter(endpoint=otel["endpoint"], timeout=2, **files)
        resource = Resource.create(
            {
                "service.name": cfg["service"],
                "service.namespace": cfg["namespace"],
                "service.instance.id": cfg["pod"],
                "k8s.namespace.name": cfg["namespace"],
                "k8s.pod.name": cfg["pod"],
                "k8s.deployment.name": cfg["pod"].rsplit("-", 1)[0],
            }
        )
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
        self._tracer = self._provider.get_tracer("meshlab.app")

    def server_span(self, method: str, path: str, headers: dict[str, str], port: int) -> AbstractContextManager[Any]:
        if not self.enabled:
            return nullcontext(None)
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind

        ctx = extract(headers)
        return self._tracer.start_as_current_span(  # type: ignore[no-any-return]
            f"{method} {path}",
            context=ctx,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": path,
                "url.scheme": "http",
                "server.port": port,
                "network.peer.address": "127.0.0.1",
                **(
                    {"http.request.header.x-request-id": [headers["x-request-id"]]} if "x-request-id" in headers else {}
                ),
            },
        )

    def client_span(self, method: str, peer_host: str, path: str) -> AbstractContextManager[Any]:
        if not self.enabled:
            return nullcontext(None)
        from opentelemetry.trace import SpanKind

        return self._tracer.start_as_current_span(  # type: ignore[no-any-return]
            method,
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": method,
                "server.address": peer_host,
                "peer.service": peer_host.split(".", maxsplit=1)[0],
                "url.full": f"http://{peer_host}{path}",
            },
        )

    def inject(self, headers: dict[str, str]) -> None:
        if self.enabled:
            from opentelemetry.propagate import inject

            inject(headers)

    @staticmethod
    def set_status(span: Any, status: int) -> None:
        if span is not None:
            span.set_attribute("http.response.status_code", status)

    @staticmethod
    def trace_id(span: Any) -> str | None:
        if span is None:
            return None
        return f"{span.get_span_context().trace_id:032x}"

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.force_flush(2000)
            self._provider.shutdown()


class App:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.service: str = cfg["service"]
        self.namespace: str = cfg["namespace"]
        self.tracing = Tracing(cfg)

    def peer_host(self, peer: str) -> str:
        name, _, ns = peer.partition(".")
        return f"{name}.{ns or self.namespace}.svc.cluster.local"

    def call(
        self, peer: str, method: str, path: str, via: str, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """One HTTP call to ``peer``; ``via`` is ``sidecar`` or ``direct``."""
        out_headers = {k: v for k, v in (headers or {}).items() if k in PROPAGATED}
        if via == "sidecar":
            port = int(self.cfg["outbound_port"])
            host = f"{self.peer_host(peer)}:9080"
        else:
            port = int(self.cfg["direct"][peer.partition(".")[0]])
            host = f"{peer.partition('.')[0]}:{port}"
            # No sidecar will add one: a direct call carries an id of its own, as apps often do.
            out_headers.setdefault("x-request-id", str(uuid.uuid4()))
        with self.tracing.client_span(method, self.peer_host(peer), path) as span:
            self.tracing.inject(out_headers)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request(method, path, headers={"Host": host, **out_headers})
                resp = conn.getresponse()
                body = resp.read()
                status = resp.status
            except OSError as exc:
                status, body = 599, str(exc).encode()
            finally:
                conn.close()
            self.tracing.set_status(span, status)
            try:
                parsed = json.loads(body) if body else {}
            except ValueError:
                parsed = {"raw": body[:200].decode(errors="replace")}
            return {
                "status": status,
                "trace_id": self.tracing.trace_id(span) or parsed.get("trace_id"),
                "request_id": parsed.get("request_id"),
                "body": parsed,
            }

    def tcp(self, peer: str, payload: str) -> dict[str, Any]:
        """One connection through the sidecar; ``reply`` is empty when it was closed unanswered
        (a peer sidecar's RBAC, say), ``error`` set when it was reset."""
        port = int(self.cfg["tcp_outbound"][peer.partition(".")[0]])
        data = b""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(payload.encode() + b"\n")
                while not data.endswith(b"\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
        except OSError as exc:
            return {"reply": data.decode(errors="replace").strip(), "error": str(exc)}
        return {"reply": data.decode(errors="replace").strip()}


def _json_handler(app: App, control: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = f"meshlab-{app.service}"

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(f"{app.service} {'control' if control else 'app'}: {format % args}\n")

        def _reply(self, status: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict[str, Any]:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            return json.loads(raw) if raw else {}

        def _serve(self) -> None:
            if control:
                self._control()
                return
            self._body()  # drain
            headers = {k.lower(): v for k, v in self.headers.items()}
            path = self.path
            with app.tracing.server_span(self.command, path.split("?")[0], headers, int(app.cfg["app_port"])) as span:
                nested = None
                forward = headers.get("x-meshlab-forward")
                if forward:
                    peer, method, fpath = forward.split()
                    nested = app.call(peer, method, fpath, "sidecar", headers)
                status = status_for(path)
                app.tracing.set_status(span, status)
                self._reply(
                    status,
                    {
                        "service": app.service,
                        "namespace": app.namespace,
                        "method": self.command,
                        "path": path,
                        "request_id": headers.get("x-request-id"),
                        "traceparent": headers.get("traceparent"),
                        "trace_id": app.tracing.trace_id(span),
                        "xfcc": headers.get("x-forwarded-client-cert"),
                        "nested": nested,
                    },
                )

        def _control(self) -> None:
            if self.path == "/healthz":
                self._reply(200, {"ok": True})
                return
            body = self._body()
            if self.path == "/call":
                results = [
                    app.call(
                        body["peer"],
                        body.get("method", "GET"),
                        body["path"],
                        body.get("via", "sidecar"),
                        body.get("headers"),
                    )
                    for _ in range(int(body.get("count", 1)))
                ]
                self._reply(200, {"results": results})
            elif self.path == "/tcp":
                results = [app.tcp(body["peer"], body.get("payload", "ping")) for _ in range(int(body.get("count", 1)))]
                self._reply(200, {"results": results})
            else:
                self._reply(404, {"error": f"unknown control path {self.path}"})

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    return Handler


class _Echo(socketserver.StreamRequestHandler):
    service = "?"

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(f"{self.service}:".encode() + line)
            self.wfile.flush()


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        cfg: dict[str, Any] = json.load(f)
    app = App(cfg)
    servers: list[socketserver.BaseServer] = [
        ThreadingHTTPServer(("127.0.0.1", int(cfg["app_port"])), _json_handler(app, control=False)),
        ThreadingHTTPServer(("127.0.0.1", int(cfg["control_port"])), _json_handler(app, control=True)),
    ]
    if cfg.get("tcp_app_port"):
        echo = type("Echo", (_Echo,), {"service": app.service})
        servers.append(_TcpServer(("127.0.0.1", int(cfg["tcp_app_port"])), echo))
    for s in servers:
        if isinstance(s, ThreadingHTTPServer):
            s.daemon_threads = True
    threads = [threading.Thread(target=s.serve_forever, name=f"serve-{i}", daemon=True) for i, s in enumerate(servers)]
    for t in threads:
        t.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sys.stderr.write(f"{app.service}: serving app={cfg['app_port']} control={cfg['control_port']}\n")
    sys.stderr.flush()
    stop.wait()
    for s in servers:
        s.shutdown()
        s.server_close()
    app.tracing.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
