"""The compile gate's PTX checks on tiny kernels compiled for sm_90 (no GPU), in a process of their own.

tests/test_ptx_checks.py runs this as `python -m tests.ptx_probe` with TRITON_INTERPRET unset: the CPU test
process imports Triton in interpreter mode (tests/conftest.py), where triton.jit and Triton's own library give
interpreted functions that cannot be compiled. Prints one JSON object: for each probe kernel the violations
flashmoe_py.triton_compile_check.uniform_control_flow reports on its PTX, and the thread0_only verdict of the
NVSHMEM signal (null when the NVSHMEM bitcode is not installed); and under "structure" what
flashmoe_py.compile_structure reads from a tl.dot loop compiled with 3 pipeline stages and with 1, for sm_90 and
sm_80: the kernel's summary and each main loop.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run with TRITON_INTERPRET unset: the probes are compiled, not interpreted")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flashmoe_py.compile_structure import main_loops, summary  # noqa: E402
from flashmoe_py.triton_compile_check import thread0_only, uniform_control_flow  # noqa: E402


def _spin_on_volatile_load(flag_ptr, out_ptr):
    v = tl.load(flag_ptr, volatile=True)
    while v == 0:
        v = tl.load(flag_ptr, volatile=True)
    tl.store(out_ptr, v)


def _spin_on_scalar_atomic(flag_ptr, out_ptr):
    v = tl.atomic_add(flag_ptr, 0, sem="acquire")
    while v == 0:
        v = tl.atomic_add(flag_ptr, 0, sem="acquire")
    tl.store(out_ptr, v)


def _spin_on_reduction(flag_ptr, out_ptr, N: tl.constexpr):
    # N = 256 spans the 4 warps: the sum crosses warps through shared memory. N = 8 sits in every warp, each
    # reducing its own loads with shuffles: the warps can disagree.
    offs = tl.arange(0, N)
    v = tl.sum(tl.load(flag_ptr + offs, volatile=True), 0)
    while v == 0:
        v = tl.sum(tl.load(flag_ptr + offs, volatile=True), 0)
    tl.store(out_ptr, v)


def _load_nvshmem():
    """kernels/nvshmem.py by its path (the flashmoe_py.kernels package need not be imported for one helper)."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "kernels", "nvshmem.py")
    spec = importlib.util.spec_from_file_location("_nvshmem_for_ptx_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nvshmem = _load_nvshmem()


def _signal_peer(sig, value, pe):
    nvshmem.signal_set(sig, value, pe)


def _dot_loop(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # C [BM, BN] = A [BM, K] @ B [K, BN]: one K loop, the pipeliner's to stage (num_stages) or not.
    offs_m, offs_n, offs_k = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + offs_k[:, None] * BN + offs_n[None, :]
    acc = tl.zeros((BM, BN), tl.float32)
    for _ in range(0, K, BK):
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
        a_ptrs += BK
        b_ptrs += BK * BN
    tl.store(c_ptr + offs_m[:, None] * BN + offs_n[None, :], acc)


def _structure(arch: int, stages: int) -> dict:
    """compile_structure's view of _dot_loop (bf16, 128 x 128 x 64 tiles, 4 warps) for sm_<arch>."""
    signature = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "K": "i32", "BM": "constexpr",
                 "BN": "constexpr", "BK": "constexpr"}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(4)}  # as the JIT specialises 16-aligned arguments
    src = ASTSource(triton.jit(_dot_loop), signature, constexprs={"BM": 128, "BN": 128, "BK": 64}, attrs=aligned)
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                         options={"num_warps": 4, "num_stages": stages}).asm["ptx"]
    loops = main_loops(ptx)
    return {**summary(loops), "loops": [{**dataclasses.asdict(loop), "pipelined": loop.pipelined} for loop in loops]}


def _ptx_sm90(fn, signature, constexprs=None, **options) -> str:
    src = ASTSource(triton.jit(fn), signature, constexprs=constexprs or {})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, **options}).asm["ptx"]


PROBES = {
    "volatile-load": (_spin_on_volatile_load, {}),
    "scalar-atomic": (_spin_on_scalar_atomic, {}),
    "sum-across-warps": (_spin_on_reduction, {"N": 256}),
    "sum-within-warps": (_spin_on_reduction, {"N": 8}),
}


def main() -> None:
    out = {}
    for name, (fn, constexprs) in PROBES.items():
        signature = {"flag_ptr": "*i32", "out_ptr": "*i32", **{k: "constexpr" for k in constexprs}}
        out[name] = [str(v) for v in uniform_control_flow(_ptx_sm90(fn, signature, constexprs))]
    if importlib.util.find_spec("nvidia.nvshmem") is not None:
        ptx = _ptx_sm90(_signal_peer, {"sig": "i64", "value": "i64", "pe": "i32"}, extern_libs=nvshmem.extern_libs(90))
        out["signal"] = thread0_only(ptx) or "ok"
    else:
        out["signal"] = None
    out["structure"] = {f"sm_{arch}-s{stages}": _structure(arch, stages) for arch in (90, 80) for stages in (3, 1)}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
