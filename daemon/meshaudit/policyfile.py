"""Policy files a security team owns: versioned (``apiVersion: meshaudit/v1``), several merged in
order, named lists used as ``@name``, exceptions with matchers and expiry; and every finding a
reviewer can act on, each with a code, the file, the line and the key.

A policy comes from sources: the files of ``policy_files`` (a directory stands for its ``*.yaml``
and ``*.yml`` files, by name) or ``policy_file``, or the inline ``policy:`` of the configuration.
Loading them (:func:`load_policy`) reads every source, merges the lists of all of them (a later
file adds to a list an earlier one named), expands each ``@name`` wherever a pattern goes,
validates each source against :class:`meshaudit.config.Policy`, and merges them in order. Every
error and warning is collected, never only the first: ``meshaudit validate`` prints them all.

Codes (README, "Policy"):

======  =====================================================================================
P001    unknown list ``@name``
P002    unknown rule
P003    unknown key
P004    missing key
P005    wrong type or value
P006    not an IP network (``source_cidr``)
P007    not a date (``expires``)
P008    a list that contains itself (``@a`` -> ``@b`` -> ``@a``)
P009    two exceptions with one name
P010    missing or unsupported ``apiVersion``
P011    unreadable file, invalid YAML, or not a mapping
P012    not a status or a class of them (``response_codes``)
P013    not a SPIFFE id pattern (``sources[].identities``)
W001    a list no pattern uses
W002    an exception that has expired
W003    an exception that can never match
W004    a pattern another one of the same list already covers
======  =====================================================================================
"""

from __future__ import annotations

import datetime
import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import ValidationError

from meshaudit.config import Config, Policy, TlsPolicy
from meshaudit.engine.exceptions import exemption_name

API_VERSION: Final = "meshaudit/v1"
Loc = tuple[str | int, ...]

# Keys whose values are not patterns: never expanded.
_NOT_PATTERNS: Final = frozenset(("rules", "name", "reason", "expires", "protocol", "response_codes", "apiVersion"))
# Matchers of an exception that a TCP connection never has.
_HTTP_ONLY: Final = ("methods", "paths", "not_paths", "user_agent", "response_codes")
_PATTERN_LISTS: Final = ("from", "to", "paths", "not_paths", "user_agent", "methods", "source_cidr")


@dataclass(frozen=True)
class Diagnostic:
    level: str  # "error" or "warning"
    code: str
    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" {self.key}:" if self.key else ""
        return f"{where}: {self.level} {self.code}{key} {self.message}"


@dataclass(frozen=True)
class Origin:
    """Where a setting or a policy item was written: a file and the line (None: the file)."""

    file: str
    line: int | None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass
class PolicyOrigins:
    """Where each item of a merged policy was written: the lists run parallel to the policy's
    (``edges[i]`` is where ``policy.edges[i]`` was written)."""

    edges: list[Origin] = field(default_factory=list)
    routes: list[Origin] = field(default_factory=list)
    overrides: list[Origin] = field(default_factory=list)
    # by the name the engine runs each one as (``exemptions[<n>]`` for the form before exceptions)
    exceptions: dict[str, Origin] = field(default_factory=dict)
    tls: dict[str, Origin] = field(default_factory=dict)  # each key of tls: the last file that sets it


