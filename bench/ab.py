"""This build of meshaudit against another, measured at once: both daemons pinned to the same
CPU (1), each fed by its own load generator (CPU 0), ALS entries at ``--per`` a message, every
rule on. The host's noise (other tenants of this shared machine move one daemon's figure by
±30 % between runs a minute apart) then falls on both alike, and their ratio is steady to a few
per cent where an alternation of separate runs could not tell 10 % apart. Each round runs both
orders (which daemon starts first: the second measured 2-3 % higher), and the figure is the
median ratio of this build's entries to the other's over all rounds.

It measures work per entry, not the effect of a change on caches: the two daemons share the
core's caches, each evicting the other's working set at every switch.

    .venv/bin/python -m bench.ab OTHER_CHECKOUT [--secs 15] [--rounds 2] [--per 25]

OTHER_CHECKOUT is another working tree of this repository (``git worktree add``) with its own
``make install``; both daemons run the bench policy and corpus of this one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench import run


def pair(s: run.Settings, first: Path, second: Path, secs: float, per: int) -> tuple[int, int]:
    """Entries each of two daemons evaluated over the same ``secs`` (``first`` started first)."""
    targets: list[run.Meshaudit] = []
    try:
        for i, program in enumerate((first, second)):
            cfg = run.meshaudit_config(s.log(f"ab{i}.alerts.jsonl"))
            targets.append(run.Meshaudit.start(s, f"ab{i}", config=cfg, program=program))
        loads = [run.loadgen(s, f"ab{i}", t.grpc_addr, "als", per, secs + 4) for i, t in enumerate(targets)]
        time.sleep(3)  # the stores fill and the load settles
        before = [t.counts().processed for t in targets]
        time.sleep(secs)
        after = [t.counts().processed for t in targets]
        for lg in loads:
            run.loadgen_result(lg, timeout=60)
    finally:
        for t in targets:
            t.stop()
    return int(after[0] - before[0]), int(after[1] - before[1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("other", type=Path, help="another checkout, installed (its .venv/bin/meshaudit)")
    p.add_argument("--secs", type=float, default=15.0, help="seconds measured per pair")
    p.add_argument("--rounds", type=int, default=2, help="rounds (each runs both orders)")
    p.add_argument("--per", type=int, default=25, help="ALS entries per message")
    a = p.parse_args(argv)
    this, other = run.MESHAUDIT, a.other.resolve() / ".venv" / "bin" / "meshaudit"
    s = run.Settings()
    ratios: list[float] = []
    for r in range(a.rounds):
        for first, second in ((other, this), (this, other)):
            n_first, n_second = pair(s, first, second, a.secs, a.per)
            mine, theirs = (n_second, n_first) if first == other else (n_first, n_second)
            ratio = mine / theirs if theirs else float("nan")
            ratios.append(ratio)
            order = "this second" if first == other else "this first"
            run.say(
                f"round {r + 1} ({order}): this {mine / a.secs:,.0f}/s, other {theirs / a.secs:,.0f}/s, "
                f"ratio {ratio:.3f}"
            )
    run.say(f"this / other, ALS {a.per}/msg: median {statistics.median(ratios):.3f} over {len(ratios)} pairs")


if __name__ == "__main__":
    main()
