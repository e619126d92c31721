"""Faults a live daemon reports, sent the way a real sender does, for the tests that watch it
from outside (a real Prometheus): a stolen certificate (a critical alert) and undecodable
OTLP/HTTP bodies (rejected input)."""

from __future__ import annotations

import contextlib
import urllib.error
import urllib.request

from infra import als


async def stolen_certificate(grpc: str, request_id: str) -> None:
    """ratings' sidecar calls reviews, and reviews' sidecar logs the request as coming from a
    workload presenting payments' certificate: one critical identity_mismatch."""
    stolen = als.inbound_http("payments", path="/reviews/1", request_id=request_id)
    client = als.outbound_http("reviews", request_id=request_id, path="/reviews/1")
    await als.stream(grpc, [als.http_message([stolen], als.identifier("reviews"))])
    await als.stream(grpc, [als.http_message([client], als.identifier("ratings"))])


def post_garbage(http: str, n: int) -> None:
    """``n`` undecodable OTLP/HTTP bodies to ``http`` (each answered 400 and counted as rejected)."""
    for _ in range(n):
        req = urllib.request.Request(
            f"http://{http}/v1/traces", data=b"\xff\x00garbage", method="POST",
            headers={"Content-Type": "application/x-protobuf"},
        )  # fmt: skip
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(req, timeout=5).read()