class PolicyError(Exception):
    """A policy with errors; ``diagnostics`` has every error and warning found."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = diagnostics
        super().__init__("\n".join(str(d) for d in diagnostics if d.level == "error"))


@dataclass
class Source:
    """One YAML document with the line of every key path in it."""

    file: str
    data: Any
    lines: dict[Loc, int]
    prefix: Loc = ()  # where the policy sits in the document: ("policy",) for the inline one
    versioned: bool = True  # a policy file must say its apiVersion

    def line(self, loc: Loc) -> int | None:
        full = (*self.prefix, *loc)
        for n in range(len(full), 0, -1):
            found = self.lines.get(full[:n])
            if found:
                return found
        return None


def key_of(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def line_index(root: yaml.Node | None) -> dict[Loc, int]:
    """Map each key path in a YAML document to its 1-based line."""
    index: dict[Loc, int] = {}

    def walk(node: yaml.Node, path: Loc) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = (*path, str(k.value))
                index[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = (*path, i)
                index[p] = v.start_mark.line + 1
                walk(v, p)

    if root is not None:
        walk(root, ())
    return index


def read_source(path: Path, diags: list[Diagnostic]) -> Source | None:
    """A policy file, or None (its error added to ``diags``)."""
    try:
        text = path.read_text()
    except OSError as exc:
        diags.append(Diagnostic("error", "P011", str(path), None, "", f"cannot read: {exc.strerror or exc}"))
        return None
    try:
        data = yaml.safe_load(text)
        lines = line_index(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        diags.append(
            Diagnostic(
                "error", "P011", str(path), mark.line + 1 if mark else None, "",
                f"invalid YAML: {getattr(exc, 'problem', exc)}",
            )
        )  # fmt: skip
        return None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        diags.append(Diagnostic("error", "P011", str(path), 1, "", "a policy file must be a mapping of keys"))
        return None
    return Source(str(path), data, lines)


def policy_paths(base: Path, names: Iterable[str]) -> Iterator[Path]:
    """The files of ``policy_files`` (relative to the configuration's directory), in order; a
    directory stands for its ``*.yaml`` and ``*.yml`` files, sorted by name."""
    for name in names:
        p = (base / name).resolve()
        if p.is_dir():
            yield from sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml") and f.is_file())
        else:
            yield p


# --- lists ----------------------------------------------------------------------------------------
@dataclass
class _List:
    items: list[str]
    where: list[tuple[Source, Loc]] = field(default_factory=list)  # each definition
    used: bool = False


def _collect_lists(sources: list[Source], diags: list[Diagnostic]) -> dict[str, _List]:
    lists: dict[str, _List] = {}
    for src in sources:
        raw = src.data.get("lists")
        if raw is None:
            continue
        if not isinstance(raw, dict):
            diags.append(_at(src, ("lists",), "error", "P005", "lists must map names to lists of patterns"))
            continue
        for name, value in raw.items():
            loc: Loc = ("lists", str(name))
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                diags.append(_at(src, loc, "error", "P005", "a list holds strings (patterns)"))
                continue
            entry = lists.setdefault(str(name), _List([]))
            entry.items.extend(items)  # a later file adds to the list
            entry.where.append((src, loc))
    return lists


def _expand_items(
    items: list[Any],
    lists: dict[str, _List],
    src: Source,
    loc: Loc,
    diags: list[Diagnostic],
    chain: tuple[str, ...],
    site: Loc | None = None,
) -> list[Any]:
    """``items`` with each ``@name`` replaced by the list's items; ``site``: where the reference
    that led here was written (errors point at it). An unknown or cyclic reference stays as it
    is (its error is reported once; the rest of the policy is still checked)."""
    out: list[Any] = []
    for i, item in enumerate(items):
        if not (isinstance(item, str) and item.startswith("@")):
            out.append(item)
            continue
        at = site or (*loc, i)
        name = item[1:]
        found = lists.get(name)
        if found is None:
            known = ", ".join(f"@{n}" for n in sorted(lists)) or "none defined"
            diags.append(_at(src, at, "error", "P001", f"unknown list {item} (lists: {known})"))
            out.append(item)
            continue
        if name in chain:
            cycle = " -> ".join(f"@{n}" for n in (*chain, name))
            diags.append(_at(src, at, "error", "P008", f"list @{chain[0]} contains itself: {cycle}"))
            out.append(item)
            continue
        found.used = True
        out.extend(_expand_items(found.items, lists, src, loc, diags, (*chain, name), at))
    return out


def _expand(node: Any, lists: dict[str, _List], src: Source, loc: Loc, diags: list[Diagnostic]) -> Any:
    """``node`` with every ``@name`` in a list of patterns (or a single pattern) replaced."""
    if isinstance(node, dict):
        return {k: v if k in _NOT_PATTERNS else _expand(v, lists, src, (*loc, str(k)), diags) for k, v in node.items()}
    if isinstance(node, list):
        if all(isinstance(i, str | int) or i is None for i in node):
            return _expand_items(node, lists, src, loc, diags, ())
        return [_expand(v, lists, src, (*loc, i), diags) for i, v in enumerate(node)]
    if isinstance(node, str) and node.startswith("@"):
        return _expand_items([node], lists, src, loc, diags, ())
    return node


# --- validation -----------------------------------------------------------------------------------
def _at(src: Source, loc: Loc, level: str, code: str, message: str) -> Diagnostic:
    return Diagnostic(level, code, src.file, src.line(loc), key_of((*src.prefix, *loc)), message)


def _code(err: Any) -> str:
    t = err["type"]
    loc = err["loc"]
    if t == "extra_forbidden":
        return "P003"
    if t == "missing":
        return "P004"
    msg = str(err.get("msg", ""))
    if "has no option" in msg:
        return "P003"
    if "unknown rule" in msg:
        return "P002"
    if "not an IP network" in msg:
        return "P006"
    if loc and loc[0] == "exceptions" and "expires" in loc:
        return "P007"
    if "not a status" in msg:
        return "P012"
    if "not a SPIFFE id pattern" in msg:
        return "P013"
    return "P005"


def _validation_diags(src: Source, exc: ValidationError) -> list[Diagnostic]:
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        code = _code(err)
        if err["type"] == "extra_forbidden":
            out.append(_at(src, loc, "error", code, f"unknown key {str(loc[-1])!r}"))
        elif code == "P004":
            out.append(_at(src, loc, "error", code, f"missing key {str(loc[-1])!r}"))
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            out.append(_at(src, loc, "error", code, msg))
    return out


def _shadowed(patterns: list[str]) -> Iterator[tuple[str, str]]:
    """(pattern, the earlier or broader pattern of the same list that already covers it)."""
    seen: list[str] = []
    for p in patterns:
        for q in seen:
            if p == q or (not any(ch in p for ch in "*?[") and fnmatch.fnmatchcase(p, q)):
                yield p, q
                break
        seen.append(p)
    for i, p in enumerate(patterns):  # a literal listed before a glob that covers it
        if any(ch in p for ch in "*?["):
            continue
        for q in patterns[i + 1 :]:
            if q != p and any(ch in q for ch in "*?[") and fnmatch.fnmatchcase(p, q):
                yield p, q
                break


def _warnings(src: Source, policy: Policy, config: Config | None, today: datetime.date) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    enabled = {name for name, section in config.rules if getattr(section, "enabled", False)} if config else set()
    for i, x in enumerate(policy.exceptions):
        loc: Loc = ("exceptions", i)
        if x.expires is not None and x.expires <= today:
            out.append(
                _at(
                    src,
                    (*loc, "expires"),
                    "warning",
                    "W002",
                    f"exception {x.name!r} expired on {x.expires}: it no longer applies",
                )
            )
        never = None
        if x.protocol == ["tcp"]:
            http = [k for k in _HTTP_ONLY if getattr(x, k) is not None]
            if http:
                never = f"protocol is tcp, but {', '.join(http)} only match HTTP requests"
        if x.not_paths is not None and "*" in x.not_paths:
            never = "not_paths has '*': no path is left"
        if x.paths is not None and x.not_paths is not None and set(x.paths) <= set(x.not_paths):
            never = "every path in paths is in not_paths"
        if config is not None and not (set(x.rules) & enabled):
            never = f"the rules it covers are all disabled ({', '.join(x.rules)})"
        if never:
            out.append(_at(src, loc, "warning", "W003", f"exception {x.name!r} can never match: {never}"))
        for key in _PATTERN_LISTS:
            values = getattr(x, "from_" if key == "from" else key)
            for p, q in _shadowed(values or []):
                out.append(_at(src, (*loc, key), "warning", "W004", f"{p!r} is already covered by {q!r}"))
    for i, e in enumerate(policy.edges or []):
        for key, values in (("from", e.from_), ("to", e.to)):
            for p, q in _shadowed(values):
                out.append(_at(src, ("edges", i, key), "warning", "W004", f"{p!r} is already covered by {q!r}"))
    for i, r in enumerate(policy.routes):
        for j, a in enumerate(r.allow):
            for p, q in _shadowed(a.paths):
                out.append(
                    _at(
                        src, ("routes", i, "allow", j, "paths"), "warning", "W004", f"{p!r} is already covered by {q!r}"
                    )
                )
    return out


def _merge(parts: list[Policy]) -> Policy:
    if len(parts) == 1:
        return parts[0]
    lists: dict[str, list[str]] = {}
    identities: dict[str, list[str]] = {}
    for p in parts:
        for k, v in p.lists.items():
            lists.setdefault(k, []).extend(v)
        for k, v in p.identities.items():
            identities.setdefault(k, []).extend(v)
    edges = [e for p in parts for e in p.edges or []]
    # tls: each key from the last file that sets it (a later file over an earlier one, as overrides)
    tls = {k: v for p in parts if p.tls is not None for k, v in p.tls.model_dump(exclude_none=True).items()}
    return Policy.model_construct(
        lists=lists,
        mesh_services=[s for p in parts for s in p.mesh_services],
        edges=edges if any(p.edges is not None for p in parts) else None,
        routes=[r for p in parts for r in p.routes],
        exceptions=[x for p in parts for x in p.exceptions],
        exemptions=[x for p in parts for x in p.exemptions],
        overrides=[o for p in parts for o in p.overrides],
        tls=TlsPolicy.model_validate(tls) if tls else None,
        identities=identities,
        sources=[x for p in parts for x in p.sources],
    )


def _origins(parts: list[tuple[Source, Policy]]) -> PolicyOrigins:
    """Where each item of ``_merge(parts)`` was written: the same parts, in the same order."""
    out = PolicyOrigins()
    exemptions = 0
    for src, p in parts:

        def at(*loc: str | int, src: Source = src) -> Origin:
            return Origin(src.file, src.line(loc))

        out.edges += [at("edges", i) for i in range(len(p.edges or ()))]
        out.routes += [at("routes", i) for i in range(len(p.routes))]
        out.overrides += [at("overrides", i) for i in range(len(p.overrides))]
        out.exceptions.update((x.name, at("exceptions", i)) for i, x in enumerate(p.exceptions))
        for i in range(len(p.exemptions)):
            out.exceptions[exemption_name(exemptions)] = at("exemptions", i)
            exemptions += 1
        if p.tls is not None:
            out.tls.update((k, at("tls", k)) for k in p.tls.model_dump(exclude_none=True))
    return out


def load_policy(
    sources: list[Source], config: Config | None = None, today: datetime.date | None = None
) -> tuple[Policy, list[Diagnostic]]:
    """The merged policy of ``sources`` and every warning; raises :class:`PolicyError` (with
    the warnings too) when any source has an error. ``config``: for the warnings that depend on
    which rules are enabled."""
    policy, diags, _ = load_policy_explained(sources, config, today)
    return policy, diags


def load_policy_explained(
    sources: list[Source], config: Config | None = None, today: datetime.date | None = None
) -> tuple[Policy, list[Diagnostic], PolicyOrigins]:
    """``load_policy``, and where each item of the merged policy was written."""
    today = today or datetime.datetime.now(datetime.UTC).date()
    diags: list[Diagnostic] = []
    for src in sources:
        if not src.versioned:
            continue
        v = src.data.get("apiVersion")
        if v is None:
            diags.append(
                Diagnostic(
                    "error", "P010", src.file, 1, "apiVersion",
                    f"missing: a policy file starts with `apiVersion: {API_VERSION}` (before v1, the key "
                    "exceptions was exemptions)",
                )
            )  # fmt: skip
        elif v != API_VERSION:
            diags.append(
                _at(src, ("apiVersion",), "error", "P010", f"unsupported {v!r}; this meshaudit reads {API_VERSION}")
            )
    lists = _collect_lists(sources, diags)
    parts: list[tuple[Source, Policy]] = []
    for src in sources:
        body = {k: v for k, v in src.data.items() if k != "apiVersion"}
        expanded = {
            k: v if k == "lists" or k in _NOT_PATTERNS else _expand(v, lists, src, (k,), diags) for k, v in body.items()
        }
        try:
            part = Policy.model_validate(expanded)
        except ValidationError as exc:
            diags.extend(_validation_diags(src, exc))
            continue
        diags.extend(_warnings(src, part, config, today))
        parts.append((src, part))
    names: dict[str, tuple[Source, int]] = {}
    for src, part in parts:
        for i, x in enumerate(part.exceptions):
            if x.name in names:
                first, j = names[x.name]
                where = f"{first.file}:{first.line(('exceptions', j))}"
                msg = f"{x.name!r} is used already ({where})"
                diags.append(_at(src, ("exceptions", i, "name"), "error", "P009", msg))
            else:
                names[x.name] = (src, i)
    for name, entry in lists.items():
        if not entry.used:
            src, loc = entry.where[0]
            diags.append(_at(src, loc, "warning", "W001", f"list @{name} is not used"))
    order = {src.file: i for i, src in reversed(list(enumerate(sources)))}
    diags.sort(key=lambda d: (d.level != "error", order.get(d.file, -1), d.line or 0))
    if any(d.level == "error" for d in diags):
        raise PolicyError(diags)
    if not parts:
        return Policy(), diags, PolicyOrigins()
    return _merge([p for _, p in parts]), diags, _origins(parts)
