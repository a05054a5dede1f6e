# The project's commands. `make test` and `make bench` do all set-up on a fresh machine.
#   VENV        where the virtualenv lives (default .venv)
#   VENV_ARGS   extra `python -m venv` flags (gpu-check uses --system-site-packages to see the image's torch)
#   TORCH_SPEC  the torch installed when the venv has none (the CPU build on disk here)
#   PIP_DEPS    --no-deps on machines without a package registry (gpu-check)
#   BENCH_ARGS  extra flashmoe-bench options for `make bench`
#   EXTRA_PINS  requirements installed together with the project (test-triton-oldest pins Triton 3.6)
# `make compile-check` compiles every Triton kernel for sm_90 and sm_80 without a GPU (part of `make test`);
# `make test-triton-oldest` runs the compile gate and the Triton tests again on Triton 3.6, the oldest we support
# (the GPU image's), in .venv-triton-oldest; CI runs it after `make test`.
# `make gpu-check` is for a GPU machine with torch + triton preinstalled and no network: gpu tests + benchmark.

PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?=
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,bench
PIP_DEPS ?=
EXTRA_PINS ?=
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install test bench lint clean compile-check gpu-check gpu-check-run test-triton-oldest triton-oldest-run

$(INSTALLED): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PY) -m pip install -q $(PIP_DEPS) setuptools wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q $(PIP_DEPS) --no-build-isolation -e ".[$(EXTRAS)]" $(EXTRA_PINS)
	touch $@

install: $(INSTALLED)

test: $(INSTALLED) compile-check
	$(PY) -m pytest -q

# The default sweep on whatever device is present: a table, rows appended to bench/results/<device>.jsonl,
# and <device>.json/.csv/.png/.md beside them. BENCH_ARGS adds options (flashmoe-bench --help).
BENCH_ARGS ?=
BENCH := $(VENV)/bin/flashmoe-bench --out 'bench/results/{device}' --plot 'bench/results/{device}.png' \
	--markdown 'bench/results/{device}.md'

compile-check: $(INSTALLED)
	$(PY) -m flashmoe_py.triton_compile_check

# numpy<2.4: Triton 3.6's interpreter turns 1-element arrays into ints, which numpy 2.4 refuses.
test-triton-oldest:
	$(MAKE) VENV=.venv-triton-oldest EXTRAS=test EXTRA_PINS='triton==3.6.0 "numpy<2.4"' triton-oldest-run

triton-oldest-run: $(INSTALLED) compile-check
	$(PY) -m pytest -q -W "ignore:Conversion of an array with ndim:DeprecationWarning" \
		tests/test_triton_backend.py tests/test_fused.py tests/test_fused_ep.py

RESULTS := bench/results/gpu-check-$(shell date +%Y%m%d-%H%M%S)
gpu-check:
	$(MAKE) VENV=.venv-gpu VENV_ARGS=--system-site-packages PIP_DEPS=--no-deps gpu-check-run

# The interpreter-marked tests run natively on the GPU there; the benchmark runs even if a test fails,
# and the target fails if either did. Everything lands in bench/results/gpu-check-<date>-*.
gpu-check-run: $(INSTALLED)
	mkdir -p bench/results
	$(PY) -c "import torch, triton; print(torch.cuda.get_device_name(), '| torch', torch.__version__, \
		'| triton', triton.__version__)" > $(RESULTS)-device.txt
	cat $(RESULTS)-device.txt
	$(PY) -m pytest -q -m "gpu or interpreter" > $(RESULTS)-tests.txt 2>&1; s=$$?; cat $(RESULTS)-tests.txt; \
	$(BENCH) $(BENCH_ARGS) > $(RESULTS)-bench.txt 2>&1; b=$$?; cat $(RESULTS)-bench.txt; \
	test $$s -eq 0 && test $$b -eq 0

bench: $(INSTALLED)
	$(BENCH) $(BENCH_ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info flashmoe_py/_C*.so .pytest_cache .ruff_cache
