"""A real Prometheus server (Debian's ``prometheus``) scraping a daemon every second and
evaluating rule files, bound to 127.0.0.1; stopped by PID."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from infra.daemon import free_port


class Prometheus:
    def __init__(self, workdir: Path, target: str, rule_files: list[Path]) -> None:
        exe = shutil.which("prometheus")
        assert exe, "prometheus is missing: `make tools` installs Debian's prometheus package"
        self.addr = f"127.0.0.1:{free_port()}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "meshaudit", "static_configs": [{"targets": [target]}]}],
        }
        cfg = workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                exe,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={workdir / 'prometheus-data'}",
                f"--web.listen-address={self.addr}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=self.log,
        )

    def api(self, path: str, **params: str) -> Any:
        url = f"http://{self.addr}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def wait(self, pred: Any, timeout: float = 30.0) -> Any:
        """The first truthy ``pred()`` (API errors while starting count as not yet)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, AssertionError, KeyError):
                got = pred()
                if got:
                    return got
            time.sleep(0.25)
        return pred()

    def firing(self) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["state"] == "firing"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def prometheus(workdir: Path, target: str, rule_files: list[Path]) -> Iterator[Prometheus]:
    p = Prometheus(workdir, target, rule_files)
    try:
        yield p
    finally:
        p.stop()
