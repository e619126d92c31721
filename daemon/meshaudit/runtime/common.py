"""What every runner does the same way: logging, the process's tuning, starting the sinks,
serving HTTP, the ready message, readiness, delivering alerts, watching the configuration."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from meshaudit import __version__, metrics
from meshaudit.config import Config
from meshaudit.engine.policy import CompiledPolicy
from meshaudit.guard import ERRORS
from meshaudit.logsafe import LibraryLogLimit
from meshaudit.model import Alert
from meshaudit.receivers.auth import warn_plaintext
from meshaudit.sinks.base import FatalSinkError, Sink
from meshaudit.views.graph import MeshGraph
from meshaudit.watch import FileWatch

if TYPE_CHECKING:
    from meshaudit.engine.core import Engine
    from meshaudit.pipeline import Pipeline

log = logging.getLogger("meshaudit")


class Alone:
    """The :class:`~meshaudit.pipeline.Peers` of a runner with no peers (one process, a receiver,
    an evaluator: all the evidence it judges is its own), and its reload. Subclasses set
    ``pipeline`` and override what they do differently."""

    several = False
    baseline_shared = False
    pipeline: Pipeline
    files: FileWatch

    @property
    def bound(self) -> dict[str, str]:
        return self.pipeline.bound

    def attach(self, pipeline: Pipeline) -> None:
        pass

    def share(self, engine: Engine) -> None:
        pass

    def periodic(self, engine: Engine) -> None:
        pass

    def core_task_ended(self, name: str) -> None:
        pass  # /healthz fails: the orchestrator restarts the process

    def request_stop(self) -> None:
        self.pipeline.request_stop()

    def reload(self) -> None:
        raise NotImplementedError

    def after_listening(self) -> None:
        """Once the receivers listen (one process, a receiver): say so if they listen beyond
        loopback without TLS, tune the GC, stop on SIGTERM and SIGINT, reload on SIGHUP and
        when the configuration's files change (``files``: the runner's FileWatch)."""
        p = self.pipeline
        cfg = p.config
        loop = asyncio.get_running_loop()
        warn_plaintext({"gRPC": cfg.listen.grpc, "OTLP/HTTP": cfg.listen.http}, cfg.receivers)
        tune_gc()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if p.config_path and cfg.reload_watch_ms:
            p.core.start(watch_guarded(self.files, self.reload, cfg.reload_watch_ms / 1000), "watch")

    def reload_pipeline(self) -> bool:
        """Reload the configuration (SIGHUP, or its files changed). An invalid one changes nothing
        (False); changed restart-only keys keep their running values and are logged by name."""
        waiting = self.pipeline.reload()
        if waiting is None:
            return False
        if waiting:
            log.warning(
                "Changed keys that apply only on restart (the running values stay until then): %s", ", ".join(waiting)
            )
        metrics.CONFIG_RELOADS.labels("ok").inc()
        return True


SHUTDOWN_SECS = 10.0
LATENESS_SECS = 2.0  # plus two ticks: how long after its end a judged window takes deltas


def lateness(tick_ms: int) -> float:
    """How long after its end a per-edge window summed from several processes' counts (stage 2
    split: the evaluators, the workers) still takes their deltas."""
    return LATENESS_SECS + 2 * tick_ms / 1000


GC_THRESHOLD_0 = 20_000  # young objects between collections (CPython default: 700)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The Kafka client logs each failed attempt (every 0.1 s per connection while a broker is
    # away): sampled, once per kind per 10 s (logsafe.LibraryLogLimit).
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, LibraryLogLimit) for f in handler.filters):
            handler.addFilter(LibraryLogLimit(("aiokafka",)))


def check_protobuf_backend() -> str:
    """The upb backend is ~10x faster than pure Python; warn loudly when it is not in use."""
    from google.protobuf.internal import api_implementation

    kind = str(api_implementation.Type())
    if kind != "upb":
        log.warning(
            "protobuf is using the %r backend, not upb: decoding will be several times slower. "
            "Install protobuf from PyPI wheels (not Debian's python3-protobuf).",
            kind,
        )
    return kind


def check_id_maps() -> list[str]:
    """The correlation's id indexes keep an id's hash, not the id (engine/_fpmap.c): warn when
    the C map is not built, and when the hash seed is fixed (``PYTHONHASHSEED``), since then ids
    sent to collide (two ids one entry, a probe chain made long) can be computed in advance, as
    for any dict of the process. Returns the warnings."""
    from meshaudit.engine.fpmap import NATIVE

    out: list[str] = []
    if not NATIVE:
        out.append(
            "meshaudit's C map of the id indexes is not built (pip install builds it from _fpmap.c): "
            "a Python map stands in, slower."
        )
    seed = os.environ.get("PYTHONHASHSEED")
    if seed not in (None, "", "random"):
        out.append(
            f"PYTHONHASHSEED is fixed ({seed!r}): whoever can send request or trace ids could compute "
            "ids whose hashes collide in the correlation indexes; unset it (Python then draws a "
            "hash key at start)."
        )
    for w in out:
        log.warning(w)
    return out


def tune_gc() -> None:
    """After start-up: freeze what exists (modules, config, policy: never garbage) so no later
    collection walks it again, and collect young objects less often. Under load the daemon
    allocates a Hop per entry; with the default threshold (700) the collector runs every ~30
    messages and its full passes showed as the alert-latency tail (BENCHMARKS.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_0, 20, 10)


