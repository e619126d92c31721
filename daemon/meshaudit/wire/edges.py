"""Stage 2 on the wire: the records of the edges topic (``distributed.edges_topic``), which carry
every evaluator's per-edge window deltas and violations to the one evaluator that owns their
(rule, source, destination) (README "Distributed mode", ``meshaudit.runtime.stage2``).

``encode(deltas, violations)`` gives one record per key (``rule|source|destination``, as the
alerts topic's key) per call: a JSON object (orjson) ``{"schema": "meshaudit.edges.v1",
"windows": [...], "violations": [...]}``, at most ``MAX_ITEMS`` items a record (a key with more
in one tick gets several records). ``decode`` gives them back as the engine's own
:class:`~meshaudit.engine.api.WindowDelta` and :class:`~meshaudit.engine.api.Violation`: parties
interned through :func:`meshaudit.model.identity`, examples as hops that hold only what an
alert's example shows (trace and request id, method, path, observer).

JSON rather than a protobuf schema: a record is per edge and tick, not per request (one evaluator
sends about one record per busy edge and rule a tick), so its size and encoding cost do not
matter next to the hops topic's (measured in README "Distributed mode"), and a record stays
readable with ``kcat``.

Untrusted input (anyone who may produce to the topic): ``decode`` raises :class:`EdgesError`
(and nothing else) for a record that is not one of ours, and bounds what it builds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

import orjson

from meshaudit.engine.api import Violation, WindowDelta
from meshaudit.model import NOBODY, UNKNOWN, Hop, Identity, identity

SCHEMA: Final = "meshaudit.edges.v1"
MAX_ITEMS: Final = 500  # windows and violations in one record
MAX_RECORD_BYTES: Final = 4 * 1024 * 1024
MAX_EXAMPLES: Final = 10
MAX_TEXT: Final = 4096  # characters of one string field


class EdgesError(ValueError):
    """A record that is not a valid edges record; the message says what is wrong."""


def key(rule: str, src_key: str, dst_key: str) -> bytes:
    """The record key, which decides the partition and so the evaluator that owns the key."""
    return f"{rule}|{src_key}|{dst_key}".encode()


def key_of(rule: str, src: Identity, dst: Identity) -> bytes:
    return key(rule, src.key, dst.key)


# --- encoding ---------------------------------------------------------------------------------------
def _party(p: Identity) -> list[str | None]:
    return [p.service, p.namespace, p.workload, p.principal, p.address]


def _example(h: Hop) -> list[Any]:
    return [h.trace_id, h.request_id, h.method, h.path, h.observer, h.start]


def _delta(d: WindowDelta) -> dict[str, Any]:
    return {
        "counter": d.windows,
        "rule": d.rule,
        "src": _party(d.src),
        "dst": _party(d.dst),
        "start": d.start,
        "total": d.total,
        "hits": d.hits,
        "first": d.seen_first,
        "last": d.seen_last,
        "examples": [_example(h) for h in d.examples],
    }


def _violation(v: Violation) -> dict[str, Any]:
    examples = ([] if v.hop is None else [v.hop]) + list(v.more)
    return {
        "rule": v.rule,
        "severity": v.severity,
        "src": _party(v.src),
        "dst": _party(v.dst),
        "detail": v.detail,
        "when": v.when,
        "summary": v.summary,
        "blocked": v.blocked,
        "hop": v.hop is not None,
        "examples": [_example(h) for h in examples],
    }


def encode(deltas: Sequence[WindowDelta], violations: Sequence[Violation]) -> list[tuple[bytes, bytes]]:
    """(key, value) records: one per key, in the order their keys first appear (a key's
    violations keep their order)."""
    by_key: dict[bytes, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for d in deltas:
        k = key_of(d.rule, d.src, d.dst)
        by_key.setdefault(k, ([], []))[0].append(_delta(d))
    for v in violations:
        k = key_of(v.rule, v.src, v.dst)
        by_key.setdefault(k, ([], []))[1].append(_violation(v))
    out: list[tuple[bytes, bytes]] = []
    for k, (ws, vs) in by_key.items():
        items = [("windows", w) for w in ws] + [("violations", v) for v in vs]
        for i in range(0, len(items), MAX_ITEMS):
            doc: dict[str, Any] = {"schema": SCHEMA, "windows": [], "violations": []}
            for kind, item in items[i : i + MAX_ITEMS]:
                doc[kind].append(item)
            out.append((k, orjson.dumps(doc)))
    return out


# --- decoding ---------------------------------------------------------------------------------------
def _text(x: Any, what: str, optional: bool = True) -> str | None:
    if x is None and optional:
        return None
    if not isinstance(x, str) or len(x) > MAX_TEXT:
        raise EdgesError(f"{what}: not a string of at most {MAX_TEXT} characters")
    return x


def _str(x: Any, what: str) -> str:
    s = _text(x, what, optional=False)
    assert s is not None
    return s


def _num(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        raise EdgesError(f"{what}: not a number")
    return float(x)


def _count(x: Any, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise EdgesError(f"{what}: not a count")
    return x


def _list(x: Any, what: str, most: int) -> list[Any]:
    if not isinstance(x, list) or len(x) > most:
        raise EdgesError(f"{what}: not a list of at most {most}")
    return x


def _party_from(x: Any, what: str) -> Identity:
    fields = _list(x, what, 5)
    if len(fields) != 5:
        raise EdgesError(f"{what}: not a party (five fields)")
    return identity(*(_text(f, what) for f in fields))


def _examples_from(x: Any, src: Identity, dst: Identity) -> list[Hop]:
    out: list[Hop] = []
    for e in _list(x, "examples", MAX_EXAMPLES):
        f = _list(e, "example", 6)
        if len(f) != 6:
            raise EdgesError("example: not six fields")
        trace, rid, method, path = (_text(v, "example") for v in f[:4])
        out.append(
            Hop(
                0, _str(f[4], "example observer"), NOBODY, UNKNOWN, src, dst, _num(f[5], "example time"),
                method=method, path=path, trace_id=trace, request_id=rid,
            )
        )  # fmt: skip
    return out


def _delta_from(x: dict[str, Any]) -> WindowDelta:
    src, dst = _party_from(x["src"], "src"), _party_from(x["dst"], "dst")
    return WindowDelta(
        _str(x["counter"], "counter"),
        _str(x["rule"], "rule"),
        src,
        dst,
        _num(x["start"], "start"),
        _count(x["total"], "total"),
        _count(x["hits"], "hits"),
        _num(x["first"], "first"),
        _num(x["last"], "last"),
        tuple(_examples_from(x["examples"], src, dst)),
    )


def _violation_from(x: dict[str, Any]) -> Violation:
    src, dst = _party_from(x["src"], "src"), _party_from(x["dst"], "dst")
    examples = _examples_from(x["examples"], src, dst)
    blocked = x["blocked"]
    if blocked is not None and not isinstance(blocked, bool):
        raise EdgesError("blocked: not a boolean")
    hop = examples[0] if x["hop"] is True and examples else None
    return Violation(
        _str(x["rule"], "rule"),
        _str(x["severity"], "severity"),
        src,
        dst,
        hop,
        _str(x["detail"], "detail"),
        _num(x["when"], "when"),
        _text(x["summary"], "summary"),
        blocked,
        examples[1:] if hop is not None else examples,
    )


def decode(value: bytes) -> tuple[list[WindowDelta], list[Violation]]:
    """One record's deltas and violations; :class:`EdgesError` for anything else."""
    if len(value) > MAX_RECORD_BYTES:
        raise EdgesError(f"larger than {MAX_RECORD_BYTES} bytes")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise EdgesError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise EdgesError(f"not a {SCHEMA} record")
    try:
        windows = _list(doc["windows"], "windows", MAX_ITEMS)
        violations = _list(doc["violations"], "violations", MAX_ITEMS)
        return [_delta_from(w) for w in windows], [_violation_from(v) for v in violations]
    except (KeyError, TypeError) as exc:
        raise EdgesError(f"a field is missing or of the wrong kind: {exc!r}") from None
