"""The Grafana dashboard in deploy/grafana: importable (a datasource variable, `__inputs` and
`__requires`), read top to bottom in rows, every panel saying what a bad value means; and, against
a real Prometheus scraping a live daemon (two workers, an MQTT sink on a real Mosquitto) that
received real traffic, every query returns data and names only metrics the daemon exports."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from infra import als
from infra.brokers import Mosquitto
from infra.daemon import deep_merge, running
from infra.faults import post_garbage, stolen_certificate
from infra.otlp import server_span
from infra.prometheus import Prometheus, prometheus
from infra.promql import exported_names, metric_names, unknown_metrics
from meshaudit import metrics
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from prometheus_client import generate_latest

from integration.conftest import CONFIG

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "meshaudit.json"
RUNBOOK = ROOT / "deploy" / "prometheus" / "RUNBOOK.md"
DS = {"type": "prometheus", "uid": "${datasource}"}
ROWS = [
    "Is it up and ingesting?",
    "Is it losing data?",
    "What is it finding?",
    "Are the alerts delivered?",
    "Is it healthy?",
]
# What Grafana puts in for its range variables, here: the whole of the test's traffic.
RANGE = "1m"


def load() -> dict[str, Any]:
    dash: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dash


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel but the rows, also those inside a collapsed row."""
    for p in dash["panels"]:
        if p["type"] == "row":
            yield from p.get("panels", [])
        else:
            yield p


def targets(dash: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expression) of every query."""
    return [(p["title"], t["refId"], t["expr"]) for p in panels(dash) for t in p["targets"]]


def variable_queries(dash: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Each query variable's ``label_values(selector, label)`` (Grafana's own function) as
    (selector, label)."""
    out = {}
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.+), *(\w+)\)", v["query"])
            assert m, f"variable {v['name']}: {v['query']}"
            out[v["name"]] = (m.group(1), m.group(2))
    return out


def substitute(expr: str, job: str, instance: str) -> str:
    """The expression as Grafana sends it with ``job`` and ``instance`` chosen."""
    for name, value in (("job", job), ("instance", instance), ("__rate_interval", RANGE), ("__range", RANGE)):
        expr = re.sub(rf"\$(?:{name}\b|\{{{name}\}})", value, expr)
    assert "$" not in expr, f"a variable the test does not know: {expr}"
    return expr


# --- the file ----------------------------------------------------------------------------------
def test_the_dashboard_is_importable_with_the_datasource_as_a_variable() -> None:
    dash = load()
    assert dash["uid"] == "meshaudit" and dash["title"] and dash["id"] is None
    assert dash["schemaVersion"] >= 41  # Grafana 12
    # Import asks for the Prometheus to use; it becomes the datasource variable's default.
    (ds_input,) = dash["__inputs"]
    assert (ds_input["type"], ds_input["pluginId"]) == ("datasource", "prometheus")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    chosen = "${" + ds_input["name"] + "}"
    assert ds["current"]["value"] == chosen
    assert DASHBOARD.read_text().count(chosen) == 2, "panels use ${datasource}, not the import input"
    assert set(variable_queries(dash)) == {"job", "instance"}
    for name in ("job", "instance"):
        assert variables[name]["datasource"] == DS
    requires = {(r["type"], r["id"]) for r in dash["__requires"]}
    assert {("grafana", "grafana"), ("datasource", "prometheus")} <= requires
    assert {("panel", p["type"]) for p in panels(dash)} <= requires
    ids = [p["id"] for p in dash["panels"]] + [p["id"] for r in dash["panels"] for p in r.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dash):
        assert p["datasource"] == DS, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS, p["title"]
            assert 'job=~"$job", instance=~"$instance"' in t["expr"], (p["title"], t["expr"])


