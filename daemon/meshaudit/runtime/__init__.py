"""How the pipeline runs. ``meshaudit run`` picks a runner (:func:`run`); each builds the same
:class:`meshaudit.pipeline.Pipeline` (receivers -> ingest queue -> engine -> alerts) and plugs
into it through :class:`meshaudit.pipeline.Peers` and an alert outlet. The pipeline never imports
a runner.

- ``single``: one process (the default): no peers; its engine aggregates, it owns the sinks,
  ``/metrics``, ``/healthz``, ``/readyz`` and the service graph.
- ``coordinator`` + ``link``: ``workers: N``. The process started by ``meshaudit run`` becomes the
  **coordinator**. It reserves the ports, starts N worker processes that share them
  (SO_REUSEPORT) and owns everything that must be single: the sinks, the one aggregator (alert
  windows, suppression, "one request counts once"), ``/metrics`` and ``/readyz``. Each
  **worker** is the pipeline on the connections the kernel hands it, its peers a
  :class:`~meshaudit.runtime.link.WorkerLink` to the coordinator.

The two sidecars of one request, or a span and its access log, usually reach different workers.
The common path stays local; only decisions that need evidence another worker may hold cross
a process boundary, in batches (``messages``: one typed message each):

- a wait that ends without local evidence (a span's access log after ``grace_ms``, a plaintext
  hop's client after ``attribution_wait_ms``) is *deferred*: the coordinator asks every other
  worker at once and returns the merged answer, then the worker decides;
- shared facts (``Engine.facts``), sent at most once a second: spans are flowing (so every worker
  keeps indexing access logs), each sidecar's last access log (silent sidecars, mesh
  membership), edges (and routes) learned in ``learn`` mode, and the service graph's tally;
- violations go to the coordinator's aggregator; each worker's metrics are summed on
  ``/metrics``.

A failure handling one message, tick or alert is counted (``meshaudit_engine_errors_total{stage}``),
logged once per kind and skipped (``meshaudit.guard``). A worker whose engine or tick task ends
anyway exits non-zero and is started again; a coordinator task that ends fails ``/healthz``.
Each worker reports whether it can receive (engine tasks, ingest queue) once a second, and the
coordinator's ``/readyz`` combines them.

In ``learn`` mode the coordinator owns the baseline of ``unexpected_edge``: it reads the state file
(``rules.unexpected_edge.state_file``) at start, answers each worker's hello with the baseline and
whether learning is over (the worker builds its engine from it before it listens), merges what the
workers learn, ends the learning window (``learn_secs`` after the first edge a worker learned),
tells the workers, and writes the file. A worker that reloads its configuration asks again.

The distributed mode's roles plug in the same way:

- ``receiver`` (``--role receiver``): the pipeline's receivers with, instead of the engine, a stage
  of its own (``producer.HopStage``) that produces the hops to Kafka, partitioned by correlation
  key, for the evaluators. See ``runtime/receiver.py``.
- ``evaluator`` (``--role evaluator``): the distributed mode's engine tier: the pipeline without
  receivers, fed from the hops topic as a member of a Kafka consumer group; its peers are none
  (every piece of evidence about a request is in one partition). See ``runtime/evaluator.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from meshaudit.config import Config, ConfigError, Policy
from meshaudit.loading import load
from meshaudit.pipeline import with_listen
from meshaudit.receivers.sockets import raise_fd_limit
from meshaudit.runtime.common import check_id_maps, check_protobuf_backend, setup_logging


def run(config_path: str | None, overrides: dict[str, str], alerts_format: str | None = None, role: str = "all") -> int:
    """Load, validate and run; returns the process exit code (2 for a bad configuration).
    ``alerts_format``: the command line's over ``sinks.jsonl.format``. ``role``: ``all`` (receivers
    and engine in this process, or its workers), ``receiver`` or ``evaluator`` (the distributed
    mode's tiers: producing hops to Kafka, and consuming them)."""
    try:
        config, policy = load(config_path)
        config = with_listen(config, overrides)
        if alerts_format is not None:
            jsonl = config.sinks.jsonl.model_copy(update={"format": alerts_format})
            config = config.model_copy(update={"sinks": config.sinks.model_copy(update={"jsonl": jsonl})})
    except ConfigError as exc:
        print(f"meshaudit: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"meshaudit: invalid listen address: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    raise_fd_limit()
    check_protobuf_backend()
    check_id_maps()
    import uvloop

    path = str(Path(config_path).resolve()) if config_path else None
    if role == "receiver":
        from meshaudit.runtime.receiver import run_receiver

        return uvloop.run(run_receiver(config, policy, path, overrides))
    if role == "evaluator":
        from meshaudit.runtime.evaluator import run_evaluator

        return run_evaluator(config, policy, path, overrides)
    if config.workers > 1:
        from meshaudit.runtime.coordinator import Coordinator

        return uvloop.run(Coordinator(config, policy, path, overrides).run())
    return uvloop.run(_single(config, policy, path, overrides))


async def _single(config: Config, policy: Policy, path: str | None, overrides: dict[str, str]) -> int:
    from meshaudit.runtime.single import Single

    return await Single(config, policy, path, overrides).run()
