"""The live service graph (/graph.json, /graph) and `meshaudit report` against a real daemon fed
real ALS bytes and real OpenTelemetry SDK spans: the figures an on-call engineer and a reviewer
read, per edge, and what the page and the report show of them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from infra import als
from infra.daemon import Daemon, deep_merge, running
from infra.otlp import server_span
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

from integration.conftest import CONFIG

PROBES = {"name": "probes", "rules": ["plaintext_hop", "unexpected_path"], "paths": ["/healthz"], "reason": "kubelet"}
GRAPH_CONFIG = deep_merge(
    CONFIG,
    {
        "graph": {"history_bucket_secs": 1, "history_hours": 1},
        "policy": {"exceptions": [PROBES]},
    },
)
GRAPH_CONFIG["policy"].pop("exemptions")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon, one mix of traffic: mTLS frontend -> reviews (with its client entries, a retry
    and a failure), plaintext reviews -> ratings (named from the client entry), an edge the policy
    does not allow (frontend -> ratings), and two traced requests to reviews, one logged."""
    with running(tmp_path_factory.mktemp("graph"), GRAPH_CONFIG) as d:
        _feed(d)
        yield d


def _feed(d: Daemon) -> None:
    import asyncio

    async def go() -> None:
        ids = [f"fr-{i}" for i in range(10)]
        inbound = [als.inbound_http("frontend", request_id=r, path="/reviews/1", duration_ms=12.0) for r in ids]
        outbound = [
            als.outbound_http(
                "reviews",
                request_id=r,
                path="/reviews/1",
                duration_ms=900.0 if i == 0 else 20.0,
                attempts=2 if i == 0 else 1,
                status=503 if i == 1 else 200,
                details="via_upstream",
            )
            for i, r in enumerate(ids)
        ]
        await als.stream(d.grpc, [als.http_message(outbound, als.identifier("frontend"))])
        await als.stream(d.grpc, [als.http_message(inbound, als.identifier("reviews"))])
        # plaintext reviews -> ratings: the client sidecar's entry names the source
        conns = [f"10.0.0.7:{41000 + i}" for i in range(4)]
        client = [
            als.outbound_http("ratings", request_id=None, upstream_local=c, path="/ratings/1", duration_ms=5.0)
            for c in conns
        ]
        for e in client:
            e.request.request_id = ""
        server = [als.inbound_http(None, remote=c, path="/ratings/1", duration_ms=3.0) for c in conns]
        for e in server:
            e.request.request_id = ""
        await als.stream(d.grpc, [als.http_message(client, als.identifier("reviews"))])
        await als.stream(d.grpc, [als.http_message(server, als.identifier("ratings"))])
        # not allowed by policy: frontend -> ratings, over mTLS
        await als.stream(
            d.grpc, [als.http_message([als.inbound_http("frontend", path="/ratings/2")], als.identifier("ratings"))]
        )
        # kubelet probes covered by the policy exception
        probe = [als.inbound_http(None, remote="10.0.0.99:5000", path="/healthz") for _ in range(3)]
        await als.stream(d.grpc, [als.http_message(probe, als.identifier("reviews"))])

    asyncio.run(go())
    # traced requests to reviews: one its sidecar logged (traceparent in the entry), one not
    _, tp = server_span(GrpcSpanExporter(endpoint=d.grpc, insecure=True), "reviews", "/reviews/3")
    logged = als.inbound_http("frontend", path="/reviews/3", traceparent=tp)
    asyncio.run(als.stream(d.grpc, [als.http_message([logged], als.identifier("reviews"))]))
    server_span(
        GrpcSpanExporter(endpoint=d.grpc, insecure=True), "reviews", "/reviews/4"
    )  # bypassed: missing_access_log
    d.wait_alerts(lambda a: {"missing_access_log", "plaintext_hop", "unexpected_edge"} <= {x["rule"] for x in a})


