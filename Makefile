# The two commands a newcomer runs: `make run` and `make test`. Each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run chaos test lint bench deps system-deps venv clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

system-deps:
	scripts/system-deps.sh

deps: system-deps venv

## make run: start Kafka and Prometheus, run the lab (a faulty rollout healed end to end), stop.
run: deps
	scripts/run-lab.sh

## make chaos: every lab experiment (bad rollout, crash loop, traffic surge, node failure), each healed and verified,
## on the local control plane (kwok nodes; LAB_CLUSTER=in-process for the in-process cluster).
LAB_CLUSTER ?= kubernetes
chaos: deps
	SRE_LAB_CLUSTER=$(LAB_CLUSTER) scripts/run-lab.sh --experiment all

## make test: lint, type-check and the whole suite against real Kafka/Prometheus/Alertmanager.
test: deps lint
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check agent streams handlers tests bench
	$(VENV)/bin/ruff format --check agent streams handlers tests bench
	$(VENV)/bin/mypy

bench: deps
	scripts/bench.sh

## make clean: stop every instance with state under .state (yours, the tests', k8s), then delete it.
clean:
	scripts/clean.sh
