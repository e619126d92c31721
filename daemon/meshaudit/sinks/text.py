"""An alert as one line a person reads on a terminal: time, severity, rule, source ->
destination, how many, and one example (or the detail). The JSON record stays the interface for
machines (pipes, files, brokers); this form is for eyes (``sinks.jsonl.format``)."""

from __future__ import annotations

from typing import Any, Final

from meshaudit.engine.rules import REGISTRY

# ANSI colours by severity, used only on a terminal
_COLOURS = {"critical": "\x1b[1;31m", "high": "\x1b[31m", "warning": "\x1b[33m", "info": "\x1b[36m"}
_RESET = "\x1b[0m"
# The rule column fits every rule's name, so the parties line up under each other.
RULE_WIDTH: Final = max(len(r.name) for r in REGISTRY)


def party(p: dict[str, Any]) -> str:
    """A party as the alert names it: ``service.namespace``, else its SPIFFE id, else its address."""
    if p.get("service"):
        return f"{p['service']}.{p['namespace']}" if p.get("namespace") else str(p["service"])
    return str(p.get("principal") or p.get("address") or "unknown")


def readable(alert: dict[str, Any], colour: bool = False) -> str:
    """One line: ``07:55:52Z [critical] identity_mismatch ratings.default -> reviews.default x3
    e.g. GET /reviews/1 (trace 4bf92f3577b34da6)``."""
    ev = alert.get("evidence") or {}
    examples = ev.get("examples") or []
    if examples:
        ex = examples[0]
        what = " ".join(x for x in (ex.get("method"), ex.get("path")) if x) or "a TCP connection"
        ids = ex.get("trace_id") or ex.get("request_id") or ""
        tail = f"  e.g. {what}" + (f" (trace {ids[:16]})" if ids else "")
    else:
        tail = f"  ({ev['detail']})" if ev.get("detail") else ""
    severity = str(alert.get("severity", "?"))
    tag = f"[{severity:>8}]"
    if colour and severity in _COLOURS:
        tag = f"{_COLOURS[severity]}{tag}{_RESET}"
    emitted = alert.get("emitted_at")  # RFC 3339, UTC: its time of day
    clock = f"{emitted[11:19]}Z " if isinstance(emitted, str) and len(emitted) >= 19 else ""
    return (
        f"{clock}{tag} {alert.get('rule', '?'):<{RULE_WIDTH}} {party(alert.get('source') or {})} -> "
        f"{party(alert.get('destination') or {})}  x{ev.get('count', 1)}{tail}"
    )
