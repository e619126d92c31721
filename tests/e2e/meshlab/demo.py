"""``make demo``: the meshaudit daemon auditing a live loopback mesh of real Envoy sidecars.

Starts the daemon with its receivers on mutual TLS (client certificates from the mesh's throwaway
CA), the mesh (twelve services, each an app plus an Envoy sidecar streaming to the daemon over
mTLS with its workload certificate; one of them forged: it claims ratings' node) and a traffic
generator that mixes good traffic with every kind of violation, then prints each alert as one
line as it arrives. The traffic of every scenario runs, also for rules this daemon does not
have yet (it says which): their alerts show up once the rules are merged. It prints the live
service graph's address at start and, before the daemon stops, writes the audit report
(``meshaudit report``, HTML and Markdown) into the run directory. Stops everything (by PID) on
Ctrl-C, SIGTERM, or after ``DEMO_SECS`` seconds (default 60; 0 runs until interrupted). Run
files go to ``var/demo/<time>/`` (``DEMO_DIR`` instead of ``var/demo``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from infra.daemon import MESHAUDIT, Daemon  # type: ignore[import-not-found,unused-ignore]  # see meshlab.envoy
from infra.pki import CertificateAuthority  # type: ignore[import-not-found,unused-ignore]  # see meshlab.envoy

from meshlab import scenarios as sc
from meshlab.mesh import DAEMON_SPIFFE, Mesh, daemon_tls

REPO = Path(__file__).resolve().parents[3]
SILENT_SECS = 5
SILENCE_AT_SECS = 6.0  # inventory's sidecar stops logging this long into the demo


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _shown(path: Path) -> str:
    """A path as the user can type it: relative to the working directory (the clone, under
    ``make demo``) when it is inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class Traffic(threading.Thread):
    """Good traffic to every service, and each violation, about once a second each."""

    def __init__(self, mesh: Mesh, stop: threading.Event) -> None:
        super().__init__(name="traffic", daemon=True)
        self.mesh = mesh
        self.stop = stop
        self.requests = 0
        self.errors = 0

    def _step(self, what: str, fn: Any) -> None:
        if self.stop.is_set():
            return
        try:
            fn()
            self.requests += 1
        except Exception as exc:  # the generator keeps going; the count shows on exit
            self.errors += 1
            if self.errors <= 3:
                _say(f"  (traffic: {what} failed: {exc})")

    def run(self) -> None:
        m = self.mesh
        started = time.monotonic()
        silenced = False
        while not self.stop.is_set():
            # good traffic: mTLS, allowed edges and paths, probes on /healthz
            self._step("good", lambda: m.call("frontend", "reviews", "/reviews/1", count=2))
            self._step("good", lambda: m.call("reviews", "ratings", "/ratings/1"))
            self._step("probe", lambda: m.probe("reviews", "/healthz"))
            self._step("inventory", lambda: m.call("frontend", "inventory", "/inventory/1"))
            # violations
            self._step("plaintext", lambda: m.call("frontend", "ratings", "/ratings/2"))
            self._step("edge", lambda: m.call("frontend", "details", "/details/1"))
            self._step("path", lambda: m.call("reviews", "ratings", "/admin/reset", method="DELETE"))
            self._step("bypass", lambda: m.call("frontend", "reviews", "/reviews/2", via="direct"))
            self._step("tcp", lambda: m.tcp("reviews", "db", "SELECT 1"))
            # violations for the newer rules (weak_tls, identity_mismatch, excessive_retries,
            # error_burst, route_mismatch, authz_denied) and RBAC enforcement of forbidden edges
            self._step("weak tls", lambda: m.call("checkout", "payments", "/payments/1"))
            self._step("stolen cert", lambda: m.call("impostor", "ratings", "/ratings/9"))
            self._step("retries", lambda: m.call("checkout", "orders", "/orders/status/503"))
            self._step("500s", lambda: m.call("frontend", "orders", "/orders/status/500", count=2))
            self._step("no route", lambda: m.call("checkout", "catalog", "/admin/debug"))
            self._step("unknown host", lambda: m.call("checkout", "billing", "/billing/1"))
            self._step("rbac", lambda: m.call("checkout", "catalog", "/catalog/internal/keys"))
            self._step("tcp rbac", lambda: m.tcp("checkout", "db", "SELECT 2"))
            self._step("blocked edge", lambda: m.call("checkout", "details", "/details/1"))
            self._step("served edge", lambda: m.call("checkout", "ratings", "/ratings/3"))
            # log_source_mismatch: forger's sidecar, which claims ratings' node, logs a probe
            self._step("forged sidecar", lambda: m.probe("forger", "/healthz"))
            if not silenced and time.monotonic() - started >= SILENCE_AT_SECS:
                self._step("silence", lambda: m.envoy("inventory").silence_access_logs())
                silenced = True
                _say("  -- inventory's sidecar stops sending access logs now (it keeps serving) --")
            self.stop.wait(0.5)


