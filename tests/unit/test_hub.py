"""``workers: N``, the hub without processes: the real coordinator (its message handlers, the
fan-out of questions and the merge of answers, the shared facts, the one aggregator) and real
worker pipelines with their real links, joined by in-memory pipes that carry the real frames.
Only the sockets and the processes are left out (tests/integration/test_workers.py has them)."""

from __future__ import annotations

import pickle
import typing
from collections.abc import Iterator
from typing import Any, cast

import pytest
from meshaudit import metrics
from meshaudit.config import Config
from meshaudit.engine.api import NO_ANSWER, PeerAnswer, PeerQuery, Violation
from meshaudit.engine.core import Facts
from meshaudit.engine.tally import LIVE_WIDTH, OUT
from meshaudit.model import Alert, Hop
from meshaudit.pipeline import Pipeline
from meshaudit.runtime import messages
from meshaudit.runtime.coordinator import Coordinator
from meshaudit.runtime.link import WorkerLink
from meshaudit.runtime.messages import (
    Answer,
    AskSeed,
    Hello,
    Intake,
    LearningOver,
    Message,
    MetricsReport,
    Query,
    Ready,
    Scrape,
    Seed,
    Shared,
    Violations,
    frame,
    violation_from_wire,
    violation_to_wire,
)
from test_engine import (
    ADDR,
    FRONTEND,
    FRONTEND_SA,
    POLICY,
    RATINGS,
    REVIEWS,
    T0,
    app_span,
    inbound,
    outbound,
    rules,
)


class Pipe:
    """One direction of a link: the frames written to it, read back (parsed) by ``take``."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes) -> None:
        self.buf += data

    def is_closing(self) -> bool:
        return False

    def take(self) -> list[Message]:
        out: list[Message] = []
        buf = self.buf
        while buf:
            n = int.from_bytes(buf[:4], "big")
            out.append(pickle.loads(bytes(buf[4 : 4 + n])))
            del buf[: 4 + n]
        return out


class Hub:
    """A coordinator and ``n`` worker pipelines on a fake clock. ``pump`` delivers every frame in
    flight (and what the handlers answer) until the pipes are empty."""

    def __init__(self, n: int = 2, **rules_over: Any) -> None:
        self.config = Config.model_validate(
            {
                "workers": n,
                "engine": {"suppress_secs": 60, "store_max_items": 1000},
                "rules": {"missing_access_log": {"grace_ms": 2000, "silent_secs": 10}, **rules_over},
                "sinks": {"jsonl": {"enabled": False}},
            }
        )
        self.now = T0
        self.alerts: list[Alert] = []  # what the coordinator delivered to its sinks
        self.by_workers: list[Alert] = []  # what a worker delivered itself: never anything
        c = self.coordinator = Coordinator(self.config, POLICY, None)
        c.outlet = self.alerts.extend
        c.clock = self.clock
        self.down = {i: Pipe() for i in range(n)}  # coordinator -> worker i
        self.up = {i: Pipe() for i in range(n)}  # worker i -> coordinator
        self.links: list[WorkerLink] = []
        self.pipelines: list[Pipeline] = []
        for i in range(n):
            c.workers[i].writer = cast(Any, self.down[i])
            link = WorkerLink(i, cast(Any, None), cast(Any, self.up[i]))
            link.clock = self.clock
            link.seed = c._seed()  # the coordinator's answer to the worker's hello
            self.pipelines.append(Pipeline(self.config, POLICY, None, link, self.by_workers.extend))
            self.links.append(link)
            link.send(Ready({}))  # it listens
        self.pump()

    def clock(self) -> float:
        return self.now

    def pump(self) -> None:
        for _ in range(100):
            moved = False
            for i, link in enumerate(self.links):
                for m in self.up[i].take():
                    moved = True
                    self.coordinator.handle(i, m)
                for m in self.down[i].take():
                    moved = True
                    link.handle(m)
            if not moved:
                return
        raise AssertionError("the hub never went quiet")

    def evaluate(self, worker: int, hops: list[Hop], now: float) -> None:
        self.now = now
        self.pipelines[worker].evaluate(hops, now)
        self.pump()

    def share(self) -> None:
        """What each worker sends once a second: its facts (and metrics)."""
        for p in self.pipelines:
            p.periodic()
        self.pump()

    def settle(self, now: float) -> list[Alert]:
        """One second of the hub: facts shared, every worker's tick (deferred decisions asked and
        answered), the coordinator's tick; the alerts delivered meanwhile."""
        self.now = now
        self.share()
        for p in self.pipelines:
            p.tick(now)
            self.pump()
        self.coordinator.tick(now)
        assert self.by_workers == []  # a worker never aggregates itself
        out, self.alerts[:] = self.alerts[:], []
        return out


