"""Load generator, run in its own process: streams pre-encoded ALS batches (or unary OTLP span
exports) to a gRPC target for a bounded duration, optionally rate-limited, optionally with
violating probe entries whose send times it records for the latency scenario.

Like Envoy, a rate-limited stream never queues without bound: each stream holds at most
``--buffer`` messages; when the server cannot keep up the generator drops and counts
(Envoy's ``logs_dropped``). With ``--rate 0`` it sends as fast as flow control allows.

Prints one JSON object with its counters on stdout when done.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import uvloop

from bench import corpus

ALS_METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
OTLP_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    # One connection per stream group, like many Envoys; avoid the subchannel being shared.
    ("grpc.use_local_subchannel_pool", 1),
]


@dataclass
class Stats:
    kind: str
    per_message: int
    streams: int
    rate: float
    started: float = 0.0
    ended: float = 0.0
    messages: int = 0
    items: int = 0
    dropped_items: int = 0
    errors: int = 0
    probes: list[tuple[int, float]] = field(default_factory=list)
    # (time, cumulative items sent): lets the harness see the offered rate over time.
    timeline: list[tuple[float, int, int]] = field(default_factory=list)


class Counter:
    """Message counter whose 8 hex digits replace corpus.TOKEN: new request ids per message."""

    def __init__(self) -> None:
        self._it = itertools.count(random.randrange(1 << 31))

    def token(self) -> bytes:
        return b"%08x" % (next(self._it) & 0xFFFFFFFF)


def _rate_phases(spec: str, duration: float) -> list[tuple[float, float]]:
    """``"3000"`` or ``"30000:60,5000:20"`` (items/s for seconds) -> [(end_offset, rate)]."""
    phases: list[tuple[float, float]] = []
    t = 0.0
    for part in spec.split(","):
        if ":" in part:
            r, d = part.split(":")
            t += float(d)
            phases.append((t, float(r)))
        else:
            phases.append((duration, float(part)))
    return phases


def _rate_at(phases: list[tuple[float, float]], offset: float) -> float:
    for end, rate in phases:
        if offset < end:
            return rate
    return phases[-1][1]


async def _als_stream(
    channel: grpc.aio.Channel,
    stream_no: int,
    corp: corpus.AlsCorpus,
    args: argparse.Namespace,
    stats: Stats,
    counter: Counter,
    deadline: float,
    phases: list[tuple[float, float]],
) -> None:
    svc_index = stream_no % len(corpus.SERVICES)
    replica = stream_no // len(corpus.SERVICES)
    http = corp.http[svc_index]
    tcp = corp.tcp[svc_index]
    per = corp.per_message
    call = channel.stream_unary(ALS_METHOD)()
    first = corpus.identifier_bytes(svc_index, replica)
    rnd = random.Random(stream_no)
    tcp_every = int(1 / args.tcp_fraction) if args.tcp_fraction > 0 else 0

    def next_msg(i: int) -> bytes:
        group = tcp if tcp_every and i % tcp_every == tcp_every - 1 else http
        return group[rnd.randrange(len(group))].replace(corpus.TOKEN, counter.token())

    try:
        # Envoy sends the Identifier with the first batch.
        await call.write(first + next_msg(0))
        stats.messages += 1
        stats.items += per
        if phases[0][1] <= 0:
            i = 1
            while time.monotonic() < deadline:
                await call.write(next_msg(i))
                i += 1
                stats.messages += 1
                stats.items += per
        else:
            queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=args.buffer)

            async def writer() -> None:
                while True:
                    msg = await queue.get()
                    await call.write(msg)
                    stats.messages += 1
                    stats.items += per

            task = asyncio.create_task(writer())
            start = time.monotonic()
            owed = 0.0
            last = start
            i = 1
            while (now := time.monotonic()) < deadline:
                rate = _rate_at(phases, now - start) / args.streams / per  # messages/s, this stream
                owed += (now - last) * rate
                last = now
                while owed >= 1:
                    owed -= 1
                    try:
                        queue.put_nowait(next_msg(i))
                    except asyncio.QueueFull:
                        stats.dropped_items += per
                    i += 1
                await asyncio.sleep(0.005)
            task.cancel()
        await call.done_writing()
        await asyncio.wait_for(call, timeout=5)
    except (grpc.aio.AioRpcError, TimeoutError, asyncio.CancelledError) as exc:
        if not isinstance(exc, asyncio.CancelledError):
            stats.errors += 1


async def _probes(channel: grpc.aio.Channel, args: argparse.Namespace, stats: Stats, deadline: float) -> None:
    """One stream of violating entries, one per message, every ``--probe-every-ms``."""
    call = channel.stream_unary(ALS_METHOD)()
    await call.write(corpus.identifier_bytes(0, 900))
    n = args.probe_base
    await asyncio.sleep(args.probe_delay)
    while time.monotonic() < deadline - args.probe_tail:
        msg = corpus.probe_message(n)
        stats.probes.append((n, time.time()))
        await call.write(msg)
        n += 1
        await asyncio.sleep(args.probe_every_ms / 1000 * random.uniform(0.5, 1.5))
    await call.done_writing()
    try:
        await asyncio.wait_for(call, timeout=5)
    except (grpc.aio.AioRpcError, TimeoutError):
        stats.errors += 1


async def _otlp_worker(
    channel: grpc.aio.Channel,
    exports: list[bytes],
    per: int,
    args: argparse.Namespace,
    stats: Stats,
    counter: Counter,
    deadline: float,
    phases: list[tuple[float, float]],
) -> None:
    call = channel.unary_unary(OTLP_METHOD)
    rnd = random.Random()
    start = time.monotonic()
    next_at = start
    while (now := time.monotonic()) < deadline:
        rate = _rate_at(phases, now - start) / args.streams / per
        if rate > 0:
            if now < next_at:
                await asyncio.sleep(next_at - now)
            next_at += 1 / rate
            if time.monotonic() - next_at > 1.0:  # a second behind: Envoy would drop the batch
                stats.dropped_items += per
                continue
        msg = exports[rnd.randrange(len(exports))].replace(corpus.TOKEN, counter.token())
        try:
            await call(msg, timeout=10)
            stats.messages += 1
            stats.items += per
        except grpc.aio.AioRpcError:
            stats.errors += 1
            stats.dropped_items += per


async def _timeline(stats: Stats, deadline: float) -> None:
    while time.monotonic() < deadline:
        stats.timeline.append((time.time(), stats.items, stats.dropped_items))
        await asyncio.sleep(1.0)


async def main_async(args: argparse.Namespace) -> Stats:
    phases = _rate_phases(args.rate, args.duration)
    stats = Stats(kind=args.kind, per_message=args.per_message, streams=args.streams, rate=phases[0][1])
    counter = Counter()
    tasks: list[asyncio.Task[None]] = []
    channels: list[grpc.aio.Channel] = []
    if args.kind == "als":
        shape = corpus.TrafficShape(
            random_paths=args.random_paths, source_accounts=args.source_accounts, tcp_messages=args.tcp_fraction
        )
        corp = corpus.build_als(args.per_message, shape=shape)
    else:
        exports = corpus.build_otlp(args.per_message)
    print(json.dumps({"ready": True}), file=sys.stderr, flush=True)
    start = time.monotonic()
    deadline = start + args.duration
    stats.started = time.time()
    for s in range(args.streams):
        if s % args.streams_per_channel == 0:
            channels.append(grpc.aio.insecure_channel(args.target, options=CHANNEL_OPTIONS))
        ch = channels[-1]
        if args.kind == "als":
            coro = _als_stream(ch, s, corp, args, stats, counter, deadline, phases)
        else:
            coro = _otlp_worker(ch, exports, args.per_message, args, stats, counter, deadline, phases)
        tasks.append(asyncio.create_task(coro))
    if args.probe_every_ms > 0:
        probe_ch = grpc.aio.insecure_channel(args.target, options=CHANNEL_OPTIONS)
        channels.append(probe_ch)
        tasks.append(asyncio.create_task(_probes(probe_ch, args, stats, deadline)))
    tasks.append(asyncio.create_task(_timeline(stats, deadline)))
    await asyncio.wait(tasks, timeout=args.duration + 15)
    for t in tasks:
        t.cancel()
    stats.ended = time.time()
    for ch in channels:
        await ch.close(grace=None)
    return stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--target", required=True, help="HOST:PORT of the gRPC server")
    p.add_argument("--kind", choices=("als", "otlp"), default="als")
    p.add_argument("--per-message", type=int, default=25, help="ALS entries per message or spans per export")
    p.add_argument("--streams", type=int, default=8, help="ALS streams, or OTLP exports in flight")
    p.add_argument("--streams-per-channel", type=int, default=4, help="streams sharing one connection")
    p.add_argument("--rate", default="0", help='items/s, 0 = as fast as possible; or phases "r:secs,r:secs"')
    p.add_argument("--duration", type=float, default=10.0, help="seconds (bounded: at most 900)")
    p.add_argument("--buffer", type=int, default=4, help="messages a rate-limited stream holds before dropping")
    p.add_argument("--tcp-fraction", type=float, default=0.1, help="fraction of ALS messages with TCP entries")
    p.add_argument("--random-paths", action="store_true", help="every path distinct (cardinality stress)")
    p.add_argument("--source-accounts", type=int, default=0, help="distinct extra source service accounts")
    p.add_argument("--probe-every-ms", type=float, default=0, help="send a violating probe entry this often")
    p.add_argument("--probe-base", type=int, default=0, help="first probe number (unique per run)")
    p.add_argument("--probe-delay", type=float, default=1.0, help="seconds before the first probe")
    p.add_argument("--probe-tail", type=float, default=2.0, help="no probes in the last seconds")
    args = p.parse_args(argv)
    if not 0 < args.duration <= 900:
        p.error("--duration must be in (0, 900]")
    if args.streams < 1 or args.streams > 512:
        p.error("--streams must be in [1, 512]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    uvloop.install()
    stats = asyncio.run(main_async(args))
    out: dict[str, Any] = asdict(stats)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
