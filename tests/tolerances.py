"""Tolerances, stated once: relative error ||actual - expected|| / ||expected|| allowed per compute dtype.

fp64 layers must match the float64 per-token implementation to 1e-10; fp32 to 1e-5; tf32 matmul
units (Triton's default fp32 dot on GPUs) to 1e-3; bf16 to 2e-2 and fp16 to 1e-2 (10 and 7 mantissa bits,
intermediates rounded to the layer dtype between the two projections).
"""

from __future__ import annotations

import torch

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, "tf32": 1e-3, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype, what: str = "tensor") -> None:
    """Norm-wise relative error within RTOL[dtype]; shapes must match and NaN never passes."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: contains NaN"
    err = rel_err(actual, expected)
    assert err <= RTOL[dtype], f"{what}: relative error {err:.3e} > {RTOL[dtype]:.0e} ({dtype})"