@pytest.fixture
def hub() -> Iterator[Hub]:
    yield Hub()


# --- the messages -------------------------------------------------------------------------------------
def test_every_message_has_one_handler_on_the_side_that_receives_it(hub: Hub) -> None:
    to_coordinator = set(typing.get_args(messages.ToCoordinator))
    to_worker = set(typing.get_args(messages.ToWorker))
    assert set(hub.coordinator._handlers) == to_coordinator - {Hello}  # the hello opens the link
    assert set(hub.links[0]._handlers) == to_worker


def test_every_message_crosses_a_frame_unchanged() -> None:
    v = Violation("plaintext_hop", "high", FRONTEND, REVIEWS, inbound(tls=None), "no TLS", T0)
    q = PeerQuery("r1", None, "reviews.default", T0, None, None)
    examples: list[Message] = [
        Hello(1, 4242),
        Seed([("a.default", "b.default", T0)], True),
        AskSeed(),
        Ready({"grpc": "127.0.0.1:1"}),
        Violations([violation_to_wire(v)]),
        Query(3, [q]),
        Answer(3, [PeerAnswer(True, FRONTEND), NO_ANSWER]),
        Shared(
            Facts(spans_at=T0, last_log={"reviews.default": T0}, learned=[("a", "b", T0)], routes=[("b", "GET", "/")])
        ),
        LearningOver(),
        Scrape(7),
        MetricsReport([("x", "counter", "doc", [("x_total", (), 1.0)])], 7),
        Intake({"engine": "ok"}),
    ]
    assert {type(m) for m in examples} == set(typing.get_args(Message))
    for m in examples:
        pipe = Pipe()
        pipe.write(frame(m))
        assert pipe.take() == [m]
    back = violation_from_wire(violation_to_wire(v))
    assert (back.rule, back.src, back.dst, back.detail) == ("plaintext_hop", FRONTEND, REVIEWS, "no TLS")
    assert back.hop is not None and back.hop.request_id == "r1"


def test_a_message_nobody_handles_is_counted_and_the_link_goes_on(hub: Hub) -> None:
    before = metrics.ENGINE_ERRORS.labels("peers")._value.get()
    hub.coordinator.handle(0, ("violations", []))  # an old tuple: no handler
    hub.links[0].handle(Hello(0, 1))  # a coordinator never sends it
    assert metrics.ENGINE_ERRORS.labels("peers")._value.get() == before + 2
    hub.coordinator.handle(0, Intake({"engine": "ok"}))  # the next one is handled
    assert hub.coordinator._intake[0] == {"engine": "ok"}


# --- questions: fanned out, answered, merged ---------------------------------------------------------
def test_the_coordinator_merges_answers_covered_by_any_named_by_the_first_that_knows() -> None:
    hub = Hub(3)
    c = hub.coordinator
    q = [PeerQuery(f"r{i}", None, "reviews.default", T0, None, None) for i in range(3)]
    c.handle(0, Query(11, q))
    asked = [hub.down[i].take() for i in (1, 2)]
    assert asked[0] == asked[1] and isinstance(asked[0][0], Query)  # every other worker, one question
    assert hub.down[0].take() == []
    cqid = asked[0][0].qid
    c.handle(1, Answer(cqid, [PeerAnswer(False, None), PeerAnswer(True, None), PeerAnswer(False, FRONTEND)]))
    assert hub.down[0].take() == []  # worker 2 has not answered yet
    c.handle(2, Answer(cqid, [PeerAnswer(False, RATINGS), PeerAnswer(False, RATINGS), PeerAnswer(True, RATINGS)]))
    (got,) = hub.down[0].take()
    assert got == Answer(11, [PeerAnswer(False, RATINGS), PeerAnswer(True, RATINGS), PeerAnswer(True, FRONTEND)])


