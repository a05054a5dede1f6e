"""`make compile-check`: every Triton kernel compiled ahead of time for sm_90 and sm_80, no GPU needed
(DESIGN §7.3). Run as `python -m flashmoe_py.triton_compile_check [--jobs N]`.

What gets compiled is what the backend would launch: for each target and dtype (fp32, bf16, fp16) the
host code of `flashmoe_py.triton_backend` runs on meta tensors (`plan_launches`) for the cases in CASES,
which together reach every kernel and both regimes' launch configs. Each distinct launch (kernel,
argument types, constexprs, warps, stages) goes through `triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`; ptxas -v on the resulting PTX gives registers and spills.

The persistent fused kernel (fused_backend.plan_launches) is compiled for the cases in FUSED_CASES: world
size 1 (the benchmark's shape, inference and training variants) and an 8-rank expert-parallel launch whose
remote writes are NVSHMEM device calls, linked against the NVSHMEM device bitcode (kernels/nvshmem.py).

One row per kernel x case x arch x dtype: registers, shared memory, spill bytes, and the matrix
instructions the PTX uses (wgmma = Hopper warpgroup MMA, mma = mma.sync). Exit status 1 when a kernel
does not compile, spills, needs more shared memory than the target has (sm_90: 227 KiB, sm_80: 163 KiB),
or a bf16/fp16 GEMM on sm_90 does not use wgmma. Tolerates Triton 3.6 through 3.9.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

# Triton 3.9 warns on every compile that its fp-fusion default will change; the gate compiles with the
# default the runtime uses, so the warning is only noise here.
warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

ARCHS = {"sm_90": 90, "sm_80": 80}
SHARED_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}
DTYPES = ("fp32", "bf16", "fp16")
BENCH_SHAPE = dict(hidden_size=2048, ffn_hidden_size=1408, num_experts=64, top_k=6)  # DESIGN §8's target
# (case, config overrides, tokens, backward, rows mode, caller routing): together they reach every kernel,
# the gated and plain epilogues, both combines, both regimes' configs.
CASES = (
    ("train", dict(activation="swiglu", bias=True, capacity_factor=1.25), 16384, True, False, False),
    ("train-nd", dict(activation="gelu", bias=True, score_func="sigmoid", expert_bias=True, num_expert_groups=8,
                      topk_groups=4, deterministic=False, num_shared_experts=1), 16384, True, False, False),
    ("ep-rows", dict(activation="geglu"), 16384, True, True, False),
    ("decode", dict(activation="swiglu"), 16, False, False, True),
)
# Fused kernel: (case, config overrides, tokens per rank, world size, puts, routing mode, save for backward,
# dtypes, archs). "compute": router logits in the kernel (inference); "logits": given, pre-activations saved.
FUSED_CASES = (
    ("fused-w1", dict(activation="swiglu"), 16384, 1, "ptr", "compute", False, DTYPES, ("sm_90", "sm_80")),
    ("fused-w1t", dict(activation="gelu", bias=True, num_shared_experts=1), 16384, 1, "ptr", "logits", True,
     ("bf16",), ("sm_90",)),
    ("fused-ep8", dict(activation="swiglu"), 2048, 8, "nvshmem", "compute", False, ("bf16",), ("sm_90",)),
)


def _plan(target: str):
    """[(case, dtype name, Launch)] for one target, distinct launches only."""
    os.environ.pop("TRITON_INTERPRET", None)  # the gate compiles; the interpreter's kernels cannot be
    import torch

    from .config import MoEConfig
    from .triton_backend import plan_launches

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    from .fused_backend import plan_launches as plan_fused

    seen, jobs = set(), []
    for case, overrides, tokens, world, puts, mode, save, dtypes, archs in FUSED_CASES:
        if target not in archs:
            continue
        for dtype in dtypes:
            cfg = MoEConfig(**BENCH_SHAPE, **overrides)
            for launch in plan_fused(cfg, torch_dtype[dtype], tokens, target, world, puts, mode, save):
                jobs.append((case, dtype, launch.name, launch.tags, _job(launch, target)))
    for dtype in DTYPES:
        for case, overrides, tokens, backward, rows_mode, given in CASES:
            cfg = MoEConfig(**BENCH_SHAPE, **overrides)
            for launch in plan_launches(cfg, torch_dtype[dtype], tokens, target, backward, rows_mode, given):
                job = _job(launch, target)
                key = (job["kernel"], repr(job["signature"]), repr(job["constexprs"]), job["options"]["num_warps"],
                       job["options"]["num_stages"])
                if key not in seen:
                    seen.add(key)
                    jobs.append((case, dtype, launch.name, launch.tags, job))
    return jobs


def _job(launch, target: str) -> dict:
    """A picklable description of a launch: argument types as Triton's JIT would specialise them."""
    from .triton_backend import triton_type

    fn = launch.kernel
    names = list(fn.arg_names)
    plain = {names[i] if isinstance(i, int) else i for i in (getattr(fn, "do_not_specialize", None) or ())}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in launch.constexprs:
            signature[name], constexprs[name] = "constexpr", launch.constexprs[name]
            continue
        value = launch.args[name]
        if name in plain and value is not None:  # do_not_specialize: the type only, never a value
            signature[name] = "i64" if isinstance(value, int) and not -2**31 <= value < 2**31 else triton_type(value)
            continue
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name], constexprs[name] = "constexpr", value  # the JIT specialises None and 1
            continue
        signature[name] = triton_type(value)
        aligned = signature[name].startswith("*") or (isinstance(value, int) and value % 16 == 0)
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    if "extern_libs" in launch.tags:
        options["extern_libs"] = launch.tags["extern_libs"]
    return {"module": fn.fn.__module__, "kernel": fn.fn.__name__, "signature": signature, "constexprs": constexprs,
            "attrs": attrs, "options": options, "target": target}


