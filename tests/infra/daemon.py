"""Run ``meshaudit run`` as a subprocess on free ports, the way a user runs it, and read what a
user sees: alert lines, metrics, readiness, stderr."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import yaml

MESHAUDIT = str(Path(sys.executable).with_name("meshaudit"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def sample_sum(exposition: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` in one scrape's text; 0 when
    absent. (Two metrics read from one scrape are consistent with each other.)"""
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


class Daemon:
    """A running daemon. ``alerts()`` reads the JSON-lines sink file; ``metric()`` scrapes."""

    def __init__(
        self, workdir: Path, config: dict[str, Any], name: str = "meshaudit", args: Sequence[str] = ()
    ) -> None:
        """``args``: more of ``meshaudit run``'s arguments (``--role receiver``, ``--role evaluator``)."""
        self.workdir = workdir
        self.args = list(args)
        self.grpc = f"127.0.0.1:{free_port()}"
        self.http = f"127.0.0.1:{free_port()}"
        self.metrics_addr = f"127.0.0.1:{free_port()}"
        self.alerts_path = workdir / f"{name}-alerts.jsonl"
        self.stderr_path = workdir / f"{name}-stderr.log"
        base = {"sinks": {"jsonl": {"path": str(self.alerts_path)}}}
        self.config = deep_merge(base, config)
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_addr}"

    def start(self, timeout: float = 20.0, stdout: int = subprocess.DEVNULL) -> Daemon:
        """``stdout``: where the daemon's standard output goes (a terminal, for its text alerts)."""
        self._stderr = open(self.stderr_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                MESHAUDIT,
                "run",
                "--config",
                str(self.config_path),
                "--grpc",
                self.grpc,
                "--http",
                self.http,
                "--metrics",
                self.metrics_addr,
                *self.args,
            ],
            stdout=stdout,
            stderr=self._stderr,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"meshaudit exited with {self.proc.returncode}:\n{self.stderr()}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(self.metrics_url + "/healthz", timeout=1).read()
                return self
            time.sleep(0.05)
        raise RuntimeError(f"meshaudit did not become healthy in {timeout}s:\n{self.stderr()}")

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def alerts(self) -> list[dict[str, Any]]:
        try:
            data = self.alerts_path.read_bytes()
        except FileNotFoundError:
            return []
        return [orjson.loads(line) for line in data.splitlines() if line.strip()]

    def wait_alerts(self, pred: Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.alerts()
            if pred(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url + "/metrics", timeout=5) as r:
            return str(r.read().decode())

    def wait_metric(self, name: str, want: float, timeout: float = 6.0, **labels: str) -> float:
        """``metric`` once it equals ``want`` (metrics publish about every second), or its value
        when ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        got = self.metric(name, **labels)
        while got != want and time.monotonic() < deadline:
            time.sleep(0.1)
            got = self.metric(name, **labels)
        return got

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``; 0 when absent."""
        return sample_sum(self.scrape(), name, **labels)

    def loop_lag_over(self, secs: str) -> float:
        """Event-loop lag observations above ``secs`` so far: the count and the bucket from one
        scrape (two scrapes could straddle an observation and count one too few)."""
        text = self.scrape()
        return sample_sum(text, "meshaudit_event_loop_lag_seconds_count") - sample_sum(
            text, "meshaudit_event_loop_lag_seconds_bucket", le=secs
        )

    def readyz(self, verbose: bool = False) -> tuple[int, dict[str, Any]]:
        """/readyz ("can receive"); ``verbose`` adds each sink's state under "sinks"."""
        try:
            with urllib.request.urlopen(self.metrics_url + "/readyz" + ("?verbose" if verbose else ""), timeout=5) as r:
                return r.status, orjson.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, orjson.loads(e.read())

    def rss_mib(self) -> float:
        """The process's resident memory now (``VmRSS`` of /proc/PID/status), in MiB."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for PID {self.proc.pid}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def running(
    workdir: Path, config: dict[str, Any], name: str = "meshaudit", args: Sequence[str] = ()
) -> Iterator[Daemon]:
    d = Daemon(workdir, config, name, args)
    d.start()
    try:
        yield d
    finally:
        d.stop()
        if os.environ.get("MESHAUDIT_TEST_SHOW_STDERR"):
            print(d.stderr(), file=sys.stderr)
