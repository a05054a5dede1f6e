"""Test-side use of the tolerances stated once in `flashmoe_py.tolerances` (shared with the benchmark's
correctness gate): `assert_close` by norm-wise relative error."""

from __future__ import annotations

from flashmoe_py.tolerances import RTOL, rel_err

__all__ = ["RTOL", "assert_close", "rel_err"]


def assert_close(actual, expected, dtype, what: str = "tensor") -> None:
    """Norm-wise relative error within RTOL[dtype]; shapes must match and NaN never passes."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any(), f"{what}: contains NaN"
    err = rel_err(actual, expected)
    assert err <= RTOL[dtype], f"{what}: relative error {err:.3e} > {RTOL[dtype]:.0e} ({dtype})"
