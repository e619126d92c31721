"""``meshaudit report``: the document a security review asks for, from a running daemon.

It reads ``/graph.json?since=...`` (services, edges, coverage and violations over the range,
from the daemon's history: ``graph.history_hours``) and ``/metrics`` (exceptions used, and the
daemon's own health since it started: what it rejected, dropped or evicted, so the reader
knows how complete the audit is), and writes Markdown, one self-contained HTML file (charts
drawn as inline SVG: nothing loaded from anywhere) or JSON (schema ``meshaudit.report.v1``).
"""

from __future__ import annotations

import html
import time
import urllib.error
import urllib.request
from typing import Any, Final

import orjson
from prometheus_client.parser import text_string_to_metric_families

from meshaudit.model import rfc3339
from meshaudit.views.graph import parse_duration

SCHEMA: Final = "meshaudit.report.v1"
TOP_OFFENDERS: Final = 5
OUTSIDE: Final = "(outside the mesh)"
EDGE_COLUMNS: Final = [
    "source",
    "destination",
    "requests",
    "mTLS",
    "access-log coverage",
    "errors",
    "policy",
    "violations",
]


class ReportError(Exception):
    """The daemon could not be read (unreachable, not meshaudit, an error answer)."""


def _get(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body: bytes = r.read()
            return body
    except urllib.error.HTTPError as exc:
        raise ReportError(f"{url}: HTTP {exc.code}: {exc.read()[:200].decode(errors='replace').strip()}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ReportError(f"{url}: {getattr(exc, 'reason', exc)}") from None


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _by(samples: list[tuple[dict[str, str], float]], *labels: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for lab, v in samples:
        key = "/".join(lab.get(k, "") for k in labels)
        out[key] = out.get(key, 0.0) + v
    return {k: v for k, v in sorted(out.items()) if v}


def build(url: str, since: str, timeout: float = 10.0) -> dict[str, Any]:
    """The report as data (the JSON form)."""
    secs = parse_duration(since)
    base = url.rstrip("/")
    try:
        graph = orjson.loads(_get(f"{base}/graph.json?since={secs:g}", timeout))
    except orjson.JSONDecodeError:
        raise ReportError(f"{base}/graph.json is not JSON: is {base} a meshaudit metrics port?") from None
    if not isinstance(graph, dict) or graph.get("schema") != "meshaudit.graph.v1":
        raise ReportError(f"{base}/graph.json is not a meshaudit service graph")
    m = _samples(_get(f"{base}/metrics", timeout).decode(errors="replace"))

    violations: dict[str, dict[str, Any]] = {}
    for e in graph["edges"]:
        for rule, n in e["alerts"].items():
            v = violations.setdefault(rule, {"count": 0, "offenders": []})
            v["count"] += n
            v["offenders"].append({"source": e["source"], "destination": e["destination"], "count": n})
    for v in violations.values():
        v["offenders"].sort(key=lambda o: (-o["count"], o["source"], o["destination"]))
        v["top_offenders"] = v.pop("offenders")[:TOP_OFFENDERS]

    matches = _by(m.get("meshaudit_policy_exception_matches_total", []), "exception")
    requests = _by(m.get("meshaudit_policy_exception_requests_total", []), "exception")
    expired = _by(m.get("meshaudit_policy_exceptions_expired_total", []), "exception")
    names = sorted(
        {lab["exception"] for lab, _ in m.get("meshaudit_policy_exception_matches_total", []) if "exception" in lab}
    )
    exceptions = [
        {
            "name": n,
            "requests": int(requests.get(n, 0)),
            "matches": int(matches.get(n, 0)),
            "expired": int(expired.get(n, 0)),
        }
        for n in names
    ]

    received = _by(m.get("meshaudit_received_total", []), "receiver", "kind")
    rejected = _by(m.get("meshaudit_rejected_total", []), "receiver", "reason")
    dropped = _by(m.get("meshaudit_dropped_total", []), "receiver", "reason")
    evictions = _by(
        [(lab, v) for lab, v in m.get("meshaudit_store_evictions_total", []) if lab.get("reason") == "capacity"],
        "store",
    )
    sink_dropped = _by(m.get("meshaudit_sink_dropped_total", []), "sink", "reason")
    engine_errors = _by(m.get("meshaudit_engine_errors_total", []), "stage")
    evicted_edges = int(graph.get("edges_evicted", 0))
    notes = []
    if dropped:
        notes.append("Received data was dropped unevaluated (ingest queue full): violations in it were not seen.")
    if evictions:
        notes.append("Correlation or window stores evicted items for capacity: some pairings and waits were lost.")
    if sink_dropped:
        notes.append("A sink gave up on alerts: they were raised but not all delivered.")
    if engine_errors:
        notes.append("The engine skipped batches or ticks after errors (meshaudit_engine_errors_total).")
    if evicted_edges:
        notes.append(f"The service graph dropped {evicted_edges} edges past graph.max_edges: this report misses them.")
    if rejected:
        notes.append("Some input was rejected as invalid (counted by reason): it was not evaluated.")
    edges = graph["edges"]
    inbound = sum(e["inbound_entries"] for e in edges)
    mtls = sum(round((e["mtls_ratio"] or 0) * e["inbound_entries"]) for e in edges)
    traced = sum(e["traced"] for e in edges)
    logged = sum(round((e["log_coverage_ratio"] or 0) * e["traced"]) for e in edges)
    return {
        "schema": SCHEMA,
        "generated_at": rfc3339(time.time()),
        "daemon": base,
        "range": {"from": graph["from"], "to": graph["to"], "seconds": graph["window_secs"], "asked_secs": secs},
        "policy_has_edges": graph["policy_has_edges"],
        "summary": {
            "services": len(graph["services"]),
            "edges": len(edges),
            "edges_not_allowed": sum(1 for e in edges if e["allowed"] is False),
            "requests": sum(e["requests"] for e in edges),
            "mtls_ratio": round(mtls / inbound, 4) if inbound else None,
            "log_coverage_ratio": round(logged / traced, 4) if traced else None,
            "violations": sum(v["count"] for v in violations.values()),
        },
        "services": graph["services"],
        "namespaces": graph["namespaces"],
        "edges": edges,
        "violations": dict(sorted(violations.items())),
        "exceptions": exceptions,
        "health": {
            "counted_since": "daemon start",
            "received": received,
            "rejected": rejected,
            "dropped": dropped,
            "capacity_evictions": evictions,
            "sink_dropped": sink_dropped,
            "engine_errors": engine_errors,
            "graph_edges_evicted": evicted_edges,
            "complete": not (dropped or evictions or engine_errors or evicted_edges),
            "notes": notes,
        },
        "timeline": graph.get("timeline", []),
        "history_bucket_secs": graph.get("history_bucket_secs"),
    }


# --- rendering -----------------------------------------------------------------------------------
def _pct(r: float | None) -> str:
    return "n/a" if r is None else f"{r * 100:.1f}%"


def _allowed(a: bool | None) -> str:
    return {True: "allowed", False: "NOT allowed", None: "no edge policy"}[a]


HEALTH: Final = (
    ("Received", "received"),
    ("Rejected as invalid", "rejected"),
    ("Dropped unevaluated", "dropped"),
    ("Evicted for capacity", "capacity_evictions"),
    ("Alerts a sink gave up on", "sink_dropped"),
    ("Engine errors", "engine_errors"),
)


def _health_rows(h: dict[str, Any]) -> list[tuple[str, str]]:
    """The daemon's health, a row per kind of loss: (title, "reason: count, ..." or "none")."""
    return [(title, ", ".join(f"{k}: {v:g}" for k, v in h[key].items()) or "none") for title, key in HEALTH]


def markdown(r: dict[str, Any]) -> str:
    s = r["summary"]
    out = [
        "# meshaudit audit report",
        "",
        f"- Daemon: {r['daemon']}",
        f"- Range: {r['range']['from']} to {r['range']['to']} ({r['range']['seconds']:g} s)",
        f"- Services: {s['services']}; edges: {s['edges']} ({s['edges_not_allowed']} not allowed by policy); "
        f"requests: {s['requests']}",
        f"- mTLS coverage: {_pct(s['mtls_ratio'])} of requests; access-log coverage: "
        f"{_pct(s['log_coverage_ratio'])} of traced requests",
        f"- Violations: {s['violations']}",
        f"- Audit complete: {'yes' if r['health']['complete'] else 'NO (see Daemon health)'}",
        "",
        "## Edges",
        "",
        "| source | destination | requests | mTLS | access-log coverage | errors | policy | violations |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for e in r["edges"]:
        alerts = ", ".join(f"{k} {v}" for k, v in e["alerts"].items())
        out.append(
            f"| {_md(e['source'])} | {_md(e['destination'])} | {e['requests']} | {_pct(e['mtls_ratio'])} | "
            f"{_pct(e['log_coverage_ratio'])} | {_pct(e['error_ratio'])} | {_allowed(e['allowed'])} | {_md(alerts)} |"
        )
    out += [
        "",
        "## mTLS and access-log coverage by namespace",
        "",
        "| namespace | requests | mTLS | access-log coverage |",
    ]
    out.append("|---|---:|---:|---:|")
    for n in r["namespaces"]:
        out.append(
            f"| {_md(n['name'] or OUTSIDE)} | {n['requests']} | {_pct(n['mtls_ratio'])} | "
            f"{_pct(n['log_coverage_ratio'])} |"
        )
    out += ["", "## Violations by rule", ""]
    if not r["violations"]:
        out.append("None in this range.")
    for rule, v in r["violations"].items():
        top = "; ".join(f"{_md(o['source'])} -> {_md(o['destination'])} ({o['count']})" for o in v["top_offenders"])
        out.append(f"- **{rule}**: {v['count']}. Top offenders: {top}")
    out += ["", "## Policy exceptions used (since the daemon started)", ""]
    if not r["exceptions"]:
        out.append("The policy has no exceptions.")
    for x in r["exceptions"]:
        out.append(
            f"- {_md(x['name'])}: covered {x['requests']} requests ({x['matches']} violations excused)"
            + (", EXPIRED" if x["expired"] else "")
        )
    h = r["health"]
    out += ["", "## Daemon health (since the daemon started)", ""]
    for title, vals in _health_rows(h):
        out.append(f"- {title}: {vals}")
    out += [f"- {n}" for n in h["notes"]] or ["- Nothing was lost: the audit covers all data received."]
    out += ["", "## Coverage over time", "", "| bucket start | requests | mTLS | access-log coverage | violations |"]
    out.append("|---|---:|---:|---:|---|")
    for t in r["timeline"]:
        vio = ", ".join(f"{k} {v}" for k, v in t["violations"].items())
        out.append(
            f"| {t['start']} | {t['requests']} | {_pct(t['mtls_ratio'])} | {_pct(t['log_coverage_ratio'])} | {vio} |"
        )
    return "\n".join(out) + "\n"


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def _e(v: object) -> str:
    return html.escape(str(v), quote=True)


def _coverage_chart(timeline: list[dict[str, Any]]) -> str:
    """mTLS and access-log coverage per history bucket, as lines (0-100 %)."""
    w, h, pad = 720, 220, 40
    if not timeline:
        return '<p class="empty">No traffic in this range.</p>'
    n = len(timeline)
    step = (w - 2 * pad) / max(1, n - 1)

    def line(key: str, color: str, name: str) -> str:
        pts = [
            f"{pad + i * step:.1f},{h - pad - (t[key] * (h - 2 * pad)):.1f}"
            for i, t in enumerate(timeline)
            if t[key] is not None
        ]
        if not pts:
            return ""
        dots = "".join(f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="3" fill="{color}"/>' for p in pts)
        return (
            f'<g class="series" data-series="{name}"><polyline fill="none" stroke="{color}" stroke-width="2" '
            f'points="{" ".join(pts)}"/>{dots}</g>'
        )

    grid = "".join(
        f'<line x1="{pad}" x2="{w - pad}" y1="{h - pad - f * (h - 2 * pad)}" y2="{h - pad - f * (h - 2 * pad)}" '
        f'stroke="#eceff1"/><text x="4" y="{h - pad - f * (h - 2 * pad) + 4}" font-size="10">{int(f * 100)}%</text>'
        for f in (0, 0.25, 0.5, 0.75, 1)
    )
    labels = (
        f'<text x="{pad}" y="{h - 10}" font-size="10">{_e(timeline[0]["start"])}</text>'
        f'<text x="{w - pad}" y="{h - 10}" font-size="10" text-anchor="end">{_e(timeline[-1]["start"])}</text>'
    )
    return (
        f'<svg id="coverage-chart" width="{w}" height="{h}" role="img" '
        f'aria-label="coverage over time">{grid}{line("mtls_ratio", "#2e7d32", "mtls")}'
        f"{line('log_coverage_ratio', '#1565c0', 'access_log')}{labels}</svg>"
        '<p class="legend"><span style="color:#2e7d32">&#9632; mTLS</span> '
        '<span style="color:#1565c0">&#9632; access-log coverage</span></p>'
    )


def _violations_chart(violations: dict[str, dict[str, Any]]) -> str:
    if not violations:
        return '<p class="empty">No violations in this range.</p>'
    top = max(v["count"] for v in violations.values())
    bar_h, label_w, w = 22, 170, 720
    rows = []
    for i, (rule, v) in enumerate(sorted(violations.items(), key=lambda x: -x[1]["count"])):
        bw = max(2.0, (w - label_w - 60) * v["count"] / top)
        y = i * (bar_h + 6)
        rows.append(
            f'<g class="bar" data-rule="{_e(rule)}" data-count="{v["count"]}"><text x="0" y="{y + 15}" '
            f'font-size="12">{_e(rule)}</text><rect x="{label_w}" y="{y}" width="{bw:.1f}" height="{bar_h}" '
            f'fill="#c62828"/><text x="{label_w + bw + 6:.1f}" y="{y + 15}" font-size="12">{v["count"]}</text></g>'
        )
    height = len(rows) * (bar_h + 6)
    return (
        f'<svg id="violations-chart" width="{w}" height="{height}" role="img" '
        f'aria-label="violations by rule">{"".join(rows)}</svg>'
    )


def html_report(r: dict[str, Any]) -> str:
    s = r["summary"]
    h = r["health"]

    def table(head: list[str], rows: list[list[str]], ident: str) -> str:
        th = "".join(f"<th>{c}</th>" for c in head)
        trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
        return f'<table id="{ident}"><tr>{th}</tr>{trs}</table>'

    edges = [
        [
            _e(e["source"]),
            _e(e["destination"]),
            str(e["requests"]),
            f'<span class="mtls-{e["mtls"]}">{_pct(e["mtls_ratio"])}</span>',
            _pct(e["log_coverage_ratio"]),
            _pct(e["error_ratio"]),
            _allowed(e["allowed"]),
            _e(", ".join(f"{k} {v}" for k, v in e["alerts"].items())),
        ]
        for e in r["edges"]
    ]
    namespaces = [
        [
            _e(n["name"] or "(outside the mesh)"),
            str(n["requests"]),
            _pct(n["mtls_ratio"]),
            _pct(n["log_coverage_ratio"]),
        ]
        for n in r["namespaces"]
    ]
    violations = [
        [
            _e(rule),
            str(v["count"]),
            "<br>".join(f"{_e(o['source'])} &rarr; {_e(o['destination'])} ({o['count']})" for o in v["top_offenders"]),
        ]
        for rule, v in r["violations"].items()
    ]
    exceptions = [
        [_e(x["name"]), str(x["requests"]), str(x["matches"]), "expired" if x["expired"] else ""]
        for x in r["exceptions"]
    ]
    health = [[title, _e(vals)] for title, vals in _health_rows(h)]
    notes = "".join(f"<li>{_e(n)}</li>" for n in h["notes"]) or "<li>Nothing was lost.</li>"
    complete = "yes" if h["complete"] else "NO: see daemon health"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>meshaudit audit report</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #263238; max-width: 1100px; }}
table {{ border-collapse: collapse; font-size: 13px; margin: 8px 0 18px; }}
td, th {{ border: 1px solid #cfd8dc; padding: 3px 8px; text-align: left; vertical-align: top; }}
.mtls-plaintext, .mtls-mixed {{ color: #c62828; font-weight: bold; }}
dt {{ font-weight: bold; float: left; width: 230px; }} dd {{ margin-left: 240px; }}
</style></head><body>
<h1>meshaudit audit report</h1>
<dl id="summary">
<dt>Daemon</dt><dd>{_e(r["daemon"])}</dd>
<dt>Range</dt><dd>{_e(r["range"]["from"])} to {_e(r["range"]["to"])} ({r["range"]["seconds"]:g} s)</dd>
<dt>Services, edges</dt><dd>{s["services"]}, {s["edges"]} ({s["edges_not_allowed"]} not allowed by policy)</dd>
<dt>Requests</dt><dd>{s["requests"]}</dd>
<dt>mTLS coverage</dt><dd id="mtls-coverage">{_pct(s["mtls_ratio"])}</dd>
<dt>Access-log coverage</dt><dd id="log-coverage">{_pct(s["log_coverage_ratio"])}</dd>
<dt>Violations</dt><dd>{s["violations"]}</dd>
<dt>Audit complete</dt><dd id="complete">{complete}</dd>
</dl>
<h2>Coverage over time</h2>{_coverage_chart(r["timeline"])}
<h2>Violations by rule</h2>{_violations_chart(r["violations"])}
{table(["rule", "count", "top offenders"], violations, "violations")}
<h2>Edges</h2>
{table(EDGE_COLUMNS, edges, "edges")}
<h2>Coverage by namespace</h2>
{table(["namespace", "requests", "mTLS", "access-log coverage"], namespaces, "namespaces")}
<h2>Policy exceptions used (since the daemon started)</h2>
{table(["exception", "requests covered", "violations excused", ""], exceptions, "exceptions")}
<h2>Daemon health (since the daemon started)</h2>
{table(["", ""], health, "health")}
<ul id="notes">{notes}</ul>
<p>Generated {_e(r["generated_at"])} by meshaudit report.</p>
</body></html>
"""


def render(r: dict[str, Any], fmt: str) -> bytes:
    if fmt == "json":
        return orjson.dumps(r, option=orjson.OPT_INDENT_2) + b"\n"
    if fmt == "html":
        return html_report(r).encode()
    return markdown(r).encode()