async def start_sinks(sinks: list[Sink]) -> bool:
    """Start every sink concurrently (a backend that is down or hangs delays start-up once, not
    once per sink); False, with the reason logged, when one cannot run at all."""
    results = await asyncio.gather(*(s.start() for s in sinks), return_exceptions=True)
    fatal = [(s, r) for s, r in zip(sinks, results, strict=True) if isinstance(r, BaseException)]
    for s, r in fatal:
        log.error("Sink %s cannot start: %s", s.name, r)
        if not isinstance(r, FatalSinkError):
            log.error("Unexpected error starting sink %s", s.name, exc_info=r)
    if fatal:
        await asyncio.gather(*(s.shutdown(time.monotonic() + 2) for s in sinks))
    return not fatal


async def serve_http(app: web.Application, addr: str, runners: list[web.AppRunner], reuse_port: bool = False) -> str:
    """Serve ``app`` on ``addr`` (HOST:PORT, port 0 for any); returns the bound HOST:PORT."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    runners.append(runner)
    host, _, port = addr.rpartition(":")
    site = web.TCPSite(runner, host, int(port), reuse_address=True, reuse_port=reuse_port or None)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or ()
    bound_port = sockets[0].getsockname()[1] if sockets else int(port)
    return f"{host}:{bound_port}"


def print_ready(bound: dict[str, str], alerts_path: str, workers: int = 1) -> None:
    out = "stdout" if alerts_path == "-" else alerts_path
    procs = f" ({workers} worker processes)" if workers > 1 else ""
    print(
        f"meshaudit {__version__} running{procs}.\n"
        f"  Envoy access logs (ALS) and OTLP/gRPC -> {bound['grpc']}\n"
        f"  OTLP/HTTP                             -> http://{bound['http']}/v1/traces, /v1/logs\n"
        f"  metrics and health                    -> http://{bound['metrics']}/metrics, /healthz, /readyz\n"
        f"  service graph                         -> http://{bound['metrics']}/graph\n"
        f"  alerts (JSON lines)                   -> {out}",
        file=sys.stderr,
        flush=True,
    )


def readiness_of(gates: dict[str, str], sinks: list[Sink]) -> tuple[dict[str, str], dict[str, str]]:
    """/readyz: what decides readiness ("can receive": receivers, engine tasks, ingest queue; each
    "ok" or why not), and each sink's state, shown only with ``?verbose``: a backend that is down
    never stops ingestion, so it must not take the daemon out of its Service either."""
    return gates, {s.name: s.ready_reason for s in sinks}


def mesh_graph(config: Config, policy: CompiledPolicy) -> MeshGraph:
    g = config.graph
    graph = MeshGraph(g.max_edges, g.history_bucket_secs, g.history_hours)
    graph.policy = policy
    return graph


def dispatch_to(sinks: list[Sink], alerts: list[Alert]) -> None:
    """Every alert to every sink; one that cannot be offered (a sink's bug, an alert that
    cannot be encoded) is counted and skipped, never the rest."""
    for a in alerts:
        metrics.ALERTS.labels(a.rule, a.severity).inc()
        for s in sinks:
            try:
                s.offer(a)
            except Exception as exc:
                ERRORS.record("dispatch", exc, f"offering a {a.rule} alert to sink {s.name}")


def watched_files(config_path: str | None, config: Config) -> list[Path]:
    """The configuration's files: a change reloads (``reload_watch_ms``)."""
    if config_path is None:
        return []
    base = Path(config_path).parent
    names = [config.policy_file] if config.policy_file else config.policy_files
    return [Path(config_path), *(base / n for n in names)]


async def watch_guarded(files: FileWatch, reload: Callable[[], None], interval: float) -> None:
    """The file watch, restarted after a failure (counted): a broken watch must not fail /healthz."""
    while True:
        try:
            await files.run(reload, interval)
        except Exception as exc:
            ERRORS.record("watch", exc, "watching the configuration files for changes")
            await asyncio.sleep(interval)
