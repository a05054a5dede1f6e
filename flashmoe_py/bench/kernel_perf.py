"""GPU measurements of `make gpu-check` (issue 12, item 7): kernel TFLOP/s, decode, baselines, launch order.

    python -m flashmoe_py.bench.kernel_perf [--dry-run] [--out FILE.json] [--deadline EPOCH | --budget S]
                                            [--workers N] [--only NAME ...] [--tiny]

Cases, in the order they are timed (the most wanted first: the time budget may end the run early):

  ceilings            a 1 GiB device-to-device copy and an 8192^3 bf16 torch.mm, best of 10 (timing.py)
  fwd-kernels/S       (a) the triton backend's inference forward at shape S, every launch timed with CUDA events
                      (triton_backend._run wrapped during the call): the up and down GEMMs' TFLOP/s, the whole call
  dense/S             (a) torch.mm (cuBLAS) on the dense shape of each GEMM: the same FLOPs, the reference point
  train-kernels/S     (a) a training step (forward + backward of out . dy): up, down, dh, dx, dw[up], dw[down]
  order/S             (d) the up and down GEMMs with the configured GROUP_M and with GROUP_M forced to 1 (the old
                      row-major order), in alternating rounds
  decode/B            (b) backend B's bf16 inference forward at T = 64, 128, 256, 512, eager and CUDA-graph replay,
                      against (bytes of the hit experts' weights) / (the copy bandwidth measured in `ceilings`)
  baselines/M         (c) triton vs torch grouped_mm and transformers' grouped_mm experts, M = fwd or fwdbwd
Shapes: shape1 T=16384 H=2048 I=1408 E=64 k=6 (SwiGLU, bf16); shape3 = Mixtral H=4096 I=14336 E=8 k=2, T=16384.

Counting. A GEMM over R = T*k routed rows is the dense product [m, k] @ [k, n] of the same FLOPs 2*m*k*n:
  up [R, H] @ [H, 2I]     down [R, I] @ [I, H]      dh [R, H] @ [H, I]      dx [R, 2I] @ [2I, H]
  dw[up] [H, R] @ [R, 2I] (x^T dpre)                dw[down] [I, R] @ [R, H] (hw^T dy)
Decode bytes: experts hit (distinct experts with a routed row, from the reference routing of the input) x
(H*2I + I*H) x 2 bytes; their lower bound on time is those bytes / the copy's bytes per second (read + write
counted, as counting.roofline_efficiency does). The forward's cuBLAS bound: its matmul FLOPs (router included,
counting.forward_flops) at the rate torch.mm reached on the up and down shapes; the record says whether the
forward reaches 0.9 of it.

Timing (the device notes' method): compilation first, in parallel processes (`--workers`), with nothing timed
while they run; then, in this process alone, warm-up calls, then the median (and 20/80% quantiles) of repeated
calls, each call bracketed by CUDA events after a synchronise, inputs rotating among INPUT_SETS sets. No L2 flush:
the expert weights of every case (1.1 GB at shape 1 and at decode, 2.8 GB at shape 3) and the activations of the
prefill cases are many times the 60 MB L2, so no call finds its predecessor's data there. Per-launch events add a
few microseconds of host time between launches, so whole-call times come from rounds without them.

Every case is guarded (an error is recorded and the next case runs) and the whole run bounded: a case starts only
when its estimate fits in the time left, else it is recorded "skipped: time budget"; at the deadline an alarm stops
the case that runs. The JSON record (`--out`) is rewritten after every case; the text goes to stdout, its last line
the 0.9 verdict. `--dry-run` (no GPU) prints the plan with its FLOPs and bytes, and checks, through
triton_backend.plan_launches on meta tensors, that every counted GEMM has a launch of that name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from .shapes import PRESETS, Shape

SHAPES: dict[str, tuple[Shape, int]] = {
    "shape1": (Shape("shape1", 2048, 1408, 64, 6), 16384),
    "shape3": (PRESETS["mixtral-8x7b"], 16384),
}
DECODE_TOKENS = (64, 128, 256, 512)
# The GPU test's plan: seconds to compile and run. Every T of it is in the prefill regime with the route kernel's
# block count neither 1 nor a multiple of 16 (Triton's integer specialisations), so decode compiles nothing new.
TINY_SHAPES: dict[str, tuple[Shape, int]] = {"tiny": (Shape("tiny", 256, 128, 8, 2), 256)}
TINY_DECODE_TOKENS = (128, 192)

INPUT_SETS = 3
REPEATS = 10
WARMUP = 2
CEILING_REPEATS = 10
MARGIN_S = 4.0         # before the step's kill: write the record and leave
WARM_SHARE = 0.5       # of the time left, at most, for the parallel compilation
FORWARD_BOUND_TARGET = 0.9
SCHEMA = "flashmoe-kernel-perf/1"


# ---------------------------------------------------------------------------------------------- counting


@dataclass(frozen=True)
class Gemm:
    """One grouped GEMM of the triton backend as the dense product [m, k] @ [k, n] of the same FLOPs."""

    kernel: str   # the launch name's kind: up, down, dh, dx, dw[up], dw[down]
    m: int
    k: int
    n: int

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n

    def as_dict(self) -> dict:
        return {"m": self.m, "k": self.k, "n": self.n, "flops": self.flops}


FORWARD_GEMMS = ("up", "down")
BACKWARD_GEMMS = ("dh", "dx", "dw[up]", "dw[down]")


def gemms(hidden: int, ffn: int, top_k: int, tokens: int, backward: bool = False) -> list[Gemm]:
    """The GEMMs of one dropless SwiGLU forward (and backward) over tokens * top_k routed rows."""
    rows, n_up = tokens * top_k, 2 * ffn
    out = [Gemm("up", rows, hidden, n_up), Gemm("down", rows, ffn, hidden)]
    if backward:
        out += [Gemm("dh", rows, hidden, ffn), Gemm("dx", rows, n_up, hidden),
                Gemm("dw[up]", hidden, rows, n_up), Gemm("dw[down]", ffn, rows, hidden)]
    return out


def gemm_kind(launch_key: str) -> str | None:
    """The GEMM a triton-backend launch name stands for ('up[swiglu]' -> 'up', 'dw[up]#2' -> 'dw[up]'), None for
    the other kernels (route, scatter, combine, ...)."""
    name = launch_key.split("#")[0]
    if name in ("dw[up]", "dw[down]"):
        return name
    base = name.split("[")[0]
    return base if base in ("up", "down", "dh", "dx") else None


def launch_keys(names: list[str]) -> list[str]:
    """Launch names made unique within one call: a name's second launch is 'name#2' (combine runs twice per step)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def expert_bytes(hidden: int, ffn: int, experts_hit: float, itemsize: int = 2) -> float:
    """Bytes of the weights of `experts_hit` SwiGLU experts: each H*2I (up) + I*H (down) elements."""
    return float(experts_hit * (hidden * 2 * ffn + ffn * hidden) * itemsize)


