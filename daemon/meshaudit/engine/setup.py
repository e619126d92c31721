"""The engine with the registered rules: what the daemon runs (tests may pass other rules)."""

from __future__ import annotations

from meshaudit.config import Config, Policy
from meshaudit.engine.core import Engine
from meshaudit.engine.rules import REGISTRY


def build_engine(config: Config, policy: Policy, peers: bool = False, baseline_shared: bool = False) -> Engine:
    return Engine(config, policy, REGISTRY, peers, baseline_shared)
