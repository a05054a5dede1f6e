"""Shared fixtures: a fresh random seed per test (printed, so a failure can be replayed with
FLASHMOE_TEST_SEED=<seed>), the skip rule for tests that need hardware this machine lacks, and the interpreter
for Triton on a machine without a GPU."""

from __future__ import annotations

import os
import random

import pytest
import torch

# Without a GPU every Triton kernel of the suite runs in the interpreter, and Triton must be imported in that mode
# first: triton.jit decides at decoration time, Triton's own library (tl.cumsum, tl.sum, ...) included, and an
# interpreted kernel cannot call a library function decorated for compiling. Test modules that happened to import
# triton before another set the variable broke every interpreter test after them. What compiles for sm_90
# without a GPU runs in processes of its own (make compile-check, tests/ptx_probe.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("FLASHMOE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(s)
    random.seed(s)
    print(f"seed={s} (replay with FLASHMOE_TEST_SEED={s})")
    return s


@pytest.fixture
def poison(monkeypatch):
    """Backends fill every buffer they allocate with NaN / -2**30 before a kernel writes it
    (FLASHMOE_DEBUG_POISON), so an element a kernel forgets shows in the comparisons."""
    monkeypatch.setenv("FLASHMOE_DEBUG_POISON", "1")


def pytest_collection_modifyitems(config, items):
    # Decided at collection from torch's own query, which makes no CUDA call when no driver is present.
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: run `make gpu-check` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
