# `make demo` and `make test` set everything up from nothing (a .venv with pinned dependencies).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= out/demo-$(shell date +%Y%m%d-%H%M%S)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test app bench-quality clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/workbench demo --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q tests

app: setup
	$(BIN)/python app.py

bench-quality: setup
	$(BIN)/python scripts/bench_quality.py
	$(BIN)/python scripts/bench_ablations.py

clean-venv:
	rm -rf $(VENV)
