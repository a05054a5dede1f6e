"""`flashmoe-bench`: time the reference path against the naive per-expert loop on a few shapes.

Runs are interleaved (A, B, A, B, ...) so that machine noise hits both alike; the table reports medians
and the ratio naive / reference (> 1 means the reference is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..config import MoEConfig
from ..layer import FusedMoE
from ..ops import moe
from ..routing import route
from .baselines import naive_loop

# (name, T, H, I, E, k): what each shape stands for.
DEFAULT_SHAPES = [
    ("fine-grained", 4096, 512, 256, 128, 8),   # many small experts (DeepSeek/Qwen3 style), prefill
    ("decode", 64, 1024, 512, 64, 8),           # a decode step: few tokens per expert, weight-bound
    ("mixtral-like/4", 2048, 1024, 896, 8, 2),  # few large experts (Mixtral-8x7B scaled down 4x)
]


def _time_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    for f in fns.values():
        f()  # warm-up: first-touch allocations and thread pools
    samples = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            samples[n].append(time.perf_counter() - t0)
    return {n: statistics.median(s) for n, s in samples.items()}


def run_shape(name, t, h, i, e, k, dtype, repeats):
    cfg = MoEConfig(hidden_size=h, ffn_hidden_size=i, num_experts=e, top_k=k)
    layer = FusedMoE(cfg, dtype=dtype)
    params = layer.params()
    x = torch.randn(t, h, dtype=dtype)
    with torch.no_grad():
        r = route(x, params.router_weight, None, cfg)
        fns = {
            "reference": lambda: moe(x, params, cfg, backend="reference", topk_ids=r.topk_ids,
                                     topk_weights=r.topk_weights).out,
            "naive_loop": lambda: naive_loop(x, params, cfg, r.topk_ids, r.topk_weights),
        }
        err = (fns["reference"]() - fns["naive_loop"]()).abs().max().item()
        times = _time_interleaved(fns, repeats)
    return {"shape": name, "T": t, "H": h, "I": i, "E": e, "k": k, "ms": {n: v * 1e3 for n, v in times.items()},
            "ratio": times["naive_loop"] / times["reference"], "max_abs_diff": err}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="flashmoe-bench", description=__doc__)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = [run_shape(*s, dtype=dtype, repeats=args.repeats) for s in DEFAULT_SHAPES]
    print(f"device: cpu ({torch.get_num_threads()} threads), dtype {args.dtype}, forward, median of {args.repeats}")
    print(f"{'shape':<16}{'T':>6}{'H':>6}{'I':>6}{'E':>5}{'k':>3}{'reference ms':>14}{'naive ms':>10}{'naive/ref':>11}")
    for r in rows:
        print(f"{r['shape']:<16}{r['T']:>6}{r['H']:>6}{r['I']:>6}{r['E']:>5}{r['k']:>3}"
              f"{r['ms']['reference']:>14.1f}{r['ms']['naive_loop']:>10.1f}{r['ratio']:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
