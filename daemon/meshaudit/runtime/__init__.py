"""``workers: N``: several processes share the listen ports (SO_REUSEPORT), so the daemon uses
more than one core.

The process started by ``meshaudit run`` becomes the **coordinator**. It reserves the ports,
starts N worker processes and owns everything that must be single: the sinks, the one
aggregator (alert windows, suppression, "one request counts once"), ``/metrics`` and
``/readyz``. Each **worker** is the daemon's receivers and rule engine on the connections the
kernel hands it (:class:`meshaudit.app.Daemon` with a :class:`WorkerLink`).

The two sidecars of one request, or a span and its access log, usually reach different workers.
The common path stays local; only decisions that need evidence another worker may hold cross
a process boundary, in batches:

- a wait that ends without local evidence (a span's access log after ``grace_ms``, a plaintext
  hop's client after ``attribution_wait_ms``) is *deferred*: the coordinator asks every other
  worker at once and returns the merged answer, then the worker decides;
- shared facts, sent at most once a second: spans are flowing (so every worker keeps indexing
  access logs), each sidecar's last access log (silent sidecars, mesh membership), edges (and
  routes) learned in ``learn`` mode;
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

Frames on the coordinator's Unix socket (a private 0700 directory) are 4-byte big-endian
lengths and pickles: both ends are this program, started by this process.
"""
