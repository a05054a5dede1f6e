# The project's commands. `make test` and `make bench` do all set-up on a fresh machine.
#   VENV        where the virtualenv lives (default .venv)
#   VENV_ARGS   extra `python -m venv` flags (gpu-check uses --system-site-packages to see the image's torch)
#   TORCH_SPEC  the torch installed when the venv has none (the CPU build on disk here)
#   PIP_DEPS    --no-deps on machines without a package registry (gpu-check)
#   BENCH_ARGS  extra flashmoe-bench options for `make bench`

PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?=
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,bench
PIP_DEPS ?=
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install test bench lint clean

$(INSTALLED): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PY) -m pip install -q $(PIP_DEPS) setuptools wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q $(PIP_DEPS) --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@

install: $(INSTALLED)

test: $(INSTALLED)
	$(PY) -m pytest -q

# The default sweep on whatever device is present: a table, rows appended to bench/results/<device>.jsonl,
# and <device>.json/.csv/.png/.md beside them. BENCH_ARGS adds options (flashmoe-bench --help).
BENCH_ARGS ?=
bench: $(INSTALLED)
	$(VENV)/bin/flashmoe-bench --out 'bench/results/{device}' --plot 'bench/results/{device}.png' \
		--markdown 'bench/results/{device}.md' $(BENCH_ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info flashmoe_py/_C*.so .pytest_cache .ruff_cache
