"""What the distributed mode's stage-2 topic (``distributed.edges_topic``) costs next to the hops
topic: one evaluator's records and bytes per second on each, for a number of busy edges, with
every rule on. In one process, no broker: the evaluator's engine runs split (as ``--role
evaluator``), is fed ``--rate`` outbound access-log hops a second spread evenly over the edges,
ticks every ``engine.tick_ms``, and what it hands out is encoded exactly as it is produced
(``meshaudit.wire.edges``); the hops topic's side is the same hops as the receivers encode them
(``meshaudit.wire.hops``, one record per ``max_hops_per_record`` hops; an access-log hop
carrying its Envoy entry is larger, ~620 bytes: BENCHMARKS.md "The hop wire format").

``--corpus``: the load generator's realistic ALS traffic instead (bench/corpus.py: Istio naming,
HTTP and TCP entries, mTLS and plaintext, some of it violating), decoded by the real decoder and
judged with the bench's configuration (every rule on); the hops topic's bytes are then those of
access-log hops carrying their Envoy entries, as the receivers produce them, one record per
message.

    .venv/bin/python -m bench.stage2_topic [--rate 10000] [--edges 10 100 1000] [--seconds 5] [--corpus]
"""

from __future__ import annotations

import argparse

from meshaudit.config import Config, Policy
from meshaudit.engine.setup import build_engine
from meshaudit.model import ALS_HTTP, OUTBOUND, Hop, identity
from meshaudit.wire import edges, hops

T0 = 1_800_000_000.0


def measure(rate: int, n_edges: int, seconds: int, tick_ms: int = 200) -> dict[str, float]:
    engine = build_engine(Config.model_validate({"engine": {"tick_ms": tick_ms}}), Policy())
    engine.agg.align()
    engine.split(2.0)
    parties = [(identity(f"client-{i}", "default"), identity(f"server-{i}", "default")) for i in range(n_edges)]
    per_tick = rate * tick_ms // 1000
    edge_records = edge_bytes = hop_records = hop_bytes = 0
    ticks = seconds * 1000 // tick_ms
    n = 0
    for t in range(ticks):
        now = T0 + t * tick_ms / 1000
        batch: list[Hop] = []
        for _ in range(per_tick):
            src, dst = parties[n % n_edges]
            batch.append(
                Hop(
                    ALS_HTTP, f"sidecar~{src.service}", src, OUTBOUND, src, dst, now, method="GET", path="/api/1",
                    status=200, attempts=1, request_id=f"r{n}", response_code_details="via_upstream",
                )
            )  # fmt: skip
            n += 1
        for i in range(0, len(batch), 500):
            hop_records += 1
            hop_bytes += len(hops.encode(batch[i : i + 500]))
        engine.evaluate(batch, now)
        engine.tick(now + tick_ms / 1000 / 2)
        for _, value in edges.encode(*engine.take_stage2()):
            edge_records += 1
            edge_bytes += len(value)
    secs = ticks * tick_ms / 1000
    return {
        "edge_records_s": edge_records / secs,
        "edge_bytes_s": edge_bytes / secs,
        "hop_records_s": hop_records / secs,
        "hop_bytes_s": hop_bytes / secs,
    }


def measure_corpus(rate: int, seconds: int, per: int = 25, tick_ms: int = 200) -> dict[str, float]:
    from meshaudit.receivers.envoy_als.decode import StreamContext, decode_http, decode_tcp

    from bench import corpus
    from bench.inproc import Msg, _config, _messages

    cfg = _config(False)
    engine = build_engine(cfg, cfg.policy)
    engine.agg.align()
    engine.split(2.0)
    namer = engine.namer
    ctxs = [
        StreamContext(namer, corpus.node_id(s, ns, i, 0), f"{s}.{ns}", "envoy_accesslog")
        for i, (s, ns) in enumerate(corpus.SERVICES)
    ]
    msgs = _messages(per)
    edge_records = edge_bytes = hop_records = hop_bytes = 0
    ticks = seconds * 1000 // tick_ms
    per_tick = rate * tick_ms // 1000
    keys: set[bytes] = set()
    i = 0
    for t in range(ticks):
        now = T0 + t * tick_ms / 1000
        done = 0
        while done < per_tick:
            svc, b = msgs[i % len(msgs)]
            i += 1
            m = Msg.FromString(b)
            batch: list[Hop] = []
            if m.WhichOneof("log_entries") == "http_logs":
                decode_http(m.http_logs.log_entry, ctxs[svc], namer, batch, b)
            else:
                decode_tcp(m.tcp_logs.log_entry, ctxs[svc], namer, batch, b)
            done += len(batch)
            hop_records += 1
            hop_bytes += len(hops.encode(batch))
            engine.evaluate(batch, now)
        engine.tick(now + tick_ms / 1000 / 2)
        for key, value in edges.encode(*engine.take_stage2()):
            keys.add(key)
            edge_records += 1
            edge_bytes += len(value)
    secs = ticks * tick_ms / 1000
    return {
        "keys": len(keys),
        "edge_records_s": edge_records / secs,
        "edge_bytes_s": edge_bytes / secs,
        "hop_records_s": hop_records / secs,
        "hop_bytes_s": hop_bytes / secs,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=10_000, help="hops a second one evaluator judges")
    ap.add_argument("--edges", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--corpus", action="store_true", help="the load generator's realistic ALS traffic")
    args = ap.parse_args()
    if args.corpus:
        m = measure_corpus(args.rate, args.seconds)
        print(f"one evaluator, {args.rate} access-log hops/s of the bench corpus, tick 200 ms, every rule on")
        print(
            f"  edges topic: {m['keys']:.0f} keys, {m['edge_records_s']:.0f} records/s, {m['edge_bytes_s']:.0f} bytes/s"
        )
        print(f"  hops topic:  {m['hop_records_s']:.0f} records/s, {m['hop_bytes_s']:.0f} bytes/s")
        return
    print(f"one evaluator, {args.rate} outbound access-log hops/s, tick 200 ms, every rule on")
    print(f"{'edges':>6} {'edges topic rec/s':>18} {'bytes/s':>10} {'hops topic rec/s':>17} {'bytes/s':>10}")
    for n in args.edges:
        m = measure(args.rate, n, args.seconds)
        print(
            f"{n:>6} {m['edge_records_s']:>18.0f} {m['edge_bytes_s']:>10.0f} "
            f"{m['hop_records_s']:>17.0f} {m['hop_bytes_s']:>10.0f}"
        )


if __name__ == "__main__":
    main()
