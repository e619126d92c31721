"""unexpected_edge in learn mode with a state file, on the engine and a fake clock: the baseline is
saved at the first tick after the learning window, a new engine (a restart) starts from it and
does not learn again, a corrupt file means learning again without losing the file, and the
exported policy allows exactly the traffic it was learned from."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from meshaudit import baseline
from meshaudit.config import Policy
from meshaudit.engine.core import Engine
from meshaudit.model import ALS_HTTP, INBOUND, OUTBOUND, Hop, identity
from meshaudit.policyfile import load_policy, read_source
from test_engine import FRONTEND, FRONTEND_SA, NODE_FRONTEND, RATINGS, REVIEWS, T0, engine, inbound, outbound, rules

DETAILS = identity("details", "default")
PRODUCTPAGE = identity("productpage", "default")
WEIRD_SA = identity(None, None, None, "spiffe://cluster.local/ns/batch/sa/job[1]*")
V6_HOST = identity(None, None, None, None, "[fd00::1]:8080")  # an edge out of the mesh, named by its address


def learner(state: Path, **over: Any) -> Engine:
    return engine(
        Policy(), unexpected_edge={"mode": "learn", "learn_secs": 60, "state_file": str(state), **over}
    )  # fmt: skip


def call(dst: Any = REVIEWS, rid: str = "r", method: str = "GET", path: str = "/reviews/1") -> Hop:
    """frontend's sidecar's entry of a request frontend sent."""
    return Hop(
        ALS_HTTP, NODE_FRONTEND, FRONTEND, OUTBOUND, FRONTEND, dst, T0, method=method, path=path, request_id=rid,
        upstream_cluster="outbound|9080||x",
    )  # fmt: skip


def served(src: Any, dst: Any, rid: str, method: str = "GET", path: str = "/") -> Hop:
    """The destination sidecar's entry of a request from ``src`` (named by its certificate)."""
    return Hop(
        ALS_HTTP, "sidecar~10.0.0.7~x", dst, INBOUND, src, dst, T0, method=method, path=path, request_id=rid,
        tls_version="TLSv1.3", upstream_cluster="inbound|80||",
    )  # fmt: skip


def test_learned_edges_are_saved_at_the_first_tick_after_the_window(tmp_path: Path) -> None:
    f = tmp_path / "baseline.json"
    e = learner(f)
    assert e.evaluate([outbound(), inbound()], T0) == []  # frontend -> reviews, both sidecars
    assert e.evaluate([outbound(dst=RATINGS, rid="r2")], T0 + 30) == []
    assert e.evaluate([outbound(rid="r3")], T0 + 45) == []  # seen again: keeps its first time
    e.tick(T0 + 59.9)
    assert not f.exists()  # still learning
    assert rules(e.evaluate([outbound(dst=DETAILS, rid="r4")], T0 + 60.1)) == ["unexpected_edge"]
    e.tick(T0 + 60.2)
    doc = orjson.loads(f.read_bytes())
    sha = doc.pop("sha256")
    assert doc == {  # golden: the file the window leaves
        "format": "meshaudit-baseline",
        "version": 1,
        "written": T0 + 60.2,
        "edges": [
            {"from": "frontend.default", "to": "ratings.default", "first_seen": T0 + 30},
            {"from": "frontend.default", "to": "reviews.default", "first_seen": T0},
        ],
        "routes": {},
    }
    assert sha == baseline.checksum(doc)
    # Written once: later ticks leave it alone.
    written = f.read_bytes()
    e.tick(T0 + 500)
    assert f.read_bytes() == written


