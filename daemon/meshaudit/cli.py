"""Command line: ``meshaudit run --config FILE [--role all|receiver|evaluator]``, ``meshaudit validate FILE``,
``meshaudit baseline export --state FILE [--since WHEN]``, ``meshaudit rules [--config FILE]``
and ``meshaudit policy explain --config FILE --source X --destination Y [...]``.

Exit codes: 0 ok, 1 runtime failure (e.g. a port in use), 2 invalid configuration or usage.
``validate`` prints every error and warning of the configuration and its policy files.
``rules`` and ``policy explain`` print what ``meshaudit.introspect`` finds, as aligned text or
(``--json``) one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshaudit import __version__

if TYPE_CHECKING:
    from meshaudit.introspect import Explanation, Request, RuleAnswer, RuleView, Setting
    from meshaudit.loading import Explained, OptionOrigin
    from meshaudit.model import Identity
    from meshaudit.policyfile import Origin


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshaudit", description="Streaming live-traffic auditor for service meshes.")
    p.add_argument("--version", action="version", version=f"meshaudit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", "-c", help="YAML configuration (default: built-in defaults)")
    run.add_argument("--grpc", metavar="HOST:PORT", help="listen address for Envoy ALS and OTLP/gRPC")
    run.add_argument("--http", metavar="HOST:PORT", help="listen address for OTLP/HTTP")
    run.add_argument("--metrics", metavar="HOST:PORT", help="listen address for /metrics, /healthz, /readyz")
    run.add_argument(
        "--alerts-format",
        choices=("auto", "json", "text"),
        help="the jsonl sink's lines: json records, readable text, or auto (text on a terminal; sinks.jsonl.format)",
    )
    run.add_argument(
        "--role",
        choices=("all", "receiver", "evaluator"),
        default="all",
        help="all: receivers and engine in this process (the default); receiver: the distributed mode's "
        "receiving tier, producing hops to Kafka; evaluator: its engine tier, consuming them (distributed:)",
    )
    val = sub.add_parser("validate", help="check a configuration file and its policy, then exit")
    val.add_argument("file")
    base = sub.add_parser("baseline", help="the baseline unexpected_edge learned (learn mode, state_file)")
    base_sub = base.add_subparsers(dest="baseline_command", required=True)
    exp = base_sub.add_parser("export", help="print a learned baseline as a reviewable policy file (YAML)")
    exp.add_argument("--state", required=True, metavar="FILE", help="the state file (rules.unexpected_edge.state_file)")
    exp.add_argument(
        "--since", metavar="WHEN", help="only edges first seen at or after WHEN: YYYY-MM-DD (UTC) or RFC 3339"
    )
    rules = sub.add_parser("rules", help="every rule with its effective settings and where each came from")
    rules.add_argument("--config", "-c", help="YAML configuration (default: built-in defaults)")
    rules.add_argument("--json", action="store_true", help="one JSON document instead of text")
    rep = sub.add_parser("report", help="an audit report from a running daemon: edges, coverage, violations, health")
    rep.add_argument("--url", default="http://127.0.0.1:9464", help="the daemon's metrics address (listen.metrics)")
    rep.add_argument("--format", choices=("md", "html", "json"), default="md", help="default: md (Markdown)")
    rep.add_argument("--since", default="1h", metavar="DUR", help="how far back: 90s, 15m, 1h, 7d (default 1h)")
    rep.add_argument("--output", "-o", metavar="FILE", help="write here (default: stdout)")
    pol = sub.add_parser("policy", help="ask the policy")
    pol_sub = pol.add_subparsers(dest="policy_command", required=True)
    ex = pol_sub.add_parser("explain", help="which rule would fire on a request, and which edge or exception decides")
    ex.add_argument("--config", "-c", required=True, help="YAML configuration")
    ex.add_argument("--source", required=True, metavar="X", help="svc.ns, svc, spiffe://..., or an IP address")
    ex.add_argument("--destination", required=True, metavar="Y", help="svc.ns, svc, spiffe://..., or an IP address")
    ex.add_argument("--method", metavar="M", help="HTTP method (an HTTP request; default GET)")
    ex.add_argument("--path", metavar="P", help="HTTP path (an HTTP request; default /)")
    ex.add_argument("--protocol", choices=("http", "tcp"), help="default: http with --method or --path, else tcp")
    ex.add_argument("--port", type=_port, metavar="N", help="the destination port (edges for ports)")
    ex.add_argument("--user-agent", metavar="UA", help="the User-Agent (exceptions' user_agent)")
    ex.add_argument("--source-address", metavar="IP[:PORT]", help="where it came from (exceptions' source_cidr)")
    ex.add_argument("--status", type=_status, metavar="N", help="the response status (exceptions' response_codes)")
    ex.add_argument(
        "--tls-version",
        metavar="V",
        help="TLSv1, TLSv1.1, TLSv1.2, TLSv1.3, or plaintext: decides plaintext_hop, weak_tls",
    )
    ex.add_argument("--json", action="store_true", help="one JSON document instead of text")
    return p


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return int(text)


def _status(text: str) -> int:
    if not text.isdigit() or not 100 <= int(text) <= 599:
        raise argparse.ArgumentTypeError(f"not an HTTP status: {text!r}")
    return int(text)


def _validate(path: str) -> int:
    """Every error and warning of the configuration and its policy files; 2 on an error."""
    from meshaudit.config import ConfigError
    from meshaudit.loading import load_with_diagnostics

    try:
        config, policy, warnings = load_with_diagnostics(path)
    except ConfigError as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    for w in warnings:
        print(w, file=sys.stderr)
    rules = [name for name, r in config.rules if getattr(r, "enabled", False)]
    print(
        f"{path}: valid{f' with {len(warnings)} warning(s)' if warnings else ''}. "
        f"Rules enabled: {', '.join(rules) or 'none'}; policy: {len(policy.edges or [])} edges, "
        f"{len(policy.routes)} routes, {len(policy.exceptions) + len(policy.exemptions)} exceptions, "
        f"{len(policy.lists)} lists."
    )
    return 0


def _export(state: str, since_arg: str | None) -> int:
    from meshaudit.baseline import BaselineError, export_policy, load, parse_since

    try:
        since = parse_since(since_arg) if since_arg is not None else None
    except ValueError as exc:
        print(f"meshaudit baseline export: {exc}", file=sys.stderr)
        return 2
    try:
        b = load(state)
    except BaselineError as exc:
        print(f"meshaudit baseline export: {exc}", file=sys.stderr)
        return 2
    if b is None:
        print(f"meshaudit baseline export: {state}: no such file", file=sys.stderr)
        return 2
    sys.stdout.write(export_policy(b, state, since))
    return 0


def _load_explained(path: str | None) -> Explained | None:
    """The configuration with its provenance; None (the loader's errors printed) when invalid."""
    from meshaudit.config import ConfigError
    from meshaudit.loading import load_explained

    try:
        return load_explained(path)
    except ConfigError as exc:
        print(f"{exc}", file=sys.stderr)
        return None


class _Paths:
    """Files as the reader knows them: relative to the configuration's directory (where
    ``policy_files`` are named from), else as the loader has them."""

    def __init__(self, config_file: str | None) -> None:
        self.base = Path(config_file).resolve().parent if config_file else None

    def __call__(self, o: Origin | None) -> str:
        if o is None:
            return ""
        file = o.file
        if self.base is not None:
            rel = os.path.relpath(Path(file).resolve(), self.base)
            file = rel if not rel.startswith("..") else file
        return f"{file}:{o.line}" if o.line else file

    def option(self, o: OptionOrigin) -> str:
        if o.at is None:
            return "default"
        if o.kind == "config":
            return f"config {self(o.at)}"
        return f"policy {self(o.at)} ({o.kind}{f', over config {self(o.over)}' if o.over else ''})"


def _origin_json(o: Origin | None) -> dict[str, Any] | None:
    return None if o is None else {"file": o.file, "line": o.line}


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, list):
        return ", ".join(_text(i) for i in v)
    return str(v)


