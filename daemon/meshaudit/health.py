"""The metrics and health endpoint (default 127.0.0.1:9464).

- ``/metrics``: Prometheus text.
- ``/healthz``: the process is alive: its event loop turns and every core task (engine loop,
  tick loop; with ``workers: N`` the coordinator's) runs. 503 naming the task that stopped: the
  liveness probe then restarts the pod.
- ``/readyz``: the daemon can receive: receivers listening, engine tasks alive, ingest queue not
  saturated. 503 with the component that is not. Sinks do not decide it (a backend that is down
  never stops ingestion; alerts are queued or spooled meanwhile) and are not shown:
  ``/readyz?verbose`` adds each sink's state ("ok" or why not, which may name a broker host).
  Sink health is also ``meshaudit_sink_ready{sink}``, for alert rules.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from meshaudit.metrics import REGISTRY

# (component -> "ok" or why it cannot receive, sink -> "ok" or why it cannot deliver)
Readiness = Callable[[], tuple[dict[str, str], dict[str, str]]]
Liveness = Callable[[], dict[str, str]]  # what is dead -> how it ended; empty when alive


def build_app(
    readiness: Readiness,
    registry: CollectorRegistry = REGISTRY,
    before_scrape: Callable[[], Awaitable[None]] | None = None,
    liveness: Liveness | None = None,
) -> web.Application:
    """``before_scrape``: gather what other processes hold (``workers: N``) before rendering."""

    async def metrics_handler(request: web.Request) -> web.Response:
        if before_scrape is not None:
            await before_scrape()
        resp = web.Response(body=generate_latest(registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def healthz(request: web.Request) -> web.Response:
        dead = liveness() if liveness is not None else {}
        if dead:
            text = "".join(f"{k} {v}\n" for k, v in dead.items())
            return web.Response(status=503, text=text)
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        gates, sinks = readiness()
        ready = all(v == "ok" for v in gates.values())
        body: dict[str, object] = {"ready": ready, "components": gates}
        if "verbose" in request.query:
            body["sinks"] = sinks
        return web.Response(status=200 if ready else 503, body=orjson.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
