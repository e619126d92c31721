"""What the coordinator and its workers say to each other (``workers: N``): one small class per
message; each side looks its handler up by the message's type (a table, no chain of tests).

Frames on the coordinator's Unix socket (a private 0700 directory) are a 4-byte big-endian
length and a pickle of one message. Pickle is safe here because both ends are this program, the
coordinator and the workers it started itself, and it is no wire format: nothing outside this
process group reads it, and a message may change with any release.
"""

from __future__ import annotations

import asyncio
import pickle
from dataclasses import dataclass, field
from typing import NamedTuple, TypeAlias, cast

from meshaudit.engine.api import Edge, PeerAnswer, PeerQuery, Violation, WindowDelta
from meshaudit.engine.core import Facts
from meshaudit.model import NOBODY, UNKNOWN, Hop, Identity
from meshaudit.runtime.summed import Snapshot


# --- violations: the hops stay behind, their example fields travel ---------------------------------
class Example(NamedTuple):
    trace_id: str | None
    request_id: str | None
    method: str | None
    path: str | None
    observer: str


class WireViolation(NamedTuple):
    rule: str
    severity: str
    src: Identity
    dst: Identity
    detail: str
    when: float
    summary: str | None
    example: Example | None
    blocked: bool | None
    more: tuple[Example, ...]


def _example_to_wire(h: Hop) -> Example:
    return Example(h.trace_id, h.request_id, h.method, h.path, h.observer)


def _example_from_wire(ex: Example, src: Identity, dst: Identity, when: float) -> Hop:
    return Hop(
        0, ex.observer, NOBODY, UNKNOWN, src, dst, when, method=ex.method, path=ex.path, trace_id=ex.trace_id,
        request_id=ex.request_id,
    )  # fmt: skip


def violation_to_wire(v: Violation) -> WireViolation:
    h = v.hop
    ex = None if h is None else _example_to_wire(h)
    more = tuple(_example_to_wire(m) for m in v.more)
    return WireViolation(v.rule, v.severity, v.src, v.dst, v.detail, v.when, v.summary, ex, v.blocked, more)


def violation_from_wire(w: WireViolation) -> Violation:
    hop = None if w.example is None else _example_from_wire(w.example, w.src, w.dst, w.when)
    extra = [_example_from_wire(m, w.src, w.dst, w.when) for m in w.more]
    return Violation(w.rule, w.severity, w.src, w.dst, hop, w.detail, w.when, w.summary, w.blocked, extra)


# --- per-edge window counts (stage 2): summed and judged by the coordinator -------------------
class WireDelta(NamedTuple):
    """A :class:`~meshaudit.engine.api.WindowDelta`, its example hops as their example fields."""

    windows: str
    rule: str
    src: Identity
    dst: Identity
    start: float
    total: int
    hits: int
    seen_first: float
    seen_last: float
    examples: tuple[Example, ...]


def delta_to_wire(d: WindowDelta) -> WireDelta:
    examples = tuple(_example_to_wire(h) for h in d.examples)
    return WireDelta(d.windows, d.rule, d.src, d.dst, d.start, d.total, d.hits, d.seen_first, d.seen_last, examples)


def delta_from_wire(w: WireDelta) -> WindowDelta:
    examples = tuple(_example_from_wire(ex, w.src, w.dst, w.seen_first) for ex in w.examples)
    return WindowDelta(w.windows, w.rule, w.src, w.dst, w.start, w.total, w.hits, w.seen_first, w.seen_last, examples)


# --- the messages --------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class Hello:
    """Worker -> coordinator, its first frame: who it is."""

    index: int
    pid: int


@dataclass(slots=True, frozen=True)
class Seed:
    """Coordinator -> worker: the learn-mode baseline to start from (the answer to :class:`Hello`,
    before the worker listens, and to :class:`AskSeed`); ``over``: learning is over."""

    edges: list[Edge]
    over: bool


@dataclass(slots=True, frozen=True)
class AskSeed:
    """Worker -> coordinator: its engine was built again (a reload) and needs the baseline."""


@dataclass(slots=True, frozen=True)
class Ready:
    """Worker -> coordinator: it listens, on these addresses."""

    bound: dict[str, str]


@dataclass(slots=True, frozen=True)
class Violations:
    """Worker -> coordinator: violations for the one aggregator, and the worker's per-edge
    window counts since its last tick (``deltas``), which the coordinator sums and judges: an
    edge's requests may reach several workers (the source service's pods, each with its own
    stream)."""

    items: list[WireViolation]
    deltas: list[WireDelta] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class Query:
    """Decisions that need evidence another worker may hold: worker -> coordinator (``qid`` the
    worker's), then coordinator -> every other worker (``qid`` the coordinator's)."""

    qid: int
    queries: list[PeerQuery]


@dataclass(slots=True, frozen=True)
class Answer:
    """The answers to a :class:`Query` of the same ``qid``, in its order: worker -> coordinator,
    then (merged over the workers) coordinator -> the worker that asked."""

    qid: int
    answers: list[PeerAnswer]


@dataclass(slots=True, frozen=True)
class Shared:
    """Facts an engine gave out (worker -> coordinator, at most once a second), and what of them
    is new to the others (coordinator -> every other worker)."""

    facts: Facts


@dataclass(slots=True, frozen=True)
class LearningOver:
    """Coordinator -> every worker: the learning window ended."""


@dataclass(slots=True, frozen=True)
class Scrape:
    """Coordinator -> worker: ``/metrics`` is being read; send your counters now."""

    seq: int


@dataclass(slots=True, frozen=True)
class MetricsReport:
    """Worker -> coordinator: its metrics, once a second and (``seq`` set) for a :class:`Scrape`."""

    snapshot: Snapshot
    seq: int | None = None


@dataclass(slots=True, frozen=True)
class Intake:
    """Worker -> coordinator, once a second: whether it can receive (``/readyz``'s gates)."""

    state: dict[str, str]


ToCoordinator: TypeAlias = Hello | AskSeed | Ready | Violations | Query | Answer | Shared | MetricsReport | Intake
ToWorker: TypeAlias = Seed | Query | Answer | Shared | LearningOver | Scrape
Message: TypeAlias = ToCoordinator | ToWorker


# --- frames ------------------------------------------------------------------------------------------
def frame(msg: Message) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return len(body).to_bytes(4, "big") + body


async def read_frame(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None when the link closed."""
    try:
        head = await reader.readexactly(4)
        body = await reader.readexactly(int.from_bytes(head, "big"))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return cast(Message, pickle.loads(body))
