"""Tolerances, stated once: relative error ||actual - expected|| / ||expected|| allowed per compute dtype.

Used by the tests and by the benchmark's correctness gate. fp64 layers must match the float64 per-token
implementation to 1e-10; fp32 to 1e-5; tf32 matmul units (Triton's default fp32 dot on GPUs) to 1e-3;
bf16 to 2e-2 and fp16 to 1e-2 (10 and 7 mantissa bits, intermediates rounded to the layer dtype between
the two projections).
"""

from __future__ import annotations

import torch

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, "tf32": 1e-3, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN when actual has NaN: it never passes a `<=` test)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)
