"""Real headless Chromium (Debian's ``chromium``) rendering a page: the DOM after its scripts ran
(``--dump-dom``) and a screenshot. Started per call with a fresh profile; every flag that makes
it reach the network on its own is off (this machine's network is closed, and a test must not
depend on it)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",  # root in the test container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    assert exe, "chromium is missing: `make tools` installs Debian's chromium package"
    with tempfile.TemporaryDirectory(prefix="meshaudit-chromium-") as profile:
        return subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def dump_dom(url: str, wait_ms: int = 2000, timeout: float = 60.0) -> str:
    """The page's DOM after ``wait_ms`` of its own (virtual) time: scripts have run."""
    r = _run([f"--virtual-time-budget={wait_ms}", "--dump-dom", url], timeout)
    assert r.returncode == 0 and r.stdout, f"chromium failed ({r.returncode}): {r.stderr[-2000:]}"
    return r.stdout


def screenshot(url: str, out: Path, size: str = "1400,900", timeout: float = 60.0) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    r = _run([f"--window-size={size}", "--virtual-time-budget=1500", f"--screenshot={out}", url], timeout)
    assert out.exists() and out.stat().st_size > 1000, f"no screenshot ({r.returncode}): {r.stderr[-2000:]}"
    return out


class Elements(HTMLParser):
    """Every element's tag and attributes, in document order (what the tests look for)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, {k: v or "" for k, v in attrs}))

    def all(self, tag: str, **having: str) -> list[dict[str, str]]:
        """Elements ``tag`` whose attributes include ``having`` (``class_`` is ``class``; other
        underscores read as dashes)."""
        want = {k.rstrip("_").replace("_", "-"): v for k, v in having.items()}
        return [a for t, a in self.found if t == tag and all(a.get(k) == v for k, v in want.items())]
