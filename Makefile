# The two commands a new user needs (see README): `make run` and `make test`.
# Both call `make setup` first, which creates .venv with the exact pins of requirements.lock and
# installs the project itself into it (editable, no dependencies: the `palm` command).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup browser slurm run deps test test-fast check-default flow serve stop ui mlflow-ui prefect-server lock docs docs-setup config-reference bench fuzz clean-venv

setup: $(VENV)/.installed

# The lock pins every package (setuptools included), so pip installs it as it is (--no-deps: no
# resolver) and `pip check` below proves it complete. The bytecode is compiled afterwards on every
# core (pip compiles file by file, half of its time here). pip's noise is filtered: the local
# index's missing folders.
$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-compile -r requirements.lock 2>&1 \
	  | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }
	$(PY) -m compileall -q -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') >/dev/null || true
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	@touch $@

## Headless Chromium and its driver, for the tests that drive the ranking page of `palm feedback
## serve`, the MLflow UI and the Prefect UI (they skip without them). Debian's packages, installed
## with apt-get when missing and when running as root (as CI does); otherwise a one-line hint.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium and chromium-driver (apt-get) for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: the browser tests will skip: install chromium and chromium-driver (sudo apt-get install chromium chromium-driver)"; fi

## Slurm and MUNGE (Debian's slurm-wlm and munge), for the tests that start a single-node Slurm of
## their own and submit real jobs to it (tests/test_slurm.py; they skip without them, or when not
## root). Installed with apt-get when missing and when running as root; otherwise a one-line hint.
slurm:
	@if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
	  && command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing slurm-wlm and munge (apt-get) for the Slurm tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; \
	else echo "note: the Slurm tests will skip: they start Slurm as root from Debian's slurm-wlm and munge (sudo apt-get install slurm-wlm munge)"; fi

## Run the whole pipeline on the embedded default data (DVC reruns only what changed).
run: setup
	$(VENV)/bin/dvc repro

## Rewrite each stage's code deps in dvc.yaml to what its command imports (palm/ops/deps.py).
deps: setup
	$(PY) -m palm.ops.deps --write

## Run the test suite (what CI runs): every stage end to end, the training stages with few steps.
## Files run on parallel workers (one per core; a file's tests on one worker), the longest first.
TEST_WORKERS ?= auto
test: setup browser slurm docs-setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
	$(PY) -m pytest -q tests -m "not default" -n $(TEST_WORKERS) --dist loadfile --durations=15

## Unit tests only (no end-to-end pipeline runs).
test-fast: setup
	$(PY) -m pytest -q tests -m "not e2e and not default"

## The acceptance run: the whole default pipeline in a fresh copy, then the numbers it must reach.
check-default: setup
	$(PY) -m pytest -q -s tests/test_default_pipeline.py -m default

## The same pipeline as a Prefect flow (one task per DVC stage, shared DVC cache);
## `make flow UNTIL=<stage>`: that stage and the stages upstream of it.
flow: setup
	$(PY) -m pipelines.flow $(if $(UNTIL),--until $(UNTIL))

## MLflow UI on http://127.0.0.1:5000 over the local SQLite store (runs, registered models and
## their aliases); it prints the link that opens the project's experiment on its runs (palm/apps/ui.py).
MLFLOW_PORT ?= 5000
ui mlflow-ui: setup
	$(PY) -m palm.apps.cli ui --port $(MLFLOW_PORT)

## The pipeline as a scheduled Prefect deployment (params.yaml serve): a local Prefect server and UI
## (http://127.0.0.1:4200, state in .prefect/), the deployment, and a runner for its runs.
## Ctrl-C or `make stop` (from another terminal) ends every process it started.
serve: setup
	$(PY) -m pipelines.serve

stop:
	$(PY) -m pipelines.serve --stop

## A bare Prefect server and UI on http://127.0.0.1:4200 (`make serve` starts its own).
prefect-server: setup
	$(VENV)/bin/prefect server start --host 127.0.0.1

## The documentation site (mkdocs.yml, docs/) on http://127.0.0.1:8000, rebuilt as pages change;
## `make test` builds it into site/ with `mkdocs build --strict` (not --quiet: it hides the warnings strict counts).
docs: docs-setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve -a 127.0.0.1:8000

docs-setup: $(VENV)/.docs-installed

$(VENV)/.docs-installed: requirements-docs.txt $(VENV)/.installed
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-docs.txt -c requirements.lock 2>&1 \
	  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	@touch $@

## Rewrite docs/reference/config.md from the config dataclasses (tests/test_config_reference.py checks it).
config-reference: setup
	$(PY) -W ignore docs/config_reference.py

## Re-resolve requirements.in into requirements.lock (exact pins).
lock:
	rm -rf /tmp/palm-lock-venv && $(PYTHON) -m venv /tmp/palm-lock-venv
	/tmp/palm-lock-venv/bin/pip install -q -r requirements.in
	/tmp/palm-lock-venv/bin/pip freeze --all --exclude pip | sed 's/^torch==.*/torch==2.13.0/' > requirements.lock

## Benchmarks (benchmarks/bench.py; most need `make run` outputs): each benchmark against its baseline
## in the same run, then benchmarks/results/<date>-<machine class>.json and .md (the machine class:
## CPU model, cores, ISA, or the GPU) and the table of docs/reference/benchmarks.md.
## `make bench ONLY="int8_decode serve_load"` runs some of them (`benchmarks/bench.py --list`).
bench: setup
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt -c requirements.lock 2>&1 \
	  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	$(PY) -W ignore benchmarks/bench.py $(if $(ONLY),--only $(ONLY))

## Fuzz every reader and parser of outside input (chat/preference files, rankings, WARC, the scrape
## files source, params.yaml sections, the feedback page, registry answers) with Hypothesis:
## FUZZ_EXAMPLES inputs per target (7 targets), failures shrunk and listed; the record goes to
## benchmarks/records/fuzz-DATE.json. `make test` runs the same targets with 100 fixed inputs each.
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	$(PY) -W ignore benchmarks/fuzz.py --examples $(FUZZ_EXAMPLES)

clean-venv:
	rm -rf $(VENV)
