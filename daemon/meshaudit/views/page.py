"""``/graph``: the live service graph as one self-contained page. The SVG is drawn here, on the
server, from the same view as ``/graph.json``: no script library, no CDN, no external font; a
few lines of inline script fetch the next drawing every ``REFRESH_SECS``.

Layout: one column per namespace (services outside any namespace, such as addresses and hosts
outside the mesh, in a last column), services stacked in their column, edges as curves from the
source's right side to the destination's left side. mTLS edges are solid green, plaintext edges
dashed red, mixed ones orange, edges no destination sidecar logged grey and dotted; an edge that
violates policy or raised alerts is drawn thick with a red halo. Every name came from the
network (access logs, spans): all of it is escaped.
"""

from __future__ import annotations

import html
import secrets
import time
from collections.abc import Callable
from typing import Any, Final

import orjson
from aiohttp import web

from meshaudit.views.graph import MeshGraph, parse_duration

REFRESH_SECS: Final = 5
COL_GAP, LAYER_GAP, PAD, NODE_W, NODE_H, ROW_H, TOP = 110, 70, 10, 170, 44, 64, 70
OUTSIDE: Final = "(outside the mesh)"
STROKE: Final = {"mtls": "#2e7d32", "plaintext": "#c62828", "mixed": "#ef6c00", "unknown": "#757575"}
DASH: Final = {"mtls": "", "plaintext": "8 5", "mixed": "10 4 2 4", "unknown": "2 4"}
LEGEND: Final = {
    "mtls": "mutual TLS",
    "plaintext": "plaintext",
    "mixed": "partly mTLS",
    "unknown": "no destination sidecar log",
}


def _e(v: object) -> str:
    return html.escape(str(v), quote=True)


def _pct(r: float | None) -> str:
    return "n/a" if r is None else f"{r * 100:.1f}%"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:g} ms"


