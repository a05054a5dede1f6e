"""Run one case on one process: build every candidate, check it against the reference, time the ones that
pass (interleaved), profile one call of each, and turn the numbers into result rows.

Correctness gate: once per case, each candidate's output on input set 0 -- and in the bwd modes the
gradients of x and of every parameter -- is compared with the reference backend's by norm-wise relative
error (`flashmoe_py.tolerances`: the dtype's tolerance; tf32's for float32 on CUDA, where matmul units may
round operands to tf32). A candidate over it is reported `failed` with its error and is not timed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..routing import route
from ..tolerances import RTOL, rel_err
from . import counting
from .candidates import Impl, Problem, Unavailable, builder, kind_of, make_problem
from .probe import probe
from .schema import config_dict, new_row
from .shapes import Case
from .timing import Ceilings, Step, quantiles_ms, synchronize, time_interleaved


@dataclass(frozen=True)
class Plan:
    """How each case is measured: at least `repeats` timed rounds after `warmup` untimed ones, more (up to
    10x) when the candidates are fast, so that each gets about `min_time_s` of timed calls."""

    repeats: int
    warmup: int
    input_sets: int
    seed: int = 0
    min_time_s: float = 0.0
    quick_ceilings: bool = False  # smoke tests: small ceiling measurements (timing.measure_ceilings)

    def rounds(self, slowest_call_s: float) -> int:
        if self.min_time_s <= 0 or slowest_call_s <= 0:
            return self.repeats
        return max(self.repeats, min(10 * self.repeats, math.ceil(self.min_time_s / slowest_call_s)))


class Progress:
    """What the runner reports while it works; the CLI draws it (rich), tests pass this silent one."""

    def add(self, calls: int) -> None:
        pass

    def advance(self, calls: int = 1) -> None:
        pass

    def describe(self, text: str) -> None:
        pass


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    return RTOL["tf32"] if (device.type == "cuda" and dtype == torch.float32) else RTOL[dtype]


def _clear_grads(impl: Impl, pb: Problem) -> None:
    for t in impl.leaves:
        t.grad = None
    for x in pb.inputs:
        x.grad = None


def make_step(impl: Impl, pb: Problem) -> Step:
    """The timed unit of `pb.case.mode`: fwd (no autograd graph), bwd (forward untimed), fwdbwd."""
    mode = pb.case.mode
    if mode == "fwd":
        def fwd(i: int) -> None:
            with torch.no_grad():
                impl.forward(pb.inputs[i])
        return Step(lambda i: None, fwd)
    if mode == "fwdbwd":
        return Step(lambda i: _clear_grads(impl, pb),
                    lambda i: impl.forward(pb.inputs[i]).backward(pb.grad_outs[i]))
    state: dict = {}

    def before(i: int) -> None:
        _clear_grads(impl, pb)
        state["out"] = impl.forward(pb.inputs[i])
        synchronize(pb.device)
    return Step(before, lambda i: state.pop("out").backward(pb.grad_outs[i]))


def outputs(impl: Impl, pb: Problem) -> dict[str, torch.Tensor]:
    """What the gate compares: out, and in the bwd modes the gradients of x and of our parameters."""
    _clear_grads(impl, pb)
    x = pb.inputs[0]
    if not pb.needs_grad:
        with torch.no_grad():
            return {"out": impl.forward(x).detach()}
    out = impl.forward(x)
    out.backward(pb.grad_outs[0])
    res = {"out": out.detach(), "grad x": x.grad.detach().clone()}
    res.update({f"grad {n}": g.detach().clone() for n, g in impl.grads().items()})
    return res


def max_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    """(worst relative error, its name); a tensor missing from `got` or NaN counts as infinitely wrong."""
    worst, where = 0.0, ""
    for name, w in want.items():
        g = got.get(name)
        e = math.inf if g is None or g.shape != w.shape else rel_err(g, w)
        if math.isnan(e):
            e = math.inf
        if e > worst or not where:
            worst, where = e, name
    return worst, where


def routing_work(pb: Problem) -> tuple[float, float]:
    """Mean kept assignments and mean experts hit over the input sets (the routing every candidate uses)."""
    cfg, p = pb.case.cfg, pb.params
    a = hit = 0.0
    with torch.no_grad():
        for x in pb.inputs:
            r = route(x, p.router_weight, p.expert_bias, cfg)
            ai, hi = counting.routing_counts(r.topk_ids, r.kept, cfg.num_experts)
            a, hit = a + ai, hit + hi
    return a / len(pb.inputs), hit / len(pb.inputs)


def timed_metrics(seconds: list[float], work: counting.Work, tokens_total: int, ceilings: Ceilings) -> dict:
    med, p20, p80 = quantiles_ms(seconds)
    eff, bound = counting.roofline_efficiency(work, med / 1e3, ceilings.matmul_flops_per_s,
                                              ceilings.copy_bytes_per_s)
    return {"latency_ms_median": med, "latency_ms_p20": p20, "latency_ms_p80": p80, "samples": len(seconds),
            "tokens_per_s": tokens_total / (med / 1e3), "tflops": work.flops / (med / 1e3) / 1e12,
            "roofline_efficiency": eff, "bound": bound}


def ceiling_metrics(ceilings: Ceilings) -> dict:
    return {"matmul_tflops_ceiling": ceilings.matmul_flops_per_s / 1e12,
            "copy_gbps_ceiling": ceilings.copy_bytes_per_s / 1e9}


def apply_ceilings(rows: list[dict], ceilings: dict[str, Ceilings]) -> None:
    """Set every row's ceilings (by dtype name) and recompute its roofline efficiency (in place): the run
    measures the ceilings more than once and keeps the best, since noise only ever lowers them."""
    for r in rows:
        c = ceilings.get(r["config"]["dtype"])
        if c is None:
            continue
        m = r["metrics"]
        m.update(ceiling_metrics(c))
        if r["status"] == "ok":
            w = counting.Work(m["flops"], m["min_bytes"])
            m["roofline_efficiency"], m["bound"] = counting.roofline_efficiency(
                w, m["latency_ms_median"] / 1e3, c.matmul_flops_per_s, c.copy_bytes_per_s)


def add_speedups(rows: list[dict]) -> None:
    """Fill speedup_vs_best_baseline and best_baseline over rows of one case (in place)."""
    ok = [r for r in rows if r["status"] == "ok" and r["kind"] == "baseline"]
    if not ok:
        return
    best = min(ok, key=lambda r: r["metrics"]["latency_ms_median"])
    for r in rows:
        r["metrics"]["best_baseline"] = best["candidate"]
        if r["status"] == "ok":
            r["metrics"]["speedup_vs_best_baseline"] = (best["metrics"]["latency_ms_median"]
                                                        / r["metrics"]["latency_ms_median"])


def run_case(case: Case, names: list[str], device: torch.device, ceilings: Ceilings, plan: Plan, header: dict,
             progress: Progress | None = None, builders: dict[str, Callable[[Problem], Impl]] | None = None,
             ) -> list[dict]:
    """Rows for `names` on `case` (one per name, in order). `builders` adds or overrides candidates."""
    progress = progress or Progress()
    builders = builders or {}
    per_candidate = max(1, plan.warmup) + plan.repeats + 1  # + the gate's call; the profiled call is a warm-up
    progress.add(per_candidate * len(names))
    config = config_dict(case, None, plan.repeats, plan.warmup, plan.input_sets)
    pb = make_problem(case, device, plan.input_sets, plan.seed)
    tol = tolerance(case.dtype, device)
    want = outputs(builder("reference")(pb), pb)
    a, hit = routing_work(pb)
    itemsize = pb.inputs[0].element_size()
    work = counting.work(case.cfg, case.tokens, a, hit, itemsize, case.mode,
                         router_itemsize=pb.params.router_weight.element_size())
    common = {"flops": work.flops, "min_bytes": work.min_bytes, "tolerance": tol, **ceiling_metrics(ceilings)}

    rows: dict[str, dict] = {}
    impls: dict[str, Impl] = {}
    errors: dict[str, float] = {}
    slowest = 0.0
    for name in names:
        progress.describe(f"{case.shape} T={case.tokens} {case.dtype_name} {case.mode}: checking {name}")
        status, reason = None, None
        try:
            impl = (builders.get(name) or builder(name))(pb)
            t0 = time.perf_counter()
            got = outputs(impl, pb)
            synchronize(device)
            slowest = max(slowest, time.perf_counter() - t0)
            err, where = max_error(got, want)
            errors[name] = err
            if not err <= tol:
                status, reason = "failed", f"{where}: relative error {err:.3g} > tolerance {tol:.0e}"
            else:
                impls[name] = impl
        except Unavailable as e:
            status, reason = "unavailable", str(e)
        except Exception as e:  # a candidate that raises is reported, never allowed to end the run
            status, reason = "error", f"{type(e).__name__}: {e}"
        progress.advance(1)
        if status is not None:
            progress.advance(per_candidate - 1)
            rows[name] = new_row(header, config, name, kind_of(name), status, reason,
                                 max_rel_err=errors.get(name), **common)

    repeats = plan.rounds(slowest)
    progress.add((repeats - plan.repeats) * len(impls))
    config["repeats"] = repeats
    for r in rows.values():
        r["config"]["repeats"] = repeats
    progress.describe(f"{case.shape} T={case.tokens} {case.dtype_name} {case.mode}: timing {len(impls)} candidates")
    steps = {n: make_step(impl, pb) for n, impl in impls.items()}
    # The profiled call is the first warm-up round (a warm call: the gate already ran each candidate once).
    probed = {}
    for name, step in steps.items():
        probed[name] = probe(step, device)
        progress.advance(1)
    samples = time_interleaved(steps, device, repeats, max(0, plan.warmup - 1), plan.input_sets,
                               on_call=progress.advance)
    for name in steps:
        rows[name] = new_row(header, config, name, kind_of(name), "ok", None, max_rel_err=errors[name],
                             **timed_metrics(samples[name], work, case.tokens, ceilings), **probed[name], **common)
    ordered = [rows[n] for n in names]
    add_speedups(ordered)
    return ordered
