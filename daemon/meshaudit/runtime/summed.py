"""``/metrics`` with ``workers: N``: each worker's registry as a snapshot, summed by the coordinator."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# --- metrics: each worker's registry, summed ----------------------------------------------------
Snapshot = list[tuple[str, str, str, list[tuple[str, tuple[tuple[str, str], ...], float]]]]


NOT_SUMMED = frozenset(("process_start_time_seconds", "process_max_fds"))  # the coordinator's own


def snapshot(registry: CollectorRegistry, worker: bool = False) -> Snapshot:
    out: Snapshot = []
    for m in registry.collect():
        if worker and m.name in NOT_SUMMED:
            continue
        samples = [
            (s.name, tuple(sorted(s.labels.items())), s.value) for s in m.samples if not s.name.endswith("_created")
        ]
        out.append((m.name, m.type, m.documentation, samples))
    return out


class SummedMetrics(Collector):
    """The coordinator's /metrics: its own registry plus every worker's latest snapshot, and
    the counters of workers that exited (so a restart never makes a counter go down)."""

    def __init__(self, own: CollectorRegistry) -> None:
        self.own = own
        self.workers: dict[int, Snapshot] = {}
        self.retired: Snapshot = []

    def retire(self, index: int) -> None:
        snap = self.workers.pop(index, None)
        if snap:
            self.retired.extend(f for f in snap if f[1] in ("counter", "histogram"))

    def collect(self) -> Iterator[Metric]:
        fams: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
        for name, typ, doc, samples in itertools.chain(snapshot(self.own), self.retired, *self.workers.values()):
            fam = fams.setdefault(name, (typ, doc, {}))
            acc = fam[2]
            for sname, labels, value in samples:
                k = (sname, labels)
                acc[k] = acc.get(k, 0.0) + value
        for name, (typ, doc, acc) in fams.items():
            m = Metric(name, doc, typ)
            for (sname, labels), value in acc.items():
                m.add_sample(sname, dict(labels), value)
            yield m