def main() -> int:
    demo_secs = float(os.environ.get("DEMO_SECS", "60"))
    run_dir = Path(os.environ.get("DEMO_DIR") or REPO / "var" / "demo").resolve() / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    _say("meshaudit demo: a loopback mesh of real Envoy sidecars, audited live.")
    # The receivers on mutual TLS with the mesh CA as client CA, as in a cluster with Istio's root:
    # each access-log stream and OTLP export then has a sender (its certificate's SPIFFE id), which
    # is what log_source_mismatch judges its claims by.
    ca = CertificateAuthority(run_dir / "pki")
    config = {**sc.daemon_config(suppress_secs=300, silent_secs=SILENT_SECS), "receivers": {"tls": daemon_tls(ca)}}
    daemon = Daemon(run_dir, config, name="meshaudit")
    mesh: Mesh | None = None
    traffic: Traffic | None = None
    shown = 0
    try:
        daemon.start()
        grpc_port = int(daemon.grpc.rsplit(":", 1)[1])
        http_port = int(daemon.http.rsplit(":", 1)[1])
        mesh = Mesh(run_dir / "mesh", grpc_port, http_port, ca=ca, collector_spiffe=DAEMON_SPIFFE).start()
        _say(f"  daemon      ALS + OTLP/gRPC {daemon.grpc}, OTLP/HTTP https://{daemon.http}, mutual TLS")
        _say(f"  metrics     {daemon.metrics_url}/metrics   (also /healthz, /readyz)")
        _say(f"  graph       {daemon.metrics_url}/graph   (the live service graph; a report is written at the end)")
        _say(f"  alerts      {_shown(daemon.alerts_path)}")
        _say(
            f"  mesh        {', '.join(mesh.services)} ({len(mesh.envoys)} Envoy sidecars, mTLS with SPIFFE ids, "
            "streaming to the daemon over mTLS with their own certificates)"
        )
        _say(f"  run files   {_shown(run_dir)}")
        _say(
            "  traffic     good mTLS calls and probes, plus: plaintext HTTP and TCP, an edge and a path "
            "outside policy, an app port called directly, a sidecar that goes silent, TLS 1.2 with a CBC "
            "suite, a stolen certificate, retries and 500s from a failing upstream, a path with no route "
            "and a host outside the registry, RBAC denials, forbidden edges RBAC blocks or not, and a "
            "sidecar that claims to be another service's"
        )
        known = sc.known_rules()
        _say(f"  rules       {', '.join(sorted(known))}")
        waiting = sorted(sc.NEW_RULE_OPTIONS.keys() - known)
        if waiting:
            _say(f"              (not in this daemon yet, their traffic runs anyway: {', '.join(waiting)})")
        until = "Ctrl-C" if demo_secs <= 0 else f"Ctrl-C or {demo_secs:g} s"
        _say(f"\nAlerts as they arrive (stops on {until}):")
        traffic = Traffic(mesh, stop)
        traffic.start()
        t0 = time.monotonic()
        while not stop.is_set():
            alerts = daemon.alerts()
            for a in alerts[shown:]:
                _say(f"  +{time.monotonic() - t0:5.1f}s  {sc.one_line(a)}")
            shown = len(alerts)
            if demo_secs > 0 and time.monotonic() - t0 >= demo_secs:
                break
            if mesh.dead():
                _say(f"  processes exited: {mesh.dead()}; stopping")
                break
            stop.wait(0.2)
    finally:
        stop.set()
        _say("\nStopping: traffic, then the mesh, then the daemon.")
        if traffic is not None:
            traffic.join(10)
        if mesh is not None:
            _summary(daemon, mesh, traffic)
            mesh.stop()
        if daemon.proc is not None and daemon.proc.poll() is None:
            _report(daemon, run_dir)
        daemon.stop()
        _say("Stopped.")
    return 0


def _summary(daemon: Daemon, mesh: Mesh, traffic: Traffic | None) -> None:
    try:
        alerts = daemon.alerts()
        by_rule = Counter(a["rule"] for a in alerts)
        _say(f"  alerts by rule: {dict(sorted(by_rule.items())) or 'none'}")
        stats = mesh.wait_access_logs_stable(quiet_secs=0.5, timeout=3.0)  # last flushes land
        _say(
            "  Envoy access logs (written/flushed/dropped): "
            + ", ".join(f"{k} {s.written}/{s.flushed}/{s.dropped}" for k, s in stats.items())
        )
        received = daemon.metric("meshaudit_received_total", receiver="envoy_als")
        spans = daemon.metric("meshaudit_received_total", kind="span")
        _say(f"  daemon received {received:g} access-log entries and {spans:g} spans")
        if traffic is not None:
            _say(f"  traffic steps: {traffic.requests} ok, {traffic.errors} failed")
    except OSError as exc:
        _say(f"  (summary unavailable: {exc})")


def _report(daemon: Daemon, run_dir: Path) -> None:
    """The audit report of the run, written by ``meshaudit report`` while the daemon is still up:
    the demo stops it right after, so a command to run later would find nothing to ask."""
    written: list[str] = []
    for fmt in ("html", "md"):
        out = run_dir / f"report.{fmt}"
        cmd = [MESHAUDIT, "report", "--url", daemon.metrics_url, "--format", fmt, "-o", str(out)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            _say(f"  (report unavailable: {exc})")
            return
        if r.returncode != 0:
            _say(f"  (report unavailable: {r.stderr.strip()})")
            return
        written.append(_shown(out))
    _say(f"  report      {' and '.join(written)}   (meshaudit report --url {daemon.metrics_url})")


if __name__ == "__main__":
    sys.exit(main())
