"""Per-stage cost of meshaudit's hot path in one process, without gRPC: protobuf parse, parse +
decode to hops, and parse + decode + engine (every rule on, the bench policy), in microseconds per
entry or span. For iterating on the hot path; the end-to-end figures come from ``bench.run``.

    .venv/bin/python -m bench.inproc [--per 25] [--seconds 3] [--repeat 3] [--otlp] [--no-graph]
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshaudit._proto.envoy.service.accesslog.v3 import als_pb2
from meshaudit.config import Config
from meshaudit.engine.setup import build_engine
from meshaudit.model import Hop
from meshaudit.naming import Namer
from meshaudit.receivers.envoy_als.decode import StreamContext, decode_http, decode_tcp
from meshaudit.receivers.otlp.decode import ExportTraceServiceRequest, decode_traces

from bench import corpus
from bench.run import meshaudit_config

Msg = als_pb2.StreamAccessLogsMessage


def _messages(per: int) -> list[tuple[int, bytes]]:
    """(service index, message) in the order the load generator sends them: fresh ids each."""
    c = corpus.build_als(per)
    out: list[tuple[int, bytes]] = []
    n = 0
    for _ in range(40):
        for svc, group in enumerate(c.http):
            for b in group:
                n += 1
                out.append((svc, b.replace(corpus.TOKEN, b"%08x" % n)))
            for b in c.tcp[svc][:1]:
                n += 1
                out.append((svc, b.replace(corpus.TOKEN, b"%08x" % n)))
    return out


def _loop(seconds: float, step: Callable[[int], int]) -> float:
    """Run ``step(i)`` (returns items done) for ``seconds``; items per second."""
    done = 0
    i = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        done += step(i)
        i += 1
        if (i & 15) == 0 and time.perf_counter() >= deadline:
            break
    return done / (time.perf_counter() - t0)


def _config(graph: bool) -> Config:
    cfg = Config.model_validate(meshaudit_config(Path("/dev/null")))
    return cfg.model_copy(update={"graph": cfg.graph.model_copy(update={"enabled": graph})})


def als(per: int, seconds: float, graph: bool = True) -> dict[str, float]:
    msgs = _messages(per)
    cfg = _config(graph)
    namer = Namer(cfg.mesh)
    ctxs = [
        StreamContext(namer, corpus.node_id(s, ns, i, 0), f"{s}.{ns}", "envoy_accesslog")
        for i, (s, ns) in enumerate(corpus.SERVICES)
    ]
    nmsg = len(msgs)

    def parse(i: int) -> int:
        m = Msg.FromString(msgs[i % nmsg][1])
        return len(m.http_logs.log_entry) or len(m.tcp_logs.log_entry)

    def decode(i: int) -> int:
        svc, b = msgs[i % nmsg]
        m = Msg.FromString(b)
        hops: list[Hop] = []
        if m.WhichOneof("log_entries") == "http_logs":
            decode_http(m.http_logs.log_entry, ctxs[svc], namer, hops)
        else:
            decode_tcp(m.tcp_logs.log_entry, ctxs[svc], namer, hops)
        return len(hops)

    engine = build_engine(cfg, cfg.policy)
    enamer = engine.namer
    ectxs = [
        StreamContext(enamer, corpus.node_id(s, ns, i, 0), f"{s}.{ns}", "envoy_accesslog")
        for i, (s, ns) in enumerate(corpus.SERVICES)
    ]
    clock = [1_800_000_000.0]

    def full(i: int) -> int:
        svc, b = msgs[i % nmsg]
        m = Msg.FromString(b)
        hops: list[Hop] = []
        if m.WhichOneof("log_entries") == "http_logs":
            decode_http(m.http_logs.log_entry, ectxs[svc], enamer, hops)
        else:
            decode_tcp(m.tcp_logs.log_entry, ectxs[svc], enamer, hops)
        now = clock[0] = clock[0] + per / 100_000  # data time at 100 k entries/s
        engine.evaluate(hops, now)
        if (i & 63) == 0:
            engine.tick(now)
        if i % (100_000 // per) == 0:  # the daemon takes the graph's counts once a second
            engine.ctx.tally.take()
        return len(hops)

    out = {}
    for name, fn in (("parse", parse), ("decode", decode), ("engine", full)):
        out[name] = _loop(seconds, fn)
    return out


def otlp(seconds: float, graph: bool = True) -> dict[str, float]:
    exports = [b.replace(corpus.TOKEN, b"%08x" % i) for i, b in enumerate(corpus.build_otlp() * 5)]
    cfg = _config(graph)
    n = len(exports)

    def parse(i: int) -> int:
        r = ExportTraceServiceRequest.FromString(exports[i % n])
        return sum(len(ss.spans) for rs in r.resource_spans for ss in rs.scope_spans)

    namer = Namer(cfg.mesh)

    def decode(i: int) -> int:
        hops: list[Hop] = []
        return decode_traces(ExportTraceServiceRequest.FromString(exports[i % n]), namer, hops)

    engine = build_engine(cfg, cfg.policy)
    clock = [1_800_000_000.0]

    def full(i: int) -> int:
        hops: list[Hop] = []
        k = decode_traces(ExportTraceServiceRequest.FromString(exports[i % n]), engine.namer, hops)
        now = clock[0] = clock[0] + k / 80_000
        engine.evaluate(hops, now)
        if (i & 7) == 0:
            engine.tick(now)
            engine.ctx.tally.take()
        return k

    return {"parse": _loop(seconds, parse), "decode": _loop(seconds, decode), "engine": _loop(seconds, full)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per", type=int, action="append", help="ALS entries per message (repeatable; 25 and 100)")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--otlp", action="store_true", help="OTLP spans instead of ALS entries")
    p.add_argument("--gc-freeze", action="store_true", help="as the daemon does: gc.freeze() before the loop")
    p.add_argument("--no-graph", action="store_true", help="graph.enabled: false (the service graph's per-edge counts)")
    a = p.parse_args(argv)
    graph = not a.no_graph
    cases: list[tuple[str, Callable[[], dict[str, float]]]] = []
    if a.otlp:
        cases.append(("OTLP 200/export", lambda: otlp(a.seconds, graph)))
    else:
        for per in a.per or [25, 100]:
            cases.append((f"ALS {per}/msg", functools.partial(als, per, a.seconds, graph)))
    for name, fn in cases:
        runs: list[dict[str, Any]] = []
        for _ in range(a.repeat):
            gc.collect()
            if a.gc_freeze:
                gc.freeze()
            runs.append(fn())
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        parts = []
        prev = 0.0
        for k, rate in med.items():
            us = 1e6 / rate
            parts.append(f"{k} {rate / 1000:7.1f} k/s {us:5.2f} us (+{us - prev:5.2f})")
            prev = us
        print(f"{name:16} " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
