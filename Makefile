# One entry point for people, CI and the devcontainer. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
YEAR ?= 2023
MONTH ?= 3
COLOR ?= green
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (0: none, all tests in one process)
TEST_WORKERS ?= 2
PARALLEL ?= 2
FORCE ?=
BENCH_ARGS ?=
MODEL ?=
MODEL_PORT ?= 5002
# The hyperparameter search (make run / backfill TRIALS=20 [TUNE_WORKERS=2] [TUNE_SEED=42]): off without TRIALS.
TRIALS ?=
TUNE_WORKERS ?=
TUNE_SEED ?=
TUNE_FLAGS = $(if $(TRIALS),--tune-trials $(TRIALS)) $(if $(TUNE_WORKERS),--tune-workers $(TUNE_WORKERS)) $(if $(TUNE_SEED),--tune-seed $(TUNE_SEED))

# uv, pinned: the same version as in requirements/dev.txt (a unit test checks they agree).
UV_VERSION := 0.13.9
UV := $(BIN)/uv
LOCK_DIR ?= requirements
# Universal: one lock resolves on Linux, macOS and Windows; the existing lock's versions are
# kept unless pyproject.toml needs others (or UPGRADE=1).
LOCK_OPTIONS = pyproject.toml --universal --python-version 3.11 --generate-hashes --quiet \
	--custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade)
# Installed only when the lock or the package metadata changes.
ENV_STAMP := $(VENV)/.installed

# Python caches compiled modules (__pycache__) unless PYTHONDONTWRITEBYTECODE is set, as some
# images and CI machines do. uv installs without compiling, so with it set every process would
# compile Prefect, MLflow and pandas from source again; here the cache fills on first import.
unexport PYTHONDONTWRITEBYTECODE

.DEFAULT_GOAL := help

.PHONY: help env run score serve-model backfill serve lab compare reopen test test-fast lint format hooks lock clean-outputs strip-notebooks browser-deps reports services services-stop ui bench

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/$$(MODEL_PORT)/$(MODEL_PORT)/g' \
		| awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'
	@echo "  Knobs: YEAR=$(YEAR) MONTH=$(MONTH) COLOR=$(COLOR); env TAXI_DATA_SOURCE, MLFLOW_TRACKING_URI, PREFECT_API_URL, TAXI_PREFECT_SERVER (see docs/configuration.md)"

env: $(ENV_STAMP) ## Create .venv from requirements/dev.txt with uv (the one install path)

# uv is bootstrapped from the package index into .venv, then installs the hashed dev lock
# exactly (sync: what the lock does not name is removed; uv itself is in it). The pipeline
# image installs requirements/runtime.txt the same way (Dockerfile).
$(UV):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(ENV_STAMP): requirements/dev.txt pyproject.toml | $(UV)
	$(UV) pip sync --quiet --python $(BIN)/python --require-hashes requirements/dev.txt
	$(UV) pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@

run: env ## Run the pipeline for YEAR-MONTH (default 2023-03) and COLOR; unchanged stages are reused; TRIALS=20 tunes first (TUNE_WORKERS, DASK=1, DASK_ADDRESS)
	$(BIN)/python flows/pipeline.py --year $(YEAR) --month $(MONTH) --color $(COLOR) $(if $(FORCE),--force) $(if $(VERBOSE),--verbose) $(TUNE_FLAGS) $(if $(DASK),--dask) $(if $(DASK_ADDRESS),--dask-address $(DASK_ADDRESS))

score: env ## Score YEAR-MONTH with the champion (MODEL=models:/nyc-taxi-duration/3 for another version); predictions and a report
	$(BIN)/python flows/score.py --year $(YEAR) --month $(MONTH) --color $(COLOR) $(if $(MODEL),--model $(MODEL)) $(if $(FORCE),--force) $(if $(VERBOSE),--verbose)

serve-model: env ## Serve the champion over HTTP on 127.0.0.1:$(MODEL_PORT) (POST trip fields to /invocations)
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-$$($(BIN)/python -c 'from taxi_duration import settings; from taxi_duration.servers import endpoints; endpoints.adopt_running_services(); print(settings.tracking_uri())')}" \
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow models serve -m $(or $(MODEL),models:/nyc-taxi-duration@champion) --env-manager local --host 127.0.0.1 --port $(MODEL_PORT)

