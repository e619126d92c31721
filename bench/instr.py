"""Instructions per ALS entry of meshaudit's hot path, counted by valgrind's callgrind: a measure
that does not depend on the machine's load, for A/B work on a shared machine (wall-clock figures
come from ``bench.inproc`` and ``bench.run``).

The workload is ``bench.inproc``'s (the bench corpus, every rule on, the bench policy, the data
clock at 100 k entries/s), fixed in size: ``--warmup`` messages run uninstrumented (the stores
fill, as in a daemon under load), then ``--messages`` messages are counted. Stages: ``decode``
(parse + decode to hops) or ``engine`` (parse + decode + every rule). Run it under callgrind
(this module starts it when it is not under valgrind already) with a fixed hash seed:

    .venv/bin/python -m bench.instr [--stage engine] [--per 25] [--warmup 10000] [--messages 2000] [--off RULE]

It prints the instructions counted and their number per entry. Needs valgrind and its headers
(``valgrind/callgrind.h``) and a C compiler: a small helper library switches the instrumentation
on and off around the counted part.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

_HELPER = """
#include <valgrind/callgrind.h>
void meshaudit_instr_on(void) { CALLGRIND_START_INSTRUMENTATION; }
void meshaudit_instr_off(void) { CALLGRIND_STOP_INSTRUMENTATION; }
"""


def _helper(workdir: Path) -> ctypes.CDLL:
    src = workdir / "instr.c"
    lib = workdir / "libinstr.so"
    src.write_text(_HELPER)
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(lib), str(src)], check=True)
    return ctypes.CDLL(str(lib))


def _workload(stage: str, per: int, warmup: int, messages: int, lib: ctypes.CDLL, off: Sequence[str] = ()) -> int:
    """Run the workload; the number of entries in the counted part. ``off``: rules switched off
    (``graph``: the service graph's tally)."""
    from meshaudit._proto.envoy.service.accesslog.v3 import als_pb2
    from meshaudit.engine.setup import build_engine
    from meshaudit.model import Hop
    from meshaudit.receivers.envoy_als.decode import StreamContext, decode_http, decode_tcp

    from bench import corpus, inproc

    msgs = inproc._messages(per)
    nmsg = len(msgs)
    cfg = inproc._config("graph" not in off)
    rules = {r: getattr(cfg.rules, r).model_copy(update={"enabled": False}) for r in off if r != "graph"}
    cfg = cfg.model_copy(update={"rules": cfg.rules.model_copy(update=rules)})
    engine = build_engine(cfg, cfg.policy)
    namer = engine.namer
    ctxs = [
        StreamContext(namer, corpus.node_id(s, ns, i, 0), f"{s}.{ns}", "envoy_accesslog")
        for i, (s, ns) in enumerate(corpus.SERVICES)
    ]
    parse = als_pb2.StreamAccessLogsMessage.FromString
    full = stage == "engine"
    now = 1_800_000_000.0
    counted = 0
    for i in range(warmup + messages):
        if i == warmup:
            lib.meshaudit_instr_on()
        svc, b = msgs[i % nmsg]
        m = parse(b)
        hops: list[Hop] = []
        if m.WhichOneof("log_entries") == "http_logs":
            decode_http(m.http_logs.log_entry, ctxs[svc], namer, hops, b)
        else:
            decode_tcp(m.tcp_logs.log_entry, ctxs[svc], namer, hops, b)
        if full:
            now += per / 100_000  # data time at 100 k entries/s
            engine.evaluate(hops, now)
            if (i & 63) == 0:
                engine.tick(now)
            if i % (100_000 // per) == 0:  # the daemon takes the graph's counts once a second
                engine.ctx.tally.take()
        if i >= warmup:
            counted += len(hops)
    lib.meshaudit_instr_off()
    return counted


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("decode", "engine"), default="engine")
    p.add_argument("--per", type=int, default=25, help="ALS entries per message")
    p.add_argument("--warmup", type=int, default=10_000, help="messages run before counting")
    p.add_argument("--messages", type=int, default=2_000, help="messages counted")
    p.add_argument("--off", action="append", default=[], help="a rule to switch off, or graph (repeatable)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # under valgrind already
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if a.inner:
            entries = _workload(a.stage, a.per, a.warmup, a.messages, _helper(workdir), a.off)
            print(f"entries {entries}", flush=True)
            return
        out = workdir / "callgrind.out"
        cmd = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            sys.executable, "-m", "bench.instr", "--inner", "--stage", a.stage, "--per", str(a.per),
            "--warmup", str(a.warmup), "--messages", str(a.messages), *(f"--off={r}" for r in a.off),
        ]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        got = re.search(r"entries (\d+)", r.stdout)
        ir = re.search(r"Collected : (\d+)", r.stderr)
        if r.returncode != 0 or got is None or ir is None:
            sys.exit(f"valgrind failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-3000:]}")
        entries, instructions = int(got.group(1)), int(ir.group(1))
        print(
            f"ALS {a.per}/msg {a.stage}{''.join(f' -{r}' for r in a.off)}: "
            f"{instructions:,} instructions over {entries:,} entries: "
            f"{instructions / entries:,.0f} per entry",
            flush=True,
        )


if __name__ == "__main__":
    main()
