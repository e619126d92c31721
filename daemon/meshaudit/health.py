"""The metrics and health endpoint (default 127.0.0.1:9464): ``/metrics`` (Prometheus text),
``/healthz`` (the process is alive and its event loop turns) and ``/readyz`` (receivers are
listening and every sink can deliver; 503 with the reasons otherwise).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from meshaudit.metrics import REGISTRY

Readiness = Callable[[], dict[str, str]]  # component -> "ok" or the reason it is not ready


def build_app(
    readiness: Readiness,
    registry: CollectorRegistry = REGISTRY,
    before_scrape: Callable[[], Awaitable[None]] | None = None,
) -> web.Application:
    """``before_scrape``: gather what other processes hold (``workers: N``) before rendering."""

    async def metrics_handler(request: web.Request) -> web.Response:
        if before_scrape is not None:
            await before_scrape()
        resp = web.Response(body=generate_latest(registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        state = readiness()
        ready = all(v == "ok" for v in state.values())
        body = orjson.dumps({"ready": ready, "components": state})
        return web.Response(status=200 if ready else 503, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
