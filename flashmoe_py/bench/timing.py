"""Timing: interleaved repeated calls with quantiles, and the two hardware ceilings measured in the run.

On CUDA each call is bracketed by CUDA events (device time, no host clock); on CPU by perf_counter.
Candidates run interleaved -- round r runs every candidate once, in an order rotated each round -- so
machine noise (other processes, frequency changes) hits all of them alike. Each round uses the next
of several input sets, so repeated calls do not all find the same activations in cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Step:
    """One candidate's repeated unit of work: `before(i)` (untimed set-up, e.g. the forward whose
    backward is timed) then `timed(i)`, both on input set i."""

    before: Callable[[int], None]
    timed: Callable[[int], None]


def _time_one(step: Step, i: int, device: torch.device) -> float:
    step.before(i)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        step.timed(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step.timed(i)
    return time.perf_counter() - t0


def time_interleaved(steps: dict[str, Step], device: torch.device, repeats: int, warmup: int, input_sets: int,
                     on_call: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each timed call, by candidate: `warmup` untimed rounds, then `repeats` timed rounds."""
    names = list(steps)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names) if names else 0
        for n in names[shift:] + names[:shift]:
            s = _time_one(steps[n], r % input_sets, device)
            if r >= warmup:
                samples[n].append(s)
            if on_call is not None:
                on_call()
    return samples


def quantiles_ms(seconds: list[float]) -> tuple[float, float, float]:
    """(median, 20%, 80%) in milliseconds, linear interpolation between samples."""
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    return float(np.median(a)), float(np.quantile(a, 0.2)), float(np.quantile(a, 0.8))


@dataclass(frozen=True)
class Ceilings:
    """What this device did in this run: a large GEMM's FLOP/s in `dtype` and a large copy's bytes/s
    (read + write)."""

    matmul_flops_per_s: float
    copy_bytes_per_s: float

    def best(self, other: Ceilings | None) -> Ceilings:
        if other is None:
            return self
        return Ceilings(max(self.matmul_flops_per_s, other.matmul_flops_per_s),
                        max(self.copy_bytes_per_s, other.copy_bytes_per_s))


def _best_seconds(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    # A ceiling is what the hardware can do: the fastest of the calls, since noise only ever slows one down.
    step = Step(lambda i: None, lambda i: fn())
    return float(np.min(time_interleaved({"x": step}, device, repeats, 1, 1)["x"]))


def _matmul_of(n: int, dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return lambda: torch.mm(a, b)


def _copy_of(nbytes: int, device: torch.device) -> Callable[[], None]:
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def measure_ceilings(device: torch.device, dtype: torch.dtype, quick: bool = False, repeats: int | None = None
                     ) -> Ceilings:
    """A square GEMM large enough to reach the BLAS/tensor-core rate, and a copy far larger than any cache;
    the best of several calls of each.

    Sizes: CUDA n=8192 GEMM and a 1 GiB copy; CPU n=2048 (n=1024 for 16-bit types, which CPUs without
    native 16-bit matmul units run far slower) and a 256 MiB copy. Inputs are random, never zeros.
    `quick` (smoke tests): n=512 and a 32 MiB copy, which may sit partly in cache -- indicative only.
    """
    cuda = device.type == "cuda"
    n = 8192 if cuda else (2048 if dtype == torch.float32 else 1024)
    nbytes = (1 << 30) if cuda else (256 << 20)
    if quick:
        n, nbytes = 512, 32 << 20
    reps = repeats or (10 if cuda else 5)
    t_mm = _best_seconds(_matmul_of(n, dtype, device), device, reps)
    t_copy = _best_seconds(_copy_of(nbytes, device), device, reps)
    return Ceilings(matmul_flops_per_s=2.0 * n ** 3 / t_mm, copy_bytes_per_s=2.0 * nbytes / t_copy)
