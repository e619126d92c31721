"""OTLP/HTTP receiver (default 127.0.0.1:4318): ``POST /v1/traces`` and ``POST /v1/logs``,
``application/x-protobuf`` and ``application/json``.

Status codes follow the OTLP/HTTP spec: 200 with an empty Export*ServiceResponse in the
request's encoding; 400 with a reason for a body that does not decode; 413 over the size
limit; 415 for another content type; 429 with Retry-After when the ingest queue is full
(the exporter retries).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from meshaudit import metrics
from meshaudit.model import Hop
from meshaudit.naming import Namer
from meshaudit.receivers.ingest import IngestQueue
from meshaudit.receivers.otlp.decode import (
    ExportLogsServiceRequest,
    ExportTraceServiceRequest,
    OtlpJsonError,
    decode_logs,
    decode_traces,
    parse_json,
)

log = logging.getLogger("meshaudit.receivers.otlp_http")
RECEIVER = "otlp_http"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"


class OtlpHttp:
    def __init__(self, queue: IngestQueue, namer: Namer, max_body_bytes: int) -> None:
        self.queue = queue
        self.namer = namer
        self.max_body_bytes = max_body_bytes
        self._messages = metrics.MESSAGES.labels(RECEIVER)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post("/v1/traces", self.traces)
        app.router.add_post("/v1/logs", self.logs)
        return app

    @staticmethod
    def _reject(status: int, reason: str, message: str) -> web.Response:
        metrics.REJECTED.labels(RECEIVER, reason).inc()
        log.warning("Rejected an OTLP/HTTP request (%d %s): %s", status, reason, message)
        return web.Response(status=status, text=message + "\n", content_type="text/plain")

    async def _handle(self, request: web.Request, message: Any, response: Any, kind: str) -> web.Response:
        self._messages.inc()
        ctype = request.content_type
        if ctype not in (PROTOBUF, JSON):
            return self._reject(415, "unsupported_media_type", f"content type {ctype!r} is not {PROTOBUF} or {JSON}")
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return self._reject(413, "too_large", f"body over {self.max_body_bytes} bytes")
        try:
            # aiohttp undoes Content-Encoding (gzip, deflate) itself and applies the size limit
            # to the decoded body, so a compressed bomb is refused with 413 as well.
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._reject(413, "too_large", f"body over {self.max_body_bytes} bytes")
        try:
            if ctype == JSON:
                parse_json(body, message)
            else:
                message.ParseFromString(body)
        except (DecodeError, OtlpJsonError) as exc:
            return self._reject(400, "undecodable", f"cannot decode the {kind} export: {exc}")
        hops: list[Hop] = []
        if kind == "traces":
            n = decode_traces(message, self.namer, hops)
            metrics.RECEIVED.labels(RECEIVER, "span").inc(n)
        else:
            n = decode_logs(message, self.namer, hops)
            metrics.RECEIVED.labels(RECEIVER, "log").inc(n)
        if hops and not self.queue.offer(hops):
            metrics.REJECTED.labels(RECEIVER, "busy").inc(len(hops))
            return web.Response(status=429, headers={"Retry-After": "1"}, text="ingest queue full; retry later\n")
        if ctype == JSON:
            return web.Response(body=json_format.MessageToJson(response).encode(), content_type=JSON)
        return web.Response(body=response.SerializeToString(), content_type=PROTOBUF)

    async def traces(self, request: web.Request) -> web.Response:
        return await self._handle(
            request,
            ExportTraceServiceRequest(),
            trace_service_pb2.ExportTraceServiceResponse(),
            "traces",
        )

    async def logs(self, request: web.Request) -> web.Response:
        return await self._handle(
            request,
            ExportLogsServiceRequest(),
            logs_service_pb2.ExportLogsServiceResponse(),
            "logs",
        )
