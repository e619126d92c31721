"""Learn mode across evaluators, on a real Tansu: the members share one learned baseline through
a compacted topic. An edge one member learned never alerts at another; an edge nobody learned
alerts (once, by id); a member started after the window reads the baseline first and learns
nothing; each member's state file holds the merged baseline."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from infra import als
from infra.brokers import Tansu
from infra.daemon import Daemon, deep_merge
from meshaudit.wire import hops as wire

from integration.test_role_evaluator import (
    PARTITIONS,
    PATH,
    REVIEWS,
    create_topic,
    evaluator_config,
    hops_of,
    key_of,
    logged_by,
    partitions,
    produce,
    start_evaluator,
    wait_until,
)

pytestmark = pytest.mark.distributed

LEARN_SECS = 6


def calls(who: str, at: float, t: float, to: list[int]) -> list[tuple[float, int, bytes, bytes]]:
    """A request from ``who`` (its certificate) to reviews, logged by reviews' sidecar, as a record
    sent ``at`` seconds from now to each partition of ``to`` (one request each)."""
    out = []
    for p in to:
        step = logged_by(REVIEWS, als.inbound_http(who, request_id=f"{who}-{at}-{p}", path=PATH, start=t + at))
        out.append((at, p, f"{who}-{p}".encode(), wire.encode(hops_of(step))))
    return out


def config(tansu: Tansu, topic: str, name: str) -> dict[str, Any]:
    return deep_merge(
        evaluator_config(tansu, topic),
        {
            "distributed": {"baseline_topic": f"{topic}-baseline", "create_topic": True},
            "rules": {
                "unexpected_edge": {"mode": "learn", "learn_secs": LEARN_SECS, "state_file": f"{name}-baseline.json"}
            },
        },
    )


async def test_members_share_the_learned_baseline(tansu: Tansu, tmp_path: Path, evaluators: list[Daemon]) -> None:
    topic = "hops-learn"
    await create_topic(tansu, topic)
    first = start_evaluator(evaluators, tmp_path, config(tansu, topic, "first"), "first")
    await asyncio.to_thread(wait_until, "the first evaluator to join", lambda: partitions(first) == PARTITIONS, 20)
    second = start_evaluator(evaluators, tmp_path, config(tansu, topic, "second"), "second")
    await asyncio.to_thread(
        wait_until, "the group to split", lambda: partitions(first) == 2 and partitions(second) == 2, 30
    )
    assert second.readyz()[1]["components"]["baseline"] == "ok", second.readyz()

    t = time.time()
    # While learning: traffic everywhere (every member's window is open), and "known" on one
    # partition only, so one member learns it.
    records = calls("everyone", 0.3, t, list(range(PARTITIONS)))
    records += calls("known", 0.5, t, [0]) + calls("known", 2.0, t, [0])
    # After the window: "known" on every partition (two belong to the member that never saw it),
    # and "stranger", which nobody learned.
    after = LEARN_SECS + 3.0
    records += calls("known", after, t, list(range(PARTITIONS))) + calls("stranger", after, t, list(range(PARTITIONS)))
    await produce(tansu, topic, records)
    both = [first, second]
    await asyncio.to_thread(wait_until, "the stranger's alert", lambda: any(a for d in both for a in d.alerts()), 15)
    await asyncio.sleep(2.0)
    alerts = [a for d in both for a in d.alerts()]
    assert {key_of(a) for a in alerts} == {("unexpected_edge", "stranger", "reviews")}, alerts
    assert len({a["id"] for a in alerts}) == 1  # one alert, however many members raised it
    assert sum(d.metric("meshaudit_baseline_topic_records_total", result="produced") for d in both) >= 1
    for name in ("first", "second"):  # each member's file: the merged baseline
        doc = orjson.loads((tmp_path / f"{name}-baseline.json").read_bytes())
        assert [(e["from"].split(".")[0], e["to"]) for e in doc["edges"]] == [
            ("everyone", "reviews.default"),
            ("known", "reviews.default"),
        ], doc

    # A member started after the window reads the baseline first: "known" is no news to it.
    third = start_evaluator(evaluators, tmp_path, config(tansu, topic, "third"), "third")
    await asyncio.to_thread(wait_until, "the third member's share", lambda: partitions(third) >= 1, 30)
    assert third.metric("meshaudit_baseline_topic_records_total", result="read") >= 1
    t = time.time()
    await produce(tansu, topic, calls("known", 0.0, t, list(range(PARTITIONS))))
    await asyncio.sleep(HOLD_WAIT)
    assert third.alerts() == [], third.alerts()
    assert {key_of(a) for d in both for a in d.alerts()} == {("unexpected_edge", "stranger", "reviews")}


HOLD_WAIT = 7.0  # past unexpected_edge's HOLD_SECS after the first hop a new member judges
