"""meshaudit benchmarks: a load generator in its own process, a decode-and-count ceiling server,
and a harness that runs the scenarios of BENCHMARKS.md and prints figures (never asserts timing).

Run from the repository root: ``.venv/bin/python -m bench.run --help`` or ``make bench``.
"""
