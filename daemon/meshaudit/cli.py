"""Command line: ``meshaudit run --config FILE`` and ``meshaudit validate FILE``.

Exit codes: 0 ok, 1 runtime failure (e.g. a port in use), 2 invalid configuration or usage.
``validate`` prints every error and warning of the configuration and its policy files.
"""

from __future__ import annotations

import argparse
import sys

from meshaudit import __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshaudit", description="Streaming live-traffic auditor for service meshes.")
    p.add_argument("--version", action="version", version=f"meshaudit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", "-c", help="YAML configuration (default: built-in defaults)")
    run.add_argument("--grpc", metavar="HOST:PORT", help="listen address for Envoy ALS and OTLP/gRPC")
    run.add_argument("--http", metavar="HOST:PORT", help="listen address for OTLP/HTTP")
    run.add_argument("--metrics", metavar="HOST:PORT", help="listen address for /metrics, /healthz, /readyz")
    val = sub.add_parser("validate", help="check a configuration file and its policy, then exit")
    val.add_argument("file")
    return p


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return _validate(args.file)
    from meshaudit.app import run

    overrides = {k: v for k in ("grpc", "http", "metrics") if (v := getattr(args, k))}
    return run(args.config, overrides)


if __name__ == "__main__":
    sys.exit(main())