def _ranks(keys: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Layers inside one namespace: a service sits one layer right of the furthest service that
    calls it (longest path from the callers; a cycle stops growing at the namespace's size)."""
    rank = dict.fromkeys(keys, 0)
    cap = len(keys) - 1
    for _ in range(len(keys)):
        changed = False
        for src, dst in edges:
            if src != dst and rank[src] + 1 > rank[dst] and rank[src] < cap:
                rank[dst] = rank[src] + 1
                changed = True
        if not changed:
            break
    return rank


def _layout(view: dict[str, Any]) -> tuple[dict[str, tuple[float, float]], list[tuple[str, float, float, int]]]:
    """Node positions by service key, and the namespace boxes (name, x, width, rows): one box per
    namespace, left to right, and inside it the services in layers, callers left of callees."""
    members: dict[str, list[str]] = {}
    ns_of: dict[str, str] = {}
    for s in view["services"]:
        ns = s["namespace"] or OUTSIDE
        members.setdefault(ns, []).append(s["key"])
        ns_of[s["key"]] = ns
    names = sorted(n for n in members if n != OUTSIDE) + ([OUTSIDE] if OUTSIDE in members else [])
    pos: dict[str, tuple[float, float]] = {}
    boxes: list[tuple[str, float, float, int]] = []
    x = 20.0
    for ns in names:
        keys = sorted(members[ns])
        inside = [(e["source"], e["destination"]) for e in view["edges"]
                  if ns_of.get(e["source"]) == ns and ns_of.get(e["destination"]) == ns]  # fmt: skip
        rank = _ranks(keys, inside)
        layers = max(rank.values()) + 1
        rows = 0
        for r in range(layers):
            column = [k for k in keys if rank[k] == r]
            for j, k in enumerate(column):
                pos[k] = (x + PAD + r * (NODE_W + LAYER_GAP), TOP + j * ROW_H)
            rows = max(rows, len(column))
        width = 2 * PAD + layers * NODE_W + (layers - 1) * LAYER_GAP
        boxes.append((ns, x, width, rows))
        x += width + COL_GAP
    return pos, boxes


def _edge_title(e: dict[str, Any]) -> str:
    lat = e.get("latency_ms") or {}
    alerts = ", ".join(f"{r} {n}" for r, n in e["alerts"].items()) or "none"
    allowed = {True: "allowed", False: "NOT allowed", None: "no edge policy"}[e["allowed"]]
    return (
        f"{e['source']} -> {e['destination']}\n"
        f"{e['requests_per_sec']} req/s ({e['requests']} requests)\n"
        f"mTLS {_pct(e['mtls_ratio'])}, access-log coverage {_pct(e['log_coverage_ratio'])}\n"
        f"errors {_pct(e['error_ratio'])}, retries {_pct(e['retry_ratio'])}\n"
        f"latency p50 {_ms(lat.get('p50'))}, p99 {_ms(lat.get('p99'))}\n"
        f"policy: {allowed}; alerts: {alerts}"
    )


def svg(view: dict[str, Any]) -> str:
    pos, boxes = _layout(view)
    rows = max((n for *_, n in boxes), default=1)
    width = max(400.0, max((x + w for _, x, w, _ in boxes), default=0.0) + 40)
    height = TOP + rows * ROW_H + 30
    out = [
        f'<svg id="mesh" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="service graph">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" markerHeight="9" '
        'markerUnits="userSpaceOnUse" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker>'
        "</defs>",
    ]
    for ns, x, w, n in boxes:
        out.append(
            f'<g class="namespace" data-namespace="{_e(ns)}"><rect x="{x}" y="{TOP - 40}" width="{w}" '
            f'height="{n * ROW_H + 40}" rx="10" fill="#f3f6fa" stroke="#c5d0dc"/>'
            f'<text x="{x + 10}" y="{TOP - 18}" font-weight="bold" fill="#37474f">{_e(ns)}</text></g>'
        )
    for e in view["edges"]:
        a, b = pos.get(e["source"]), pos.get(e["destination"])
        if a is None or b is None:
            continue
        x1, y1 = a[0] + NODE_W, a[1] + NODE_H / 2
        x2, y2 = b[0], b[1] + NODE_H / 2
        if x2 <= x1:  # same column or backwards: loop out to the right and come in from the left
            x1, x2 = a[0] + NODE_W, b[0]
            bend = 60 + abs(y2 - y1) / 4
            d = f"M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"
        else:
            mid = (x1 + x2) / 2
            d = f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}"
        state = e["mtls"]
        violating = e["violating"]
        width_px = 4 if violating else 2
        dash = f' stroke-dasharray="{DASH[state]}"' if DASH[state] else ""
        halo = (
            f'<path d="{d}" fill="none" stroke="#ff1744" stroke-opacity="0.35" stroke-width="10"/>' if violating else ""
        )
        out.append(
            f'<g class="edge" data-src="{_e(e["source"])}" data-dst="{_e(e["destination"])}" '
            f'data-mtls="{state}" data-violating="{str(violating).lower()}">{halo}'
            f'<path d="{d}" fill="none" stroke="{STROKE[state]}" stroke-width="{width_px}"{dash} '
            f'marker-end="url(#arrow)"/><title>{_e(_edge_title(e))}</title></g>'
        )
    for s in view["services"]:
        p = pos[s["key"]]
        label = s["service"] or s["address"] or s["key"]
        workload = (s["workload"] or "")[:28]
        out.append(
            f'<g class="service" data-key="{_e(s["key"])}"><rect x="{p[0]}" y="{p[1]}" width="{NODE_W}" '
            f'height="{NODE_H}" rx="6" fill="#fff" stroke="#546e7a"/>'
            f'<text x="{p[0] + 8}" y="{p[1] + 18}" font-size="13">{_e(label[:24])}</text>'
            f'<text x="{p[0] + 8}" y="{p[1] + 35}" font-size="11" fill="#78909c">{_e(workload)}</text>'
            f"<title>{_e(s['key'])}</title></g>"
        )
    out.append("</svg>")
    return "".join(out)


def _table(view: dict[str, Any]) -> str:
    head = (
        "<tr><th>source</th><th>destination</th><th>req/s</th><th>mTLS</th><th>access-log coverage</th>"
        "<th>errors</th><th>retries</th><th>p50</th><th>p99</th><th>policy</th><th>alerts</th></tr>"
    )
    body = []
    for e in view["edges"]:
        lat = e.get("latency_ms") or {}
        allowed = {True: "allowed", False: "not allowed", None: "-"}[e["allowed"]]
        alerts = ", ".join(f"{_e(r)}&nbsp;{n}" for r, n in e["alerts"].items()) or ""
        cls = ' class="violating"' if e["violating"] else ""
        body.append(
            f'<tr{cls} data-src="{_e(e["source"])}" data-dst="{_e(e["destination"])}">'
            f"<td>{_e(e['source'])}</td><td>{_e(e['destination'])}</td><td>{e['requests_per_sec']}</td>"
            f'<td class="{e["mtls"]}">{_pct(e["mtls_ratio"])}</td><td>{_pct(e["log_coverage_ratio"])}</td>'
            f"<td>{_pct(e['error_ratio'])}</td><td>{_pct(e['retry_ratio'])}</td>"
            f"<td>{_ms(lat.get('p50'))}</td><td>{_ms(lat.get('p99'))}</td><td>{allowed}</td><td>{alerts}</td></tr>"
        )
    return f'<table id="edges">{head}{"".join(body)}</table>'


def fragment(view: dict[str, Any]) -> str:
    """What the page shows and replaces on every refresh."""
    other = view["other"]
    more = (
        f'<p class="more">{other["edges"]} more edges ({other["requests"]} requests) not drawn.</p>'
        if other["edges"]
        else ""
    )
    legend = "".join(
        f'<span class="key"><svg width="40" height="10"><line x1="0" y1="5" x2="40" y2="5" stroke="{STROKE[k]}" '
        f'stroke-width="3"{" stroke-dasharray=" + chr(34) + DASH[k] + chr(34) if DASH[k] else ""}/></svg> {v}</span>'
        for k, v in LEGEND.items()
    )
    drawing = svg(view) if view["edges"] else '<p id="empty">No traffic observed in this window yet.</p>'
    return (
        f'<p class="meta">Last {view["window_secs"]:g} s, to {_e(view["to"])}. {len(view["edges"])} edges, '
        f"{len(view['services'])} services. {legend} "
        '<span class="key"><b style="color:#ff1744">thick, red halo</b>: violates policy or alerted</span></p>'
        f"{drawing}{more}{_table(view)}"
    )


def page(view: dict[str, Any], nonce: str, window_secs: float) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>meshaudit: service graph</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #263238; }}
h1 {{ font-size: 20px; margin: 0 0 8px; }}
.meta {{ font-size: 13px; color: #455a64; }}
.key {{ margin-left: 12px; white-space: nowrap; }}
table {{ border-collapse: collapse; font-size: 13px; margin-top: 12px; }}
td, th {{ border: 1px solid #cfd8dc; padding: 3px 8px; text-align: left; }}
tr.violating td {{ background: #ffebee; }}
td.plaintext {{ color: #c62828; font-weight: bold; }}
#status {{ font-size: 12px; color: #90a4ae; }}
</style></head>
<body><h1>meshaudit: service graph</h1>
<div id="status">refreshes every {REFRESH_SECS} s</div>
<div id="graph">{fragment(view)}</div>
<script nonce="{nonce}">
(function () {{
  var url = "/graph?fragment=1&window={window_secs:g}";
  function refresh() {{
    fetch(url, {{cache: "no-store"}}).then(function (r) {{
      if (!r.ok) throw new Error(r.status);
      return r.text();
    }}).then(function (t) {{
      document.getElementById("graph").innerHTML = t;
      document.getElementById("status").textContent = "updated " + new Date().toISOString();
    }}).catch(function (e) {{
      document.getElementById("status").textContent = "daemon unreachable (" + e + "), retrying";
    }});
  }}
  setInterval(refresh, {REFRESH_SECS * 1000});
}})();
</script></body></html>
"""


def add_routes(app: web.Application, graph: MeshGraph, top_edges: Callable[[], int]) -> None:
    """``/graph`` (the page; ``?fragment=1`` its refreshed part) and ``/graph.json``
    (``?window=60``: the live view, 10-300 s; ``?since=1h``: the history a report reads)."""

    def window_of(request: web.Request) -> float:
        try:
            return parse_duration(request.query.get("window", "60"))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"window: {exc}\n") from None

    async def graph_json(request: web.Request) -> web.Response:
        now = time.time()
        since = request.query.get("since")
        if since is not None:
            try:
                view = graph.over(now, parse_duration(since))
            except ValueError as exc:
                raise web.HTTPBadRequest(text=f"since: {exc}\n") from None
        else:
            view = graph.live(now, window_of(request), top_edges())
        return web.Response(body=orjson.dumps(view), content_type="application/json")

    async def graph_page(request: web.Request) -> web.Response:
        window = window_of(request)
        view = graph.live(time.time(), window, top_edges())
        if request.query.get("fragment"):
            return web.Response(text=fragment(view), content_type="text/html", headers=_HEADERS)
        nonce = secrets.token_urlsafe(16)
        headers = {**_HEADERS, "Content-Security-Policy": _CSP.format(nonce=nonce)}
        return web.Response(text=page(view, nonce, window), content_type="text/html", headers=headers)

    app.router.add_get("/graph.json", graph_json)
    app.router.add_get("/graph", graph_page)


# The page loads nothing from anywhere: its script (by nonce) may only fetch its own fragment.
_CSP: Final = (
    "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS: Final = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
