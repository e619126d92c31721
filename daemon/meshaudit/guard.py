"""Keeping the daemon's core loops alive.

Nothing that goes wrong in one batch, tick, alert or peer message may end the task that runs
them: :class:`ErrorLog` counts the failure (``meshaudit_engine_errors_total{stage}``), logs the
first of each kind (stage and exception type) with its traceback and later ones not at all, and
the caller skips that piece of work and goes on.

If a core task ends anyway (an exception that is not an ``Exception``), :class:`CoreTasks` notes
it: ``/healthz`` then answers 503 naming the task, so Kubernetes restarts the pod, and the
daemon still stops cleanly (exit 0, sinks flushed) on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final

from meshaudit import metrics

log = logging.getLogger("meshaudit")

_MAX_KINDS: Final = 256  # stages x exception types: few, but bound the table anyway


class ErrorLog:
    """Failures caught in a core loop: each counted; the first of each kind logged."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self.logger = logger
        self._seen: set[tuple[str, str]] = set()

    def record(self, stage: str, exc: BaseException, what: str = "") -> None:
        metrics.ENGINE_ERRORS.labels(stage).inc()
        kind = (stage, type(exc).__qualname__)
        if kind in self._seen:
            return
        if len(self._seen) < _MAX_KINDS:
            self._seen.add(kind)
        self.logger.error(
            "%s failed with %s%s; skipped, and the daemon goes on. Later %s failures in stage %r are "
            "counted in meshaudit_engine_errors_total{stage=%r}, not logged.",
            stage.capitalize(),
            type(exc).__qualname__,
            f" ({what})" if what else "",
            type(exc).__qualname__,
            stage,
            stage,
            exc_info=exc,
        )


ERRORS: Final = ErrorLog()


class CoreTasks:
    """The tasks a process cannot work without (engine loop, tick loop, ...). One that ends
    before ``stop`` is reported by :meth:`dead` (and so by ``/healthz``) and logged once."""

    def __init__(self, on_death: Callable[[str], None] | None = None) -> None:
        self.tasks: list[asyncio.Task[None]] = []
        self._dead: dict[str, str] = {}
        self._stopping = False
        self._on_death = on_death

    def start(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        t = asyncio.create_task(coro, name=name)
        t.add_done_callback(self._done)
        self.tasks.append(t)
        return t

    def _done(self, t: asyncio.Task[None]) -> None:
        if self._stopping:
            if not t.cancelled():
                t.exception()  # retrieved: no "never retrieved" noise at exit
            return
        name = t.get_name()
        exc = None if t.cancelled() else t.exception()
        why = "cancelled" if t.cancelled() else type(exc).__qualname__ if exc is not None else "returned"
        self._dead[name] = why
        log.critical(
            "Core task %r stopped (%s): /healthz now fails so the process is restarted.", name, why, exc_info=exc
        )
        if self._on_death is not None:
            self._on_death(name)

    def dead(self) -> dict[str, str]:
        """Task name -> how it ended, for the core tasks that ended while the process runs."""
        return {f"task:{k}": f"stopped ({v})" for k, v in self._dead.items()}

    async def stop(self) -> None:
        """Cancel every task and wait for them; a task that failed does not fail the stop."""
        self._stopping = True
        for t in self.tasks:
            t.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks)
