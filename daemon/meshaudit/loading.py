"""Loading a configuration file and its policy: every error names the file, the line and the key.

``load(path)`` returns (config, policy) or raises :class:`meshaudit.config.ConfigError` whose
message is ready to print; ``load_with_diagnostics`` also returns the policy's warnings (for
``meshaudit validate``, which prints every error and warning, not only the first);
``load_explained`` also says where every setting and policy item came from (for ``meshaudit
rules`` and ``meshaudit policy explain``).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import ValidationError

from meshaudit.config import Config, ConfigError, Policy
from meshaudit.policyfile import (
    Diagnostic,
    Origin,
    PolicyError,
    PolicyOrigins,
    Source,
    line_index,
    load_policy_explained,
    policy_paths,
    read_source,
)

if TYPE_CHECKING:
    from meshaudit.engine.api import RuleConfig

log = logging.getLogger("meshaudit.policy")


def _format_errors(exc: ValidationError, src: Source) -> str:
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = src.line(loc)
        where = f"{src.file}:{line}" if line else src.file
        if err["type"] == "extra_forbidden":
            out.append(f"{where}: unknown key '{key}'")
        else:
            out.append(f"{where}: {key}: {err['msg']}")
    return "\n".join(out)


def _read_config(path: Path) -> Source:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
        lines = line_index(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping of sections")
    return Source(str(path), data, lines, versioned=False)


def load_with_diagnostics(
    path: str | os.PathLike[str] | None, today: datetime.date | None = None
) -> tuple[Config, Policy, list[Diagnostic]]:
    """Config, merged policy and the policy's warnings. Raises ConfigError on any error; its
    message lists every error of the policy (with the warnings after them)."""
    cfg, policy, warnings, _, _ = _load(path, today)
    return cfg, policy, warnings


def _load(
    path: str | os.PathLike[str] | None, today: datetime.date | None
) -> tuple[Config, Policy, list[Diagnostic], PolicyOrigins, Source | None]:
    """``load_with_diagnostics``, with where each policy item was written and the configuration
    file as read (its line index); None without a file."""
    if path is None:
        cfg = Config()
        return cfg, cfg.policy, [], PolicyOrigins(), None
    p = Path(path)
    src = _read_config(p)
    data: dict[str, Any] = dict(src.data)
    inline = data.pop("policy", None)  # validated below, after its @lists are expanded
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, src)) from None
    diags: list[Diagnostic] = []
    sources: list[Source] = []
    if inline is not None:
        if not isinstance(inline, dict):
            raise ConfigError(f"{p}:{src.line(('policy',))}: policy must be a mapping")
        if cfg.policy_file or cfg.policy_files:
            raise ConfigError(f"{p}: set one of policy, policy_file and policy_files")
        sources.append(Source(str(p), inline, src.lines, prefix=("policy",), versioned=False))
    names = [cfg.policy_file] if cfg.policy_file else cfg.policy_files
    for f in policy_paths(p.parent, names):
        s = read_source(f, diags)
        if s is not None:
            sources.append(s)
    try:
        policy, warnings, origins = load_policy_explained(sources, cfg, today) if sources else (Policy(), [], None)
    except PolicyError as exc:
        errors = [d for d in exc.diagnostics if d.level == "error"] + diags
        raise ConfigError(
            "\n".join(str(d) for d in [*errors, *(d for d in exc.diagnostics if d.level != "error")])
        ) from None
    if diags:  # an unreadable file
        raise ConfigError("\n".join(str(d) for d in diags))
    if inline is not None:
        cfg = cfg.model_copy(update={"policy": policy})
    return cfg, policy, warnings, origins or PolicyOrigins(), src


OptionKind = Literal["default", "config", "override", "tls"]


@dataclass(frozen=True)
class OptionOrigin:
    """Where a rule option's effective value came from: its default, the configuration's
    ``rules.<name>.<option>``, a policy override for all traffic, or the policy's ``tls``."""

    kind: OptionKind
    at: Origin | None = None  # None: the default
    over: Origin | None = None  # the policy's value stands over this rules.<name>.<option> of the config

    def __str__(self) -> str:
        if self.at is None:
            return "default"
        if self.kind == "config":
            return f"config {self.at}"
        return f"policy {self.at} ({self.kind}{f', over config {self.over}' if self.over else ''})"


@dataclass
class Provenance:
    """Where each setting and policy item of a loaded configuration came from."""

    config_file: str | None  # None: the built-in defaults
    # Each rule's effective options, as the engine builds them (``rules.<name>`` under the
    # policy's overrides for all traffic and, for weak_tls, its tls), and where each came from.
    sections: dict[str, RuleConfig]
    options: dict[str, dict[str, OptionOrigin]]
    policy: PolicyOrigins  # each edge, route, override, exception and tls key


@dataclass
class Explained:
    config: Config
    policy: Policy
    warnings: list[Diagnostic]
    provenance: Provenance


def load_explained(path: str | os.PathLike[str] | None, today: datetime.date | None = None) -> Explained:
    """``load_with_diagnostics``, and where every setting and policy item came from. Each rule's
    effective options are the engine's own (``CompiledPolicy.rule_section``); an option is
    ``default`` unless the configuration file writes ``rules.<name>.<option>`` or the policy
    sets it (the policy wins, as in the engine). Raises ConfigError as ``load`` does."""
    from meshaudit.engine.policy import CompiledPolicy
    from meshaudit.engine.rules import REGISTRY

    cfg, policy, warnings, origins, src = _load(path, today)
    compiled = CompiledPolicy(policy)
    sections: dict[str, RuleConfig] = {}
    options: dict[str, dict[str, OptionOrigin]] = {}
    for cls in REGISTRY:
        name = cls.name
        section, layers = compiled.rule_section_explained(name, getattr(cfg.rules, name, None) or cls.Config())
        sections[name] = section
        where: dict[str, OptionOrigin] = {}
        for option in type(section).model_fields:
            layer = layers.get(option)
            line = src.lines.get(("rules", name, option)) if src is not None else None
            config = Origin(src.file, line) if src is not None and line is not None else None
            if layer == "tls":
                where[option] = OptionOrigin("tls", origins.tls[option], config)
            elif isinstance(layer, int):
                where[option] = OptionOrigin("override", origins.overrides[layer], config)
            elif config is not None:
                where[option] = OptionOrigin("config", config)
            else:
                where[option] = OptionOrigin("default")
        options[name] = where
    return Explained(cfg, policy, warnings, Provenance(src.file if src else None, sections, options, origins))


def load(path: str | os.PathLike[str] | None) -> tuple[Config, Policy]:
    """Load and validate a config file (None: built-in defaults). Returns config and policy; the
    policy's warnings are logged."""
    cfg, policy, warnings = load_with_diagnostics(path)
    for w in warnings:
        log.warning("%s", w)
    return cfg, policy
