"""The receiver role of the distributed mode (``meshaudit run --role receiver``): the pipeline's
receivers exactly as in one process (decoders, TLS and senders, sources check, limits, the
ingest queue), and instead of the engine its :class:`~meshaudit.runtime.producer.HopStage`,
which produces the hops to the hops topic (``distributed:``) for the evaluators.

Stateless: any number of receivers run behind one Service; the hops topic's partitioning by
correlation key, not the receiver a sidecar reached, decides which evaluator sees a request. A
receiver has no sinks and raises no alerts (an invalid reload is logged and counted, as
everywhere). It serves ``/metrics``, ``/healthz`` (its tasks run) and ``/readyz``: listening, and
the ingest queue not saturated, unless it is saturated because the broker is away
(:meth:`HopStage.gate`); ``/readyz?verbose`` shows the hops topic's state.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from aiohttp import web

from meshaudit import __version__, health, metrics
from meshaudit.config import Config, Policy
from meshaudit.model import Alert
from meshaudit.pipeline import Pipeline
from meshaudit.runtime.common import Alone, serve_http, watched_files
from meshaudit.runtime.producer import HopStage
from meshaudit.watch import FileWatch

log = logging.getLogger("meshaudit")

HEALTH_SECS = 1.0  # the ingest queue's gauges and gRPC health, this often


class Receiver(Alone):
    """The receiver process. It is also the pipeline's :class:`~meshaudit.pipeline.Peers`: none
    (the pipeline has no engine to share)."""

    def __init__(
        self, config: Config, policy: Policy, config_path: str | None, overrides: dict[str, str] | None = None
    ) -> None:
        self.stage = HopStage(config.distributed)
        self.pipeline = Pipeline(config, policy, config_path, self, self.dispatch, overrides, stage=self.stage)
        self.files = FileWatch(lambda: watched_files(self.pipeline.config_path, self.pipeline.config))

    # --- alerts and readiness ------------------------------------------------------------------
    def dispatch(self, alerts: list[Alert]) -> None:
        """A receiver has no sinks: the only alert it can raise, an invalid reload, is logged (and
        counted in config_reloads_total{result="invalid"}) where it happens."""
        for a in alerts:
            metrics.ALERTS.labels(a.rule, a.severity).inc()

    def readiness(self) -> tuple[dict[str, str], dict[str, str]]:
        return self.pipeline.intake_state(), {"hops_topic": self.stage.state()}

    # --- reload --------------------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP, or the files changed: the policy's ``sources`` and the log level apply at once;
        ``distributed``, ``receivers`` and the rest that is restart-only wait (logged by name)."""
        self.files.mark()
        if self.reload_pipeline():
            log.info("Configuration reloaded from %s.", self.pipeline.config_path)

    # --- lifecycle ------------------------------------------------------------------------------
    async def _health(self) -> None:
        """Once a second: the ingest queue's gauges, gRPC health as /readyz says, the loop's lag."""
        loop = asyncio.get_running_loop()
        p = self.pipeline
        while True:
            expected = loop.time() + HEALTH_SECS
            await asyncio.sleep(HEALTH_SECS)
            metrics.LOOP_LAG.observe(max(0.0, loop.time() - expected))
            p.queue.qsize()
            await p.grpc_health.update(all(v == "ok" for v in p.intake_state().values()))

    async def run(self, ready_message: bool = True) -> int:
        p = self.pipeline
        cfg = p.config
        why = self.stage.check()
        if why is not None:
            log.error("Cannot produce hops: %s", why)
            return 1
        p.start()
        p.core.start(self._health(), "health")
        runners: list[web.AppRunner] = []
        try:
            await p.listen()
            app = health.build_app(self.readiness, liveness=p.core.dead)
            p.bound["metrics"] = await serve_http(app, cfg.listen.metrics, runners)
        except OSError as exc:
            log.error("Cannot listen: %s", exc)
            await self._shutdown(runners)
            return 1
        await p.listening()
        self.after_listening()
        if ready_message:
            print_ready(p.bound, cfg)
        await p.stopped()
        log.info("Stopping: receivers first, then what they accepted is produced.")
        await self._shutdown(runners)
        return p.exit_code

    async def _shutdown(self, runners: list[web.AppRunner]) -> None:
        await self.pipeline.stop()
        for r in runners:
            await r.cleanup()


def print_ready(bound: dict[str, str], config: Config) -> None:
    d = config.distributed
    print(
        f"meshaudit {__version__} running as a receiver (distributed mode).\n"
        f"  Envoy access logs (ALS) and OTLP/gRPC -> {bound['grpc']}\n"
        f"  OTLP/HTTP                             -> http://{bound['http']}/v1/traces, /v1/logs\n"
        f"  metrics and health                    -> http://{bound['metrics']}/metrics, /healthz, /readyz\n"
        f"  hops (to the evaluators)              -> Kafka topic {d.hops_topic} on {','.join(d.bootstrap_servers)}",
        file=sys.stderr,
        flush=True,
    )


async def run_receiver(config: Config, policy: Policy, path: str | None, overrides: dict[str, str]) -> int:
    return await Receiver(config, policy, path, overrides).run()