def expected_experts_hit(experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts hit by `tokens` tokens choosing top_k of E uniformly (the dry run's estimate)."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def forward_flops(shape: Shape, tokens: int) -> float:
    """Matmul FLOPs of one dropless forward, router included (counting.forward_flops)."""
    from .counting import forward_flops as count

    return count(shape.config(), tokens, tokens * shape.top_k)


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class PerfCase:
    """One guarded measurement. `run(ctx)` returns its data; `warm(ctx)` (None: nothing to compile) runs its
    workloads once, untimed. `est_s`: seconds it takes once compiled; `compile_s`: more when it is not."""

    name: str
    part: str
    title: str
    run: Callable
    est_s: float
    warm: Callable | None = None
    compile_s: float = 0.0
    plan: dict = field(default_factory=dict)
    optional: bool = False  # its failure is recorded but does not fail the step (the fused backend's cases)


def _shape_plan(key: str, shape: Shape, tokens: int, backward: bool) -> dict:
    return {"shape": key, "model": shape.name, "tokens": tokens, "hidden": shape.hidden, "ffn": shape.ffn,
            "experts": shape.experts, "top_k": shape.top_k, "rows": tokens * shape.top_k,
            "gemms": {g.kernel: g.as_dict() for g in gemms(shape.hidden, shape.ffn, shape.top_k, tokens, backward)}}


def build_plan(shapes: dict[str, tuple[Shape, int]] | None = None, decode_tokens: tuple[int, ...] = DECODE_TOKENS,
               tiny: bool = False) -> list[PerfCase]:
    """The cases in the order they are timed. The first shape is the one (b), (c) and (d) run at."""
    if shapes is None:
        shapes = TINY_SHAPES if tiny else SHAPES
        decode_tokens = TINY_DECODE_TOKENS if tiny else decode_tokens
    keys = list(shapes)
    main = keys[0]
    shape, tokens = shapes[main]

    def per_shape(key: str) -> list[PerfCase]:
        s, t = shapes[key]
        fwd_plan = _shape_plan(key, s, t, False)
        fwd_plan["forward_flops"] = forward_flops(s, t)
        cases = [PerfCase(f"fwd-kernels/{key}", "a", f"triton inference forward per launch, {key} T={t}",
                          partial(measure_kernels, shape=s, tokens=t, train=False), 1.5,
                          partial(measure_kernels, shape=s, tokens=t, train=False, warm_only=True), 10, fwd_plan),
                 PerfCase(f"dense/{key}", "a", f"torch.mm on each GEMM's dense shape, {key}",
                          partial(measure_dense, shape=s, tokens=t, backward=True), 2.0,
                          plan=_shape_plan(key, s, t, True)),
                 PerfCase(f"train-kernels/{key}", "a", f"triton training step per launch, {key} T={t}",
                          partial(measure_kernels, shape=s, tokens=t, train=True), 3.0,
                          partial(measure_kernels, shape=s, tokens=t, train=True, warm_only=True), 15,
                          _shape_plan(key, s, t, True))]
        return cases

    hit = {t: expected_experts_hit(shape.experts, shape.top_k, t) for t in decode_tokens}
    decode_plan = {"shape": main, "tokens": list(decode_tokens),
                   "expected_experts_hit": {str(t): round(h, 2) for t, h in hit.items()},
                   "expected_weight_bytes": {str(t): expert_bytes(shape.hidden, shape.ffn, h) for t, h in hit.items()}}

    def decode(backend: str, est: float, compile_s: float, optional: bool) -> PerfCase:
        return PerfCase(f"decode/{backend}", "b", f"{backend} decode T={','.join(map(str, decode_tokens))}, "
                        f"eager and CUDA graph, {main}",
                        partial(measure_decode, shape=shape, backend=backend, tokens_list=decode_tokens), est,
                        partial(measure_decode, shape=shape, backend=backend, tokens_list=decode_tokens,
                                warm_only=True), compile_s, dict(decode_plan, backend=backend), optional)

    def baselines(mode: str, est: float) -> PerfCase:
        return PerfCase(f"baselines/{mode}", "c", f"triton vs torch grouped_mm vs transformers grouped_mm, {mode}, "
                        f"{main} T={tokens}", partial(measure_baselines, shape=shape, tokens=tokens, mode=mode), est,
                        plan={"shape": main, "tokens": tokens, "mode": mode,
                              "candidates": list(BASELINE_CANDIDATES)})

    order = PerfCase(f"order/{main}", "d", f"up/down GEMMs, configured GROUP_M vs GROUP_M=1, {main} T={tokens}",
                     partial(measure_order, shape=shape, tokens=tokens), 2.0,
                     partial(measure_order, shape=shape, tokens=tokens, warm_only=True), 5,
                     {"shape": main, "tokens": tokens, "kernels": list(FORWARD_GEMMS),
                      "gemms": {g.kernel: g.as_dict() for g in gemms(shape.hidden, shape.ffn, shape.top_k, tokens)}})
    ceilings = PerfCase("ceilings", "ceilings", "copy bandwidth and dense bf16 matmul rate",
                        measure_ceilings_case, 1.0, plan={"copy_bytes": 1 << 30, "matmul_n": 8192})
    cases = [ceilings, *per_shape(main), order, decode("triton", 3.0, 8, False), baselines("fwd", 3.0),
             baselines("fwdbwd", 4.0)]
    for key in keys[1:]:
        cases += per_shape(key)
    cases.append(decode("fused", 3.0, 30, True))
    return cases


# ---------------------------------------------------------------------------------------------- running


class OutOfTime(BaseException):
    """The run's deadline passed (an alarm). A BaseException, so the cases' own `except Exception` guards let it
    through to the runner."""


def _unavailable_types() -> tuple:
    from ..backends import BackendUnavailable
    from .candidates import Unavailable

    return (BackendUnavailable, Unavailable)


class CaseUnavailable(RuntimeError):
    """The case cannot run on this machine or build (the message says why): recorded, not an error."""


def _error_text(e: BaseException) -> str:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return "".join(tb[-3:])[-1500:]


def run_cases(cases: list[PerfCase], ctx, deadline: float, clock: Callable[[], float] = time.time,
              compiled: frozenset | set = frozenset(), on_update: Callable[[list[dict]], None] | None = None,
              print_fn=print) -> list[dict]:
    """Run `cases` in order, each guarded, each only if its estimate (plus `compile_s` unless its warm-up is in
    `compiled`) fits before `deadline` (in `clock`'s seconds). Returns one row per case."""
    unavailable = (CaseUnavailable,) + _safe_unavailable_types()
    results: list[dict] = []
    stopped = False
    for i, case in enumerate(cases, 1):
        need = case.est_s + (0.0 if case.warm is None or case.name in compiled else case.compile_s)
        row = {"name": case.name, "part": case.part, "title": case.title, "optional": case.optional,
               "est_s": round(need, 1), "plan": case.plan, "status": None, "detail": "", "seconds": None, "data": None}
        left = deadline - clock()
        if stopped or left < need:
            row.update(status="skipped", detail=f"skipped: time budget ({max(left, 0):.0f} s left, about "
                                                f"{need:.0f} s needed)")
        else:
            t0 = clock()
            try:
                row.update(status="ok", data=case.run(ctx))
            except OutOfTime:
                row.update(status="skipped", detail=f"skipped: time budget (stopped at the deadline after "
                                                    f"{clock() - t0:.0f} s)")
                stopped = True
            except KeyboardInterrupt:
                row.update(status="interrupted", detail="interrupted (the step was killed)",
                           seconds=round(clock() - t0, 2))
                results.append(row)
                if on_update:
                    on_update(results)
                raise
            except unavailable as e:
                row.update(status="unavailable", detail=str(e))
            except Exception as e:  # one failing case is recorded; the others still run
                row.update(status="error", detail=f"{type(e).__name__}: {e}", traceback=_error_text(e))
            row["seconds"] = round(clock() - t0, 2)
        results.append(row)
        print_fn(f"[{i}/{len(cases)}] {case.name:<22} {row['status']}"
                 + (f" in {row['seconds']:.1f} s" if row["seconds"] is not None else "")
                 + (f": {row['detail'][:140]}" if row["detail"] else ""))
        if on_update:
            on_update(results)
    return results


def _safe_unavailable_types() -> tuple:
    try:
        return _unavailable_types()
    except Exception:  # the package half-installed: its unavailability errors then count as errors
        return ()


def exit_status(results: list[dict]) -> int:
    """1 when a case that is not optional failed or was interrupted; skipped and unavailable cases are not failures."""
    return 1 if any(r["status"] in ("error", "interrupted") and not r["optional"] for r in results) else 0


# ---------------------------------------------------------------------------------------------- derived numbers


def _tflops(flops: float, ms: float | None) -> float | None:
    return None if not ms else flops / (ms * 1e-3) / 1e12


def derive(results: list[dict]) -> dict:
    """What the record concludes from the raw times: per-GEMM TFLOP/s against torch.mm's on the same dense shape,
    the forward's cuBLAS bound (first shape), decode against the copy bandwidth, baseline speedups, launch orders."""
    ok = {r["name"]: r for r in results if r["status"] == "ok" and r.get("data") is not None}
    out: dict = {"kernels": [], "forward_bound": None, "decode": [], "baselines": {}, "order": None}
    dense_of = {n.split("/", 1)[1]: r["data"]["gemms"] for n, r in ok.items() if n.startswith("dense/")}
    first_shape = next((r["plan"].get("shape") for r in results if r["name"].startswith("fwd-kernels/")), None)
    for name, r in ok.items():
        kind, _, key = name.partition("/")
        if kind not in ("fwd-kernels", "train-kernels"):
            continue
        dense = dense_of.get(key, {})
        for g, m in r["data"]["gemms"].items():
            ref = dense.get(g, {})
            ratio = m["tflops"] / ref["tflops"] if m.get("tflops") and ref.get("tflops") else None
            out["kernels"].append({"shape": key, "pass": "forward" if kind == "fwd-kernels" else "training step",
                                   "kernel": g, "ms": m["ms"], "tflops": m["tflops"], "dense_ms": ref.get("ms"),
                                   "dense_tflops": ref.get("tflops"), "ratio": ratio})
    fwd, dense = ok.get(f"fwd-kernels/{first_shape}"), dense_of.get(first_shape or "")
    if fwd is not None and dense and all(dense.get(g, {}).get("ms") for g in FORWARD_GEMMS):
        gemm_flops = sum(dense[g]["flops"] for g in FORWARD_GEMMS)
        rate = gemm_flops / (sum(dense[g]["ms"] for g in FORWARD_GEMMS) * 1e-3)
        total = fwd["plan"].get("forward_flops", gemm_flops)
        bound_ms = total / rate * 1e3
        fwd_ms = fwd["data"]["call_ms"]["median"]
        ratio = bound_ms / fwd_ms
        out["forward_bound"] = {"shape": first_shape, "forward_ms": fwd_ms, "flops": total, "bound_ms": bound_ms,
                                "cublas_tflops": rate / 1e12, "ratio": ratio, "target": FORWARD_BOUND_TARGET,
                                "reached": ratio >= FORWARD_BOUND_TARGET}
    copy = ok["ceilings"]["data"].get("copy_bytes_per_s") if "ceilings" in ok else None
    for name, r in ok.items():
        if not name.startswith("decode/"):
            continue
        for row in r["data"]["tokens"]:
            d = {"backend": name.split("/", 1)[1], **{k: row.get(k) for k in ("tokens", "experts_hit",
                                                                              "weight_bytes", "eager_ms", "graph_ms",
                                                                              "error", "graph_error")}}
            bound = row["weight_bytes"] / copy * 1e3 if copy and row.get("weight_bytes") else None
            d["bound_ms"] = bound
            for mode in ("eager", "graph"):
                ms = row.get(f"{mode}_ms")
                d[f"{mode}_efficiency"] = bound / ms if bound and ms else None
            out["decode"].append(d)
    for name, r in ok.items():
        if name.startswith("baselines/"):
            rows = r["data"]["candidates"]
            ours = rows.get("triton", {}).get("ms")
            out["baselines"][name.split("/", 1)[1]] = {
                n: {"status": c["status"], "ms": c.get("ms"), "triton_speedup": c["ms"] / ours
                    if ours and c.get("ms") and n != "triton" else None} for n, c in rows.items()}
    order = next((r for n, r in ok.items() if n.startswith("order/")), None)
    if order is not None:
        out["order"] = order["data"]
    return out


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def summary_lines(results: list[dict]) -> list[str]:
    """The human-readable record: a few tables, and last the forward's cuBLAS-bound verdict."""
    d = derive(results)
    lines = []
    if d["kernels"]:
        lines.append("GEMM kernels (triton, bf16) vs torch.mm on the same dense [m,k]x[k,n] (TFLOP/s; ratio = ours "
                     "/ cuBLAS):")
        for k in d["kernels"]:
            lines.append(f"  {k['shape']:<7} {k['pass']:<13} {k['kernel']:<9} {_fmt(k['ms'], '8.3f')} ms "
                         f"{_fmt(k['tflops'], '6.0f')} TFLOP/s   cuBLAS {_fmt(k['dense_ms'], '7.3f')} ms "
                         f"{_fmt(k['dense_tflops'], '6.0f')}   ratio {_fmt(k['ratio'], '.2f')}")
    order = d["order"]
    if order:
        if order.get("note"):
            lines.append(f"launch order: {order['note']}")
        for g, v in order.get("kernels", {}).items():
            group_m = v.get("launched_group_m") or v.get("configured_group_m")
            lines.append(f"launch order {g:<5} GROUP_M={group_m}: "
                         f"{_fmt(v.get('configured_ms'), '.3f')} ms; GROUP_M=1: {_fmt(v.get('group_m1_ms'), '.3f')} "
                         f"ms; speedup {_fmt(v.get('speedup'), '.3f')}")
    if d["decode"]:
        lines.append("decode (weights of the hit experts / measured copy bandwidth; efficiency = bound / time):")
        for r in d["decode"]:
            err = r.get("error") or ""
            lines.append(f"  {r['backend']:<6} T={r['tokens']:<4} hit {_fmt(r['experts_hit'], '5.1f')} "
                         f"{_fmt(r['weight_bytes'] and r['weight_bytes'] / 1e9, '.3f')} GB bound "
                         f"{_fmt(r['bound_ms'], '.3f')} ms; eager {_fmt(r['eager_ms'], '.3f')} ms "
                         f"({_fmt(r['eager_efficiency'], '.2f')}); graph {_fmt(r['graph_ms'], '.3f')} ms "
                         f"({_fmt(r['graph_efficiency'], '.2f')})" + (f"  {err[:80]}" if err else "")
                         + (f"  graph: {r['graph_error'][:80]}" if r.get("graph_error") else ""))
    for mode, rows in d["baselines"].items():
        parts = []
        for n, c in rows.items():
            if c["status"] == "ok":
                parts.append(f"{n} {c['ms']:.3f} ms" + (f" (triton's speedup {c['triton_speedup']:.2f}x)"
                                                        if c["triton_speedup"] else ""))
            else:
                parts.append(f"{n} {c['status']}")
        lines.append(f"baselines {mode}: " + "; ".join(parts))
    skipped = [r["name"] for r in results if r["status"] == "skipped"]
    bad = [f"{r['name']} ({r['status']})" for r in results if r["status"] in ("error", "unavailable", "interrupted")]
    if skipped:
        lines.append("skipped (time budget): " + ", ".join(skipped))
    if bad:
        lines.append("not measured: " + ", ".join(bad))
    fb = d["forward_bound"]
    if fb is None:
        lines.append("forward vs cuBLAS bound: not measured (needs fwd-kernels and dense of the first shape)")
    else:
        lines.append(f"forward at {fb['shape']}: {fb['forward_ms']:.3f} ms; torch.mm for its {fb['flops'] / 1e12:.2f} "
                     f"TFLOP at {fb['cublas_tflops']:.0f} TFLOP/s: {fb['bound_ms']:.3f} ms; {fb['ratio']:.2f} of the "
                     f"cuBLAS bound: reaches {fb['target']}: {'yes' if fb['reached'] else 'no'}")
    return lines


# ---------------------------------------------------------------------------------------------- GPU measurements


class Context:
    """What the cases share in one process: the device, the layer dtype, each shape's weights (drawn once, on the
    device), and the run's random seed."""

    def __init__(self, device, seed: int = 0):
        import torch

        self.device, self.dtype, self.seed = device, torch.bfloat16, seed
        self._params: dict = {}

    def params(self, shape: Shape) -> dict:
        """Weights at nn.Linear scale (never zeros), leaves that require grad (the inference cases run under
        no_grad): router_weight [E, H], w_up [E, H, 2I], w_down [E, I, H], bf16."""
        import torch

        if shape.name not in self._params:
            g = torch.Generator(device=self.device).manual_seed(self.seed)
            h, i, e = shape.hidden, shape.ffn, shape.experts
            cfg = shape.config()

            def rnd(*dims, scale):
                return torch.randn(*dims, generator=g, device=self.device, dtype=self.dtype).mul_(scale)

            self._params[shape.name] = {n: t.requires_grad_() for n, t in (
                ("router_weight", rnd(e, h, scale=h ** -0.5)), ("w_up", rnd(e, h, cfg.up_size, scale=h ** -0.5)),
                ("w_down", rnd(e, i, h, scale=i ** -0.5)))}
        return self._params[shape.name]

    def inputs(self, shape: Shape, tokens: int, sets: int = INPUT_SETS, grad: bool = False, seed: int = 1) -> list:
        """`sets` random x [T, H] bf16 (requires_grad when `grad`)."""
        import torch

        g = torch.Generator(device=self.device).manual_seed(self.seed + seed)
        return [torch.randn(tokens, shape.hidden, generator=g, device=self.device, dtype=self.dtype)
                .requires_grad_(grad) for _ in range(sets)]


def _event_ms(fn: Callable[[], object]) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _stats(ms: list[float]) -> dict:
    from .timing import quantiles_ms

    med, p20, p80 = quantiles_ms([m / 1e3 for m in ms])
    return {"median": med, "p20": p20, "p80": p80, "samples": len(ms)}


@contextlib.contextmanager
def launch_events():
    """Within the block, each launch the triton backend makes is bracketed by CUDA events: yields a list of
    (name, start, end, GROUP_M, config tag), one per launch, in launch order."""
    import torch

    from .. import triton_backend as tb

    original = tb._run
    events: list = []

    def timed(launch):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        original(launch)
        end.record()
        events.append((launch.name, start, end, launch.constexprs.get("GROUP_M"), launch.tags.get("config")))

    tb._run = timed
    try:
        yield events
    finally:
        tb._run = original


def _per_launch_ms(events: list) -> dict[str, tuple[float, object, object]]:
    keys = launch_keys([e[0] for e in events])
    return {k: (s.elapsed_time(e), gm, cfg) for k, (_, s, e, gm, cfg) in zip(keys, events)}


def gemm_rates(launch_ms: dict[str, float], plan_gemms: dict[str, dict]) -> dict[str, dict]:
    """Per counted GEMM: its launches' median time (summed if one GEMM kind had several launches) and TFLOP/s."""
    by_kind: dict[str, float] = {}
    for key, ms in launch_ms.items():
        kind = gemm_kind(key)
        if kind is not None:
            by_kind[kind] = by_kind.get(kind, 0.0) + ms
    return {g: {**spec, "ms": by_kind.get(g), "tflops": _tflops(spec["flops"], by_kind.get(g))}
            for g, spec in plan_gemms.items()}


def _time_launches(call: Callable[[int], object], repeats: int, sets: int = INPUT_SETS) -> tuple[list, dict, dict]:
    """Rounds of call(i): one timed whole, one with per-launch events. -> (whole-call ms, {key: [ms]}, {key: cfg})."""
    import torch

    whole: list[float] = []
    per: dict[str, list[float]] = {}
    configs: dict[str, dict] = {}
    for r in range(repeats):
        i = r % sets
        whole.append(_event_ms(lambda: call(i)))
        torch.cuda.synchronize()
        with launch_events() as events:
            call(i)
        torch.cuda.synchronize()
        for key, (ms, gm, cfg) in _per_launch_ms(events).items():
            per.setdefault(key, []).append(ms)
            configs.setdefault(key, {"group_m": gm, "config": cfg})
    return whole, per, configs


def _moe_call(ctx, shape: Shape, tokens: int, backend: str, train: bool):
    """(call(i), inputs): one inference forward (no_grad) or one training step of `backend` on input set i."""
    import torch

    import flashmoe_py as fm

    cfg = shape.config()
    params = ctx.params(shape)
    xs = ctx.inputs(shape, tokens, grad=train)
    if not train:
        def call(i):
            with torch.no_grad():
                return fm.moe(xs[i], params, cfg, backend=backend)
        return call, xs
    gs = ctx.inputs(shape, tokens, seed=2)

    def step(i):
        for t in (*params.values(), xs[i]):
            t.grad = None
        out = fm.moe(xs[i], params, cfg, backend=backend).out
        out.backward(gs[i])
        return out
    return step, xs


def measure_kernels(ctx, shape: Shape, tokens: int, train: bool, warm_only: bool = False,
                    repeats: int = REPEATS) -> dict | None:
    """(a): the triton backend's forward (or training step), each launch timed; its GEMMs' TFLOP/s."""
    call, _ = _moe_call(ctx, shape, tokens, "triton", train)
    for i in range(1 if warm_only else WARMUP):
        call(i % INPUT_SETS)
    if warm_only:
        return None
    whole, per, configs = _time_launches(call, repeats)
    launches = {k: {**_stats(v), **configs[k]} for k, v in per.items()}
    plan = {g.kernel: g.as_dict() for g in gemms(shape.hidden, shape.ffn, shape.top_k, tokens, train)}
    return {"tokens": tokens, "train": train, "call_ms": _stats(whole), "launches": launches,
            "gemms": gemm_rates({k: v["median"] for k, v in launches.items()}, plan)}


def measure_dense(ctx, shape: Shape, tokens: int, backward: bool, repeats: int = REPEATS) -> dict:
    """(a): torch.mm on the dense shape of each GEMM, bf16 random operands, into a preallocated output."""
    import torch

    from .timing import Step, time_interleaved

    out = {}
    for g in gemms(shape.hidden, shape.ffn, shape.top_k, tokens, backward):
        try:
            # dW reads its A operand transposed (x^T, hw^T): cuBLAS gets it in that layout too.
            a = (torch.randn(g.k, g.m, device=ctx.device, dtype=ctx.dtype).t() if g.kernel.startswith("dw")
                 else torch.randn(g.m, g.k, device=ctx.device, dtype=ctx.dtype))
            b = torch.randn(g.k, g.n, device=ctx.device, dtype=ctx.dtype)
            c = torch.empty(g.m, g.n, device=ctx.device, dtype=ctx.dtype)
            secs = time_interleaved({"mm": Step(lambda i: None, lambda i: torch.mm(a, b, out=c))}, ctx.device,
                                    repeats, WARMUP, 1)["mm"]
            st = _stats([s * 1e3 for s in secs])
            out[g.kernel] = {**g.as_dict(), "ms": st["median"], "p20": st["p20"], "p80": st["p80"],
                             "tflops": _tflops(g.flops, st["median"])}
        except Exception as e:
            out[g.kernel] = {**g.as_dict(), "ms": None, "tflops": None, "error": f"{type(e).__name__}: {e}"}
    return {"gemms": out}


def measure_ceilings_case(ctx) -> dict:
    from .timing import measure_ceilings

    c = measure_ceilings(ctx.device, ctx.dtype, repeats=CEILING_REPEATS)
    return {"copy_bytes_per_s": c.copy_bytes_per_s, "matmul_flops_per_s": c.matmul_flops_per_s,
            "copy_gbps": c.copy_bytes_per_s / 1e9, "matmul_tflops": c.matmul_flops_per_s / 1e12,
            "method": "best of 10 after one warm-up: a 1 GiB fp32 copy (bytes read + written) and an 8192^3 bf16 mm"}


def _target(device) -> str:
    import torch

    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90" if major >= 9 else "sm_80"


def measure_order(ctx, shape: Shape, tokens: int, warm_only: bool = False, repeats: int = REPEATS) -> dict | None:
    """(d): the forward's up and down launches with the configured GROUP_M and with GROUP_M forced to 1 (the
    row-major order), in alternating rounds; the GROUP_M each launch really got comes from its Launch."""
    import torch

    from .. import triton_backend as tb

    configs = tb.launch_configs()
    original = configs.gemm_config
    rows = tokens * shape.top_k
    regime = configs.regime(rows, shape.experts)
    configured = {g: original(_target(ctx.device), regime, g, 2) for g in FORWARD_GEMMS}
    call, _ = _moe_call(ctx, shape, tokens, "triton", train=False)
    if not all("group_m" in getattr(c, "_fields", ()) for c in configured.values()):
        if warm_only:
            call(0)
            return None
        whole, per, _ = _time_launches(call, repeats)
        return {"note": "old order only: this gemm_config has no group_m field",
                "kernels": {g: {"configured_group_m": None, "configured_ms": _kind_median(per, g)}
                            for g in FORWARD_GEMMS}}

    def forced(*args, **kwargs):
        return original(*args, **kwargs)._replace(group_m=1)

    variants = {"configured": original, "group_m=1": forced}
    samples: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    seen_group_m: dict[str, dict[str, object]] = {v: {} for v in variants}
    names = list(variants)
    rounds = 1 if warm_only else WARMUP + repeats
    for r in range(rounds):
        for v in names[r % 2:] + names[:r % 2]:  # alternate which goes first: drifts hit both alike
            configs.gemm_config = variants[v]
            try:
                with launch_events() as events:
                    call(r % INPUT_SETS)
                torch.cuda.synchronize()
            finally:
                configs.gemm_config = original
            if r < WARMUP and not warm_only:
                continue
            for key, (ms, gm, _) in _per_launch_ms(events).items():
                kind = gemm_kind(key)
                if kind in FORWARD_GEMMS:
                    samples[v].setdefault(kind, []).append(ms)
                    seen_group_m[v][kind] = gm
    if warm_only:
        return None
    out = {}
    for g in FORWARD_GEMMS:
        a, b = samples["configured"].get(g), samples["group_m=1"].get(g)
        ca, cb = (_stats(a) if a else None), (_stats(b) if b else None)
        out[g] = {"configured_group_m": configured[g].group_m, "launched_group_m": seen_group_m["configured"].get(g),
                  "forced_launched_group_m": seen_group_m["group_m=1"].get(g),
                  "configured_ms": ca and ca["median"], "group_m1_ms": cb and cb["median"],
                  "speedup": cb["median"] / ca["median"] if ca and cb else None, "configured": ca, "group_m1": cb}
    note = None
    if all(configured[g].group_m == 1 for g in FORWARD_GEMMS):
        note = "the configured order is GROUP_M=1 already: both variants are the old order"
    return {"regime": regime, "note": note, "kernels": out}


def _kind_median(per: dict[str, list[float]], kind: str) -> float | None:
    ms = [sum(v) / len(v) for k, v in per.items() if gemm_kind(k) == kind]
    return sum(ms) if ms else None


def measure_decode(ctx, shape: Shape, backend: str, tokens_list: tuple[int, ...], warm_only: bool = False,
                   repeats: int = 2 * REPEATS) -> dict | None:
    """(b): inference forward of `backend` at each T, eager and as CUDA-graph replay (one graph per input set,
    captured after warm-up on a side stream). Each T and each mode is guarded on its own."""
    import torch

    from .. import backends
    from ..routing import route
    from .counting import routing_counts
    from .timing import Step, time_interleaved

    reason = backends.unavailable_reason(backend, ctx.device)
    if reason is not None:
        raise CaseUnavailable(reason)
    cfg = shape.config()
    params = ctx.params(shape)
    rows = []
    for t in tokens_list:
        row: dict = {"tokens": t}
        rows.append(row)
        try:
            call, xs = _moe_call(ctx, shape, t, backend, train=False)
            hits = []
            with torch.no_grad():
                for x in xs:
                    r = route(x, params["router_weight"], None, cfg)
                    hits.append(routing_counts(r.topk_ids, r.kept, shape.experts)[1])
            row["experts_hit"] = sum(hits) / len(hits)
            row["weight_bytes"] = expert_bytes(shape.hidden, shape.ffn, row["experts_hit"])
            for i in range(1 if warm_only else WARMUP):
                call(i % INPUT_SETS)
            if warm_only:
                continue
            secs = time_interleaved({"eager": Step(lambda i: None, call)}, ctx.device, repeats, 0, INPUT_SETS)
            row["eager"] = _stats([s * 1e3 for s in secs["eager"]])
            row["eager_ms"] = row["eager"]["median"]
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            continue
        try:
            graphs = []
            for i in range(INPUT_SETS):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):  # the caching allocator settles before capture
                        call(i)
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    call(i)
                graphs.append(g)
            secs = time_interleaved({"graph": Step(lambda i: None, lambda i: graphs[i].replay())}, ctx.device,
                                    repeats, WARMUP, INPUT_SETS)
            row["graph"] = _stats([s * 1e3 for s in secs["graph"]])
            row["graph_ms"] = row["graph"]["median"]
        except Exception as e:
            row["graph_error"] = f"{type(e).__name__}: {e}"
    return None if warm_only else {"backend": backend, "tokens": rows}


BASELINE_CANDIDATES = ("triton", "torch_grouped_mm", "hf_grouped_mm")


def grouped_mm_availability() -> dict:
    import torch
    import torch.nn.functional as F

    return {"torch._grouped_mm": hasattr(torch, "_grouped_mm"),
            "torch.nn.functional.grouped_mm": hasattr(F, "grouped_mm"), "torch": torch.__version__}


def measure_baselines(ctx, shape: Shape, tokens: int, mode: str, repeats: int = REPEATS) -> dict:
    """(c): the full layer (router + experts) of each candidate, the bench's builders and timed step, interleaved;
    the forward's relative error against the triton backend's on input set 0."""
    import torch

    from ..records import MoEParams
    from ..tolerances import rel_err
    from .candidates import Problem, builder
    from .runner import make_step
    from .shapes import Case
    from .timing import time_interleaved

    unavailable = _unavailable_types()
    grad = mode != "fwd"
    params = ctx.params(shape)
    xs = ctx.inputs(shape, tokens, grad=grad)
    gs = ctx.inputs(shape, tokens, seed=2) if grad else []
    pb = Problem(Case(shape.name, tokens, shape.config(), ctx.dtype, mode), ctx.device,
                 MoEParams.from_mapping(params), xs, gs)
    rows: dict[str, dict] = {}
    steps = {}
    want = None
    for name in BASELINE_CANDIDATES:
        try:
            impl = builder(name)(pb)
            with torch.no_grad():
                got = impl.forward(xs[0])
            if want is None and name == "triton":
                want = got
            err = rel_err(got, want) if want is not None else None
            step = make_step(impl, pb)
            for i in range(WARMUP):
                step.before(i)
                step.timed(i)
            torch.cuda.synchronize()
            steps[name] = step
            rows[name] = {"status": "ok", "rel_err_vs_triton": err}
        except unavailable as e:
            rows[name] = {"status": "unavailable", "reason": str(e)}
        except Exception as e:
            rows[name] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
    samples = time_interleaved(steps, ctx.device, repeats, 0, INPUT_SETS) if steps else {}
    for name, secs in samples.items():
        st = _stats([s * 1e3 for s in secs])
        rows[name].update(ms=st["median"], p20=st["p20"], p80=st["p80"], samples=st["samples"])
    return {"mode": mode, "tokens": tokens, "availability": grouped_mm_availability(), "candidates": rows}


# ---------------------------------------------------------------------------------------------- compilation


def _worker_argv(names: list[str], tiny: bool) -> list[str]:
    return [sys.executable, "-m", "flashmoe_py.bench.kernel_perf", "--warm", *names] + (["--tiny"] if tiny else [])


def warm_worker(cases: list[PerfCase], names: list[str]) -> int:
    """A compile process: each named case's workloads once (what compiles its kernels into the shared Triton
    cache), a line 'WARM <name> ok|error <seconds>' each."""
    import torch

    ctx = Context(torch.device("cuda"))
    by_name = {c.name: c for c in cases}
    for n in names:
        t0 = time.time()
        try:
            by_name[n].warm(ctx)
            torch.cuda.synchronize()
            print(f"WARM {n} ok {time.time() - t0:.1f}", flush=True)
        except Exception as e:
            print(f"WARM {n} error {time.time() - t0:.1f} {type(e).__name__}: {str(e)[:200]}", flush=True)
    return 0


def parse_warm_log(text: str) -> dict[str, dict]:
    out = {}
    for ln in text.splitlines():
        parts = ln.split(" ", 4)
        if len(parts) >= 4 and parts[0] == "WARM" and parts[2] in ("ok", "error"):
            out[parts[1]] = {"status": parts[2], "seconds": float(parts[3]),
                             "detail": parts[4] if len(parts) > 4 else ""}
    return out


def compile_in_parallel(cases: list[PerfCase], ctx, until: float, workers: int, tiny: bool = False,
                        clock: Callable[[], float] = time.time, print_fn=print) -> dict[str, dict]:
    """Run the warm-ups before anything is timed: the first in this process, up to `workers` others in processes
    of their own (in this process group, so the step's kill reaches them), all stopped at `until`.
    -> {case name: {status, seconds, detail}}."""
    warmable = [c for c in cases if c.warm is not None]
    if workers <= 0 or not warmable:
        return {}
    mine, theirs = warmable[0], warmable[1:1 + workers]
    procs = []
    for c in theirs:
        log = tempfile.TemporaryFile()
        procs.append((c, log, subprocess.Popen(_worker_argv([c.name], tiny), stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)))
    status: dict[str, dict] = {}
    try:
        t0 = clock()
        try:
            mine.warm(ctx)
            status[mine.name] = {"status": "ok", "seconds": round(clock() - t0, 1), "detail": "this process"}
        except Exception as e:
            status[mine.name] = {"status": "error", "seconds": round(clock() - t0, 1),
                                 "detail": f"{type(e).__name__}: {e}"}
        for c, log, p in procs:
            try:
                p.wait(max(0.1, until - clock()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for c, log, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.seek(0)
            got = parse_warm_log(log.read().decode(errors="replace"))
            log.close()
            status[c.name] = got.get(c.name, {"status": "killed" if p.returncode and p.returncode < 0 else "error",
                                              "seconds": None, "detail": f"rc {p.returncode}, no report"})
    for n, s in status.items():
        print_fn(f"compile {n:<22} {s['status']}" + (f" in {s['seconds']:.1f} s" if s["seconds"] is not None else "")
                 + (f" ({s['detail'][:120]})" if s["detail"] and s["status"] != "ok" else ""))
    return status


# ---------------------------------------------------------------------------------------------- record, CLI


class Record:
    """The JSON record, rewritten whole (through a temporary file) after every case."""

    def __init__(self, path: Path | None, head: dict):
        self.path, self.data = path, dict(schema=SCHEMA, **head, warm={}, cases=[], summary=[], finished=False)

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)

    def cases(self, rows: list[dict]) -> None:
        self.data["cases"] = rows
        self.write()


METHOD = {
    "timer": "CUDA events around each call after a synchronise (timing.time_interleaved); per launch, events around "
             "each triton_backend._run in rounds of their own",
    "statistic": f"median of {REPEATS} timed calls ({2 * REPEATS} at decode) after {WARMUP} warm-up calls, "
                 "20/80% quantiles beside it; ceilings: best of 10",
    "inputs": f"random bf16 (never zeros), {INPUT_SETS} input sets rotated",
    "cache": "no L2 flush: each case's expert weights (1.1 GB at shape 1, 2.8 GB at shape 3) exceed the 60 MB L2",
    "compilation": "before any timing, in parallel warm-up processes; nothing else runs on the GPU while timing",
    "graph": "decode: one torch.cuda.CUDAGraph per input set, captured after 2 warm-up calls on a side stream",
}


def _head(budget_s: float, device=None) -> dict:
    head = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": round(budget_s, 1), "method": METHOD}
    if device is not None:
        from .schema import run_header

        head.update(header=run_header(device), grouped_mm=grouped_mm_availability())
    return head


def dry_run(cases: list[PerfCase], budget_s: float, workers: int, tiny: bool) -> int:
    """What a GPU run would measure, with its FLOPs and bytes; imports what the GPU run imports and checks the
    launch names against triton_backend.plan_launches (meta tensors, sm_90). 0 when every GEMM has its launch."""
    import torch

    from .. import fused_backend, triton_backend  # noqa: F401  (the GPU run's imports, here without a GPU)
    from . import baselines, candidates, runner, timing  # noqa: F401

    shapes = TINY_SHAPES if tiny else SHAPES
    print(f"kernel-perf plan (dry run, no GPU): {len(cases)} cases, budget {budget_s:.0f} s")
    for key, (s, t) in shapes.items():
        print(f"  {key}: {s.name} T={t} H={s.hidden} I={s.ffn} E={s.experts} k={s.top_k}, rows {t * s.top_k}, "
              f"forward {forward_flops(s, t) / 1e9:.1f} GFLOP")
    for i, c in enumerate(cases, 1):
        print(f"{i:>2}. {c.name:<22} part {c.part:<8} about {c.est_s:.0f} s (+{c.compile_s:.0f} s to compile)  "
              f"{c.title}")
        for g, spec in (c.plan.get("gemms", {}) if c.name.startswith("dense/") else {}).items():
            print(f"      {g:<9} [{spec['m']}x{spec['k']}]x[{spec['k']}x{spec['n']}]  {spec['flops'] / 1e9:9.1f} GFLOP")
        for t, b in c.plan.get("expected_weight_bytes", {}).items():
            print(f"      T={t:<4} ~{c.plan['expected_experts_hit'][t]:5.1f} experts hit (uniform): {b / 1e9:.3f} GB "
                  "of weights")
    ok = True
    for key, (s, t) in shapes.items():
        launches = triton_backend.plan_launches(s.config(), torch.bfloat16, t, "sm_90", backward=True)
        fwd = triton_backend.plan_launches(s.config(), torch.bfloat16, t, "sm_90", backward=False)
        found = {gemm_kind(k) for k in launch_keys([ln.name for ln in launches])} - {None}
        want = set(FORWARD_GEMMS + BACKWARD_GEMMS)
        ok &= found == want
        print(f"  launches at {key} (sm_90): inference " + ", ".join(ln.name for ln in fwd) + "; training step "
              + ", ".join(f"{ln.name}" + (f" {ln.tags['config']}" if "config" in ln.tags else "") for ln in launches)
              + f"; GEMMs counted and launched: {'ok' if found == want else f'MISMATCH {sorted(found ^ want)}'}")
    try:
        cfg = triton_backend.launch_configs().gemm_config("sm_90", "prefill", "up", 2)
        order = (f"GROUP_M {cfg.group_m} configured for up (sm_90 prefill)" if "group_m" in getattr(cfg, "_fields", ())
                 else "gemm_config has no group_m: old order only")
    except Exception as e:
        order = f"gemm_config: {type(e).__name__}: {e}"
    first = next(iter(shapes.values()))[0]
    print(f"  launch order: {order}; grouped GEMM here: {grouped_mm_availability()}; transformers grouped_mm: "
          f"{baselines.hf_unavailable('grouped_mm', first.config()) or 'available'}")
    warm = [c for c in cases if c.warm is not None]
    compile_wall = max([c.compile_s for c in warm[:1 + workers]] or [0])
    compile_serial = sum(c.compile_s for c in warm)
    measure = sum(c.est_s for c in cases)
    print(f"  estimates: compile about {compile_wall:.0f} s in {min(len(warm), 1 + workers)} processes "
          f"({compile_serial:.0f} s in one), then measuring about {measure:.0f} s; compile gets at most "
          f"{WARM_SHARE:.0%} of the budget")
    print(f"kernel-perf dry run: {'ok' if ok else 'FAILED (a counted GEMM has no launch of its name)'}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m flashmoe_py.bench.kernel_perf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check the launch names; no GPU")
    ap.add_argument("--out", type=Path, help="the JSON record (rewritten after every case)")
    ap.add_argument("--deadline", type=float, help="epoch seconds when this process is killed (gpu-check's)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds from now, when --deadline is not given")
    ap.add_argument("--workers", type=int, default=6, help="compile processes besides this one (0: compile inline)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these cases")
    ap.add_argument("--tiny", action="store_true", help="the GPU test's small plan")
    ap.add_argument("--warm", nargs="+", metavar="NAME", help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    end = (args.deadline if args.deadline else start + args.budget) - MARGIN_S
    cases = build_plan(tiny=args.tiny)
    if args.only:
        unknown = set(args.only) - {c.name for c in cases}
        if unknown:
            raise SystemExit(f"kernel-perf: --only {sorted(unknown)}: choose from {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in args.only]
    if args.dry_run:
        return dry_run(cases, end - start, args.workers, args.tiny)
    if args.warm:
        return warm_worker(cases, args.warm)
    import torch

    if not torch.cuda.is_available():
        print("kernel-perf: no CUDA device")
        return 2
    device = torch.device("cuda")
    rec = Record(args.out, _head(end - start, device))
    return measure(cases, Context(device), start, end, rec, args.workers, args.tiny)


def measure(cases: list[PerfCase], ctx, start: float, end: float, rec: Record, workers: int = 0, tiny: bool = False,
            print_fn=print) -> int:
    """The GPU run: compile in parallel (at most WARM_SHARE of the time), then the cases, all stopped by an alarm
    at `end` (epoch seconds); the record is complete whatever stops it. Returns the exit status."""
    rec.write()

    def alarm(signum, frame):
        raise OutOfTime()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, min(max(0.1, end - time.time()), 86400.0))
    interrupted = False
    try:
        warm: dict = {}
        try:
            warm = compile_in_parallel(cases, ctx, start + WARM_SHARE * (end - start), workers, tiny,
                                       print_fn=print_fn)
        except OutOfTime:
            print_fn("compile: stopped at the deadline")
        rec.data["warm"] = warm
        compiled = {n for n, s in warm.items() if s["status"] == "ok"}
        run_cases(cases, ctx, end, compiled=compiled, on_update=rec.cases, print_fn=print_fn)
    except KeyboardInterrupt:  # the step's kill: say what was measured before it
        interrupted = True
    except OutOfTime:  # between cases, or in the runner's own bookkeeping
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    results = rec.data["cases"]  # what on_update kept: complete up to the last case that ended
    lines = summary_lines(results)
    rec.data.update(derived=derive(results), summary=lines, finished=not interrupted, interrupted=interrupted,
                    elapsed_s=round(time.time() - start, 1))
    rec.write()
    print_fn("\n".join(lines))
    return 130 if interrupted else exit_status(results)


if __name__ == "__main__":
    raise SystemExit(main())