def _ptxas() -> str:
    try:
        from triton import knobs

        for tool in ("ptxas_blackwell", "ptxas"):
            found = getattr(knobs.nvidia, tool, None)
            if found is not None and getattr(found, "path", None):
                return found.path
    except (ImportError, AttributeError):
        pass
    path = shutil.which("ptxas")
    if path is None:
        raise RuntimeError("ptxas not found (it ships with the triton wheel)")
    return path


def _resources(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ptxas -v on the PTX Triton produced."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        done = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    regs = max((int(m) for m in re.findall(r"Used (\d+) registers", log)), default=-1)
    spills = sum(int(m) for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def _compile(job: dict) -> dict:
    """Worker: compile one launch; returns its resources or the error."""
    os.environ.pop("TRITON_INTERPRET", None)
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    arch = ARCHS[job["target"]]
    start = time.perf_counter()
    try:
        src = ASTSource(kernel, job["signature"], constexprs=job["constexprs"], attrs=job["attrs"])
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=job["options"])
        ptx = compiled.asm["ptx"]
        regs, spills = _resources(ptx, arch)
    except Exception as e:  # reported as a failed row, never hidden
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "-"
    return {"regs": regs, "spills": spills, "shared": compiled.metadata.shared, "mma": mma,
            "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--case", action="append", help="only these cases (repeatable; default: all), e.g. fused-ep8")
    parser.add_argument("--arch", choices=sorted(ARCHS), action="append", help="only these targets (default: both)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = [(target, *job) for target in args.arch or ARCHS for job in _plan(target)
            if not args.case or job[0] in args.case]
    if not rows:
        parser.error(f"--case: none of {args.case} is a case; cases: "
                     f"{', '.join(c[0] for c in FUSED_CASES + CASES)}")
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_compile, [r[-1] for r in rows]))
    else:
        results = [_compile(r[-1]) for r in rows]

    header = f"{'kernel':<14} {'case':<9} {'arch':<6} {'dtype':<5} {'regime':<8} {'config':<20} " \
             f"{'regs':>4} {'smem KiB':>8} {'spills':>6} {'mma':<6} verdict"
    print(header)
    print("-" * len(header))
    failures = 0
    for (target, case, dtype, name, tags, job), res in zip(rows, results):
        problems = []
        if "error" in res:
            problems.append("does not compile: " + res["error"])
        else:
            if res["spills"] > 0:
                problems.append(f"spills {res['spills']} B")
            if res["shared"] > SHARED_LIMIT[target]:
                problems.append(f"shared memory {res['shared']} B > {SHARED_LIMIT[target]} B")
            if target == "sm_90" and dtype in ("bf16", "fp16") and "config" in tags and res["mma"] != "wgmma":
                problems.append("16-bit GEMM without wgmma")
        failures += bool(problems)
        if "error" in res:
            regs = smem = spills = mma = "-"
        else:
            regs, smem, spills, mma = res["regs"], f"{res['shared'] / 1024:.1f}", res["spills"], res["mma"]
        print(f"{name:<14} {case:<9} {target:<6} {dtype:<5} {tags.get('regime', '-'):<8} {tags.get('config', '-'):<20} "
              f"{regs:>4} {smem:>8} {spills:>6} {mma:<6} {'; '.join(problems) or 'ok'}")
    took = time.perf_counter() - start
    import triton

    print(f"\n{len(rows)} compilations with Triton {triton.__version__} in {took:.0f} s, {failures} failing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
