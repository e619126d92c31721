"""The distributed mode's benchmark (issue 15, ``python -m bench.run distributed``): Tansu, two
receivers (``meshaudit run --role receiver``) and one, then two evaluators (``--role
evaluator``), against the one-process daemon on the same load in the same run.

Each run measures three cases back to back, each on fresh processes:

- ``single``: one process (the default mode), the same connections all to it;
- ``dist-1`` and ``dist-2``: a fresh Tansu (memory storage) with the hops topic created with
  ``PARTITIONS`` partitions, two receivers, one or two evaluators in one consumer group, started
  and joined (every partition owned) before any load.

The load is a bounded count of ALS entries: ``CONNECTIONS`` h2load processes (nghttp2, C: on
these two shared CPUs the Python generator's 0.2-0.3 CPU would be taken from the tiers), each
posting one file of ``ENTRIES_PER_CONNECTION`` entries (bench/h2body.py, the workers scenario's
bodies: fresh ids per message, 25 entries per message), spread over the receivers alternately.
Beside it, the harness sends one violating probe entry (``unexpected_edge``) every
``PROBE_EVERY`` seconds on its own stream to the first receiver, and reads the evaluators' alert
files: probe sent -> alert line written is the end-to-end lag, under load (senders running,
which outrun the evaluators here: the lag is the backlog's), while the evaluators catch up
(drain), idle (after the backlog, ``IDLE_SECS``, which also gives each tier's CPU at rest), and
paced: ``PACED_RATE`` entries/s for ``PACED_SECS`` from bench/loadgen.py, below every case's
capacity, where records are smaller and per-record costs weigh more per hop.

Measured from the daemons' own /metrics (sampled every ``SAMPLE_EVERY`` s) and process CPU from
/proc (each process tree: utime + stime):

- receiver side: entries accepted (``received_total``), dropped, hops produced and acknowledged
  (``hops_produced_total``), bytes per hop (``hop_produced_bytes_total``, before compression:
  ``compression: none``, the default) and hops per record;
- evaluator side: hops judged (``evaluator_hops_total{phase="judge"}``), and replayed (0: the
  topic is new);
- rates while every sender runs (after ``WARMUP`` s, until the first sender is done), the
  pipeline's rate over the whole bounded load (hops judged / first send to last judged), and the
  backlog and drain time when the senders are done;
- CPU seconds per hop of each tier (receivers, evaluators, Tansu, h2load) over the whole load,
  first send to drained, and the one process's CPU per entry on the same load. The Kafka hop's
  cost = (receiver + evaluator CPU per hop) - (one process CPU per entry), within each run.

Nothing is pinned: Tansu, the receivers, the evaluators, the senders and the harness share the
machine's CPUs, so throughput here is the machine's, not a tier's; CPU per hop is the figure to
size from (other load on the machine changes it much less than it changes rates). Every server
binds 127.0.0.1 on a free port; every process is stopped by its PID; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench import corpus, h2body
from bench.loadgen import ALS_METHOD
from bench.procs import Proc, cpu_seconds, free_port, metric_sum, rss_bytes, scrape, tree_pids, wait_port
from bench.run import (
    MESHAUDIT,
    Meshaudit,
    Settings,
    _h2load,
    _percentile,
    _tail_alerts,
    loadgen,
    loadgen_result,
    meshaudit_config,
    say,
    tansu_binary,
)

CONNECTIONS = 8  # h2load processes, alternately to each receiver (all to the one process)
ENTRIES_PER_CONNECTION = 60_000  # 480 k entries per case: ~5 s at the one process's rate
PER_MESSAGE = 25  # Envoy's default 16 KiB buffer
RECEIVERS = 2
EVALUATORS = (1, 2)
PARTITIONS = 6  # >= evaluators, and room for a third
SESSION_TIMEOUT_MS = 6000
WARMUP = 1.0
SAMPLE_EVERY = 0.25
PROBE_EVERY = 0.1  # 10 alerts/s: well inside the alert budget (1000 per suppress_secs)
IDLE_SECS = 3.0
PACED_RATE = 20_000.0  # entries/s: under every case's capacity here (~35 k/s distributed)
PACED_SECS = 6.0
JOIN_TIMEOUT = 60.0
SEND_TIMEOUT = 180.0
DRAIN_TIMEOUT = 120.0
SLACK_HOPS = 100  # "drained": within this many hops (the probes keep coming)
TOPIC = "meshaudit.hops"


@dataclass
class Node:
    """One process of a case: ``role`` receiver, evaluator, single (one process) or tansu."""

    role: str
    proc: Proc
    metrics_url: str | None = None
    grpc_addr: str | None = None
    alerts: Path | None = None

    def pids(self) -> list[int]:
        return tree_pids(self.proc.pid)

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_url) if self.metrics_url else {}


@dataclass
class Sample:
    t: float
    counts: dict[str, float]
    cpu: dict[str, float]
    rss: dict[str, int]  # bytes, the largest process of each role
    # The largest value of a gauge on any node: what a drop would be explained by (a full ingest
    # queue; records in flight at distributed.max_in_flight_bytes: the broker acknowledges slowly).
    peaks: dict[str, float] = field(default_factory=dict)


@dataclass
class Probes:
    sent: list[tuple[int, float, str]] = field(default_factory=list)  # (n, time.time(), phase)
    seen: dict[int, float] = field(default_factory=dict)


# --- processes ---------------------------------------------------------------------------------
def _start_daemon(s: Settings, tag: str, role: str, cfg: dict[str, Any], alerts: Path | None = None) -> Node:
    cfg_path = s.log(f"{tag}.yaml")
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    mp = free_port()
    argv = [str(MESHAUDIT), "run", "--config", str(cfg_path), "--metrics", f"127.0.0.1:{mp}"]
    gp = None
    if role == "receiver":
        gp = free_port()
        argv += ["--grpc", f"127.0.0.1:{gp}", "--http", f"127.0.0.1:{free_port()}"]
    argv += ["--role", role]
    proc = Proc(argv, s.log(f"{tag}.log"))
    try:
        if gp is not None:
            wait_port(gp, timeout=30, proc=proc.popen)
        wait_port(mp, timeout=30, proc=proc.popen)
    except (RuntimeError, TimeoutError):
        proc.stop()
        raise RuntimeError(f"{role} did not start:\n{s.log(f'{tag}.log').read_text()[-2000:]}") from None
    return Node(role, proc, f"http://127.0.0.1:{mp}/metrics", f"127.0.0.1:{gp}" if gp else None, alerts)


def _stop(nodes: list[Node]) -> None:
    """SIGTERM every node at once (an evaluator lets its waits end before it leaves: seconds),
    then wait for each; Tansu last, once nothing produces to it."""
    daemons = [n for n in nodes if n.role != "tansu"]
    with ThreadPoolExecutor(max(1, len(daemons))) as ex:
        list(ex.map(lambda n: n.proc.stop(15.0), daemons))
    for n in nodes:
        if n.role == "tansu":
            n.proc.stop()


def _dist_config(tag: str, bootstrap: str, compression: str, alerts: Path) -> dict[str, Any]:
    cfg = meshaudit_config(alerts)
    cfg["distributed"] = {
        "bootstrap_servers": [bootstrap],
        "hops_topic": TOPIC,
        "group_id": f"bench-{tag}",
        "session_timeout_ms": SESSION_TIMEOUT_MS,
        "compression": compression,
        # Stage 2's topic (per-edge windows and every violation), created by the first evaluator.
        "edges_topic": f"{TOPIC}.edges",
        "edges_partitions": PARTITIONS,
        "create_topic": True,
    }
    return cfg


async def _create_topic(bootstrap: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
    finally:
        await admin.close()


def _wait_joined(evaluators: list[Node]) -> float:
    """Until every partition is owned, each evaluator owns some, and that held for 1 s; returns
    the seconds it took."""
    t0 = time.monotonic()
    stable_since: float | None = None
    while time.monotonic() - t0 < JOIN_TIMEOUT:
        owned = []
        with contextlib.suppress(OSError):
            owned = [metric_sum(e.metrics(), "meshaudit_evaluator_partitions") for e in evaluators]
        if len(owned) == len(evaluators) and sum(owned) == PARTITIONS and min(owned) > 0:
            stable_since = stable_since or time.monotonic()
            if time.monotonic() - stable_since >= 1.0:
                return time.monotonic() - t0
        else:
            stable_since = None
        time.sleep(0.2)
    raise RuntimeError(f"the evaluators did not share the {PARTITIONS} partitions in {JOIN_TIMEOUT:.0f} s")


# --- sampling ----------------------------------------------------------------------------------
def _sample(nodes: list[Node], senders: list[Proc], sender_cpu: dict[int, float]) -> Sample:
    """Counters summed by meaning over ``nodes``, CPU seconds per role; a sender's CPU is its
    last reading while alive (an exited process has no /proc entry left to read)."""
    counts: dict[str, float] = {}
    peaks: dict[str, float] = {}

    def add(key: str, v: float) -> None:
        counts[key] = counts.get(key, 0.0) + v

    def peak(key: str, v: float) -> None:
        peaks[key] = max(peaks.get(key, 0.0), v)

    for n in nodes:
        if n.role == "tansu":
            continue
        m = n.metrics()
        # Bytes on the wire to and from Kafka: what a receiver wrote and an evaluator read through
        # read(2)/write(2) (/proc/PID/io). aiokafka's sockets are uvloop's (libuv: read, write,
        # writev) and so are counted; gRPC's are not (recvmsg, sendmsg). Also counted: the
        # harness's metrics scrapes (a few KB each, 4 a second) and log lines.
        io = _io_bytes(n.proc.pid)
        if n.role == "receiver":
            add("wire_out", io[1])
        if n.role == "evaluator":
            add("wire_in", io[0])
        if n.role in ("receiver", "single"):
            add("accepted", metric_sum(m, "meshaudit_received_total"))
            add("dropped", metric_sum(m, "meshaudit_dropped_total"))
            peak("ingest_queue_entries", metric_sum(m, "meshaudit_ingest_queue_entries"))
            peak("hop_in_flight_bytes", metric_sum(m, "meshaudit_hop_in_flight_bytes"))
        if n.role == "receiver":
            add("produced", metric_sum(m, "meshaudit_hops_produced_total"))
            add("bytes", metric_sum(m, "meshaudit_hop_produced_bytes_total"))
            add("records", metric_sum(m, "meshaudit_hop_records_produced_total"))
            add("unproduced", metric_sum(m, "meshaudit_hops_unproduced_total"))
            add("produce_errors", metric_sum(m, "meshaudit_hop_produce_errors_total"))
        if n.role == "evaluator":
            add("judged", metric_sum(m, "meshaudit_evaluator_hops_total", phase="judge"))
            add("replayed", metric_sum(m, "meshaudit_evaluator_hops_total", phase="replay"))
        if n.role == "single":
            # One process: what it evaluated is both "through" (produced) and "judged".
            ev = metric_sum(m, "meshaudit_hops_evaluated_total")
            add("produced", ev)
            add("judged", ev)
    cpu: dict[str, float] = {}
    rss: dict[str, int] = {}
    for n in nodes:
        pids = n.pids()
        cpu[n.role] = cpu.get(n.role, 0.0) + cpu_seconds(pids)
        rss[n.role] = max(rss.get(n.role, 0), rss_bytes(pids))
    for p in senders:
        if p.alive():
            sender_cpu[p.pid] = max(sender_cpu.get(p.pid, 0.0), cpu_seconds([p.pid]))
    cpu["h2load"] = sum(sender_cpu.values())
    return Sample(time.monotonic(), counts, cpu, rss, peaks)


def _io_bytes(pid: int) -> tuple[int, int]:
    try:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    except (OSError, ValueError):
        return 0, 0
    return int(fields.get("rchar", 0)), int(fields.get("wchar", 0))


def _at(samples: list[Sample], t: float) -> Sample:
    """The sample nearest to monotonic time ``t``."""
    return min(samples, key=lambda x: abs(x.t - t))


def _rate(a: Sample, b: Sample, key: str) -> float:
    dt = b.t - a.t
    return (b.counts.get(key, 0.0) - a.counts.get(key, 0.0)) / dt if dt > 0 else float("nan")


# --- probes: end-to-end lag ------------------------------------------------------------------------
async def _send_probes(addr: str, probes: Probes, base: int, phase: list[str], stop: asyncio.Event) -> None:
    """One ALS stream of violating entries, one per message, every PROBE_EVERY s until ``stop``."""
    async with grpc.aio.insecure_channel(addr) as ch:
        call = ch.stream_unary(ALS_METHOD)()
        await call.write(corpus.identifier_bytes(0, 900))
        n = base
        while not stop.is_set():
            probes.sent.append((n, time.time(), phase[0]))
            await call.write(corpus.probe_message(n))
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PROBE_EVERY)
        await call.done_writing()
        with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
            await asyncio.wait_for(call, 5)


def _lags(probes: Probes) -> dict[str, Any]:
    out: dict[str, Any] = {"sent": len(probes.sent), "alerted": sum(1 for n, _, _ in probes.sent if n in probes.seen)}
    for ph in ("load", "drain", "idle", "paced"):
        lat = [(probes.seen[n] - t) * 1000 for n, t, p in probes.sent if p == ph and n in probes.seen]
        out[ph] = {
            "n": len(lat),
            "p50_ms": _percentile(lat, 0.5),
            "p99_ms": _percentile(lat, 0.99),
            "max_ms": max(lat) if lat else float("nan"),
        }
    return out


# --- one case ----------------------------------------------------------------------------------------
async def _drive(s: Settings, tag: str, nodes: list[Node], bodies: list[Path], probe_base: int) -> dict[str, Any]:
    """Send the bounded load (and probes) through ``nodes``; sample until the evaluators (or the
    one process) have judged it all; then probe the idle pipeline."""
    entry = [n for n in nodes if n.role in ("receiver", "single")]
    sink_nodes = [n for n in nodes if n.role in ("evaluator", "single") and n.alerts is not None]
    probes = Probes()
    phase = ["load"]
    stop_probes, stop_tail = asyncio.Event(), asyncio.Event()
    tails = [asyncio.create_task(_tail_alerts(n.alerts, probes.seen, stop_tail)) for n in sink_nodes if n.alerts]
    senders: list[Proc] = []
    sender_cpu: dict[int, float] = {}
    samples: list[Sample] = [await asyncio.to_thread(_sample, nodes, senders, sender_cpu)]
    t_send = time.monotonic()
    for i, n in enumerate(entry):
        assert n.grpc_addr is not None
        senders += _h2load(s, f"{tag}-to{i}", n.grpc_addr, bodies[i :: len(entry)])
    probe_task = asyncio.create_task(_send_probes(entry[0].grpc_addr or "", probes, probe_base, phase, stop_probes))
    t_first_done = t_all_done = t_drained = None
    try:
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            cur = await asyncio.to_thread(_sample, nodes, senders, sender_cpu)
            samples.append(cur)
            alive = [p.alive() for p in senders]
            if t_first_done is None and not all(alive):
                t_first_done = cur.t
            if t_all_done is None and not any(alive):
                t_all_done, phase[0] = cur.t, "drain"
            if t_all_done is not None:
                c, prev = cur.counts, samples[-2].counts
                settled = abs(c.get("produced", 0) - prev.get("produced", 0)) <= SLACK_HOPS
                if settled and c.get("judged", 0) >= c.get("produced", 0) - SLACK_HOPS:
                    t_drained = cur.t
                    break
                if cur.t - t_all_done > DRAIN_TIMEOUT:
                    raise RuntimeError(f"not drained {DRAIN_TIMEOUT:.0f} s after the senders: {c}")
            elif cur.t - t_send > SEND_TIMEOUT:
                raise RuntimeError(f"senders still running after {SEND_TIMEOUT:.0f} s")
        phase[0] = "idle"
        i0 = await asyncio.to_thread(_sample, nodes, [], {})
        await asyncio.sleep(IDLE_SECS)
        i1 = await asyncio.to_thread(_sample, nodes, [], {})
        idle = {r: (i1.cpu[r] - i0.cpu.get(r, 0.0)) / (i1.t - i0.t) for r in i1.cpu if r != "h2load"}
        paced = await _paced(s, tag, nodes, entry, phase)
    finally:
        stop_probes.set()
        for p in senders:
            p.stop(timeout=2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(probe_task, 10)
        await asyncio.sleep(1.0)  # the last probes' alerts
        stop_tail.set()
        await asyncio.gather(*tails, return_exceptions=True)
    return _figures(samples, t_send, t_first_done or t_all_done, t_all_done, t_drained, probes) | {
        "paced": paced,
        "idle_cpu": idle,
    }


async def _paced(
    s: Settings,
    tag: str,
    nodes: list[Node],
    entry: list[Node],
    phase: list[str],
) -> dict[str, Any]:
    """PACED_RATE entries/s for PACED_SECS (bench/loadgen.py, split over the entry nodes): CPU
    per hop and lag (the probes, labelled "paced") below capacity, where records are smaller."""
    per = PACED_RATE / len(entry)
    gens: list[Proc] = []
    try:
        for i, n in enumerate(entry):
            gens.append(
                await asyncio.to_thread(
                    loadgen, s, f"{tag}-paced{i}", n.grpc_addr or "", "als", PER_MESSAGE, PACED_SECS, f"{per:.0f}", 4
                )
            )
        a = await asyncio.to_thread(_sample, nodes, [], {})
        phase[0] = "paced"
        results = [await asyncio.to_thread(loadgen_result, g, PACED_SECS + 60) for g in gens]
    finally:
        for g in gens:
            g.stop(timeout=2)
    phase[0] = "after"
    b = a
    for _ in range(int(DRAIN_TIMEOUT / SAMPLE_EVERY)):
        await asyncio.sleep(SAMPLE_EVERY)
        b = await asyncio.to_thread(_sample, nodes, [], {})
        if b.counts.get("judged", 0) >= b.counts.get("produced", 0) - SLACK_HOPS:
            break
    produced = b.counts.get("produced", 0) - a.counts.get("produced", 0)
    judged = b.counts.get("judged", 0) - a.counts.get("judged", 0)
    us: dict[str, float] = {}
    for role in b.cpu:
        if role == "h2load":
            continue
        base = judged if role in ("evaluator", "single") else produced
        us[role] = (b.cpu[role] - a.cpu.get(role, 0.0)) / base * 1e6 if base > 0 else float("nan")
    return {
        "rate": PACED_RATE,
        "secs": b.t - a.t,
        "judged_rate": judged / (b.t - a.t),
        "loadgen_dropped": sum(r["dropped_items"] for r in results),
        "hops_per_record": produced / (b.counts["records"] - a.counts["records"])
        if b.counts.get("records", 0) > a.counts.get("records", 0)
        else None,
        "cpu_us_per_hop": us,
    }


def _figures(
    samples: list[Sample], t_send: float, t_first_done: float, t_all_done: float, t_drained: float, probes: Probes
) -> dict[str, Any]:
    first, last = samples[0], _at(samples, t_drained)
    # While every sender runs, after the warm-up (or the whole send when that is too short).
    w0, w1 = _at(samples, t_send + WARMUP), _at(samples, t_first_done)
    if w1.t - w0.t < 1.0:
        w0, w1 = first, _at(samples, t_all_done)
    end_send = _at(samples, t_all_done)

    def d(key: str) -> float:
        return last.counts.get(key, 0.0) - first.counts.get(key, 0.0)

    cpu = {role: last.cpu[role] - first.cpu.get(role, 0.0) for role in last.cpu}
    produced, judged = d("produced"), d("judged")
    per_hop_us: dict[str, float] = {}
    for role, secs in cpu.items():
        base = judged if role in ("evaluator", "single") else produced
        per_hop_us[role] = secs / base * 1e6 if base > 0 else float("nan")
    elapsed = last.t - first.t
    return {
        "entries_accepted": d("accepted"),
        "dropped": d("dropped"),
        "produced": produced,
        "judged": judged,
        "replayed": d("replayed"),
        "unproduced": d("unproduced"),
        "produce_errors": d("produce_errors"),
        "bytes_per_hop": d("bytes") / produced if d("bytes") > 0 and produced > 0 else None,
        "hops_per_record": produced / d("records") if d("records") > 0 else None,
        "wire_bytes_per_hop": d("wire_out") / produced if d("wire_out") > 0 and produced > 0 else None,
        "fetched_bytes_per_hop": d("wire_in") / judged if d("wire_in") > 0 and judged > 0 else None,
        "window_secs": w1.t - w0.t,
        "accepted_rate": _rate(w0, w1, "accepted"),
        "produced_rate": _rate(w0, w1, "produced"),
        "judged_rate": _rate(w0, w1, "judged"),
        "send_secs": t_all_done - t_send,
        "through_rate": judged / (t_drained - t_send),
        "backlog_at_send_end": end_send.counts.get("produced", 0.0) - end_send.counts.get("judged", 0.0),
        "drain_secs": t_drained - t_all_done,
        "cpu_secs": cpu,
        "cpu_util": {role: secs / elapsed for role, secs in cpu.items()},
        "cpu_us_per_hop": per_hop_us,
        "rss_mb": {r: max(x.rss.get(r, 0) for x in samples) / 2**20 for r in last.rss},
        "peaks": {k: max(x.peaks.get(k, 0.0) for x in samples) for k in last.peaks},
        "lag": _lags(probes),
    }


def run_single(s: Settings, tag: str, bodies: list[Path], probe_base: int) -> dict[str, Any]:
    t = Meshaudit.start(s, tag, cpus=None)
    node = Node("single", t.proc, t.metrics_url, t.grpc_addr, t.alerts)
    try:
        return {"case": "single", "evaluators": 0, **asyncio.run(_drive(s, tag, [node], bodies, probe_base))}
    finally:
        _stop([node])


def _start_tansu(s: Settings, tag: str) -> tuple[Node, str]:
    """A fresh Tansu (memory storage) on a free port, unpinned like everything else here."""
    binary = tansu_binary()
    if binary is None:
        raise RuntimeError("Tansu is missing: make tools")
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url]
    proc = Proc([*argv, "--storage-engine", "memory://tansu/"], s.log(f"{tag}.tansu.log"))
    try:
        wait_port(port, proc=proc.popen)
    except (RuntimeError, TimeoutError):
        proc.stop()
        raise
    return Node("tansu", proc), f"127.0.0.1:{port}"


def run_distributed(
    s: Settings, tag: str, evaluators: int, bodies: list[Path], probe_base: int, compression: str = "none"
) -> dict[str, Any]:
    broker_node, broker = _start_tansu(s, tag)
    nodes = [broker_node]
    try:
        asyncio.run(_create_topic(broker))
        for i in range(RECEIVERS):
            name = f"{tag}-recv{i}"
            nodes.append(
                _start_daemon(
                    s, name, "receiver", _dist_config(tag, broker, compression, s.log(f"{name}.alerts.jsonl"))
                )
            )
        evs = []
        for i in range(evaluators):
            name = f"{tag}-eval{i}"
            alerts = s.log(f"{name}.alerts.jsonl")
            alerts.unlink(missing_ok=True)
            evs.append(_start_daemon(s, name, "evaluator", _dist_config(tag, broker, compression, alerts), alerts))
        nodes += evs
        joined = _wait_joined(evs)
        out = asyncio.run(_drive(s, tag, nodes, bodies, probe_base))
    finally:
        _stop(nodes)
    case = f"dist-{evaluators}" + ("-gzip" if compression != "none" else "")
    return {"case": case, "evaluators": evaluators, "compression": compression, "join_secs": joined, **out}


# --- the scenario, its summary and the sizing ---------------------------------------------------------
# dist-2-gzip: the same with ``compression: gzip``, for the Kafka bandwidth (bytes on the wire).
CASES = ("single", "dist-1", "dist-2", "dist-2-gzip")
DIST_CASES = CASES[1:]


def _within_run(row: dict[str, dict[str, Any]]) -> None:
    """Ratios inside one run: each distributed case against that run's one process."""
    one = row.get("single", {}).get("cpu_us_per_hop", {}).get("single")
    for name in DIST_CASES:
        c = row.get(name)
        if c is None or "cpu_us_per_hop" not in c or one is None:
            continue
        us = c["cpu_us_per_hop"]
        both = us["receiver"] + us["evaluator"]
        c["kafka_hop_us"] = both - one  # what produce + consume add per hop, broker not counted
        c["kafka_hop_us_with_broker"] = both + us["tansu"] - one
        c["cpu_ratio_to_single"] = both / one
        pone = row["single"].get("paced", {}).get("cpu_us_per_hop", {}).get("single")
        pus = c.get("paced", {}).get("cpu_us_per_hop", {})
        if pone and "receiver" in pus and "evaluator" in pus:
            c["paced"]["kafka_hop_us"] = pus["receiver"] + pus["evaluator"] - pone
    d1, d2 = row.get("dist-1", {}), row.get("dist-2", {})
    if d1.get("through_rate") and d2.get("through_rate"):
        d2["speedup_vs_1"] = d2["through_rate"] / d1["through_rate"]