def test_a_restart_starts_from_the_saved_baseline_and_does_not_learn_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "baseline.json"
    first = learner(f)
    first.evaluate([outbound(), inbound(), outbound(dst=RATINGS, rid="r2")], T0)
    first.tick(T0 + 61)
    saved = f.read_bytes()

    with caplog.at_level(logging.INFO, "meshaudit.baseline"):
        again = learner(f)  # the restart
    assert any("loaded" in r.getMessage() and "2 edges" in r.getMessage() for r in caplog.records)
    later = T0 + 86_400
    assert again.evaluate([outbound(rid="a"), inbound(rid="a"), outbound(dst=RATINGS, rid="b")], later) == []
    got = again.evaluate([outbound(dst=DETAILS, rid="c")], later + 1)  # at once: no second window
    assert rules(got) == ["unexpected_edge"]
    assert got[0].source is FRONTEND and got[0].destination is DETAILS
    assert (got[0].detail or "").startswith("edge not in the baseline learned at start-up")
    again.tick(later + 3600)
    assert f.read_bytes() == saved  # nothing learned, nothing written


def test_a_corrupt_file_means_an_empty_baseline_learned_again_and_the_file_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "baseline.json"
    first = learner(f)
    first.evaluate([outbound()], T0)
    first.tick(T0 + 61)
    damaged = f.read_bytes().replace(b"reviews", b"details")  # edited by hand: checksum mismatch
    f.write_bytes(damaged)

    with caplog.at_level(logging.INFO, "meshaudit.baseline"):
        e = learner(f)
    (err,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert str(f) in err and "checksum mismatch" in err and "empty baseline" in err and "learning again" in err

    later = T0 + 1000
    assert e.evaluate([outbound(dst=RATINGS, rid="a")], later) == []  # learning again: no alert
    e.tick(later + 30)
    assert f.read_bytes() == damaged  # not overwritten while the new window is open
    e.tick(later + 60.5)
    assert Path(f"{f}.corrupt").read_bytes() == damaged
    got = baseline.load(f)
    assert got is not None and set(got.edges) == {("frontend.default", "ratings.default")}
    # The new baseline is in force: the edge of the damaged file is not in it.
    assert rules(e.evaluate([outbound(rid="b")], later + 61)) == ["unexpected_edge"]


def test_learn_routes_saves_routes_and_never_alerts_on_one(tmp_path: Path) -> None:
    f = tmp_path / "baseline.json"
    e = learner(f, learn_routes=True)
    e.evaluate([call(rid="1"), call(rid="2", path="/reviews/2?x=1"), call(rid="3", method="POST", path="/reviews")], T0)
    e.evaluate([served(FRONTEND_SA, REVIEWS, "1", path="/reviews/1")], T0 + 1)  # the same request, other side
    e.tick(T0 + 61)
    doc = orjson.loads(f.read_bytes())
    assert doc["routes"] == {
        "reviews.default": {"allow": [["GET", "/reviews/1"], ["GET", "/reviews/2"], ["POST", "/reviews"]], "dropped": 0}
    }
    # After the window: a route never seen, on a learned edge, is not unexpected_edge's business.
    assert e.evaluate([call(rid="4", method="DELETE", path="/admin")], T0 + 62) == []
    again = learner(f, learn_routes=True)
    assert again.evaluate([call(rid="5", method="DELETE", path="/admin")], T0 + 100) == []
    again.tick(T0 + 200)
    assert orjson.loads(f.read_bytes())["routes"] == doc["routes"]


LEARNED_TRAFFIC = [
    call(rid="t1"),
    call(rid="t2", path="/reviews/2?page=3"),
    call(rid="t3", method="POST", path="/reviews"),
    served(FRONTEND_SA, REVIEWS, "t1", path="/reviews/1"),
    call(dst=RATINGS, rid="t4", path="/ratings/*"),  # a literal star in a path
    call(dst=V6_HOST, rid="t5", path="/"),
    served(WEIRD_SA, DETAILS, "t6", method="PUT", path="/details/[0]"),
]


def test_the_exported_policy_allows_the_learned_traffic_and_nothing_else(tmp_path: Path) -> None:
    f = tmp_path / "baseline.json"
    e = learner(f, learn_routes=True)
    assert e.evaluate(LEARNED_TRAFFIC, T0) == []
    e.tick(T0 + 61)
    saved = baseline.load(f)
    assert saved is not None
    text = baseline.export_policy(saved, str(f))
    assert yaml.safe_load(text)["apiVersion"] == "meshaudit/v1"
    exported = tmp_path / "exported.yaml"
    exported.write_text(text)  # read as it is, by the policy loader (validate and run use it)
    source = read_source(exported, [])
    assert source is not None
    policy, warnings = load_policy([source])
    assert warnings == []
    assert len(policy.edges or []) == 4
    enforcing = engine(policy)
    assert enforcing.evaluate(LEARNED_TRAFFIC, T0 + 100) == []
    enforcing.tick(T0 + 200)
    # Not vacuous: a new edge, or a new route on a learned destination, does alert.
    other = enforcing.evaluate(
        [call(dst=PRODUCTPAGE, rid="x1"), call(rid="x2", method="DELETE", path="/reviews/1")], T0 + 300
    )
    assert sorted(rules(other)) == ["unexpected_edge", "unexpected_path"]


def test_export_is_a_reviewable_policy_file() -> None:
    b = baseline.Baseline()
    b.add_edge("reviews.default", "ratings.default", T0 + 3600)
    b.add_edge("frontend.default", "reviews.default", T0)
    b.add_edge("spiffe://cluster.local/ns/batch/sa/job[1]*", "[fd00::1]:8080", T0 + 7200)
    b.routes.add("reviews.default", "GET", "/reviews/1")
    b.routes.add("reviews.default", "GET", "/reviews/2")
    b.routes.add("reviews.default", "POST", "/reviews")
    b.written = T0 + 7300
    assert baseline.export_policy(b, "/var/lib/meshaudit/baseline.json") == (
        "# meshaudit learned baseline, exported as a policy for review.\n"
        "# From /var/lib/meshaudit/baseline.json, written 2027-01-15T10:01:40Z.\n"
        "# 3 edges (of 3 learned); 3 routes on 1 destinations.\n"
        "# Every entry below was seen while learning: check each before enforcing it.\n"
        "apiVersion: meshaudit/v1\n"
        "edges:\n"
        "  # first seen 2027-01-15T08:00:00Z\n"
        "  - {from: [frontend.default], to: [reviews.default]}\n"
        "  # first seen 2027-01-15T09:00:00Z\n"
        "  - {from: [reviews.default], to: [ratings.default]}\n"
        "  # first seen 2027-01-15T10:00:00Z\n"
        "  - {from: ['spiffe://cluster.local/ns/batch/sa/job[[]1][*]'], to: ['[[]fd00::1]:8080']}\n"
        "routes:\n"
        "  - to: [reviews.default]\n"
        "    allow:\n"
        "      - {methods: [GET], paths: [/reviews/1, /reviews/2]}\n"
        "      - {methods: [POST], paths: [/reviews]}\n"
    )
    since = baseline.export_policy(b, "state.json", baseline.parse_since("2027-01-15T09:00:00Z"))
    doc = yaml.safe_load(since)
    assert [(e["from"], e["to"]) for e in doc["edges"]] == [
        (["reviews.default"], ["ratings.default"]),
        (["spiffe://cluster.local/ns/batch/sa/job[[]1][*]"], ["[[]fd00::1]:8080"]),
    ]
    assert "routes" not in doc  # reviews.default is no longer a destination of an exported edge
    assert "# 2 edges (of 3 learned, first seen since 2027-01-15T09:00:00Z)" in since
    empty = yaml.safe_load(baseline.export_policy(b, "state.json", baseline.parse_since("2030-01-01")))
    assert empty["edges"] == []  # as a policy: every edge alerts


@pytest.mark.parametrize(
    ("text", "epoch"),
    [
        ("2027-01-15", T0 - 8 * 3600 + 0.0),
        ("2027-01-15T08:00:00Z", T0),
        ("2027-01-15T09:30:00+01:30", T0),
        ("2027-01-15T08:00:00.5Z", T0 + 0.5),
    ],
)
def test_since_takes_a_date_or_an_rfc3339_time(text: str, epoch: float) -> None:
    assert baseline.parse_since(text) == epoch


@pytest.mark.parametrize(("text", "says"), [("yesterday", "expected YYYY-MM-DD"), ("2027-01-15T08:00:00", "offset")])
def test_since_refuses_what_it_cannot_place_in_time(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        baseline.parse_since(text)
