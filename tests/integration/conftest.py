from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from infra.daemon import Daemon, running

POLICY: dict[str, Any] = {
    "mesh_services": ["frontend.default", "reviews.default", "ratings.default"],
    "edges": [
        {"from": ["frontend.default"], "to": ["reviews.default"]},
        {"from": ["reviews.default"], "to": ["ratings.default"]},
    ],
    "routes": [{"to": ["reviews.default"], "allow": [{"methods": ["GET"], "paths": ["/reviews/*"]}]}],
    "exemptions": [{"rules": ["plaintext_hop", "unexpected_path"], "paths": ["/healthz"], "reason": "probes"}],
}

CONFIG: dict[str, Any] = {
    "engine": {"tick_ms": 50},
    "rules": {
        "missing_access_log": {"grace_ms": 1000, "silent_secs": 2},
        "plaintext_hop": {"attribution_wait_ms": 500},
    },
    "policy": POLICY,
}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running(tmp_path, CONFIG) as d:
        yield d


@pytest.fixture
def evaluators() -> Iterator[list[Daemon]]:
    """Evaluators (``--role evaluator``) a test started (``test_role_evaluator.start_evaluator``);
    every one stopped at teardown."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()