def test_rows_read_top_to_bottom_and_panels_do_not_overlap() -> None:
    dash = load()
    rows = [p for p in dash["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == ROWS
    cells: set[tuple[int, int]] = set()
    row_y = [r["gridPos"]["y"] for r in rows]
    assert row_y == sorted(row_y)
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    # Each row has panels, between it and the next row.
    for i, r in enumerate(rows):
        end = row_y[i + 1] if i + 1 < len(rows) else math.inf
        inside = [p for p in dash["panels"] if p["type"] != "row" and r["gridPos"]["y"] < p["gridPos"]["y"] < end]
        assert inside, r["title"]


def test_every_panel_says_what_a_bad_value_means_and_its_runbook_exists() -> None:
    dash = load()
    sections = {m.lower() for m in re.findall(r"^## (\S+)$", RUNBOOK.read_text(), re.M)}
    linked = set()
    for p in panels(dash):
        assert len(p.get("description", "")) > 40, p["title"]
        for anchor in re.findall(r"RUNBOOK\.md#([\w-]+)", p["description"]):
            assert anchor in sections, f"{p['title']}: no runbook section #{anchor}"
            linked.add(anchor)
    # Every alert about meshaudit's own health has a panel showing what it fires on.
    assert linked == sections


def test_rates_use_grafanas_rate_interval() -> None:
    for title, _, expr in targets(load()):
        for fn, window in re.findall(r"\b(rate|increase|irate|delta)\([^\[]*\[([^\]]*)\]", expr):
            want = "$__range" if fn == "increase" and window == "$__range" else "$__rate_interval"
            assert window == want, f"{title}: {fn}(...[{window}])"


# --- the metric-name check -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('up{job=~"$job"}', {"up"}),
        (
            'histogram_quantile(0.99, sum by (sink, le) (rate(meshaudit_sink_delivery_seconds_bucket{sink="mqtt"}'
            "[$__rate_interval])))",
            {"meshaudit_sink_delivery_seconds_bucket"},
        ),
        (
            'sum without (receiver) (rate(a_total{reason="queue_full"}[5m] offset 1m)) / on (instance) b * 1e3',
            {"a_total", "b"},
        ),
        ('count_values("version", x) and bool y or {__name__="z", job="j"}', {"x", "y", "z"}),
        ("sum(rate(c_total[5m])) by (le) > 0.5", {"c_total"}),
    ],
)
def test_metric_names_are_read_out_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_the_metric_check_fails_on_a_made_up_name() -> None:
    exported = exported_names(generate_latest(metrics.REGISTRY).decode())
    good = (
        'sum(rate(meshaudit_received_total{job="m"}[5m])) + up'
        " + histogram_quantile(0.5, rate(meshaudit_event_loop_lag_seconds_bucket[5m]))"
    )
    bad = "sum(rate(meshaudit_recieved_total[5m])) + meshaudit_sink_delivery_seconds_p99"
    assert unknown_metrics([good], exported) == {}
    assert unknown_metrics([good, bad], exported) == {
        bad: {"meshaudit_recieved_total", "meshaudit_sink_delivery_seconds_p99"}
    }
    # A labelled family with no series yet still declares its names (HELP and TYPE).
    assert {"meshaudit_peer_queries_total", "meshaudit_build_info", "process_cpu_seconds_total"} <= exported


# --- against a live daemon -----------------------------------------------------------------
def _has_finite_data(prom: Prometheus, expr: str) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in prom.query(expr))


async def _traffic(grpc: str, http: str, round_: int) -> None:
    """One round of what a mesh sends: mTLS HTTP and TCP access logs, spans over OTLP/gRPC and
    OTLP/HTTP, a plaintext hop, a stolen certificate and undecodable bodies."""
    reviews = als.identifier("reviews")
    ok = [als.inbound_http("frontend", path=f"/reviews/{round_}-{i}") for i in range(5)]
    plain = als.inbound_http(None, path="/reviews/1", remote=f"10.9.{round_}.1:5000")
    await als.stream(grpc, [als.http_message([*ok, plain], reviews)])
    tcp = als.tcp_entry(cluster="inbound|9080||", peer=als.spiffe("reviews"))
    await als.stream(grpc, [als.tcp_message([tcp], als.identifier("ratings"))])
    server_span(GrpcSpanExporter(endpoint=grpc, insecure=True), "reviews", f"/reviews/g{round_}")
    server_span(HttpSpanExporter(endpoint=f"http://{http}/v1/traces"), "reviews", f"/reviews/h{round_}")
    await stolen_certificate(grpc, f"stolen-{round_}")
    await asyncio.to_thread(post_garbage, http, 5)


