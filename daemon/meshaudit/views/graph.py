"""The mesh as meshaudit observed it: the services, the edges between them and, per edge, the
figures an on-call engineer and a security reviewer read (``/graph``, ``/graph.json``,
``meshaudit report``).

Two halves:

- :class:`meshaudit.engine.tally.EdgeTally` lives in the engine and counts each batch's hops per edge: a few dict
  lookups and integer adds per hop. missing_access_log tells it which traced requests a sidecar
  logged (``traced``).
- :class:`MeshGraph` lives in the process that serves ``/graph`` and absorbs the tallies once a
  second into time buckets: a live ring (10 s buckets, five minutes: rates and latency) and a
  history ring per edge (``graph.history_bucket_secs`` for ``graph.history_hours``: what a report
  covers). With ``workers: N`` each worker's tally goes to the coordinator once a second.

Per edge, source -> destination as the alerts name them (a plaintext client is named the way
the rules name it, from the client sidecar's entry of the same request or connection):

- requests: the source sidecar's entries (outbound: one per request, after its retries); an
  edge whose source has no sidecar is counted from the destination's inbound entries;
- mTLS: of the destination sidecar's inbound entries, those with a client certificate; TLS
  without a client certificate and plaintext are counted apart;
- access-log coverage: of the traced requests missing_access_log judged (a span on a mesh
  destination), those its sidecar logged;
- errors: requests that failed upstream (error_burst's definition: a 5xx the upstream answered,
  or an upstream failure flag), counted where requests are; retries: ``attempts - 1`` of the
  source sidecar's entries;
- latency: the access logs' durations (Envoy's ``duration``, a span's end - start), the source
  sidecar's where there is one; per edge and side, the first 8 a second and then one in 32 are
  read (a lazy field of an access-log entry), so a busy edge costs little more than a quiet one;
- alerts: the violations each alert counts, by rule.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from typing import Any, Final

from meshaudit.engine.tally import (
    BINS,
    BOUNDS_MS,
    COUNTERS,
    IN,
    IN_FAIL,
    IN_MTLS,
    IN_TLS,
    LAT_IN,
    LAT_OUT,
    LIVE_WIDTH,
    OUT,
    OUT_FAIL,
    RETRIES,
    TRACED,
    TRACED_LOGGED,
)  # fmt: skip
from meshaudit.model import Alert, Identity, rfc3339

SCHEMA: Final = "meshaudit.graph.v1"
LIVE_BUCKET_SECS: Final = 10.0
LIVE_SLOTS: Final = 31  # five minutes and the bucket being filled


class Ring:
    """Counts in time buckets: ``slots`` buckets of ``bucket_secs``, ``width`` counters each,
    in one array (no object per bucket). A bucket older than the ring holds is dropped."""

    __slots__ = ("bucket_secs", "data", "last", "slots", "width")

    def __init__(self, bucket_secs: float, slots: int, width: int) -> None:
        self.bucket_secs = bucket_secs
        self.slots = slots
        self.width = width
        self.data = array("q", bytes(8 * slots * width))
        self.last = -1  # number of the newest bucket written (time // bucket_secs)

    def bucket(self, t: float) -> int:
        return int(t // self.bucket_secs)

    def add(self, b: int, values: Sequence[int], first: int = 0) -> None:
        """Add ``values`` to counters ``first...`` of bucket ``b``."""
        if b > self.last:
            self._advance(b)
        elif b <= self.last - self.slots:
            return
        base = (b % self.slots) * self.width + first
        d = self.data
        for i, v in enumerate(values):
            if v:
                d[base + i] += v

    def _advance(self, b: int) -> None:
        w = self.width
        zero = array("q", bytes(8 * w))
        for k in range(max(self.last + 1, b - self.slots + 1), b + 1):
            base = (k % self.slots) * w
            self.data[base : base + w] = zero
        self.last = b

    def rows(self, b_from: int, b_to: int) -> Iterable[tuple[int, array[int]]]:
        """(bucket, counters) for each bucket in [b_from, b_to] the ring still holds."""
        lo = max(b_from, self.last - self.slots + 1, 0)
        for k in range(lo, min(b_to, self.last) + 1):
            base = (k % self.slots) * self.width
            yield k, self.data[base : base + self.width]

    def total(self, b_from: int, b_to: int, width: int | None = None) -> list[int]:
        out = [0] * (width or self.width)
        for _, row in self.rows(b_from, b_to):
            for i in range(len(out)):
                out[i] += row[i]
        return out


class _Edge:
    __slots__ = ("alerts", "dst", "first_seen", "hist", "last_seen", "live", "rule_hist", "src")

    def __init__(self, src: Identity, dst: Identity, now: float, history: tuple[float, int]) -> None:
        self.src = src
        self.dst = dst
        self.first_seen = now
        self.last_seen = now
        self.live = Ring(LIVE_BUCKET_SECS, LIVE_SLOTS, LIVE_WIDTH)
        self.hist = Ring(history[0], history[1], COUNTERS)
        self.alerts: dict[str, int] = {}  # rule -> violations counted by alerts, since start
        self.rule_hist: dict[str, Ring] = {}  # rule -> violations per history bucket


def percentile(bins: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a latency histogram (``BOUNDS_MS``), interpolated linearly
    inside its bin; None without samples. Above the last bound: the last bound."""
    n = sum(bins)
    if n == 0:
        return None
    rank = q * n
    seen = 0
    for i, c in enumerate(bins):
        if c and seen + c >= rank:
            if i >= len(BOUNDS_MS):
                return BOUNDS_MS[-1]
            lo = BOUNDS_MS[i - 1] if i else 0.0
            return lo + (BOUNDS_MS[i] - lo) * max(0.0, rank - seen) / c
        seen += c
    return BOUNDS_MS[-1]


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


