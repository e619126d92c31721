"""One process (the default): the pipeline with no peers, its own sinks, ``/metrics``,
``/healthz``, ``/readyz`` and the service graph.

Start: the sinks, then the engine, then the receivers; on SIGTERM or Ctrl-C stop in reverse with
a deadline (stop intake, drain the ingest queue through the engine, flush the sinks).
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from meshaudit import health
from meshaudit.config import Config, Policy
from meshaudit.engine.core import Engine
from meshaudit.model import Alert
from meshaudit.pipeline import Pipeline
from meshaudit.runtime.common import (
    SHUTDOWN_SECS,
    Alone,
    dispatch_to,
    mesh_graph,
    print_ready,
    readiness_of,
    serve_http,
    start_sinks,
    watched_files,
)
from meshaudit.sinks import build_sinks
from meshaudit.views import page
from meshaudit.watch import FileWatch

log = logging.getLogger("meshaudit")


class Single(Alone):
    """The whole daemon in one process. It is also the pipeline's :class:`~meshaudit.pipeline.Peers`:
    none, so its engine aggregates its own violations; once a second the engine's tally goes to
    the service graph."""

    def __init__(
        self, config: Config, policy: Policy, config_path: str | None, overrides: dict[str, str] | None = None
    ) -> None:
        self.sinks = build_sinks(config.sinks)
        self.pipeline = Pipeline(config, policy, config_path, self, self.dispatch, overrides)
        # The service graph (/graph), judged under the engine's policy.
        self.graph = mesh_graph(config, self.pipeline.engine.ctx.policy)
        # the configuration's files as last loaded: a change reloads (reload_watch_ms)
        self.files = FileWatch(lambda: watched_files(self.pipeline.config_path, self.pipeline.config))

    # --- Peers: none ---------------------------------------------------------------------------
    def periodic(self, engine: Engine) -> None:
        self.graph.absorb(engine.facts().tally, time.time())

    # --- alerts and readiness ------------------------------------------------------------------
    def dispatch(self, alerts: list[Alert]) -> None:
        dispatch_to(self.sinks, alerts)
        self.graph.alerts(alerts, time.time())

    def readiness(self) -> tuple[dict[str, str], dict[str, str]]:
        return readiness_of(self.pipeline.intake_state(), self.sinks)

    # --- reload --------------------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP, or the files changed (see :meth:`Pipeline.reload`)."""
        self.files.mark()
        p = self.pipeline
        if not self.reload_pipeline():
            return
        self.graph.policy = p.engine.ctx.policy
        log.info("Configuration reloaded from %s; windows, waits and the learned baseline are kept.", p.config_path)

    # --- lifecycle ------------------------------------------------------------------------------
    async def run(self, ready_message: bool = True) -> int:
        p = self.pipeline
        cfg = p.config
        if not await start_sinks(self.sinks):
            return 1
        p.start()
        runners: list[web.AppRunner] = []
        try:
            await p.listen()
            app = health.build_app(self.readiness, liveness=p.core.dead)
            page.add_routes(app, self.graph, lambda: p.config.graph.top_edges)
            p.bound["metrics"] = await serve_http(app, cfg.listen.metrics, runners)
        except OSError as exc:
            log.error("Cannot listen: %s", exc)
            await self._shutdown(runners)
            return 1
        await p.listening()
        self.after_listening()
        if ready_message:
            print_ready(p.bound, cfg.sinks.jsonl.path)
        await p.stopped()
        log.info("Stopping: receivers first, then the engine, then the sinks.")
        await self._shutdown(runners)
        return p.exit_code

    async def _shutdown(self, runners: list[web.AppRunner]) -> None:
        deadline = time.monotonic() + SHUTDOWN_SECS
        await self.pipeline.stop()
        # Sinks last, each with the remaining time.
        await asyncio.gather(*(s.shutdown(deadline) for s in self.sinks))
        for r in runners:
            await r.cleanup()
