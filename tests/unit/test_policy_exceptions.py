"""Policy exceptions on a fake clock: each matcher (from, to, methods, paths, not_paths,
user_agent, source_cidr, response_codes, protocol) lets through exactly what it names, all of an
exception's matchers must match, an exception stops at its ``expires`` day, and each one counts
the violations it covered."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from meshaudit.config import Config, Policy
from meshaudit.engine.core import Engine
from meshaudit.engine.setup import build_engine
from meshaudit.model import ALS_HTTP, ALS_TCP, INBOUND, Alert, Hop, identity
from test_engine import NODE_REVIEWS, REVIEWS, T0

NODE_ADDR = identity(None, None, None, None, "10.128.0.7:51234")  # a kubelet on the node

PROBES = {
    "name": "kubelet-probes",
    "rules": ["plaintext_hop"],
    "reason": "kubelet probes arrive in plaintext from the node",
    "to": ["reviews.default"],
    "methods": ["GET"],
    "paths": ["/healthz", "/readyz"],
    "user_agent": "kube-probe/*",
    "source_cidr": ["10.128.0.0/16"],
}


def engine(*exceptions: dict[str, Any], **policy: Any) -> Engine:
    cfg = Config.model_validate(
        {"engine": {"suppress_secs": 60}, "rules": {"plaintext_hop": {"attribution_wait_ms": 0}}}
    )
    return build_engine(cfg, Policy.model_validate({"exceptions": list(exceptions), **policy}))


def plain(
    path: str | None = "/healthz",
    ua: str | None = "kube-probe/1.29",
    addr: str = "10.128.0.7:51234",
    status: int = 200,
    method: str | None = "GET",
    origin: int = ALS_HTTP,
) -> Hop:
    """A plaintext request (or TCP connection) reaching reviews' sidecar from an address."""
    src = identity(None, None, None, None, addr)
    return Hop(
        origin, NODE_REVIEWS, REVIEWS, INBOUND, src, REVIEWS, T0, method=method, path=path, status=status,
        user_agent=ua, source_address=addr, conn=addr, upstream_cluster="inbound|9080||",
    )  # fmt: skip


def alerted(e: Engine, h: Hop, at: float = T0) -> bool:
    got: list[Alert] = e.evaluate([h], at) + e.tick(at + 1)
    return any(a.rule == "plaintext_hop" for a in got)


def test_the_kubelet_probe_example_lets_through_only_what_it_names() -> None:
    assert not alerted(engine(PROBES), plain())
    assert not alerted(engine(PROBES), plain(path="/readyz?full=1"))
    assert alerted(engine(PROBES), plain(path="/admin"))  # paths
    assert alerted(engine(PROBES), plain(ua="curl/8.5"))  # user_agent
    assert alerted(engine(PROBES), plain(ua=None))  # no user agent logged: not a probe
    assert alerted(engine(PROBES), plain(addr="10.1.0.7:51234"))  # source_cidr
    assert alerted(engine(PROBES), plain(method="POST"))  # methods


@pytest.mark.parametrize(
    ("matcher", "hit", "miss"),
    [
        ({"from": ["10.128.*"]}, {}, {"addr": "10.9.0.1:1"}),
        ({"to": ["ratings.*"]}, None, {}),
        ({"not_paths": ["/admin*"]}, {}, {"path": "/admin/x"}),
        ({"response_codes": [200, "3xx"]}, {"status": 302}, {"status": 500}),
        ({"response_codes": ["5xx"]}, {"status": 503}, {"status": 200}),
        ({"protocol": "tcp"}, {"origin": ALS_TCP, "method": None, "path": None, "ua": None}, {}),
        ({"protocol": ["http"]}, {}, {"origin": ALS_TCP, "method": None, "path": None, "ua": None}),
        ({"source_cidr": "fd00::/8"}, {"addr": "[fd00::7]:443"}, {"addr": "[fe80::1]:443"}),
        ({"user_agent": ["Prometheus/*", "kube-probe/*"]}, {"ua": "Prometheus/2.51"}, {"ua": "Go-http-client/2"}),
    ],
)
def test_each_matcher(matcher: dict[str, Any], hit: dict[str, Any] | None, miss: dict[str, Any]) -> None:
    x = {"name": "x", "rules": ["plaintext_hop"], "reason": "r", **matcher}
    if hit is not None:
        assert not alerted(engine(x), plain(**hit)), hit
    assert alerted(engine(x), plain(**miss)), miss


def test_an_exception_covers_only_its_rules() -> None:
    x = {**PROBES, "rules": ["unexpected_path"]}
    assert alerted(engine(x), plain())


def test_an_exception_stops_at_its_expires_day_and_says_so() -> None:
    day = datetime.datetime.fromtimestamp(T0, datetime.UTC).date() + datetime.timedelta(days=1)
    midnight = datetime.datetime.combine(day, datetime.time(), datetime.UTC).timestamp()
    e = engine({**PROBES, "expires": day.isoformat()})
    assert not alerted(e, plain(), midnight - 10)
    assert e.ctx.policy.exceptions.take_expired() == []
    e.tick(midnight)
    assert [x.name for x in e.ctx.policy.exceptions.take_expired()] == ["kubelet-probes"]
    assert alerted(e, plain(addr="10.128.0.8:1"), midnight + 5)


def test_matches_are_counted_per_exception() -> None:
    other = {"name": "scrapes", "rules": ["plaintext_hop"], "reason": "r", "paths": ["/stats/prometheus"]}
    e = engine(PROBES, other)
    for i in range(3):
        e.evaluate([plain(addr=f"10.128.0.{i}:1")], T0 + i)
    assert e.ctx.policy.exceptions.take_matches() == ({"kubelet-probes": 3}, {"kubelet-probes": 3})
    assert e.ctx.policy.exceptions.names == ["kubelet-probes", "scrapes"]


def test_a_request_that_breaks_two_covered_rules_is_one_request_of_covered_traffic() -> None:
    """A probe breaks plaintext_hop and unexpected_path (no route allows /healthz): two
    violations excused, one request covered (meshaudit_policy_exception_requests_total)."""
    both = {**PROBES, "rules": ["plaintext_hop", "unexpected_path"]}
    routes = [{"to": ["reviews.default"], "allow": [{"methods": ["GET"], "paths": ["/reviews/*"]}]}]
    e = engine(both, routes=routes)
    for i in range(2):
        assert not alerted(e, plain(addr=f"10.128.0.{i}:1"), T0 + i)
    assert e.ctx.policy.exceptions.take_matches() == ({"kubelet-probes": 4}, {"kubelet-probes": 2})


def test_exemptions_still_work_as_exceptions_named_by_position() -> None:
    e = engine(exemptions=[{"rules": ["plaintext_hop"], "paths": ["/healthz"], "reason": "probes"}])
    assert not alerted(e, plain(ua=None, addr="10.9.9.9:1"))
    assert e.ctx.policy.exceptions.take_matches() == ({"exemptions[0]": 1}, {"exemptions[0]": 1})
