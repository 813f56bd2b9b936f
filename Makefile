# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; on a GPU machine install your CUDA build of torch into $(VENV) first.
TORCH ?= torch==2.13.0
# the browser the UI tests drive (Debian's package: Playwright downloads no browser of its own)
CHROMIUM ?= /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test test-all test-ui ui-deps lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
# DeepSpeed's CPU accelerator JIT-builds its shm comm op at every start: built here, so runs never compile (and stale build locks are cleared)
	$(PY) -m pipelines.training.extension_locks
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/graft run jobs/demo.yaml

# two xdist workers, each test module whole on one worker: a module's shared run (a module-scoped fixture) is built once
test: $(VENV)/.installed
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

test-all: $(VENV)/.installed ui-deps
	CHROMIUM=$(CHROMIUM) $(VENV)/bin/pytest -q -m "slow or not slow"

# the MLflow UI checked in headless Chromium (a tiny job, then the runs table, a loss chart and the eval table)
test-ui: $(VENV)/.installed ui-deps
	CHROMIUM=$(CHROMIUM) $(VENV)/bin/pytest -q -m browser

ui-deps: $(VENV)/.installed
	test -x $(CHROMIUM) || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)
	$(PY) -c "import playwright.sync_api" 2>/dev/null || $(PY) -m pip install -q -e ".[ui]"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check graft pipelines tests benchmarks

clean:
	rm -rf runs
