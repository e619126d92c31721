"""meshlab: a loopback service mesh of real Envoy sidecars for meshaudit's end-to-end tests
and ``make demo``.

What it owns (its CA and SPIFFE certificates come from :mod:`infra.pki`): Istio-like
Envoy bootstrap generation (:mod:`meshlab.envoy`), tiny HTTP/TCP apps, some traced with the
OpenTelemetry SDK (:mod:`meshlab.app`), process management that stops only what it started, by
PID (:mod:`meshlab.procs`), and the mesh itself with traffic helpers (:mod:`meshlab.mesh`).
Everything binds 127.0.0.1 on free ports; nothing is written outside the run directory.
"""