backfill: env ## Run every month FROM=YYYY-MM TO=YYYY-MM (PARALLEL=2 at a time; DASK=1 or DASK_ADDRESS=tcp://host:8786 for Dask)
	@test -n "$(FROM)" -a -n "$(TO)" || { echo "usage: make backfill FROM=2023-01 TO=2023-04 [COLOR=green] [PARALLEL=2] [DASK=1 | DASK_ADDRESS=tcp://host:8786]"; exit 2; }
	$(BIN)/python flows/backfill.py --from $(FROM) --to $(TO) --color $(COLOR) --max-parallel $(PARALLEL) $(TUNE_FLAGS) $(if $(FORCE),--force) $(if $(DASK),--dask) $(if $(DASK_ADDRESS),--dask-address $(DASK_ADDRESS)) $(if $(VERBOSE),--verbose)

serve: env ## Serve the monthly scheduled deployment (Ctrl-C stops) on the local or PREFECT_API_URL server
	$(BIN)/python flows/serve.py

services: env ## Start real MLflow and Prefect servers on 127.0.0.1 in the background; runs then use them
	$(BIN)/python -m taxi_duration.servers.local_servers start

services-stop: env ## Stop exactly the servers `make services` (or a run) started
	$(BIN)/python -m taxi_duration.servers.local_servers stop

ui: env ## Print the MLflow and Prefect UI addresses
	@$(BIN)/python -m taxi_duration.servers.local_servers urls

bench: env ## Time the pipeline against the plain script, and a cold run with TAXI_FAST_START=0 (BENCH_ARGS="--repeat 3 --check" or "--quick"); table in outputs/bench/pipeline.md
	$(BIN)/python bench/run.py $(BENCH_ARGS)

reports: ## Print where the run gallery is (open it in a browser: no server needed)
	@if [ -f outputs/index.html ]; then echo "file://$(CURDIR)/outputs/index.html"; else echo "no runs yet: make run"; fi

browser-deps: ## Install Debian's Chromium for the browser tests (root; apt)
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@chromium --version

lab: env ## JupyterLab on notebooks/, kernel from the project environment (root too, as in containers)
	cd notebooks && ../$(BIN)/jupyter lab --notebook-dir=. $(if $(filter 0,$(shell id -u)),--allow-root)

compare: env ## Compare two runs A=<run> B=<run> (MLflow run id, prefix or folder): one offline report in the newer run's folder
	@test -n "$(A)" -a -n "$(B)" || { echo "usage: make compare A=<run id, prefix or folder> B=<run id, prefix or folder>"; exit 2; }
	$(BIN)/python -m taxi_duration.review.compare $(A) $(B)

reopen: env ## Reopen RUN=<run> [STAGE=03_train] in JupyterLab with the run's exact parameters (notebooks/reopened/)
	@test -n "$(RUN)" || { echo "usage: make reopen RUN=<run id, prefix or folder> [STAGE=01_explore|02_features|03_train|04_score]"; exit 2; }
	$(BIN)/python -m taxi_duration.review.reopen $(RUN) $(if $(STAGE),--stage $(STAGE))

test: env lint ## Lint, then run the whole test suite (every layer; TEST_WORKERS=2 processes side by side; ends with the 25 slowest)
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal) --durations=25 $(PYTEST_ARGS)

test-fast: env ## Unit tests only
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# What ruff lints and formats (the notebooks too); mypy's files are in pyproject.toml.
LINT_PATHS := src flows tests bench notebooks

lint: env ## Lint and format check (ruff), type-check src/ and flows/ (mypy), check the deployment files
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yaml
	$(BIN)/python -c 'import json5, yaml; yaml.safe_load(open("prefect.yaml")); json5.load(open(".devcontainer/devcontainer.json"))'

format: env ## Apply ruff's safe fixes and the formatter to the code and notebooks
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/ruff format $(LINT_PATHS)

hooks: env ## Install the git pre-commit hooks (.pre-commit-config.yaml: the .venv tools, nothing downloaded)
	$(BIN)/pre-commit install
	git config blame.ignoreRevsFile .git-blame-ignore-revs

lock: $(UV) ## Re-resolve pyproject.toml into requirements/runtime.txt and dev.txt (needs the package index; UPGRADE=1 takes newer versions)
	$(UV) pip compile $(LOCK_OPTIONS) -o $(LOCK_DIR)/runtime.txt
	$(UV) pip compile $(LOCK_OPTIONS) --extra dev -c $(LOCK_DIR)/runtime.txt -o $(LOCK_DIR)/dev.txt

strip-notebooks: env ## Remove outputs from notebooks/ before committing
	$(BIN)/nbstripout --keep-id notebooks/*.ipynb

clean-outputs: ## Delete generated outputs (runs, reports); keeps data/ and MLflow
	find outputs -mindepth 1 ! -name .gitkeep ! -name README.md -exec rm -rf {} +
