"""What the evaluator role asks of the pure engine (fake clock): ``Engine.replay`` rebuilds
stage-1 state without judging, so hops judged after it pair and join as in the process that
judged the replayed ones; ``Engine.release`` forgets the waits of a lost partition without a
verdict; and aligned alert windows give the same alert ids in every process that judges the same
violations, whatever else it judged before."""

from __future__ import annotations

from meshaudit.engine.core import Engine
from meshaudit.model import INBOUND, SPAN, SPAN_KIND_CLIENT, Hop, identity
from meshaudit.runtime.evaluator import Catchup, partition_of
from test_engine import ADDR, FRONTEND, T0, app_span, engine, inbound, outbound, rules

INTRUDER = identity("intruder", "default", None, "spiffe://cluster.local/ns/default/sa/intruder")


def at(h: Hop, start: float) -> Hop:
    """``h`` observed at ``start`` (data time)."""
    h.start = start
    return h


def evaluator_engine() -> Engine:
    e = engine()
    e.agg.align()
    return e


def test_replay_judges_nothing() -> None:
    """Violations in replayed hops were judged by the previous owner: no alert, no wait, no count."""
    e = evaluator_engine()
    e.replay([inbound(rid="seen"), inbound(src=INTRUDER, rid="x"), inbound(src=ADDR, tls=None, rid="p")], T0)
    e.replay([app_span(trace="aa" * 16)], T0)
    assert e.tick(T0 + 10) == []
    assert e.agg.violations == {} and e.hops_evaluated == 0


def test_a_replayed_client_entry_names_a_plaintext_hop_judged_after_it() -> None:
    e = evaluator_engine()
    e.replay([outbound(rid="p1")], T0)  # the client sidecar's entry, before the committed offset
    got = e.evaluate([inbound(src=ADDR, tls=None, rid="p1")], T0 + 0.5)
    assert rules(got) == ["plaintext_hop"] and got[0].source is FRONTEND


def test_without_replay_the_same_plaintext_hop_is_named_by_its_address() -> None:
    """The control: the state replay rebuilds is what names the client."""
    e = evaluator_engine()
    assert e.evaluate([inbound(src=ADDR, tls=None, rid="p1")], T0 + 0.5) == []
    got = e.tick(T0 + 2.1)
    assert rules(got) == ["plaintext_hop"] and got[0].source is ADDR


def test_a_replayed_access_log_satisfies_a_span_judged_after_it() -> None:
    e = evaluator_engine()
    e.replay([inbound(rid="seen"), inbound(rid="r2", trace_id="cd" * 16)], T0)
    assert e.evaluate([app_span(trace="cd" * 16)], T0 + 1) == []
    assert e.tick(T0 + 10) == []


def test_without_replay_that_span_is_a_false_missing_access_log() -> None:
    e = evaluator_engine()
    e.evaluate([inbound(rid="seen")], T0)
    e.evaluate([app_span(trace="cd" * 16)], T0 + 1)
    assert rules(e.tick(T0 + 10)) == ["missing_access_log"]


def test_a_replayed_client_span_names_a_bypassed_request() -> None:
    e = evaluator_engine()
    client = Hop(
        SPAN, "span:frontend.default", FRONTEND, INBOUND, FRONTEND, identity(), T0,
        span_id="1" * 16, trace_id="ab" * 16, span_kind=SPAN_KIND_CLIENT,
    )  # fmt: skip
    e.replay([inbound(rid="seen"), client], T0)
    e.evaluate([app_span(parent="1" * 16)], T0 + 1)
    got = e.tick(T0 + 3.1)
    assert rules(got) == ["missing_access_log"] and got[0].source is FRONTEND


def test_release_drops_the_waits_of_lost_partitions_only() -> None:
    """A lost partition's waits end without a verdict (its new owner judges them again with all
    the evidence); the partitions kept still alert."""
    e = evaluator_engine()
    e.evaluate([inbound(rid="seen")], T0)
    spans = [app_span(trace=f"{i:032x}") for i in range(40)]
    e.evaluate(spans, T0 + 1)
    lost = {0, 1}
    moved = [s for s in spans if partition_of(s, 4) in lost]
    assert 0 < len(moved) < len(spans)
    assert e.release(lambda h: partition_of(h, 4) in lost) == len(moved)
    got = e.tick(T0 + 3.1)
    assert rules(got) == ["missing_access_log"]
    assert e.agg.violations["missing_access_log"] == len(spans) - len(moved)
    plain = inbound(src=ADDR, tls=None, rid="p9")
    e.evaluate([plain], T0 + 4)
    assert e.release(lambda h: True) == 1
    assert e.tick(T0 + 10) == [] and e.evaluate([outbound(rid="p9")], T0 + 10) == []


def test_longest_wait_is_the_longest_parked_ttl() -> None:
    # missing_access_log: grace 2 s, and 1 s more for spans the index cannot join; plaintext 1.5 s
    assert evaluator_engine().longest_wait() == 3.0


def test_aligned_ids_are_the_same_in_every_process_that_judges_the_violation() -> None:
    """Two evaluators (or one before and one after a failover) judge the same violation at
    different receive times, after different other violations: the same id."""
    first, second = evaluator_engine(), evaluator_engine()
    a = first.evaluate([at(inbound(src=INTRUDER, rid="x1"), T0 + 5)], T0 + 5.2)
    second.evaluate([inbound(src=ADDR, tls=None, rid="other"), outbound(rid="other")], T0 + 40)
    b = second.evaluate([at(inbound(src=INTRUDER, rid="x1"), T0 + 5)], T0 + 97)
    assert rules(a) == rules(b) == ["unexpected_edge"]
    assert a[0].id == b[0].id
    # A later violation of the same key in the same window (bucket of suppress_secs) repeats it
    # as a count, whichever process sees it; in the next bucket, a new window and a new id.
    assert second.evaluate([at(inbound(src=INTRUDER, rid="x2"), T0 + 6)], T0 + 98) == []
    c = second.evaluate([at(inbound(src=INTRUDER, rid="x3"), T0 + 5 + 60)], T0 + 99)
    assert rules(c) == ["unexpected_edge"] and c[0].id != a[0].id


def test_unaligned_ids_depend_on_the_receive_time() -> None:
    """The control: one process's ids name windows by when they opened."""
    first, second = engine(), engine()
    a = first.evaluate([inbound(src=INTRUDER, rid="x1")], T0)
    b = second.evaluate([inbound(src=INTRUDER, rid="x1")], T0 + 1)
    assert a[0].id != b[0].id


def test_catchup_phases() -> None:
    committed = Catchup(since_ms=1000, judge_from=50, judge_after_ms=2000)
    assert committed.phase(10, 999) == "skip"  # older than the TTL: a broker's coarse answer
    assert committed.phase(10, 1500) == "replay"
    assert committed.phase(50, 900) == "judge"  # from the committed offset on, whatever its time
    fresh = Catchup(since_ms=1000, judge_from=None, judge_after_ms=2000)
    assert [fresh.phase(0, t) for t in (999, 1500, 2000)] == ["skip", "replay", "judge"]
