"""``workers: N``: the per-edge windows (stage 2) are summed by the coordinator. A worker's window
counts travel as pickled messages; their examples as their example fields."""

from __future__ import annotations

import pickle

from meshaudit.config import Config, Policy
from meshaudit.engine.api import WindowDelta
from meshaudit.engine.setup import build_engine
from meshaudit.model import INBOUND, Hop, identity
from meshaudit.runtime.common import lateness
from meshaudit.runtime.messages import Violations, delta_from_wire, delta_to_wire
from test_engine import T0
from test_rule_excessive_retries import out

SRC, DST = identity("frontend", "default"), identity("reviews", "default")


def test_a_window_delta_crosses_the_socket_with_its_example_fields() -> None:
    ex = Hop(0, "sidecar~10.0.0.1~frontend-1.default~default.svc.cluster.local", SRC, INBOUND, SRC, DST,
             1_800_000_001.5, method="GET", path="/reviews/1", request_id="r-1", trace_id="t" * 32)  # fmt: skip
    d = WindowDelta("excessive_retries_windows", "excessive_retries", SRC, DST, 1_800_000_000.0, 4, 4,
                    1_800_000_001.5, 1_800_000_002.0, (ex,))  # fmt: skip
    msg = pickle.loads(pickle.dumps(Violations([], [delta_to_wire(d)])))
    [back] = [delta_from_wire(w) for w in msg.deltas]
    assert back[:9] == d[:9]
    assert back.src == SRC and back.dst == DST
    [got] = back.examples
    assert (got.method, got.path, got.request_id, got.trace_id, got.observer) == (
        "GET", "/reviews/1", "r-1", "t" * 32, ex.observer,
    )  # fmt: skip
    assert Violations([]).deltas == []  # a worker with no window counts sends none


def test_an_edge_split_over_two_workers_is_judged_on_their_sum() -> None:
    # What each worker's link and the coordinator do (runtime/link.py, coordinator.py): the
    # workers count into deltas, the coordinator sums and judges. 8 retried requests, 4 a worker,
    # with min_retries 8: neither worker alone may alert, the sum must, once.
    cfg = Config.model_validate({"engine": {"tick_ms": 200}, "rules": {"excessive_retries": {"min_retries": 8}}})
    workers = [build_engine(cfg, Policy(), peers=True) for _ in range(2)]
    coordinator = build_engine(cfg, Policy(), baseline_shared=True)
    for e in (*workers, coordinator):
        e.split(lateness(cfg.engine.tick_ms))
    now = T0 + 1
    for i, w in enumerate(workers):
        w.evaluate([out(f"r-{i}-{k}", attempts=2) for k in range(4)], now)
        w.tick(now)
        deltas, violations = w.take_stage2()
        assert [v for v in violations if v.rule == "excessive_retries"] == []
        msg = pickle.loads(pickle.dumps(Violations([], [delta_to_wire(d) for d in deltas])))
        coordinator.absorb_stage2([delta_from_wire(d) for d in msg.deltas], [], now)
    coordinator.tick(now + 0.2)
    [v] = [v for v in coordinator.take_forwarded() if v.rule == "excessive_retries"]
    assert v.detail.startswith("8 retries over 8 requests"), v.detail
    coordinator.tick(now + 0.4)
    assert coordinator.take_forwarded() == []  # judged once
