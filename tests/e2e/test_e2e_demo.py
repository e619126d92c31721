"""``make demo`` as a user runs it: ``python -m meshlab.demo`` from the clone, read from its
standard output. Every rule the daemon has shows among the alert lines (log_source_mismatch from
the forged sidecar, over the receivers' mutual TLS, with the others); the printed graph address
serves the live service graph while the demo runs; Ctrl-C (SIGINT) stops it cleanly, and before
the daemon stops the audit report is written where the demo says.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from meshlab.procs import wait_until
from meshlab.scenarios import known_rules

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0  # the daemon and twelve apps and Envoys, on a shared two-core machine
# The last alert to come is the silent sidecar's: silenced 6 s into the traffic, reported 5 s later.
ALL_RULES_TIMEOUT = 45.0
STOP_TIMEOUT = 60.0
FORGER = "spiffe://cluster.local/ns/default/sa/forger"
ALERT_LINE = re.compile(r"^  \+ *[\d.]+s  \S+ \[ *\w+\] (\w+) ")


class Output:
    """The demo's standard output, line by line, read as it comes."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    def field(self, name: str) -> str | None:
        """The value of a header line ``  <name>   <value>``."""
        for line in list(self.lines):
            m = re.match(rf"^  {name} +(\S.*)$", line)
            if m:
                return m.group(1)
        return None

    def alert_rules(self) -> set[str]:
        """The rules of the alert lines so far (``  + 0.6s  <time> [severity] <rule> ...``)."""
        return {m.group(1) for line in list(self.lines) if (m := ALERT_LINE.match(line))}

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def test_demo_shows_every_rule_serves_the_graph_and_writes_the_report(tmp_path: Path) -> None:
    env = {**os.environ, "DEMO_SECS": "120", "DEMO_DIR": str(tmp_path), "PYTHONPATH": "tests:tests/e2e"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlab.demo"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = Output(proc)
    try:
        assert wait_until(lambda: "Alerts as they arrive" in out.text() or proc.poll() is not None, START_TIMEOUT), (
            out.text()
        )
        assert proc.poll() is None, out.text()
        graph = out.field("graph")
        assert graph is not None, out.text()
        graph_url = graph.split()[0]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/graph", graph_url), graph
        assert "mutual TLS" in (out.field("daemon") or ""), out.text()
        assert "log_source_mismatch" in (out.field("rules") or ""), out.text()

        rules = known_rules()
        assert wait_until(lambda: rules <= out.alert_rules() or proc.poll() is not None, ALL_RULES_TIMEOUT, 0.2), (
            f"no alert line yet for {sorted(rules - out.alert_rules())}:\n{out.text()}"
        )
        # The printed address serves the live graph, with the mesh's services drawn, while it runs.
        with urllib.request.urlopen(graph_url, timeout=10) as r:
            assert r.status == 200
            assert r.headers.get_content_type() == "text/html"
            page = r.read().decode()
        assert "<svg" in page
        assert "ratings.default" in page and "checkout.default" in page
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: the demo stops its traffic, mesh and daemon
        try:
            rc = proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        out.join(5)
        assert proc.stdout is not None
        proc.stdout.close()
    text = out.text()
    assert rc == 0, text
    assert out.lines[-1] == "Stopped.", text

    # The forged sidecar's alert: named after its certificate's identity and the node it claimed.
    [forged] = [line for line in out.lines if "] log_source_mismatch " in line]
    assert "[critical] log_source_mismatch forger.default -> ratings.default" in forged, forged
    assert f"data from {FORGER} (client certificate) claimed" in forged, forged
    # Every rule in the summary, and no traffic step failed (mTLS to the daemon broke nothing).
    summary = out.field("alerts by rule:")
    assert summary is not None, text
    by_rule = ast.literal_eval(summary)
    assert set(by_rule) == set(rules), by_rule
    assert by_rule["log_source_mismatch"] == 1, by_rule
    steps = out.field("traffic steps:")
    assert steps is not None and re.fullmatch(r"\d+ ok, 0 failed", steps), text

    # The report was written while the daemon was up, where the demo says.
    report = out.field("report")
    assert report is not None, text
    html_path, md_path = (Path(p) for p in re.findall(r"(\S+/report\.(?:html|md))", report))
    assert html_path.parent.parent == tmp_path.resolve(), report
    md = md_path.read_text()
    assert "- Audit complete: yes" in md, md
    assert "**log_source_mismatch**: 1. Top offenders: forger.default -> ratings.default (1)" in md, md
    assert "log_source_mismatch" in html_path.read_text()
    # ... and the daemon is gone: the graph address no longer answers.
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(graph_url, timeout=2).read()
