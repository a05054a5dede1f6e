"""Build flashmoe_py, the Triton kernels (as flashmoe_py.kernels) and the optional extension flashmoe_py._C.

Environment switches, all read here:
  FLASHMOE_SKIP_EXT=1    build no extension at all (pure-Python install; features that need _C say so)
  FLASHMOE_SKIP_CUDA=1   build only the CPU part of _C even where nvcc and a CUDA torch exist
  FLASHMOE_CUDA_ARCHS    ';'-separated SM targets for the CUDA part of _C (default "90a;80")
  MAX_JOBS               parallel ninja jobs (default: cores, capped at one per 4 GiB of memory)

The CPU part of _C (csrc/*.cpp) is always built when torch is importable at build time; the CUDA part
(csrc/*.cu) only when nvcc is on the PATH and torch was built with CUDA. A missing nvcc is a warning.
Install with `pip install --no-build-isolation -e .` so the extension is built against the torch you run.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup

SKIP_EXT = os.environ.get("FLASHMOE_SKIP_EXT") == "1"
SKIP_CUDA = os.environ.get("FLASHMOE_SKIP_CUDA") == "1"
CUDA_ARCHS = os.environ.get("FLASHMOE_CUDA_ARCHS", "90a;80")


def _max_jobs() -> str:
    if "MAX_JOBS" in os.environ:
        return os.environ["MAX_JOBS"]
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gib // 4))))


def _cuda_home(nvcc: str) -> str | None:
    """The CUDA toolkit root to build against: $CUDA_HOME or $CUDA_PATH, else the root of the nvcc on the PATH
    with links resolved, else /usr/local/cuda; the first that has bin/nvcc and include/cuda_runtime_api.h.
    torch guesses dirname(dirname(which nvcc)), wrong when the nvcc on the PATH is a wrapper script (as
    /usr/local/bin/nvcc -> /usr/local/cuda-13.0 is on some machines): then the runtime headers are missing."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    with open(nvcc, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):  # a wrapper script: the nvcc it execs names the real toolkit
        for word in head.decode(errors="replace").split():
            if word.endswith("/bin/nvcc"):
                candidates.insert(2, os.path.dirname(os.path.dirname(word)))
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) \
                and os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h")):
            return root
    return None


def _extensions():
    """(ext_modules, cmdclass, summary lines)."""
    cpu_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    if SKIP_EXT:
        return [], {}, ["_C: skipped (FLASHMOE_SKIP_EXT=1)"]
    if not cpu_sources:
        return [], {}, ["_C: no sources under csrc/"]
    try:
        import torch
    except ImportError:
        return [], {}, ["_C: skipped, torch is not importable at build time (use --no-build-isolation)"]
    os.environ["MAX_JOBS"] = _max_jobs()
    nvcc = shutil.which("nvcc")
    cuda_home = _cuda_home(nvcc) if nvcc and torch.version.cuda else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read when cpp_extension is imported, just below
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = bool(cuda_sources) and not SKIP_CUDA and cuda_home is not None
    cxx = ["-O3", "-std=c++17"]
    if with_cuda:
        gencode = [f"-gencode=arch=compute_{a.rstrip('a')},code=sm_{a}" for a in CUDA_ARCHS.split(";") if a]
        ext = CUDAExtension("flashmoe_py._C", cpu_sources + cuda_sources, define_macros=[("FLASHMOE_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", *gencode]})
        what = f"CPU + CUDA ({CUDA_ARCHS})"
    else:
        ext = CppExtension("flashmoe_py._C", cpu_sources, extra_compile_args=cxx)
        why = ("FLASHMOE_SKIP_CUDA=1" if SKIP_CUDA else "no .cu sources" if not cuda_sources
               else "nvcc not found" if not nvcc else "torch has no CUDA" if not torch.version.cuda
               else f"no CUDA toolkit with include/cuda_runtime_api.h found from {nvcc}; set CUDA_HOME")
        what = f"CPU only ({why})"
    summary = [f"_C: {what}; sources: {', '.join(cpu_sources + (cuda_sources if with_cuda else []))}",
               f"    MAX_JOBS={os.environ['MAX_JOBS']}"]
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, summary


ext_modules, cmdclass, summary = _extensions()
print("flashmoe_py build summary:\n  " + "\n  ".join(summary))

packages = ["flashmoe_py", "flashmoe_py.bench", "flashmoe_py.parallel", "flashmoe_py.hf"]
package_dir = {"flashmoe_py": "flashmoe_py"}
if os.path.isfile("kernels/__init__.py"):
    # Installed as flashmoe_py.kernels, never as a top-level `kernels` (another PyPI project's name).
    packages.append("flashmoe_py.kernels")
    package_dir["flashmoe_py.kernels"] = "kernels"

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"flashmoe_py.kernels": ["*.ll"]},  # the NVSHMEM shim of the fused kernel (kernels/nvshmem.py)
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
