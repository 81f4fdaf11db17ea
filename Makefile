# tuneflow: make install | make demo | make test
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test clean
OLAH_VENV ?= .venv-olah

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
	$(BIN)/python -m infra.tiny --out demo/assets
	$(BIN)/tuneflow run --config configs/demo.yaml

# The tests serve tiny repos from a local Hub mirror (olah); it needs a newer fastapi than Prefect, so its own venv.
$(OLAH_VENV)/.installed:
	test -x $(OLAH_VENV)/bin/python || $(PY) -m venv $(OLAH_VENV)
	$(OLAH_VENV)/bin/pip install --quiet "olah>=0.5.4,<0.6"
	touch $@

test: install $(OLAH_VENV)/.installed
	TUNEFLOW_OLAH_VENV=$(abspath $(OLAH_VENV)) $(BIN)/python -m pytest -ra

clean:
	rm -rf runs demo mlflow.db mlruns mlartifacts .pytest_cache
