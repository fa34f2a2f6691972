# `make demo` and `make test` set everything up from nothing (a .venv with pinned dependencies).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= out/demo-$(shell date +%Y%m%d-%H%M%S)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test browser app bench-quality clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/workbench demo --out $(DEMO_OUT)

# The app's browser test drives Debian's chromium through chromium-driver; installed here when missing.
BROWSER_PKGS := chromium chromium-driver
NBMAKE_TIMEOUT ?= 300

browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi; \
	echo "make: the app's browser test needs $(BROWSER_PKGS); installing them with apt-get"; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "error: no apt-get here: install chromium and chromedriver yourself (or run with WORKBENCH_SKIP_BROWSER=1 to skip the browser test)"; exit 1; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else \
	  echo "error: installing $(BROWSER_PKGS) needs root: run 'sudo apt-get install -y $(BROWSER_PKGS)' (or WORKBENCH_SKIP_BROWSER=1)"; exit 1; fi; \
	log=$$(mktemp); \
	if $$SUDO apt-get update -q >$$log 2>&1 && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $(BROWSER_PKGS) >>$$log 2>&1; then \
	  rm -f $$log; echo "make: installed $(BROWSER_PKGS)"; \
	else tail -20 $$log; echo "error: could not install $(BROWSER_PKGS) with apt-get (log above; full log in $$log)"; exit 1; fi

# The suite, the tutorial notebooks (executed top to bottom by nbmake) and the app in a real browser.
test: setup $(if $(filter 1,$(WORKBENCH_SKIP_BROWSER)),,browser)
	$(BIN)/python -m pytest -q tests notebooks --nbmake --nbmake-timeout=$(NBMAKE_TIMEOUT) --durations=15

app: setup
	$(BIN)/python app.py

bench-quality: setup
	$(BIN)/python scripts/bench_quality.py
	$(BIN)/python scripts/bench_ablations.py --seeds 0,16,32

clean-venv:
	rm -rf $(VENV)
