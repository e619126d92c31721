"""Rule registry: adding a rule is one module and one line here."""

from __future__ import annotations

from meshaudit.engine.core import EngineContext, Rule
from meshaudit.engine.rules.missing_access_log import MissingAccessLog
from meshaudit.engine.rules.plaintext_hop import PlaintextHop
from meshaudit.engine.rules.unexpected import UnexpectedEdge, UnexpectedPath

REGISTRY: dict[str, type] = {
    "plaintext_hop": PlaintextHop,
    "unexpected_edge": UnexpectedEdge,
    "unexpected_path": UnexpectedPath,
    "missing_access_log": MissingAccessLog,
}


def build_rules(ctx: EngineContext) -> list[Rule]:
    rules: list[Rule] = []
    for name, cls in REGISTRY.items():
        if getattr(ctx.config.rules, name).enabled:
            rules.append(cls(ctx))
    return rules
