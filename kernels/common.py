"""Device helpers shared by the kernels: expert tile lookup, activations and their derivatives.

Every helper works on fp32 or fp64 values; kernels upcast loads to their accumulator type first.
"""

import triton
import triton.language as tl

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2), for the exact erf gelu
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 * pi), gelu's derivative


@triton.jit
def expert_tile(pid_m, counts_ptr, E, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Map grouped-GEMM tile `pid_m` to (expert e, first sorted row of the tile, rows left in e from there).

    counts_ptr [E] int32: rows per expert, experts stored back to back. Expert e owns cdiv(counts[e], BLOCK_M)
    consecutive tiles; tiles past the last expert give e >= E and the caller exits. Computed from the counts
    in every program, so the host never reads them (grids are sized from an upper bound).
    """
    ex = tl.arange(0, E_PAD)
    n = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    tiles = (n + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    e = tl.sum((ends <= pid_m).to(tl.int32), 0)
    before = ex < e
    first_tile = tl.sum(tl.where(before, tiles, 0), 0)
    first_row = tl.sum(tl.where(before, n, 0), 0)
    n_e = tl.sum(tl.where(ex == e, n, 0), 0)
    local = (pid_m - first_tile) * BLOCK_M
    return e, first_row + local, n_e - local


@triton.jit
def expert_rows(e, counts_ptr, E, E_PAD: tl.constexpr):
    """(first sorted row, row count) of expert e; counts_ptr [E] int32."""
    ex = tl.arange(0, E_PAD)
    n = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    return tl.sum(tl.where(ex < e, n, 0), 0), tl.sum(tl.where(ex == e, n, 0), 0)


@triton.jit
def _sigmoid(z):
    # Written out rather than tl.sigmoid so fp64 stays fp64; exp overflow gives the right limits (0 and 1).
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    """ACT in {"silu", "gelu" (exact erf), "relu"} applied to z (fp32/fp64)."""
    if ACT == "silu":
        y = z * _sigmoid(z)
    elif ACT == "gelu":
        y = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    else:
        # where(z < 0, 0, z) keeps NaN as NaN, like torch.relu (a max(z, 0) would drop it).
        y = tl.where(z < 0, 0.0, z)
    return y


@triton.jit
def act_grad(z, ACT: tl.constexpr):
    """d act(z) / dz, matching PyTorch's backward (relu: 1 where z > 0, else 0)."""
    if ACT == "silu":
        s = _sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == "gelu":
        d = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    else:
        d = tl.where(z > 0, 1.0, 0.0)
    return d