def test_a_question_nobody_answers_in_time_is_answered_with_no_evidence(hub: Hub) -> None:
    c = hub.coordinator
    timeouts = metrics.PEER_QUERIES.labels("timeout")._value.get()
    c.handle(0, Query(5, [PeerQuery("r1", None, "reviews.default", T0, None, None)]))
    hub.down[1].take()  # worker 1 never answers
    for fo in c.fanouts.values():
        fo.deadline = 0.0  # its time is up
    c.tick(T0)
    assert hub.down[0].take() == [Answer(5, [NO_ANSWER])]
    assert metrics.PEER_QUERIES.labels("timeout")._value.get() == timeouts + 1


def test_a_worker_that_goes_away_is_no_longer_waited_for(hub: Hub) -> None:
    c = hub.coordinator
    c.handle(0, Query(6, [PeerQuery("r1", None, "reviews.default", T0, None, None)]))
    c._gone(c.workers[1])
    assert hub.down[0].take() == [Answer(6, [NO_ANSWER])]
    assert c.readiness()[0]["receivers"] == "1 of 2 workers listening"
    c.handle(0, Query(7, [PeerQuery("r2", None, "reviews.default", T0, None, None)]))  # nobody left to ask
    assert hub.down[0].take() == [Answer(7, [NO_ANSWER])]


# --- shared facts -------------------------------------------------------------------------------------
def test_facts_go_to_the_other_workers_once_and_the_tally_to_the_graph(hub: Hub) -> None:
    c = hub.coordinator
    c.handle(0, Shared(Facts(spans_at=T0, last_log={"reviews.default": T0, "ratings.default": T0})))
    assert hub.down[0].take() == []  # not back to the sender
    assert hub.down[1].take() == [Shared(Facts(spans_at=T0, last_log={"reviews.default": T0, "ratings.default": T0}))]
    c.handle(1, Shared(Facts(last_log={"reviews.default": T0 - 5, "ratings.default": T0 + 1})))
    assert hub.down[0].take() == [Shared(Facts(last_log={"ratings.default": T0 + 1}))]  # only what is newer
    c.handle(1, Shared(Facts(last_log={"reviews.default": T0 - 5})))
    assert hub.down[0].take() == []  # nothing new: nothing sent
    counts = [0] * LIVE_WIDTH
    counts[OUT] = 3
    c.handle(0, Shared(Facts(tally=[(FRONTEND, REVIEWS, counts)])))
    assert hub.down[1].take() == []  # the tally is the graph's, not the workers'
    assert list(c.graph.edges) == [("frontend.default", "reviews.default")]


def test_a_worker_absorbs_what_another_shared(hub: Hub) -> None:
    a, b = hub.pipelines
    b.evaluate([inbound(rid="seen")], T0)  # reviews' sidecar logs at worker b
    a.evaluate([app_span(trace="ab" * 16)], T0)
    hub.share()
    assert a.engine.corr.sidecar_last_log.get("reviews.default") == T0
    assert b.engine.corr.index_logged_until is not None
    assert b.engine.corr.index_logged_until >= T0 + b.engine.corr.horizon  # spans flow (at a): b keeps indexing


def test_metrics_and_intake_reach_the_coordinator(hub: Hub) -> None:
    c = hub.coordinator
    hub.share()
    assert set(c.summed.workers) == {0, 1}
    assert c.readiness()[0] == {"receivers": "ok", "engine": "ok", "ingest_queue": "ok"}
    c.handle(1, Intake({"engine": "ok", "ingest_queue": "full: 1000 of 1000 entries"}))
    assert c.readiness()[0]["ingest_queue"] == "worker 1: full: 1000 of 1000 entries"
    c._scrape_seq = 3
    c._scrape_waiting = {0, 1}
    c._broadcast(-1, Scrape(3))
    hub.pump()
    assert c._scrape_waiting == set() and c._scrape_done.is_set()