def _get(d: Daemon, path: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(f"{d.metrics_url}{path}", timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _graph(d: Daemon, query: str = "") -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:  # the graph takes the engine's counts once a second
        status, _, body = _get(d, f"/graph.json{query}")
        assert status == 200, body
        view: dict[str, Any] = json.loads(body)
        edges = {(e["source"], e["destination"]): e for e in view["edges"]}
        covered = edges.get(("frontend.default", "reviews.default"), {}).get("traced", 0) >= 1
        judged = edges.get(("10.0.0.44", "reviews.default"), {}).get("traced", 0) >= 1
        if (covered and judged) or time.monotonic() > deadline:
            return view
        time.sleep(0.3)


def test_graph_json_gives_each_edge_its_figures(fed: Daemon) -> None:
    view = _graph(fed)
    assert view["schema"] == "meshaudit.graph.v1"
    edges = {(e["source"], e["destination"]): e for e in view["edges"]}
    fr = edges[("frontend.default", "reviews.default")]
    assert fr["requests"] == 10 and fr["inbound_entries"] == 11  # + the logged traced request
    assert fr["mtls"] == "mtls" and fr["mtls_ratio"] == 1.0
    assert fr["failures"] == 1 and fr["error_ratio"] == 0.1
    assert fr["retries"] == 1 and fr["retry_ratio"] == 0.1
    assert fr["latency_ms"]["samples"] == 8  # the source sidecar's durations: the first 8 a second
    assert 10 <= fr["latency_ms"]["p50"] <= 25 and fr["latency_ms"]["p99"] > 500
    assert fr["traced"] == 1 and fr["log_coverage_ratio"] == 1.0  # named from the entry that logged it
    assert fr["allowed"] is True and fr["violating"] is False

    rr = edges[("reviews.default", "ratings.default")]
    assert rr["mtls"] == "plaintext" and rr["plaintext"] == 4 and rr["mtls_ratio"] == 0.0
    assert rr["requests"] == 4 and rr["alerts"] == {"plaintext_hop": 1}
    assert rr["allowed"] is True and rr["violating"] is True

    bad = edges[("frontend.default", "ratings.default")]
    assert bad["allowed"] is False and bad["violating"] is True and bad["alerts"] == {"unexpected_edge": 1}

    bypassed = edges[("10.0.0.44", "reviews.default")]  # the app span's client address
    assert bypassed["traced"] == 1 and bypassed["log_coverage_ratio"] == 0.0
    assert bypassed["alerts"] == {"missing_access_log": 1}

    services = {s["key"] for s in view["services"]}
    assert {"frontend.default", "reviews.default", "ratings.default"} <= services
    ns = {n["name"]: n for n in view["namespaces"]}
    assert ns["default"]["inbound_entries"] == 11 + 4 + 1 + 3  # + the probes


def test_graph_json_bounds_and_errors(fed: Daemon) -> None:
    view = _graph(fed, "?window=60")
    top = json.loads(_get(fed, "/graph.json?window=60&top=1")[2])  # top is a setting, not a query
    assert len(top["edges"]) == len(view["edges"])
    status, _, body = _get(fed, "/graph.json?window=soon")
    assert status == 400 and b"window" in body
    status, _, body = _get(fed, "/graph.json?since=-1h")
    assert status == 400 and b"since" in body


def test_graph_page_is_self_contained_and_draws_the_edges(fed: Daemon) -> None:
    _graph(fed)
    status, headers, body = _get(fed, "/graph")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'nonce-" in csp
    assert "http://" not in page.replace(fed.metrics_url, "") and "https://" not in page  # nothing external
    assert 'data-src="reviews.default" data-dst="ratings.default" data-mtls="plaintext" data-violating="true"' in page
    assert 'data-src="frontend.default" data-dst="reviews.default" data-mtls="mtls" data-violating="false"' in page
    status, _, frag = _get(fed, "/graph?fragment=1")
    assert status == 200 and b"<script" not in frag and b'class="edge"' in frag


def _report(d: Daemon, fmt: str, out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "meshaudit", "report", "--url", d.metrics_url, "--format", fmt, "--since", "1h"]
    return subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True, timeout=30)


def test_report_json_covers_what_a_review_asks(fed: Daemon, tmp_path: Path) -> None:
    _graph(fed)
    r = _report(fed, "json", tmp_path / "report.json")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["schema"] == "meshaudit.report.v1"
    s = rep["summary"]
    assert s["edges_not_allowed"] == 1 and s["services"] >= 3
    assert rep["violations"]["plaintext_hop"]["top_offenders"][0] == {
        "source": "reviews.default",
        "destination": "ratings.default",
        "count": 1,
    }
    assert set(rep["violations"]) == {"plaintext_hop", "unexpected_edge", "missing_access_log"}
    # 3 probes, each excused from plaintext_hop and unexpected_path
    assert rep["exceptions"] == [{"name": "probes", "requests": 3, "matches": 6, "expired": 0}]
    h = rep["health"]
    assert h["complete"] is True and h["dropped"] == {} and h["received"]["envoy_als/http"] >= 30
    assert rep["timeline"] and all(t["mtls_ratio"] is None or 0 <= t["mtls_ratio"] <= 1 for t in rep["timeline"])
    ns = {n["name"]: n for n in rep["namespaces"]}
    assert 0 < ns["default"]["mtls_ratio"] < 1  # plaintext to ratings, probes to reviews


def test_report_markdown_and_html(fed: Daemon, tmp_path: Path) -> None:
    _graph(fed)
    assert _report(fed, "md", tmp_path / "report-md.txt").returncode == 0
    md = (tmp_path / "report-md.txt").read_text()
    assert "| reviews.default | ratings.default | 4 | 0.0% |" in md
    assert "**unexpected_edge**: 1" in md and "probes: covered 3 requests (6 violations excused)" in md
    assert _report(fed, "html", tmp_path / "report.html").returncode == 0
    page = (tmp_path / "report.html").read_text()
    assert 'id="coverage-chart"' in page and 'data-rule="plaintext_hop"' in page
    assert "<script" not in page and "http://" not in page.replace(fed.metrics_url, "")


def test_report_says_clearly_when_the_daemon_cannot_be_read(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "meshaudit", "report", "--url", "http://127.0.0.1:9", "--since", "1h"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "meshaudit report: http://127.0.0.1:9" in r.stderr
    r = subprocess.run([*cmd[:-1], "soon"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "not a positive duration" in r.stderr
