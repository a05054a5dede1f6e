"""Per-call counts from one profiled call: kernel launches, host syncs, operator calls, peak memory.

- kernel_launches (CUDA): device activities torch.profiler records for the call (kernels, memcpy, memset).
- host_syncs (CUDA): runtime calls that block the host on the device (cuda*Synchronize, cuStreamSynchronize),
  which is what `.item()`, `.tolist()` and host-side splits cost.
- aten_ops (any device): top-level aten operator calls of the call -- on a CPU the honest stand-in for
  launches (each is at least one dispatcher round trip and one kernel).
- triton_launches (any device): Triton kernel launches of the call, counted where Triton launches a kernel
  (JITFunction.run, or the interpreter's InterpretedFunction.run), compile-only warm-ups excluded.
- peak_mem_bytes: CUDA: torch.cuda.max_memory_allocated during the call minus what was allocated before.
  CPU: the high point of the running sum of the CPU allocator's allocations and frees during the call, as
  the profiler's memory events report them at operator granularity (temporaries allocated and freed inside
  one operator are not seen).
On CPU kernel_launches and host_syncs are None (no device to launch on or wait for).
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .timing import Step, synchronize

_SYNC_NAMES = ("Synchronize",)


def _top_level_aten(events) -> int:
    n = 0
    for e in events:
        if e.name.startswith("aten::") and e.device_type == DeviceType.CPU:
            parent = e.cpu_parent
            if parent is None or not parent.name.startswith("aten::"):
                n += 1
    return n


@contextlib.contextmanager
def count_triton_launches():
    """Yields a one-element list that counts the Triton launches made inside the block (any backend, any device).
    Wraps the launch entry of compiled and interpreted kernels; Triton not installed: the count stays 0."""
    counter = [0]
    try:
        from triton.runtime import interpreter, jit
    except ImportError:
        yield counter
        return
    originals = [(cls, cls.run) for cls in (jit.JITFunction, interpreter.InterpretedFunction)]

    def wrap(run):
        def counted(self, *args, **kwargs):
            if not kwargs.get("warmup", False):
                counter[0] += 1
            return run(self, *args, **kwargs)
        return counted

    for cls, run in originals:
        cls.run = wrap(run)
    try:
        yield counter
    finally:
        for cls, run in originals:
            cls.run = run


def _cpu_peak(events) -> int:
    # Top-level events carry their (inclusive) net allocation; "[memory]" events are allocations or frees
    # outside any operator. Their running sum in time order is the live memory the call added.
    deltas = []
    for e in events:
        if e.device_type != DeviceType.CPU or (e.cpu_parent is not None):
            continue
        if e.name == "[memory]" or e.name.startswith("aten::") or e.cpu_memory_usage:
            deltas.append((e.time_range.end if e.name != "[memory]" else e.time_range.start, e.cpu_memory_usage))
    live = peak = 0
    for _, d in sorted(deltas):
        live += d
        peak = max(peak, live)
    return int(peak)


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints a line to fd 2 at each profiler start and stop; keep it off the progress display."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def probe(step: Step, device: torch.device) -> dict:
    """Profile one call of `step` (its `before` runs outside the profiler) on input set 0."""
    step.before(0)
    synchronize(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with _quiet_stderr(), profile(activities=activities, profile_memory=not cuda) as prof, \
            count_triton_launches() as triton_launches:
        step.timed(0)
        synchronize(device)
    events = prof.events()
    out = {"aten_ops": _top_level_aten(events), "triton_launches": triton_launches[0], "kernel_launches": None,
           "host_syncs": None}
    if cuda:
        out["kernel_launches"] = sum(1 for e in events if e.device_type == DeviceType.CUDA)
        out["host_syncs"] = sum(1 for e in events if e.device_type == DeviceType.CPU
                                and any(s in e.name for s in _SYNC_NAMES))
        out["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(device) - base)
    else:
        out["peak_mem_bytes"] = _cpu_peak(events)
    return out
