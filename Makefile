# xray-triage: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
CONFIG ?= config/xray-triage.yaml
export XRAY_TRIAGE_CONFIG ?= $(CONFIG)

.PHONY: run test venv system-deps services lint bench fuzz train clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -e '.[ml,test]'
	touch $(STAMP)

venv: $(STAMP)

## run: the listener, the hand-off and a worker on the embedded SQLite database and broker
# The shipped config's relative paths (var/...) are meant from the checkout, not from config/.
run: $(STAMP)
	XRAY_TRIAGE_HOME=$(CURDIR) $(VENV)/bin/xray-triage db upgrade
	XRAY_TRIAGE_HOME=$(CURDIR) $(VENV)/bin/xray-triage run

## system-deps: Debian packages the tests talk to (installed only where absent; needs root)
system-deps:
	bash scripts/system_deps.sh

## services: PostgreSQL and Redis on 127.0.0.1, started if not running
services: system-deps
	bash scripts/ensure_services.sh

## test: install whatever is missing, start what is needed, run every check and every test
test: system-deps $(STAMP) services lint
	$(PY) -m pytest

## lint: style, formatting, the layers (docs/architecture.md) and the types of the production packages
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

## bench: speed and memory figures against baselines measured in the same run (not run by CI)
bench: system-deps $(STAMP) services
	$(PY) -m bench

## fuzz: a long network fuzzing campaign against the listener (FUZZ_CASES, FUZZ_SEED); figures in docs/conformance.md
FUZZ_CASES ?= 20000
FUZZ_SEED ?= 1
fuzz: system-deps $(STAMP)
	$(PY) -m tests.fuzz_campaign --cases $(FUZZ_CASES) --seed $(FUZZ_SEED)

## train: the shipped default model + the compact baseline on ../shared/data, then their evaluation
## reports (report-nih: the default on all NIH findings films, a collection it never trained on).
## Measured wall time in docs/training.md; resumable: re-run after an interruption.
TRAIN_CONFIG ?= training/configs/default.yaml
BASELINE_CONFIG ?= training/configs/baseline.yaml
train:
	test -x $(VENV)/bin/xray-triage || $(MAKE) venv
	$(VENV)/bin/xray-triage train --config $(TRAIN_CONFIG)
	$(VENV)/bin/xray-triage train --config $(BASELINE_CONFIG)
	$(VENV)/bin/xray-triage evaluate --model models/baseline --data models/baseline/split.csv --split val --out models/baseline/report
	$(VENV)/bin/xray-triage evaluate --model models/default --data models/default/split.csv --split val --compare models/baseline --out models/default/report
	$(VENV)/bin/xray-triage evaluate --model models/default --data models/default/split.csv --split test --compare models/baseline --out models/default/report-test
	$(VENV)/bin/xray-triage evaluate --model models/default --data ../shared/data/nih-findings --split all --out models/default/report-nih

clean:
	rm -rf var build *.egg-info .pytest_cache