def _med(values: list[float | None]) -> float:
    vs = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vs) if vs else float("nan")


def summarize(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in CASES:
        cs = [row[name] for row in runs if name in row and "cpu_us_per_hop" in row[name]]
        if not cs:
            continue
        flat = (
            "accepted_rate",
            "produced_rate",
            "judged_rate",
            "through_rate",
            "send_secs",
            "drain_secs",
            "backlog_at_send_end",
            "bytes_per_hop",
            "wire_bytes_per_hop",
            "fetched_bytes_per_hop",
            "hops_per_record",
            "dropped",
            "replayed",
            "kafka_hop_us",
            "kafka_hop_us_with_broker",
            "cpu_ratio_to_single",
            "speedup_vs_1",
            "join_secs",
        )
        sm: dict[str, Any] = {"runs": len(cs)}
        for k in flat:
            vals = [c.get(k) for c in cs]
            if any(v is not None for v in vals):
                sm[k] = _med(vals)
                sm[f"{k}_all"] = vals
        roles = sorted({r for c in cs for r in c["cpu_us_per_hop"]})
        sm["cpu_us_per_hop"] = {r: _med([c["cpu_us_per_hop"].get(r) for c in cs]) for r in roles}
        sm["cpu_us_per_hop_all"] = {r: [c["cpu_us_per_hop"].get(r) for c in cs] for r in roles}
        sm["rss_mb"] = {r: _med([c["rss_mb"].get(r) for c in cs]) for r in cs[0]["rss_mb"]}
        sm["cpu_util"] = {r: _med([c["cpu_util"].get(r) for c in cs]) for r in roles}
        sm["lag"] = {
            ph: {q: _med([c["lag"][ph][q] for c in cs]) for q in ("p50_ms", "p99_ms", "max_ms")}
            for ph in ("load", "drain", "idle", "paced")
        }
        sm["paced_cpu_us_per_hop"] = {
            r: _med([c["paced"]["cpu_us_per_hop"].get(r) for c in cs]) for r in cs[0]["paced"]["cpu_us_per_hop"]
        }
        sm["paced_hops_per_record"] = _med([c["paced"]["hops_per_record"] for c in cs])
        sm["paced_judged_rate"] = _med([c["paced"]["judged_rate"] for c in cs])
        sm["idle_cpu"] = {r: _med([c["idle_cpu"].get(r) for c in cs]) for r in cs[0]["idle_cpu"]}
        sm["paced_kafka_hop_us"] = _med([c["paced"].get("kafka_hop_us") for c in cs])
        sm["probes_missing"] = sum(c["lag"]["sent"] - c["lag"]["alerted"] for c in cs)
        out[name] = sm
    return out


def sizing(summary: dict[str, dict[str, Any]], requests: float = 1e6, headroom: float = 0.6) -> dict[str, Any]:
    """Requests/s -> access-log entries/s (two per request: the client's and the server's
    sidecar) -> hops/s -> cores per tier at ``headroom`` utilisation -> replicas (one process
    uses at most about one core); partitions; the hops topic's bandwidth."""
    src = summary.get("dist-2") or summary.get("dist-1")
    if not src:
        return {}
    hops = 2 * requests
    us = src["cpu_us_per_hop"]
    out: dict[str, Any] = {"requests_per_sec": requests, "hops_per_sec": hops, "headroom": headroom}
    for tier in ("receiver", "evaluator"):
        cores = hops * us[tier] / 1e6
        out[tier] = {"us_per_hop": us[tier], "cores": cores, "replicas": int(-(-cores // headroom))}
    evaluators = out["evaluator"]["replicas"]
    # Twice the evaluators, so the group can double without repartitioning (a topic's partition
    # count can grow, but keys then move: correlation state would be split for one TTL).
    out["partitions"] = 2 * evaluators
    out["replication_factor"] = 3
    out["kafka"] = {}
    for name in DIST_CASES:
        sm = summary.get(name)
        if not sm:
            continue
        # On the wire: what the receivers wrote to Kafka per hop (produce requests, compressed
        # with gzip); their own count (records before compression) when that is missing.
        bph = sm.get("wire_bytes_per_hop") or sm.get("bytes_per_hop") or float("nan")
        mb = hops * bph / 1e6
        out["kafka"][name] = {
            "bytes_per_hop": bph,
            "receiver_us_per_hop": sm["cpu_us_per_hop"]["receiver"],
            "receiver_replicas": int(-(-hops * sm["cpu_us_per_hop"]["receiver"] / 1e6 // headroom)),
            "produce_mb_per_sec": mb,
            "broker_in_mb_per_sec": mb * 3,  # produce + 2 follower copies (acks=all)
            "consume_mb_per_sec": mb,
            "retention_gb_per_ttl": mb * 60 * 3 / 1000,  # the 60 s replay window, on every replica
        }
    return out


def scenario(s: Settings, results: dict[str, Any]) -> None:
    import shutil

    missing = [what for what, ok in (("h2load", shutil.which("h2load")), ("Tansu", tansu_binary())) if not ok]
    if missing:
        results["distributed"] = {"error": f"missing: {', '.join(missing)} (make tools)"}
        say(f"distributed: {results['distributed']['error']}")
        return
    runs: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="meshaudit-dist-") as tmp:
        bodies = h2body.write_bodies(Path(tmp), CONNECTIONS, PER_MESSAGE, ENTRIES_PER_CONNECTION)
        for r in range(s.runs):
            row: dict[str, dict[str, Any]] = {}
            for i, name in enumerate(CASES):
                tag = f"dist{r}-{name}"
                base = (r * len(CASES) + i) * 100_000
                try:
                    if name == "single":
                        c = run_single(s, tag, bodies, base)
                    else:
                        n, gzip = int(name.split("-")[1]), name.endswith("-gzip")
                        c = run_distributed(s, tag, n, bodies, base, "gzip" if gzip else "none")
                except RuntimeError as exc:
                    say(f"{tag}: {exc}")
                    row[name] = {"case": name, "error": str(exc)[:1000]}
                    continue
                row[name] = c
                us = c["cpu_us_per_hop"]
                say(
                    f"run {r + 1} {name}: through {c['through_rate']:,.0f} hops/s, judged {c['judged_rate']:,.0f}/s "
                    f"while sending, drain {c['drain_secs']:.1f} s; CPU µs/hop "
                    + ", ".join(f"{k} {v:.2f}" for k, v in us.items())
                    + f"; lag p99 load {c['lag']['load']['p99_ms']:.0f} ms idle {c['lag']['idle']['p99_ms']:.0f} ms"
                )
            _within_run(row)
            for name in DIST_CASES:
                if "kafka_hop_us" in row.get(name, {}):
                    say(f"run {r + 1} {name}: Kafka hop {row[name]['kafka_hop_us']:.2f} µs/hop")
            runs.append(row)
    summary = summarize(runs)
    results["distributed"] = {
        "settings": {
            "connections": CONNECTIONS,
            "entries_per_connection": ENTRIES_PER_CONNECTION,
            "per_message": PER_MESSAGE,
            "receivers": RECEIVERS,
            "partitions": PARTITIONS,
            "probe_every": PROBE_EVERY,
        },
        "runs": runs,
        "summary": summary,
        "sizing_1m_rps": sizing(summary),
    }


def table_lines(results: dict[str, Any]) -> list[str]:
    dist = results.get("distributed")
    if not dist:
        return []
    if "summary" not in dist:
        return ["", f"distributed: {dist.get('error')}"]
    lines = [
        "",
        "| case | hops/s through (median) | accepted/s while sending | judged/s while sending | drain s "
        "| µs/hop receivers | µs/hop evaluators | µs/hop Tansu | µs/entry one process | Kafka hop µs | bytes/hop "
        "(wire) "
        "| lag p50/p99 ms under load | idle p50/p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: Any, fmt: str = ",.0f") -> str:
        return "—" if v is None or math.isnan(v) else format(v, fmt)

    for name, sm in dist["summary"].items():
        us, lag = sm["cpu_us_per_hop"], sm["lag"]
        lines.append(
            f"| {name} | {f(sm['through_rate'])} | {f(sm['accepted_rate'])} | {f(sm['judged_rate'])} | "
            f"{f(sm['drain_secs'], '.1f')} | {f(us.get('receiver'), '.2f')} | {f(us.get('evaluator'), '.2f')} | "
            f"{f(us.get('tansu'), '.2f')} | {f(us.get('single'), '.2f')} | {f(sm.get('kafka_hop_us'), '.2f')} | "
            f"{f(sm.get('bytes_per_hop'))} ({f(sm.get('wire_bytes_per_hop'))}) | "
            f"{f(lag['load']['p50_ms'])}/{f(lag['load']['p99_ms'])} | "
            f"{f(lag['idle']['p50_ms'])}/{f(lag['idle']['p99_ms'])} |"
        )
    sz = dist.get("sizing_1m_rps")
    if sz:
        lines.append(
            f"\n1 M requests/s = {sz['hops_per_sec']:,.0f} hops/s: receivers {sz['receiver']['cores']:.1f} cores "
            f"-> {sz['receiver']['replicas']} replicas, evaluators {sz['evaluator']['cores']:.1f} cores -> "
            f"{sz['evaluator']['replicas']} replicas (at {sz['headroom']:.0%}), {sz['partitions']} partitions; "
            + "; ".join(
                f"{name}: {k['bytes_per_hop']:,.0f} B/hop on the wire, {k['produce_mb_per_sec']:,.0f} MB/s produced, "
                f"{k['broker_in_mb_per_sec']:,.0f} MB/s into the brokers at replication factor 3, "
                f"{k['receiver_replicas']} receivers"
                for name, k in sz["kafka"].items()
            )
        )
    return lines