async def test_every_query_returns_data_from_a_live_daemon(mosquitto: Mosquitto, tmp_path: Path) -> None:
    dash = load()
    config = deep_merge(CONFIG, {"workers": 2, "sinks": {"mqtt": {"port": mosquitto.port, "topic_prefix": "grafana"}}})
    with running(tmp_path, config) as d, prometheus(tmp_path, d.metrics_addr, []) as prom:
        instance = d.metrics_addr
        # Counters created at 0 must be scraped at 0 first, or rate() never sees them rise.
        assert prom.wait(lambda: prom.query('meshaudit_sink_sent_total{sink="mqtt"}'))
        await _traffic(d.grpc, d.http, 1)
        # Series born with the first round (OTLP/HTTP spans) rise with the second.
        assert prom.wait(lambda: prom.query('meshaudit_received_total{receiver="otlp_http"}'))
        await _traffic(d.grpc, d.http, 2)
        assert d.wait_metric("meshaudit_alerts_total", 1, rule="identity_mismatch", severity="critical") == 1
        # Prometheus has scraped the second round and the alerts delivered.
        assert prom.wait(lambda: prom.query('sum(meshaudit_received_total{receiver="otlp_http"}) >= 2'))
        assert prom.wait(lambda: prom.query('meshaudit_sink_sent_total{sink="mqtt"} > 0'))

        # Every metric the dashboard names is one this daemon exports.
        selectors = [s for s, _ in variable_queries(dash).values()]
        exprs = [e for _, _, e in targets(dash)] + selectors
        assert unknown_metrics(exprs, exported_names(d.scrape())) == {}

        # Every query returns data: a finite value, as a panel draws it.
        queries = {(title, ref): substitute(e, "meshaudit", instance) for title, ref, e in targets(dash)}

        def empty() -> list[str]:
            return [q for q in queries.values() if not _has_finite_data(prom, q)]

        assert prom.wait(lambda: not empty(), timeout=10), empty()

        def panel(title: str, ref: str = "A") -> list[tuple[dict[str, str], float]]:
            """(labels, value) of each series the panel's query ``ref`` draws now."""
            return [(r["metric"], float(r["value"][1])) for r in prom.query(queries[(title, ref)])]

        def rising(title: str, *labels: str) -> set[tuple[str, ...]]:
            return {tuple(m[k] for k in labels) for m, v in panel(title) if v > 0}

        # And shows what happened: a few values an on-call engineer reads.
        sinks = {"jsonl", "mqtt"}
        assert [v for m, v in panel("Scraped") if m["instance"] == instance] == [1.0]
        ingest = rising("Received /s by receiver and kind", "receiver", "kind")
        assert {("envoy_als", "http"), ("envoy_als", "tcp"), ("otlp_grpc", "span"), ("otlp_http", "span")} <= ingest
        assert rising("Rejected /s by receiver and reason", "receiver", "reason") == {("otlp_http", "undecodable")}
        assert panel("Critical alerts")[0][1] >= 1
        found = rising("Alerts by rule and severity in the time range", "rule", "severity")
        assert {("identity_mismatch", "critical"), ("plaintext_hop", "high")} <= found
        assert {m["sink"]: v for m, v in panel("Sink ready")} == dict.fromkeys(sinks, 1.0)
        assert ("mqtt",) in rising("Delivered, failed and retried /s by sink", "sink")
        latency = {m["sink"]: v for m, v in panel("Delivery latency by sink") if math.isfinite(v)}
        assert 0 < latency["mqtt"] < 5
        # Series that exist at 0 from the start, so that the first event shows as a rise.
        drops = panel("Alerts dropped /s by sink and reason")
        assert {(m["sink"], m["reason"]) for m, _ in drops} == {
            (s, r) for s in sinks for r in metrics.SINK_DROP_REASONS
        }
        assert {v for _, v in drops} == {0.0}
        held = {m["rule"] for m, _ in panel("Alerts held back by the budget /min by rule")}
        assert {"identity_mismatch", "plaintext_hop", "unexpected_edge"} <= held
        assert panel("Workers ready") == [({"instance": instance}, 2.0)]
        assert panel("Memory (RSS)")[0][1] > 3 * 40 * 2**20  # the coordinator and both workers

        # The variables' queries find this daemon.
        for name, (selector, label) in variable_queries(dash).items():
            series = prom.api("series", **{"match[]": substitute(selector, "meshaudit", instance)})
            assert {s[label] for s in series} == {"job": {"meshaudit"}, "instance": {instance}}[name]
