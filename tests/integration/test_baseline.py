"""The learned baseline across restarts, with the real daemon: learn mode with a state file learns
the edges it is sent, writes them when the window ends, and a daemon started again on the file
does not learn again: the known edges raise nothing, a new one alerts at once. The same with
``workers: 2`` (the coordinator owns the file). A damaged file is refused and replaced only after
learning again. ``meshaudit baseline export`` turns the file into a policy that, enforced, raises
nothing on the traffic it was learned from."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from infra import als
from infra.daemon import MESHAUDIT, Daemon, deep_merge, running
from meshaudit import baseline

pytestmark = pytest.mark.integration

LEARN_SECS = 2


def learn_config(state: Path, **over: Any) -> dict[str, Any]:
    rule = {"mode": "learn", "learn_secs": LEARN_SECS, "state_file": str(state), "learn_routes": True}
    return deep_merge({"engine": {"tick_ms": 50}, "rules": {"unexpected_edge": rule}, "policy": {}}, over)


def known_traffic() -> list[Any]:
    """frontend -> reviews (both sidecars' entries), reviews -> ratings (the client's entry)."""
    return [
        als.http_message(
            [
                als.outbound_http("reviews", request_id="k1", path="/reviews/1"),
                als.outbound_http("reviews", request_id="k2", method="POST", path="/reviews"),
            ],
            als.identifier("frontend"),
        ),
        als.http_message(
            [
                als.inbound_http("frontend", request_id="k1", path="/reviews/1"),
                als.inbound_http("frontend", request_id="k2", method="POST", path="/reviews"),
            ],
            als.identifier("reviews", ip="10.0.0.2"),
        ),
        als.http_message(
            [als.outbound_http("ratings", request_id="k3", path="/ratings/7?full=1")],
            als.identifier("reviews", ip="10.0.0.2"),
        ),
    ]


def new_edge(rid: str = "n1") -> Any:
    entry = als.outbound_http("details", request_id=rid, path="/details/1")
    return als.http_message([entry], als.identifier("frontend"))


async def send(d: Daemon, messages: list[Any]) -> None:
    for m in messages:  # one connection per message, as each sidecar has its own
        assert await als.stream(d.grpc, [m]) == grpc.StatusCode.OK


def wait_for(what: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def edge_alerts(alerts: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(a["source"]["service"], a["destination"]["service"]) for a in alerts if a["rule"] == "unexpected_edge"]


def read(path: Path | str) -> bytes:
    return Path(path).read_bytes()


def saved_edges(state: Path) -> set[tuple[str, str]]:
    b = baseline.load(state)
    return set() if b is None else set(b.edges)


KNOWN = {("frontend.default", "reviews.default"), ("reviews.default", "ratings.default")}


async def learn(tmp_path: Path, state: Path, config: dict[str, Any]) -> None:
    """A first daemon learns the known traffic, writes the state file and stops."""
    with running(tmp_path, config, name="learning") as d:
        await send(d, known_traffic())
        assert wait_for(state.exists), d.stderr()
        assert saved_edges(state) == KNOWN
        assert wait_for(lambda: d.metric("meshaudit_baseline_writes_total", result="ok") == 1), d.stderr()
        assert d.metric("meshaudit_baseline_loads_total", result="missing") == 1
        assert edge_alerts(d.alerts()) == []
    assert d.proc is not None and d.proc.returncode == 0


async def restart_knows_the_baseline(tmp_path: Path, state: Path, config: dict[str, Any]) -> None:
    saved = read(state)
    with running(tmp_path, config, name="restarted") as d:
        assert "Learned baseline loaded from" in d.stderr()
        assert d.metric("meshaudit_baseline_loads_total", result="loaded") == 1
        await send(d, known_traffic())
        await send(d, [new_edge()])  # well inside what would be a new learning window
        got = d.wait_alerts(lambda a: bool(edge_alerts(a)), timeout=10)
        assert edge_alerts(got) == [("frontend", "details")], got
        assert d.wait_alerts(lambda a: len(a) > len(got), timeout=1.5) == got  # nothing for the known edges
        await asyncio.sleep(LEARN_SECS + 0.5)  # past the window: nothing learned, nothing written
        assert read(state) == saved
        assert d.metric("meshaudit_baseline_writes_total") == 0


async def test_a_restarted_daemon_keeps_the_learned_baseline(tmp_path: Path) -> None:
    state = tmp_path / "state" / "baseline.json"
    state.parent.mkdir()
    config = learn_config(state)
    await learn(tmp_path, state, config)
    await restart_knows_the_baseline(tmp_path, state, config)


async def test_with_workers_the_coordinator_keeps_the_learned_baseline(tmp_path: Path) -> None:
    state = tmp_path / "baseline.json"
    config = learn_config(state, workers=2)
    await learn(tmp_path, state, config)
    await restart_knows_the_baseline(tmp_path, state, config)


async def test_a_damaged_state_file_is_refused_learned_again_and_kept(tmp_path: Path) -> None:
    state = tmp_path / "baseline.json"
    state.write_text('{"format": "meshaudit-baseline", "version": 1, "edges": [')  # cut short
    damaged = state.read_bytes()
    with running(tmp_path, learn_config(state)) as d:
        err = d.stderr()
        assert f"Learned baseline refused: {state}: not a meshaudit baseline: not valid JSON" in err, err
        assert "Starting with an empty baseline and learning again" in err
        assert d.metric("meshaudit_baseline_loads_total", result="corrupt") == 1
        await send(d, known_traffic())  # learned again: no alert
        await asyncio.sleep(LEARN_SECS / 2)
        assert read(state) == damaged  # not overwritten before the new window ends
        assert wait_for(lambda: Path(f"{state}.corrupt").exists()), d.stderr()
        assert read(f"{state}.corrupt") == damaged
        # The damaged file is copied first, then replaced: until then it is still the damaged one.
        assert wait_for(lambda: read(state) != damaged and saved_edges(state) == KNOWN)
        await send(d, [new_edge()])
        got = d.wait_alerts(lambda a: bool(edge_alerts(a)), timeout=10)
        assert edge_alerts(got) == [("frontend", "details")], got


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_reload_keeps_the_baseline_and_alerts_only_on_new_edges(tmp_path: Path, workers: int) -> None:
    state = tmp_path / "baseline.json"
    config = learn_config(state, workers=workers)
    await learn(tmp_path, state, config)
    with running(tmp_path, config, name="reloaded") as d:
        d.signal(signal.SIGHUP)
        # Every engine (the one process's, or each worker's) reconfigured in place, its baseline kept.
        assert wait_for(lambda: d.stderr().count("the learned baseline are kept") == workers), d.stderr()
        await send(d, known_traffic())
        await send(d, [new_edge()])
        got = d.wait_alerts(lambda a: bool(edge_alerts(a)), timeout=10)
        assert edge_alerts(got) == [("frontend", "details")], got
        assert d.wait_alerts(lambda a: len(a) > len(got), timeout=1.5) == got
        assert d.stderr().count("Learned baseline loaded from") == 1  # at start only: the reload kept it


def meshaudit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MESHAUDIT, *args], capture_output=True, text=True, timeout=30)


def export(*args: str) -> subprocess.CompletedProcess[str]:
    return meshaudit("baseline", "export", *args)


async def test_baseline_export_gives_a_policy_that_raises_nothing_on_the_learned_traffic(tmp_path: Path) -> None:
    state = tmp_path / "baseline.json"
    await learn(tmp_path, state, learn_config(state))

    out = export("--state", str(state))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# meshaudit learned baseline, exported as a policy for review.\n")
    assert f"# From {state}, written " in out.stdout and "# 2 edges (of 2 learned)" in out.stdout
    doc = yaml.safe_load(out.stdout)
    assert doc["apiVersion"] == "meshaudit/v1"
    assert doc["edges"] == [
        {"from": ["frontend.default"], "to": ["reviews.default"]},
        {"from": ["reviews.default"], "to": ["ratings.default"]},
    ]
    assert doc["routes"] == [
        {"to": ["ratings.default"], "allow": [{"methods": ["GET"], "paths": ["/ratings/7"]}]},
        {
            "to": ["reviews.default"],
            "allow": [{"methods": ["GET"], "paths": ["/reviews/1"]}, {"methods": ["POST"], "paths": ["/reviews"]}],
        },
    ]
    assert out.stdout.count("  # first seen 20") == 2

    # --since: the edges first seen at or after it (all of them were seen today; none tomorrow).
    today = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86_400))
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86_400))
    assert yaml.safe_load(export("--state", str(state), "--since", today).stdout)["edges"] == doc["edges"]
    later = export("--state", str(state), "--since", f"{tomorrow}T00:00:00Z")
    assert later.returncode == 0 and yaml.safe_load(later.stdout)["edges"] == []

    # Enforced as the policy, as it was exported, it raises nothing on the traffic it was learned from.
    policy_file = tmp_path / "exported-policy.yaml"
    policy_file.write_text(out.stdout)
    enforcing = {"engine": {"tick_ms": 50}, "policy_file": str(policy_file)}
    enforcing_file = tmp_path / "enforcing.yaml"
    enforcing_file.write_text(yaml.safe_dump(enforcing))
    check = meshaudit("validate", str(enforcing_file))
    assert check.returncode == 0, check.stderr
    assert "policy: 2 edges, 2 routes" in check.stdout
    with running(tmp_path, enforcing, name="enforcing") as d:
        await send(d, known_traffic())
        await send(d, [new_edge()])  # the marker: the one thing this policy does not allow
        got = d.wait_alerts(lambda a: bool(edge_alerts(a)), timeout=10)
        assert d.wait_alerts(lambda a: len(a) > len(got), timeout=1.5) == got
        assert [(a["rule"], a["destination"]["service"]) for a in got] == [("unexpected_edge", "details")], got


def test_baseline_export_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    state = tmp_path / "baseline.json"
    missing = export("--state", str(state))
    assert missing.returncode == 2 and f"{state}: no such file" in missing.stderr
    state.write_text('{"format": "meshaudit-baseline", "version": 7}')
    damaged = export("--state", str(state))
    assert damaged.returncode == 2
    assert f"{state}: baseline format version 7 is not supported" in damaged.stderr
    assert "Traceback" not in damaged.stderr and damaged.stdout == ""
    bad_since = export("--state", str(state), "--since", "last week")
    assert bad_since.returncode == 2 and "expected YYYY-MM-DD or an RFC 3339 time" in bad_since.stderr
