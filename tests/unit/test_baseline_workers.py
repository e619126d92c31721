"""``workers: N`` in learn mode, without processes: the coordinator owns the merged baseline (reads
the state file, opens and ends the learning window, tells the workers, writes the file, drops
violations of edges it knows), and a worker's engine starts from what the coordinator sends."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from meshaudit import baseline
from meshaudit.config import Config, Policy
from meshaudit.engine.api import Violation
from meshaudit.engine.core import Engine, Facts
from meshaudit.engine.rules.unexpected_edge import UnexpectedEdge
from meshaudit.engine.setup import build_engine
from meshaudit.model import Alert, identity
from meshaudit.runtime.coordinator import Coordinator
from meshaudit.runtime.link import WorkerLink
from meshaudit.runtime.messages import (
    AskSeed,
    LearningOver,
    Message,
    Seed,
    Shared,
    Violations,
    WireViolation,
    violation_to_wire,
)

T0 = 1_800_000_000.0
A, B, C = "frontend.default", "reviews.default", "details.default"


class Pipe:
    """A stream writer that keeps the frames written to it."""

    def __init__(self) -> None:
        self.frames: list[Message] = []

    def write(self, data: bytes) -> None:
        while data:
            n = int.from_bytes(data[:4], "big")
            self.frames.append(pickle.loads(data[4 : 4 + n]))
            data = data[4 + n :]

    def is_closing(self) -> bool:
        return False


def config(state: Path | None, **over: Any) -> Config:
    rule = {"mode": "learn", "learn_secs": 60, "state_file": str(state) if state else None, **over}
    return Config.model_validate(
        {"workers": 2, "rules": {"unexpected_edge": rule}, "sinks": {"jsonl": {"enabled": False}}}
    )  # fmt: skip


Coordinators = Callable[[Path], tuple[Coordinator, dict[int, "Pipe"], list[Alert]]]


def learner(engine: Engine) -> UnexpectedEdge | None:
    rule = next((r for r in engine.rules if r.learns()), None)
    assert rule is None or isinstance(rule, UnexpectedEdge)
    return rule


def learned(*edges: tuple[str, str, float], routes: tuple[tuple[str, str, str], ...] = ()) -> Shared:
    return Shared(Facts(learned=list(edges), routes=list(routes)))


@pytest.fixture
def coordinator() -> Iterator[Coordinators]:
    """A coordinator whose workers are pipes and whose sinks are a list."""

    def make(state: Path) -> tuple[Coordinator, dict[int, Pipe], list[Alert]]:
        c = Coordinator(config(state), Policy(), None)
        pipes = {i: Pipe() for i in c.workers}
        for i, w in c.workers.items():
            w.writer = cast(Any, pipes[i])
        alerts: list[Alert] = []
        c.outlet = alerts.extend
        return c, pipes, alerts

    yield make


def violation(src: str, dst: str) -> WireViolation:
    s, d = identity(*src.split(".")), identity(*dst.split("."))
    return violation_to_wire(Violation("unexpected_edge", "high", s, d, None, "edge not in the baseline", T0))


def test_the_coordinator_merges_ends_the_window_tells_the_workers_and_saves(
    tmp_path: Path, coordinator: Coordinators
) -> None:
    state = tmp_path / "baseline.json"
    c, pipes, alerts = coordinator(state)
    assert c._seed() == Seed([], False)
    c.handle(0, learned((A, B, T0 + 1), routes=((B, "GET", "/reviews/1"),)))
    c.handle(1, learned((A, B, T0 + 2), ("x.default", A, T0 + 3)))
    assert pipes[1].frames == [learned((A, B, T0 + 1))]  # shared with the other worker
    assert pipes[0].frames == [learned(("x.default", A, T0 + 3))]
    c.handle(1, Violations([violation(A, C)]))  # still learning: not an alert
    assert alerts == []
    c._baseline_tick(T0 + 60.5)
    assert not state.exists()  # the window opened at the first edge learned (T0 + 1)
    c._baseline_tick(T0 + 61)
    assert pipes[0].frames[-1] == LearningOver() and pipes[1].frames[-1] == LearningOver()
    saved = baseline.load(state)
    assert saved is not None
    assert saved.edges == {(A, B): T0 + 1, ("x.default", A): T0 + 3}
    assert saved.routes.by_dst == {B: {("GET", "/reviews/1")}}
    c.handle(0, Violations([violation(A, B), violation(A, C)]))  # known / new
    assert [(a.source.key, a.destination.key) for a in alerts] == [(A, C)]
    # An edge a worker learned just before it heard the window was over: kept, saved again.
    c.handle(0, learned((B, C, T0 + 60.9)))
    c._baseline_tick(T0 + 62)
    again = baseline.load(state)
    assert again is not None and (B, C) in again.edges


def test_the_coordinator_starts_from_the_state_file_and_answers_with_it(
    tmp_path: Path, coordinator: Coordinators
) -> None:
    state = tmp_path / "baseline.json"
    b = baseline.Baseline()
    b.add_edge(A, B, T0)
    baseline.save(b, state, T0 + 60)
    c, pipes, alerts = coordinator(state)
    assert c.learn_over
    assert c._seed() == Seed([(A, B, T0)], True)
    c.handle(1, AskSeed())  # a worker that reloaded asks
    assert pipes[1].frames == [Seed([(A, B, T0)], True)]
    c.handle(0, Violations([violation(A, B), violation(A, C)]))
    assert [(a.source.key, a.destination.key) for a in alerts] == [(A, C)]
    c._baseline_tick(T0 + 10_000)
    assert c.baseline_file is not None and not c.baseline_file.pending  # nothing new: not written again


def test_a_worker_engine_starts_from_the_coordinators_answer(tmp_path: Path) -> None:
    cfg = config(tmp_path / "never-read-by-a-worker.json")
    pipe = Pipe()
    link = WorkerLink(0, cast(Any, None), cast(Any, pipe))
    link.seed = Seed([(A, B, T0)], True)
    engine = build_engine(cfg, Policy(), peers=True)
    link.engine_built(engine)
    rule = learner(engine)
    assert rule is not None and rule.learning_over and (A, B) in rule.baseline
    assert rule.file is None  # the coordinator owns the file
    assert pipe.frames == []  # nothing to ask at start: the answer to hello came first

    # After a reload: the new engine asks, and alerts as if learning were over until answered.
    engine = build_engine(cfg, Policy(), peers=True)
    link.engine_built(engine)
    rule = learner(engine)
    assert rule is not None and rule.learning_over and len(rule.baseline) == 0
    assert pipe.frames == [AskSeed()]
    rule.seed([(A, B, T0), (B, C, T0 + 1)], False)  # what the link does with the answer
    assert not rule.learning_over and (B, C) in rule.baseline


@pytest.mark.parametrize("mode", ["policy", "learn"])
def test_a_worker_without_learn_mode_has_nothing_to_seed(tmp_path: Path, mode: str) -> None:
    cfg = config(None, mode=mode, enabled=mode == "learn")
    link = WorkerLink(0, cast(Any, None), cast(Any, Pipe()))
    link.seed = Seed([], False)
    engine = build_engine(cfg, Policy(), peers=True)
    link.engine_built(engine)
    rule = learner(engine)
    assert (rule is not None) == (mode == "learn")
    if rule is not None:
        assert not rule.learning_over  # learning until the coordinator says it is over