# --- meshaudit rules ---------------------------------------------------------------------------
_LONG = 40  # a value longer than this goes on lines of its own, under its option


def _rules(path: str | None, as_json: bool) -> int:
    from meshaudit.introspect import rules_view

    x = _load_explained(path)
    if x is None:
        return 2
    views = rules_view(x)
    if as_json:
        json.dump(_rules_json(x, views), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(_rules_text(x, views))
    return 0


def _rules_json(x: Explained, views: list[RuleView]) -> dict[str, Any]:
    return {
        "config": x.provenance.config_file,
        "rules": [
            {
                "rule": v.name,
                "options": [
                    {
                        "name": o.name,
                        "value": o.value,
                        "origin": o.origin.kind,
                        "at": _origin_json(o.origin.at),
                        "over_config": _origin_json(o.origin.over),
                    }
                    for o in v.options
                ],
                "destinations": [
                    {"to": d.to, "options": d.options, "at": _origin_json(d.origin)} for d in v.destinations
                ],
            }
            for v in views
        ],
    }


def _cell(name: str, value: Any) -> tuple[str, list[str]]:
    """An option's value cell, and the lines under it of a value too long for the cell (a
    list: one item a line)."""
    text = _text(value)
    if len(text) <= _LONG or not isinstance(value, list):
        return text, []
    return f"{len(value)} {'suites' if name == 'allowed_ciphers' else 'items'}:", [_text(i) for i in value]


def _rules_text(x: Explained, views: list[RuleView]) -> str:
    where = _Paths(x.provenance.config_file)
    cells = {(v.name, o.name): _cell(o.name, o.value) for v in views for o in v.options}
    name_w = max(len(o) for _, o in cells)
    value_w = max(len(text) for text, _ in cells.values())
    out = []
    if x.provenance.config_file is None:
        out.append("Rules with the built-in defaults (no --config).")
    else:
        out.append(f"Rules of {x.provenance.config_file} (files relative to its directory).")
    for v in views:
        out.append("")
        out.append(v.name)
        for o in v.options:
            text, under = cells[v.name, o.name]
            out.append(f"  {o.name:<{name_w}}  {text:<{value_w}}  {where.option(o.origin)}")
            out.extend(f"  {'':<{name_w}}    {item}" for item in under)
        for d in v.destinations:
            opts = ", ".join(f"{k} {_text(val)}" for k, val in d.options.items())
            out.append(f"  to [{', '.join(d.to)}]: {opts}  ({where(d.origin)})")
    return "\n".join(out) + "\n"


# --- meshaudit policy explain ------------------------------------------------------------------
_DECISION = {"alert": "ALERT", "allow": "allowed", "not_judged": "not judged", "disabled": "disabled"}


def _explain(args: argparse.Namespace) -> int:
    from meshaudit.introspect import Request, RequestError, explain

    x = _load_explained(args.config)
    if x is None:
        return 2
    req = Request(
        args.source, args.destination, args.method, args.path, args.protocol, args.port, args.user_agent,
        args.source_address, args.status, args.tls_version,
    )  # fmt: skip
    try:
        e = explain(x, req)
    except RequestError as exc:
        print(f"meshaudit policy explain: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(_explain_json(x, req, e), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(_explain_text(x, e))
    return 0


def _setting_json(s: Setting | None) -> dict[str, Any] | None:
    return None if s is None else {"value": s.value, "destination_override": _origin_json(s.override)}


def _explain_json(x: Explained, req: Request, e: Explanation) -> dict[str, Any]:
    def covering(a: RuleAnswer, expired: bool) -> dict[str, Any] | None:
        c = a.expired if expired else a.exception
        if c is None:
            return None
        return {"name": c.name, "reason": c.reason, "at": _origin_json(c.origin), "expires": _text(c.expires)}

    return {
        "config": x.provenance.config_file,
        "request": {
            "source": e.source.to_json(), "destination": e.destination.to_json(), "protocol": e.protocol,
            "method": e.method, "path": e.path, "port": e.port, "user_agent": req.user_agent,
            "source_address": req.source_address, "status": req.status, "tls_version": e.tls_version,
        },
        "rules": [
            {
                "rule": a.rule, "decision": a.decision, "why": a.why, "decided_by": _origin_json(a.decided_by),
                "related": [{"what": r.what, "at": _origin_json(r.origin)} for r in a.related],
                "severity": _setting_json(a.severity),
                "severity_when_served": _setting_json(a.severity_when_served),
                "exception": covering(a, False), "expired_exception": covering(a, True),
            }
            for a in e.answers
        ],
        "notes": e.notes,
        "verdict": e.verdict,
    }  # fmt: skip


def _party(i: Identity) -> str:
    names = [
        f"{k} {v}"
        for k, v in (("service", i.service), ("namespace", i.namespace), ("principal", i.principal),
                     ("address", i.address))
        if v
    ]  # fmt: skip
    return ", ".join(names) or "no name"


def _explain_text(x: Explained, e: Explanation) -> str:
    where = _Paths(x.provenance.config_file)
    what = f"{e.method} {e.path}" if e.method is not None else "TCP connection"
    if e.port is not None:
        what += f" to port {e.port}"
    if e.tls_version is not None:
        what += " in plaintext" if e.tls_version == "plaintext" else f" over {e.tls_version}"
    out = [
        f"{what} from {e.source.key} to {e.destination.key}",
        f"  configuration  {x.provenance.config_file} (files below are relative to its directory)",
        f"  source         {e.source.key} ({_party(e.source)})",
        f"  destination    {e.destination.key} ({_party(e.destination)})",
    ]
    decided = [a for a in e.answers if a.decision != "depends"]
    depends = [a for a in e.answers if a.decision == "depends"]
    rule_w = max(len(a.rule) for a in e.answers)
    if decided:
        out += ["", "Decided by the policy:"]
        label_w = max(len(_DECISION.get(a.decision, a.decision)) for a in decided)
        for a in decided:
            out += _answer_lines(a, f"{a.rule:<{rule_w}}  {_DECISION.get(a.decision, a.decision):<{label_w}}", where)
    if depends:
        out += ["", "Depending on how it is made and answered:"]
        for a in depends:
            out += _answer_lines(a, f"{a.rule:<{rule_w}}", where)
    out.append("")
    out += [f"note: {n}" for n in e.notes]
    out.append(f"verdict: {e.verdict}")
    return "\n".join(out) + "\n"


_WIDTH = 110


def _answer_lines(a: RuleAnswer, head: str, where: _Paths) -> list[str]:
    """One rule's answer: the head and why, then what bears on it, each wrapped under the why."""
    indent = " " * (2 + len(head) + 2)
    why = a.why + (f" ({where(a.decided_by)})" if a.decided_by is not None else "")
    texts = [why]
    texts += [f"{r.what} ({where(r.origin)})" for r in a.related]
    if a.severity is not None:  # a rule that alerts, or may: at what severity, and covered?
        severity = _severity_text(a.severity, a.severity_when_served, where)
        if a.decision == "alert":  # what a reviewer acts on: one line each
            texts += [severity, _exception_text(a, where)]
        else:
            texts.append(f"{severity}; {_exception_text(a, where)}")
    out: list[str] = []
    for i, t in enumerate(texts):
        first = f"  {head}  " if i == 0 else indent
        out += textwrap.wrap(t, _WIDTH, initial_indent=first, subsequent_indent=indent + "  ", break_on_hyphens=False)
    return out


def _severity_text(severity: Setting, served: Setting | None, where: _Paths) -> str:
    """The severity for this destination; a destination override that set it is named once."""
    overrides = {s.override for s in (severity, served) if s is not None and s.override is not None}

    def one(s: Setting) -> str:
        return f"{s.value} (override {where(s.override)} for this destination)" if s.override else str(s.value)

    if served is None:
        return f"severity {one(severity)}"
    if len(overrides) == 1 and severity.override == served.override:
        return f"severity {severity.value} if the mesh denies it, {served.value} if served " + (
            f"(override {where(severity.override)} for this destination)"
        )
    return f"severity {one(severity)} if the mesh denies it, {one(served)} if served"


def _exception_text(a: RuleAnswer, where: _Paths) -> str:
    c = a.exception
    if c is not None:
        until = f", until {c.expires}" if c.expires else ""
        return f"covered by exception {c.name} ({where(c.origin)}{until}): {c.reason}"
    if a.expired is not None:
        x = a.expired
        return f"no exception covers it: {x.name} ({where(x.origin)}) would, but it expired on {x.expires}"
    return "no exception covers it"


def _report(url: str, fmt: str, since: str, output: str | None) -> int:
    from meshaudit.views import report

    try:
        body = report.render(report.build(url, since), fmt)
    except (report.ReportError, ValueError) as exc:
        print(f"meshaudit report: {exc}", file=sys.stderr)
        return 2
    if output:
        with open(output, "wb") as f:
            f.write(body)
    else:
        sys.stdout.buffer.write(body)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "baseline":
        return _export(args.state, args.since)
    if args.command == "validate":
        return _validate(args.file)
    if args.command == "rules":
        return _rules(args.config, args.json)
    if args.command == "policy":
        return _explain(args)
    if args.command == "report":
        return _report(args.url, args.format, args.since, args.output)
    from meshaudit.runtime import run

    overrides = {k: v for k in ("grpc", "http", "metrics") if (v := getattr(args, k))}
    return run(args.config, overrides, args.alerts_format, args.role)


if __name__ == "__main__":
    sys.exit(main())
