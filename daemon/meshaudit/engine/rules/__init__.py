"""Rule registry: adding a rule is one module and one line here. The configuration
(``rules.<name>``), the rule names exemptions accept and the alert summaries all derive from it."""

from __future__ import annotations

from typing import Any

from meshaudit.engine.api import Rule
from meshaudit.engine.rules.authz_denied import AuthzDenied
from meshaudit.engine.rules.error_burst import ErrorBurst
from meshaudit.engine.rules.excessive_retries import ExcessiveRetries
from meshaudit.engine.rules.identity_mismatch import IdentityMismatch
from meshaudit.engine.rules.log_source_mismatch import LogSourceMismatch
from meshaudit.engine.rules.missing_access_log import MissingAccessLog
from meshaudit.engine.rules.plaintext_hop import PlaintextHop
from meshaudit.engine.rules.route_mismatch import RouteMismatch
from meshaudit.engine.rules.unexpected_edge import UnexpectedEdge
from meshaudit.engine.rules.unexpected_path import UnexpectedPath
from meshaudit.engine.rules.weak_tls import WeakTls

REGISTRY: tuple[type[Rule[Any]], ...] = (
    PlaintextHop,
    UnexpectedEdge,
    UnexpectedPath,
    MissingAccessLog,
    RouteMismatch,
    AuthzDenied,
    WeakTls,
    IdentityMismatch,
    ExcessiveRetries,
    ErrorBurst,
    LogSourceMismatch,
)

RULE_NAMES: frozenset[str] = frozenset(r.name for r in REGISTRY)
SUMMARIES: dict[str, str] = {r.name: r.summary for r in REGISTRY}