# --- the whole path: two workers, one request's evidence at both -------------------------------------
def test_workers_span_and_its_access_log_at_different_workers_raise_nothing(hub: Hub) -> None:
    a, b = 0, 1
    hub.evaluate(b, [inbound(rid="seen")], T0)  # reviews' sidecar logs, at worker b
    hub.settle(T0)  # a learns that reviews has a sidecar
    hub.evaluate(a, [app_span(trace="cd" * 16)], T0 + 1)  # the app's span reaches worker a
    hub.share()  # spans are flowing (at a): b keeps indexing its access logs
    hub.evaluate(b, [inbound(rid="r2", trace_id="cd" * 16)], T0 + 1.5)  # its access log, at worker b
    assert hub.settle(T0 + 3.1) == []
    assert hub.pipelines[a].engine.take_deferred() == [] and hub.pipelines[a].engine.forwarded == []


def test_workers_unlogged_span_alerts_once_after_asking_the_peer(hub: Hub) -> None:
    answered = metrics.PEER_QUERIES.labels("answered")._value.get()
    hub.evaluate(1, [inbound(rid="seen")], T0)
    hub.settle(T0)
    hub.evaluate(0, [app_span(trace="ee" * 16)], T0 + 1)
    assert hub.settle(T0 + 2.5) == []  # still within the grace
    got = hub.settle(T0 + 3.1)
    assert rules(got) == ["missing_access_log"] and got[0].destination.key == REVIEWS.key
    assert got[0].examples[0].trace_id == "ee" * 16
    assert metrics.PEER_QUERIES.labels("answered")._value.get() == answered + 1
    assert hub.settle(T0 + 10) == []  # once


def test_workers_plaintext_hop_named_by_the_client_entry_at_the_other_worker(hub: Hub) -> None:
    hub.evaluate(1, [outbound(rid="p1")], T0)  # the client sidecar's entry, at worker b
    hub.evaluate(0, [inbound(src=ADDR, tls=None, rid="p1")], T0 + 0.1)  # waits at worker a
    assert hub.alerts == []
    assert hub.settle(T0 + 0.5) == []
    got = hub.settle(T0 + 2.0)  # attribution wait (1.5 s) over: worker b names the client
    assert rules(got) == ["plaintext_hop"] and got[0].source.key == FRONTEND.key


def test_workers_one_request_logged_at_two_workers_counts_once(hub: Hub) -> None:
    hub.evaluate(0, [outbound(dst=RATINGS, rid="x1")], T0)  # frontend -> ratings: not allowed
    hub.evaluate(1, [inbound(src=FRONTEND_SA, rid="x1", path="/reviews/1")], T0)
    got = hub.settle(T0 + 0.1)  # with what the two evaluations delivered
    assert rules(got) == ["unexpected_edge"]
    assert hub.coordinator.agg.violations == {"unexpected_edge": 1}


def test_workers_keep_indexing_access_logs_while_another_worker_receives_spans(hub: Hub) -> None:
    """b only ever sees access logs, a only spans: a's facts keep b indexing its logs, so a span
    at a is answered by b's log 190 s on."""
    for i in range(0, 200, 10):
        hub.evaluate(0, [app_span(trace=f"{i:032x}", start=T0 + i)], T0 + i)
        hub.share()
        hub.evaluate(1, [inbound(rid=f"q{i}", trace_id=f"{i:032x}")], T0 + i)
        assert hub.settle(T0 + i) == []
    assert hub.settle(T0 + 193) == []  # the last span's wait ended: b had its log
    assert hub.pipelines[1].engine.corr.logged_trace.has("reviews.default", f"{190:032x}")


def test_the_example_fields_cross_and_the_hops_stay_behind(hub: Hub) -> None:
    hub.evaluate(0, [inbound(src=FRONTEND_SA, rid="x9", path="/secret", tls=None)], T0)
    got = hub.settle(T0 + 2)
    assert {a.rule for a in got} >= {"plaintext_hop"}
    ex = next(a for a in got if a.rule == "plaintext_hop").examples[0]
    assert (ex.request_id, ex.path) == ("x9", "/secret")
