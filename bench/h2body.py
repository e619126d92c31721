"""Request bodies for h2load (nghttp2's HTTP/2 load generator, written in C): one file per
connection holding a whole ALS stream, gRPC-framed (1-byte flag, 4-byte length, message), the
first message carrying the Identifier as Envoy sends it. Every message gets fresh request and
trace ids (the corpus token replaced by a counter), so a file long enough for the measured
window never repeats an id.

Used by the ``workers`` scenario: there the load generator shares the machine's two CPUs with
the daemon, and h2load sends the same bytes for ~1/10 of the Python generator's CPU.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from bench import corpus


def grpc_frame(msg: bytes) -> bytes:
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


def write_bodies(out_dir: Path, streams: int, per: int, entries_per_stream: int, seed: int = 3) -> list[Path]:
    corp = corpus.build_als(per)
    rnd = random.Random(seed)
    token = rnd.randrange(1 << 31)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(streams):
        svc_index = s % len(corpus.SERVICES)
        replica = s // len(corpus.SERVICES)
        http, tcp = corp.http[svc_index], corp.tcp[svc_index]
        chunks = []
        for i in range(max(1, entries_per_stream // per)):
            group = tcp if i % 10 == 9 else http  # one message in ten holds TCP entries
            msg = group[rnd.randrange(len(group))].replace(corpus.TOKEN, b"%08x" % (token & 0xFFFFFFFF))
            token += 1
            if i == 0:
                msg = corpus.identifier_bytes(svc_index, replica) + msg
            chunks.append(grpc_frame(msg))
        p = out_dir / f"als-{per}-{s}.grpc"
        p.write_bytes(b"".join(chunks))
        paths.append(p)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--per-message", type=int, default=25)
    p.add_argument("--entries", type=int, default=100_000, help="entries per stream (file)")
    a = p.parse_args()
    for path in write_bodies(a.out, a.streams, a.per_message, a.entries):
        print(path, path.stat().st_size)


if __name__ == "__main__":
    main()