class MeshGraph:
    """The observed mesh: edges with live and historical counts, bounded by ``max_edges`` (past
    it the edge seen longest ago goes, counted in ``evicted``). ``policy`` answers whether an
    edge is allowed (``CompiledPolicy``; None: no policy to judge against)."""

    def __init__(self, max_edges: int = 1000, history_bucket_secs: float = 300.0, history_hours: float = 24.0) -> None:
        self.max_edges = max_edges
        self.history = (history_bucket_secs, max(1, math.ceil(history_hours * 3600 / history_bucket_secs)))
        self.edges: dict[tuple[str, str], _Edge] = {}
        self.started: float | None = None
        self.evicted = 0
        self.policy: Any = None

    def _edge(self, src: Identity, dst: Identity, now: float) -> _Edge:
        key = (src.key, dst.key)
        e = self.edges.get(key)
        if e is None:
            if len(self.edges) >= self.max_edges:
                oldest = min(self.edges, key=lambda k: self.edges[k].last_seen)
                del self.edges[oldest]
                self.evicted += 1
            e = self.edges[key] = _Edge(src, dst, now, self.history)
        e.last_seen = now
        return e

    def absorb(self, tally: Iterable[tuple[Identity, Identity, Sequence[int]]], now: float) -> None:
        """A tally (:meth:`EdgeTally.take`), counted at ``now`` (receive time)."""
        for src, dst, counts in tally:
            if self.started is None:
                self.started = now
            e = self._edge(src, dst, now)
            e.live.add(e.live.bucket(now), counts)
            e.hist.add(e.hist.bucket(now), counts[:COUNTERS])

    def alerts(self, alerts: Iterable[Alert], now: float) -> None:
        """Alerts as they go to the sinks: each counts ``count`` violations of its rule."""
        for a in alerts:
            if self.started is None:
                self.started = now
            e = self._edge(a.source, a.destination, now)
            e.alerts[a.rule] = e.alerts.get(a.rule, 0) + a.count
            ring = e.rule_hist.get(a.rule)
            if ring is None:
                ring = e.rule_hist[a.rule] = Ring(*self.history, 1)
            ring.add(ring.bucket(now), (a.count,))

    # --- views ---------------------------------------------------------------------------------
    def _allowed(self, src: Identity, dst: Identity) -> bool | None:
        """As unexpected_edge judges it (for plain edges): a source named by neither a service
        nor a certificate (an address) is not judged."""
        p = self.policy
        if p is None or not p.has_edges or (src.service is None and src.principal is None):
            return None
        return bool(p.edge_allowed(src, dst))

    @staticmethod
    def _figures(c: Sequence[int], secs: float) -> dict[str, Any]:
        requests = c[OUT] or c[IN]
        failures = c[OUT_FAIL] if c[OUT] else c[IN_FAIL]
        plaintext = c[IN] - c[IN_MTLS] - c[IN_TLS]
        return {
            "requests": requests,
            "requests_per_sec": round(requests / secs, 3) if secs > 0 else None,
            "inbound_entries": c[IN],
            "mtls_ratio": _ratio(c[IN_MTLS], c[IN]),
            "tls_without_client_cert": c[IN_TLS],
            "plaintext": plaintext,
            "traced": c[TRACED],
            "log_coverage_ratio": _ratio(c[TRACED_LOGGED], c[TRACED]),
            "failures": failures,
            "error_ratio": _ratio(failures, requests),
            "retries": c[RETRIES],
            "retry_ratio": _ratio(c[RETRIES], c[OUT]),
        }

    @staticmethod
    def _mtls_state(c: Sequence[int]) -> str:
        if not c[IN]:
            return "unknown"  # no destination sidecar logged it
        if c[IN_MTLS] == c[IN]:
            return "mtls"
        return "plaintext" if c[IN_MTLS] == 0 and c[IN_TLS] == 0 else "mixed"

    def live(self, now: float, window_secs: float = 60.0, top: int = 100) -> dict[str, Any]:
        """``/graph.json``: the last ``window_secs`` (10 to 300 s) of every edge, the ``top`` busiest
        edges listed and the rest counted."""
        window_secs = min(max(window_secs, LIVE_BUCKET_SECS), LIVE_BUCKET_SECS * (LIVE_SLOTS - 1))
        b_to = int(now // LIVE_BUCKET_SECS)
        b_from = int((now - window_secs) // LIVE_BUCKET_SECS) + 1
        rows = []
        for e in self.edges.values():
            c = e.live.total(b_from, b_to)
            rows.append((e, c))
        return self._view(rows, now, window_secs, top, live=True)

    def over(self, now: float, since_secs: float, top: int = 1000) -> dict[str, Any]:
        """The history of the last ``since_secs`` (as far as it is kept): every edge's totals and
        a timeline of mesh-wide coverage and violations, for reports."""
        ring_secs, slots = self.history
        b_to = int(now // ring_secs)
        b_from = max(int((now - since_secs) // ring_secs) + 1, b_to - slots + 1)
        rows = [(e, e.hist.total(b_from, b_to)) for e in self.edges.values()]
        start = b_from * ring_secs
        if self.started is not None:
            start = max(start, self.started)
        view = self._view(rows, now, now - start, top, live=False, b_range=(b_from, b_to))
        timeline: dict[int, list[int]] = {}
        violations: dict[int, dict[str, int]] = {}
        for e in self.edges.values():
            for b, row in e.hist.rows(b_from, b_to):
                t = timeline.setdefault(b, [0] * COUNTERS)
                for i in range(COUNTERS):
                    t[i] += row[i]
            for rule, ring in e.rule_hist.items():
                for b, row in ring.rows(b_from, b_to):
                    if row[0]:
                        v = violations.setdefault(b, {})
                        v[rule] = v.get(rule, 0) + row[0]
        view["timeline"] = [
            {
                "start": rfc3339(b * ring_secs),
                "requests": t[OUT] or t[IN],
                "mtls_ratio": _ratio(t[IN_MTLS], t[IN]),
                "log_coverage_ratio": _ratio(t[TRACED_LOGGED], t[TRACED]),
                "violations": violations.get(b, {}),
            }
            for b, t in sorted(timeline.items())
        ]
        view["history_bucket_secs"] = ring_secs
        return view

    def _view(
        self,
        rows: list[tuple[_Edge, list[int]]],
        now: float,
        secs: float,
        top: int,
        live: bool,
        b_range: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        def alerts_of(e: _Edge) -> dict[str, int]:
            if b_range is None:
                return dict(sorted(e.alerts.items()))
            out = {r: ring.total(*b_range)[0] for r, ring in sorted(e.rule_hist.items())}
            return {r: n for r, n in out.items() if n}

        active = [(e, c, alerts_of(e)) for e, c in rows]
        active = [(e, c, a) for e, c, a in active if any(c[:COUNTERS]) or a]
        active.sort(key=lambda x: (-(x[1][OUT] or x[1][IN]), -sum(x[2].values()), x[0].src.key, x[0].dst.key))
        shown, rest = active[:top], active[top:]
        services: dict[str, Identity] = {}
        edges = []
        for e, c, a in shown:
            services.setdefault(e.src.key, e.src)
            services.setdefault(e.dst.key, e.dst)
            allowed = self._allowed(e.src, e.dst)
            edge: dict[str, Any] = {
                "source": e.src.key,
                "destination": e.dst.key,
                **self._figures(c, secs),
                "mtls": self._mtls_state(c),
                "alerts": a,
                "allowed": allowed,
                "violating": allowed is False or bool(a),
                "first_seen": rfc3339(e.first_seen),
                "last_seen": rfc3339(e.last_seen),
            }
            if live:
                side = LAT_OUT if c[OUT] else LAT_IN
                bins = c[side : side + BINS]
                p50, p99 = percentile(bins, 0.5), percentile(bins, 0.99)
                edge["latency_ms"] = {
                    "p50": None if p50 is None else round(p50, 2),
                    "p99": None if p99 is None else round(p99, 2),
                    "samples": sum(bins),
                }
            edges.append(edge)
        namespaces: dict[str, list[int]] = {}
        for e, c, _ in active:
            ns = namespaces.setdefault(e.dst.namespace or "", [0] * COUNTERS)
            for i in range(COUNTERS):
                ns[i] += c[i]
        return {
            "schema": SCHEMA,
            "generated_at": rfc3339(now),
            "from": rfc3339(now - secs),
            "to": rfc3339(now),
            "window_secs": round(secs, 3),
            "services": [
                {"key": k, "service": s.service, "namespace": s.namespace, "workload": s.workload, "address": s.address}
                for k, s in sorted(services.items())
            ],
            "namespaces": [
                {
                    "name": ns or None,
                    "requests": c[OUT] or c[IN],
                    "inbound_entries": c[IN],
                    "mtls_ratio": _ratio(c[IN_MTLS], c[IN]),
                    "traced": c[TRACED],
                    "log_coverage_ratio": _ratio(c[TRACED_LOGGED], c[TRACED]),
                }
                for ns, c in sorted(namespaces.items())
            ],
            "edges": edges,
            "other": {
                "edges": len(rest),
                "requests": sum(c[OUT] or c[IN] for _, c, _ in rest),
            },
            "edges_evicted": self.evicted,
            "policy_has_edges": self.policy is not None and bool(self.policy.has_edges),
        }


_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``1h``, ``7d``; ValueError otherwise."""
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:]) if t else None
    number = t[:-1] if unit else t
    try:
        secs = float(number) * (unit or 1)
    except ValueError:
        secs = math.nan
    if not math.isfinite(secs) or secs <= 0:
        raise ValueError(f"not a positive duration: {text!r} (e.g. 90s, 15m, 1h, 7d)")
    return secs
