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
# `make gpu-check` is for one GPU machine with torch + Triton preinstalled and maybe no package registry (e.g. the
# lent H100/H200): .venv-gpu on the machine's own packages plus the wheels carried in .whl/ (`make gpu-wheels`
# fetches nvshmem4py there), then flashmoe_py/gpu_check.py: device and versions, the gpu tests, PHASE=ALL at world
# size 1, two in-process ranks, compute-sanitizer memcheck + synccheck, the benchmark's GPU shapes; at most 8
# minutes with the install, each step timed, records in bench/results/gpu-check-<date>-* (and <= 8 files in $OUT).
# `make gpu-check-dry` rehearses it here (DRY=1, the .venv's python as PYTHON): lists the steps, runs what needs no
# GPU, records in build/gpu-check.

PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?=
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,bench
PIP_DEPS ?=
EXTRA_PINS ?=
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install test bench lint clean compile-check gpu-check gpu-check-run gpu-check-dry gpu-install gpu-wheels \
	test-triton-oldest triton-oldest-run

# --system-site-packages shows the packages of the base interpreter only; when $(PYTHON) is itself a venv (the GPU
# image's python3 is), a .pth in the new venv adds that venv's site-packages too. A Python without ensurepip
# gets a venv without pip, which then runs the pip of those packages. Without ninja, torch builds _C the slow way.
$(INSTALLED): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV) || { rm -rf $(VENV); $(PYTHON) -m venv --without-pip $(VENV_ARGS) $(VENV); }
	$(if $(findstring --system-site-packages,$(VENV_ARGS)),$(PYTHON) -c 'import site; print("import site; " + \
		"; ".join("site.addsitedir(%r)" % p for p in site.getsitepackages()))' \
		> "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_flashmoe_parent_site.pth")
	$(PY) -m pip install -q $(PIP_DEPS) setuptools wheel
	$(PY) -m pip install -q $(PIP_DEPS) ninja || echo "no ninja: torch's cpp_extension builds _C without it (slower)"
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
		tests/test_triton_backend.py tests/test_fused.py tests/test_fused_ep.py tests/test_local_ranks.py \
		tests/test_fused_states.py tests/test_offsets.py tests/test_compile.py tests/test_routing_kernels.py

# gpu-check: the install part is timed and recorded too (it counts towards the 8 minutes, and is what fails first
# without a registry), then gpu-check-run; when the install failed, the device is still recorded.
GPU_STAMP := $(shell date +%Y%m%d-%H%M%S)
GPU_RESULTS ?= $(if $(DRY),build/gpu-check,bench/results)
# The dry run's venv is its own: built without _C, it must never pass for a real one on a GPU machine.
GPU_VENV := VENV=.venv-gpu$(if $(DRY),-dry) VENV_ARGS=--system-site-packages PIP_DEPS=--no-deps
WHEELS ?= .whl
# No registry there: pip must fail at once rather than retry the network; carried wheels come from $(WHEELS).
GPU_PIP_ENV ?= PIP_NO_INDEX=1 PIP_FIND_LINKS=$(abspath $(WHEELS))
# _C's CUDA part for the H100/H200 only (one nvcc pass); the dry run builds no _C: the tree's _C*.so, loaded by
# the other venvs' tests here, would be rewritten in place.
GPU_BUILD_ENV ?= $(if $(DRY),FLASHMOE_SKIP_EXT=1,FLASHMOE_CUDA_ARCHS=90a)
# A hung pip or nvcc must not take the whole 8 minutes; a slow one shortens the last steps (gpu_check's deadline).
GPU_INSTALL_LIMIT ?= 150
GPU_LOG = $(GPU_RESULTS)/gpu-check-$(GPU_STAMP)-install.txt
GPU_CHECK_ARGS ?= --stamp $(GPU_STAMP) --results $(GPU_RESULTS) $(if $(DRY),--dry-run)

gpu-check:
	@mkdir -p $(GPU_RESULTS); t0=$$(date +%s); echo "gpu-check: venv + install (log $(GPU_LOG))"; \
	$(GPU_PIP_ENV) $(GPU_BUILD_ENV) timeout $(GPU_INSTALL_LIMIT) $(MAKE) --no-print-directory $(GPU_VENV) \
		gpu-install > $(GPU_LOG) 2>&1; rc=$$?; \
	args="$(GPU_CHECK_ARGS) --started-at $$t0 --install-rc $$rc --install-log $(GPU_LOG)"; \
	if [ $$rc -eq 0 ]; then $(MAKE) --no-print-directory $(GPU_VENV) GPU_CHECK_ARGS="$$args" gpu-check-run; \
	else $(PYTHON) flashmoe_py/gpu_check.py $$args; exit 1; fi

# A carried wheel that does not install (another Python) is reported, not fatal: the steps that need it fail.
gpu-install: $(INSTALLED)
	@$(if $(wildcard $(WHEELS)/*.whl),,echo "no wheels in $(WHEELS)/: the nvshmem tests need nvshmem4py \
		(make gpu-wheels; README: GPU check)")
	@for w in $(wildcard $(WHEELS)/*.whl); do $(PY) -m pip install -q --no-index --no-deps "$$w" \
		&& echo "installed $$w" || echo "could not install $$w (built for another Python or platform?)"; done

gpu-check-run: $(INSTALLED)
	$(PY) -m flashmoe_py.gpu_check $(GPU_CHECK_ARGS)

gpu-check-dry: $(INSTALLED)
	$(MAKE) --no-print-directory DRY=1 PYTHON=$(abspath $(PY)) gpu-check

# Here, with a registry: the wheels that gpu-check needs on the GPU image (Python 3.12, x86-64) and lacks there.
GPU_WHEELS ?= nvshmem4py-cu13==0.4.1
gpu-wheels:
	mkdir -p $(WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(WHEELS) $(GPU_WHEELS)
	ls -l $(WHEELS)

bench: $(INSTALLED)
	$(BENCH) $(BENCH_ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info flashmoe_py/_C*.so .pytest_cache .ruff_cache
