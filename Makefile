# Two entry points: `make demo` (main job on the embedded corpus) and `make test` (whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attent-installed
export DS_ACCELERATOR ?= cpu

.PHONY: setup test demo lint clean

setup: $(STAMP)

# torch is pinned to the CPU build that installs from local disk; a bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/attent-scale demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
