"""Per-stage cost of meshaudit's hot path in one process, without gRPC: protobuf parse, parse +
decode to hops, and parse + decode + engine (every rule on, the bench policy), in microseconds per
entry or span. For iterating on the hot path; the end-to-end figures come from ``bench.run``.

``--wire`` adds the distributed mode's hop wire format (meshaudit.wire.hops): a receiver's parse +
decode + Kafka key + ``encode`` of each message's hops, an evaluator's ``decode`` of those batches
alone and followed by the engine, and the bytes per hop; for ALS both ways an access-log hop can
travel (its Envoy entry for the fields read lazily, or every field read at the receiver).

    .venv/bin/python -m bench.inproc [--per 25] [--seconds 3] [--repeat 3] [--otlp] [--no-graph] [--wire]
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
from meshaudit.wire import hops as wire

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


WIRE_PARTITIONS = 12  # the hops topic's partitions a receiver spreads a batch over (the default)
WIRE_TAKE = 1024  # hops a receiver's producer takes off its queue at once under load (at most 2048)


def _wire_stages(
    seconds: float,
    n: int,
    produce: Callable[[int], list[Hop]],
    evaluate: Callable[[int, list[Hop]], None],
    entries: bool,
    tag: str,
) -> dict[str, float]:
    """A receiver (``produce`` + key + encode), an evaluator's decode alone and decode + engine
    (``evaluate``) over the same batches; ``bytes<tag>`` is the mean encoded size per hop."""
    batches: list[bytes] = []
    nhops = 0
    for i in range(n):
        hops = produce(i)
        nhops += len(hops)
        batches.append(wire.encode(hops, entries=entries))

    def receiver(i: int) -> int:
        """As the producer stage: what waits on the ingest queue (``WIRE_TAKE`` hops, as under
        load), by partition, evidence copies included."""
        hops: list[Hop] = []
        while len(hops) < WIRE_TAKE:
            hops += produce(i)
            i += 1
        for own, copies in wire.route(hops, WIRE_PARTITIONS).values():
            wire.encode(own + copies, entries=entries, evidence=len(copies))
        return len(hops)

    def decode(i: int) -> int:
        return len(wire.decode(batches[i % n]))

    def evaluator(i: int) -> int:
        hops = wire.decode(batches[i % n])
        evaluate(i, hops)
        return len(hops)

    return {
        f"receiver{tag}": _loop(seconds, receiver),
        f"wire decode{tag}": _loop(seconds, decode),
        f"evaluator{tag}": _loop(seconds, evaluator),
        f"bytes{tag}": sum(len(b) for b in batches) / nhops,
    }


def als(per: int, seconds: float, graph: bool = True, with_wire: bool = False) -> dict[str, float]:
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
            decode_http(m.http_logs.log_entry, ctxs[svc], namer, hops, b)
        else:
            decode_tcp(m.tcp_logs.log_entry, ctxs[svc], namer, hops, b)
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
            decode_http(m.http_logs.log_entry, ectxs[svc], enamer, hops, b)
        else:
            decode_tcp(m.tcp_logs.log_entry, ectxs[svc], enamer, hops, b)
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
    if with_wire:

        def produce(i: int) -> list[Hop]:
            svc, b = msgs[i % nmsg]
            m = Msg.FromString(b)
            hops: list[Hop] = []
            if m.WhichOneof("log_entries") == "http_logs":
                decode_http(m.http_logs.log_entry, ctxs[svc], namer, hops, b)
            else:
                decode_tcp(m.tcp_logs.log_entry, ctxs[svc], namer, hops, b)
            return hops

        for entries, tag in ((True, ""), (False, " (read all)")):
            engine = build_engine(cfg, cfg.policy)  # a fresh evaluator each time
            clock[0] = 1_800_000_000.0

            def evaluate(i: int, hops: list[Hop], engine: Any = engine) -> None:
                now = clock[0] = clock[0] + per / 100_000
                engine.evaluate(hops, now)
                if (i & 63) == 0:
                    engine.tick(now)
                if i % (100_000 // per) == 0:
                    engine.ctx.tally.take()

            out.update(_wire_stages(seconds, nmsg, produce, evaluate, entries, tag))
    return out


def otlp(seconds: float, graph: bool = True, with_wire: bool = False) -> dict[str, float]:
    exports = [b.replace(corpus.TOKEN, b"%08x" % i) for i, b in enumerate(corpus.build_otlp() * 5)]
    cfg = _config(graph)
    n = len(exports)

    def parse(i: int) -> int:
        r = ExportTraceServiceRequest.FromString(exports[i % n])
        return sum(len(ss.spans) for rs in r.resource_spans for ss in rs.scope_spans)

    namer = Namer(cfg.mesh)

    def decode(i: int) -> int:
        hops: list[Hop] = []
        b = exports[i % n]
        return decode_traces(ExportTraceServiceRequest.FromString(b), namer, hops, None, b)

    engine = build_engine(cfg, cfg.policy)
    clock = [1_800_000_000.0]

    def full(i: int) -> int:
        hops: list[Hop] = []
        b = exports[i % n]
        k = decode_traces(ExportTraceServiceRequest.FromString(b), engine.namer, hops, None, b)
        now = clock[0] = clock[0] + k / 80_000
        engine.evaluate(hops, now)
        if (i & 7) == 0:
            engine.tick(now)
            engine.ctx.tally.take()
        return k

    out = {"parse": _loop(seconds, parse), "decode": _loop(seconds, decode), "engine": _loop(seconds, full)}
    if with_wire:

        def produce(i: int) -> list[Hop]:
            hops: list[Hop] = []
            b = exports[i % n]
            decode_traces(ExportTraceServiceRequest.FromString(b), namer, hops, None, b)
            return hops

        engine = build_engine(cfg, cfg.policy)
        clock[0] = 1_800_000_000.0

        def evaluate(i: int, hops: list[Hop]) -> None:
            now = clock[0] = clock[0] + len(hops) / 80_000
            engine.evaluate(hops, now)
            if (i & 7) == 0:
                engine.tick(now)
                engine.ctx.tally.take()

        out.update(_wire_stages(seconds, n, produce, evaluate, True, ""))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per", type=int, action="append", help="ALS entries per message (repeatable; 25 and 100)")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--otlp", action="store_true", help="OTLP spans instead of ALS entries")
    p.add_argument("--gc-freeze", action="store_true", help="as the daemon does: gc.freeze() before the loop")
    p.add_argument("--no-graph", action="store_true", help="graph.enabled: false (the service graph's per-edge counts)")
    p.add_argument("--wire", action="store_true", help="also the hop wire format: receiver, evaluator, bytes per hop")
    a = p.parse_args(argv)
    graph = not a.no_graph
    cases: list[tuple[str, Callable[[], dict[str, float]]]] = []
    if a.otlp:
        cases.append(("OTLP 200/export", lambda: otlp(a.seconds, graph, a.wire)))
    else:
        for per in a.per or [25, 100]:
            cases.append((f"ALS {per}/msg", functools.partial(als, per, a.seconds, graph, a.wire)))
    for name, fn in cases:
        runs: list[dict[str, Any]] = []
        for _ in range(a.repeat):
            gc.collect()
            if a.gc_freeze:
                gc.freeze()
            runs.append(fn())
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        us = {k: 1e6 / v for k, v in med.items() if not k.startswith("bytes")}
        parts = []
        prev = 0.0
        for k in ("parse", "decode", "engine"):
            parts.append(f"{k} {med[k] / 1000:7.1f} k/s {us[k]:5.2f} us (+{us[k] - prev:5.2f})")
            prev = us[k]
        print(f"{name:16} " + " | ".join(parts), flush=True)
        for tag in ("", " (read all)"):
            if f"receiver{tag}" not in us:
                continue
            # encode: the receiver's work past today's decode (the key and the batch); the
            # evaluator's decode, and its whole work against today's engine stage (parse + decode + rules).
            print(
                f"  wire{tag:11} encode {us['receiver' + tag] - us['decode']:5.2f} us"
                f" (receiver {us['receiver' + tag]:5.2f}) | decode {us['wire decode' + tag]:5.2f} us"
                f" | decode + engine {us['evaluator' + tag]:5.2f} us (today's engine stage {us['engine']:5.2f})"
                f" | {med['bytes' + tag]:5.0f} bytes/hop",
                flush=True,
            )


if __name__ == "__main__":
    main()
