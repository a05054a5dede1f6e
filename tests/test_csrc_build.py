"""The standalone CMake build of csrc/ (DESIGN §7.4): the torch-free signal core with its cross-process C++
test, and an nvcc compile check of every csrc/*.cu for sm_90a against the NVSHMEM headers of the
nvidia-nvshmem-cu13 wheel. No GPU is needed for either."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _cmake_build(build: Path, cuda: bool) -> subprocess.CompletedProcess:
    gen = ["-G", "Ninja"] if shutil.which("ninja") or (Path(sys.executable).parent / "ninja").exists() else []
    cfg = ["cmake", "-S", str(REPO), "-B", str(build), *gen, f"-DPython3_EXECUTABLE={sys.executable}",
           f"-DFLASHMOE_CUDA_CHECK={'ON' if cuda else 'OFF'}"]
    env_path = f"{Path(sys.executable).parent}:{__import__('os').environ.get('PATH', '')}"
    for cmd in (cfg, ["cmake", "--build", str(build)], ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"PATH": env_path})
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_and_cross_process_signal_test_passes(tmp_path):
    res = _cmake_build(tmp_path / "build", cuda=False)
    assert "signal_cross_process" in res.stdout and "100% tests passed" in res.stdout, res.stdout


@pytest.mark.timeout(600)
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA compile check needs it")
def test_cuda_sources_compile_for_sm90a_with_nvshmem_headers(tmp_path):
    pytest.importorskip("nvidia.nvshmem", reason="the NVSHMEM headers come from pip install nvidia-nvshmem-cu13")
    build = tmp_path / "build"
    _cmake_build(build, cuda=True)
    sources = sorted(p.name for p in (REPO / "csrc").glob("*.cu"))
    objects = sorted(p.name for p in build.rglob("*.cu.o"))
    assert sources and objects == [f"{s}.o" for s in sources], f"compiled {objects}, expected one per {sources}"
