"""Every environment variable flashmoe_py reads at run time, in one place (build switches live in setup.py).

TRITON_INTERPRET        Triton's own switch, unset by default. "1" makes `@triton.jit` produce CPU-interpreted
                        kernels, and the `triton` backend then runs on CPU tensors (tests do this). Triton reads
                        it when the kernels are decorated, so it must be set before `flashmoe_py.kernels` is
                        first imported.
FLASHMOE_DEBUG_POISON   "1": every buffer the Triton launchers allocate for a kernel to write is first filled
                        with NaN (floats) or -2**30 (integers), so an element a kernel fails to write shows up.
                        For tests; costs one fill per buffer. Default off.
FLASHMOE_TRITON_TARGET  Launch-config table to use on a GPU ("sm_90", "sm_80") instead of the one picked from
                        the device's compute capability. For tuning and comparisons. Default unset.

Values are read on every call, never cached, so tests may change them with monkeypatch.
"""

from __future__ import annotations

import os


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def debug_poison() -> bool:
    return os.environ.get("FLASHMOE_DEBUG_POISON", "0") == "1"


def triton_target() -> str | None:
    return os.environ.get("FLASHMOE_TRITON_TARGET") or None
