"""Frames between the coordinator and its workers, and the violations they carry."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

from meshaudit.engine.api import Violation
from meshaudit.model import NOBODY, UNKNOWN, Hop, Identity

# --- frames ------------------------------------------------------------------------------------
Message = tuple[Any, ...]


def frame(msg: Message) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return len(body).to_bytes(4, "big") + body


async def read_frame(reader: asyncio.StreamReader) -> Message | None:
    try:
        head = await reader.readexactly(4)
        body = await reader.readexactly(int.from_bytes(head, "big"))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    msg: Message = pickle.loads(body)
    return msg


# A violation crosses as a tuple: the hops stay behind, their example fields travel.
WireViolation = tuple[
    str,
    str,
    Identity,
    Identity,
    str,
    float,
    "str | None",
    "tuple[Any, ...] | None",
    "bool | None",
    "tuple[tuple[Any, ...], ...]",
]


def _example_to_wire(h: Hop) -> tuple[Any, ...]:
    return (h.trace_id, h.request_id, h.method, h.path, h.observer)


def _example_from_wire(ex: tuple[Any, ...], src: Identity, dst: Identity, when: float) -> Hop:
    trace_id, request_id, method, path, observer = ex
    return Hop(
        0, observer, NOBODY, UNKNOWN, src, dst, when, method=method, path=path, trace_id=trace_id,
        request_id=request_id,
    )  # fmt: skip


def violation_to_wire(v: Violation) -> WireViolation:
    h = v.hop
    ex = None if h is None else _example_to_wire(h)
    more = tuple(_example_to_wire(m) for m in v.more)
    return (v.rule, v.severity, v.src, v.dst, v.detail, v.when, v.summary, ex, v.blocked, more)


def violation_from_wire(w: WireViolation) -> Violation:
    rule, severity, src, dst, detail, when, summary, ex, blocked, more = w
    hop = None if ex is None else _example_from_wire(ex, src, dst, when)
    extra = [_example_from_wire(m, src, dst, when) for m in more]
    return Violation(rule, severity, src, dst, hop, detail, when, summary, blocked, extra)
