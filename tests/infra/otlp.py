"""Spans from the real OpenTelemetry SDK, as an instrumented application emits them."""

from __future__ import annotations

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind


def server_span(exporter: SpanExporter, service: str, path: str) -> tuple[str, str]:
    """Emit one SERVER span the way an instrumented app does; returns (trace_id, traceparent)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service, "service.namespace": "default"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test-app")
    with tracer.start_as_current_span(f"GET {path}", kind=SpanKind.SERVER) as span:
        span.set_attribute("http.request.method", "GET")
        span.set_attribute("url.path", path)
        span.set_attribute("client.address", "10.0.0.44")
        ctx = span.get_span_context()
    provider.shutdown()
    trace_id = f"{ctx.trace_id:032x}"
    return trace_id, f"00-{trace_id}-{ctx.span_id:016x}-01"


def client_span(exporter: SpanExporter, service: str, host: str, request_id: str) -> None:
    """A CLIENT span of an app that records the x-request-id it sent (the semantic conventions'
    ``http.request.header.x-request-id``, a string array)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service, "service.namespace": "default"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test-app").start_as_current_span("GET", kind=SpanKind.CLIENT) as span:
        span.set_attribute("http.request.method", "GET")
        span.set_attribute("server.address", host)
        span.set_attribute("url.full", f"http://{host}/reviews/1")
        span.set_attribute("http.request.header.x-request-id", [request_id])
    provider.shutdown()
