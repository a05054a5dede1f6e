"""Grouped expert GEMMs (DESIGN §2.5) and their backward, over rows sorted by expert.

Rows of one expert are contiguous in the sorted order; counts_ptr [E] int32 holds rows per expert and
every kernel finds its expert from the counts on the device (common.expert_tile), so grids are sized from
an upper bound and surplus programs exit. With GATHER, sorted row r holds assignment order[r] of token
order[r] // TOPK, and the kernel loads that token's row of x (or of the output gradient) directly: no
gathered copy of x is ever made. Without GATHER the rows are already grouped (the expert-parallel path).

  up_tile, gemm_tile the tile loops (helpers, also called by the fused kernel; up_kernel uses gemm_tile)
  row_offset, expert_offset  int64 element offsets of rows and expert slabs (helpers, see row_offset)
  grouped_tile, grouped_row_tile  the launch order of every GEMM kernel (helpers)
  up_kernel          pre = x[rows] @ w_up[e] + b_up[e];  h = glu(gate, up)  or  act(pre)  (common.expert_act)
  rows_gemm_kernel   out = (a[rows] @ B[e] + bias[e]) * weight[row], stored by row or added to its token
  act_grad_kernel    u = g[token] @ w_down[e]^T; weight gradient <u, h> + <g, b_down>; dpre = dact(u * weight);
                     h * weight (dW_down's operand), h recomputed from pre
  weight_grad_kernel dW[e] = A[rows]^T @ B[rows] (optionally gathered), db[e] = (weighted) column sums of B

Launch order: 1-D grids in grouped order (grouped_tile): consecutive programs, which run at the same time,
cover GROUP_M row tiles x every column tile, so a wave reads each A and B tile from HBM once and re-reads it
from L2. Epilogues run by column halves or quarters of the accumulator (_halves splits it without moving
data), so wide tiles (one MMA of n = 256) need no more registers at once than narrow ones did.

The tile loops of the forward GEMMs are helpers (`up_tile`, `gemm_tile`) that take the tile's row pointers,
so the persistent fused kernel (fused_moe.py) runs the very same loops on rows it gathers from x or from a
receive slab of the symmetric heap.

Accumulation is fp32 (fp64 for fp64 inputs); outputs are rounded once, when stored. UPCAST (set by the
host only under the Triton interpreter) feeds bf16 dot operands in as fp32: the interpreter's dot
multiplies the raw bit patterns of bf16 (Triton issue 11584).
"""

import triton
import triton.language as tl

from .common import act_fwd, act_grad, act_has_params, expert_act, expert_rows, expert_tile, glu_fwd, glu_grad


@triton.jit
def row_offset(rows, stride):
    """int64 element offset rows * stride of the start of each row (rows: int32/int64 scalar or vector, stride
    the row length in elements).

    Every product of a row index with a row length in these kernels goes through here: each factor fits in
    i32 (Triton types a Python int below 2^31, program ids, tl.arange and loaded int32 indices as i32) while
    the product passes 2^31 at production sizes (2^21 sorted rows times N_up = 4096), so it is formed in int64.
    Row indices themselves stay i32 until this product (cheaper compares and division by TOPK).
    """
    return rows.to(tl.int64) * stride


@triton.jit
def expert_offset(e, rows, cols):
    """int64 element offset of expert e's [rows, cols] matrix in a contiguous [E, rows, cols] buffer.

    In int64 from the first product: e * rows * cols passes 2^31 (255 * 7168 * 4096 for DeepSeek-V3's w_up).
    Offsets within one expert's matrix stay i32: rows * cols <= 7168 * 36864 = 2.6e8 at production sizes.
    """
    return e.to(tl.int64) * rows * cols


@triton.jit
def grouped_tile(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` (0 <= pid < tiles_m * tiles_n) over a tiles_m x tiles_n grid of tiles, in
    grouped order: programs GROUP_M * tiles_n * g onwards cover row tiles [GROUP_M * g, GROUP_M * (g + 1)) (fewer in
    the last group), walking those row tiles for column tile 0, then for column tile 1, and so on.

    Programs with consecutive ids run at the same time, so one wave reads about GROUP_M row tiles of A and
    wave / GROUP_M column tiles of B, each from HBM once and then from L2, where row-major order (all column
    tiles of one row tile, then the next) would read every column tile of B in every wave and a column-major one
    every row tile of A. GROUP_M = 1 is row-major order.
    """
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size = tl.minimum(tiles_m - first_m, GROUP_M)
    local = pid % per_group
    return first_m + local % size, local // size


@triton.jit
def grouped_row_tile(pid, counts_ptr, E, tiles_n, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """Program `pid` of a grouped GEMM over sorted rows -> (expert e, first sorted row, rows left in e from there,
    column tile); e >= E for the programs past the last (row tile, column tile), which the caller exits.

    counts_ptr [E] int32. The grid is sized on the host from an upper bound on the row tiles; the exact number,
    sum over experts of cdiv(counts[e], BLOCK_M), is computed here so the grouped order (grouped_tile) covers
    exactly the tiles that exist and the surplus programs are the last ones. Row tiles are numbered expert by
    expert (common.expert_tile), so a group of row tiles mostly shares one expert's B.
    """
    ex = tl.arange(0, E_PAD)
    n = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    tiles_m = tl.sum((n + BLOCK_M - 1) // BLOCK_M, 0)
    live = pid < tiles_m * tiles_n
    # A surplus program decodes as program 0 and is then sent past the last row tile: expert_tile gives e >= E.
    pid_m, pid_n = grouped_tile(tl.where(live, pid, 0), tl.maximum(tiles_m, 1), tiles_n, GROUP_M)
    e, row0, rows_left = expert_tile(tl.where(live, pid_m, tiles_m), counts_ptr, E, E_PAD, BLOCK_M)
    return e, row0, rows_left, pid_n


@triton.jit
def _halves(acc):
    """acc [M, N] -> its column halves [M, N/2], [M, N/2]. For the MMA accumulator layouts a thread holding column c
    also holds c + N/2 (N/2 a multiple of 8), so the split is a renaming of registers: no data moves."""
    return tl.split(tl.permute(tl.reshape(acc, (acc.shape[0], 2, acc.shape[1] // 2)), (0, 2, 1)))


@triton.jit
def up_tile(a_ptrs, row_ok, w_base, b_base, cols, col_ok, H, INNER,
            GATED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One up-projection tile: (acc_gate, acc_up) [BLOCK_M, BLOCK_N] fp32 (fp64 for fp64 rows), bias included,
    from two dots sharing the A load (the fused kernel's loop; up_kernel runs gate and up as one dot).

    a_ptrs [BLOCK_M, BLOCK_K]: pointers to the tile's rows at reduction columns 0..BLOCK_K-1 (rows may be
    gathered from anywhere: token rows of x, rows of a receive slab); w_base: w_up[e] [H, N_UP]; b_base:
    b_up[e] [N_UP]; cols [BLOCK_N] inner columns of the tile. Gated: gate columns `cols`, up columns
    INNER + cols, two accumulators; plain: acc_up stays zero. Shared by up_kernel and the fused kernel.
    """
    if GATED:
        n_up = 2 * INNER
    else:
        n_up = INNER
    offs_k = tl.arange(0, BLOCK_K)
    g_ptrs = w_base + offs_k[:, None] * n_up + cols[None, :]
    acc_ty = tl.float64 if a_ptrs.dtype.element_ty == tl.float64 else tl.float32
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), acc_ty)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), acc_ty)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a_mask = row_ok[:, None]
            b_mask = col_ok[None, :]
        else:
            k_ok = k0 + offs_k < H
            a_mask = row_ok[:, None] & k_ok[None, :]
            b_mask = k_ok[:, None] & col_ok[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b_g = tl.load(g_ptrs, mask=b_mask, other=0.0)
        if GATED:
            b_u = tl.load(g_ptrs + INNER, mask=b_mask, other=0.0)
        if UPCAST:
            a, b_g = a.to(tl.float32), b_g.to(tl.float32)
            if GATED:
                b_u = b_u.to(tl.float32)
        acc_g = tl.dot(a, b_g, acc_g, input_precision=PRECISION, out_dtype=acc_g.dtype)
        if GATED:
            acc_u = tl.dot(a, b_u, acc_u, input_precision=PRECISION, out_dtype=acc_u.dtype)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * n_up
    if HAS_BIAS:
        acc_g += tl.load(b_base + cols, mask=col_ok, other=0.0).to(acc_ty)[None, :]
        if GATED:
            acc_u += tl.load(b_base + INNER + cols, mask=col_ok, other=0.0).to(acc_ty)[None, :]
    return acc_g, acc_u


@triton.jit
def gemm_tile(a_ptrs, row_ok, b_ptrs, col_ok, K, stride_bk, EVEN_K: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] = A[rows] @ B over K, fp32 (fp64 for fp64 operands); no bias, no epilogue.

    a_ptrs [BLOCK_M, BLOCK_K] and b_ptrs [BLOCK_K, BLOCK_N] point at reduction index 0; A advances by
    BLOCK_K elements along its rows, B by BLOCK_K * stride_bk. Shared by rows_gemm_kernel and the fused kernel.
    """
    offs_k = tl.arange(0, BLOCK_K)
    acc_ty = tl.float64 if a_ptrs.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), acc_ty)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a_mask = row_ok[:, None]
            b_mask = col_ok[None, :]
        else:
            k_ok = k0 + offs_k < K
            a_mask = row_ok[:, None] & k_ok[None, :]
            b_mask = k_ok[:, None] & col_ok[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def up_kernel(
    h_ptr, pre_ptr,  # outputs: h [R, I], pre [R, N_UP] (STORE_PRE only), x's dtype
    x_ptr, order_ptr, counts_ptr, w_ptr, b_ptr,  # x [T or R, H], order [R] int32, counts [E] int32,
    # w_up [E, H, N_UP], b_up [E, N_UP]
    H, INNER, E,
    TOPK: tl.constexpr, GATHER: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, EVEN_K: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Tile (BLOCK_M sorted rows of one expert) x (BLOCK_N of the I inner columns), in grouped order
    (grouped_row_tile). Gated: the tile's gate columns j + [0, BLOCK_N) and up columns I + j + [0, BLOCK_N) of
    w_up[e] are one [BLOCK_K, 2 * BLOCK_N] operand, so one MMA of n = 2 * BLOCK_N covers both (the A tile is loaded
    once, and a wgmma twice as wide runs closer to peak than two); the accumulator is split into gate and up in the
    epilogue, so act(gate) * up never leaves registers."""
    e, row0, rows_left, pid_n = grouped_row_tile(tl.program_id(0), counts_ptr, E, tl.cdiv(INNER, BLOCK_N), E_PAD,
                                                 BLOCK_M, GROUP_M)
    if e >= E:
        return
    offs_m = tl.arange(0, BLOCK_M)
    rows = row0 + offs_m
    row_ok = offs_m < rows_left
    if GATHER:
        tok = tl.load(order_ptr + rows, mask=row_ok, other=0) // TOPK
    else:
        tok = rows
    if GATED:
        n_up = 2 * INNER
    else:
        n_up = INNER
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INNER
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + row_offset(tok, H)[:, None] + offs_k[None, :]
    w_base = w_ptr + expert_offset(e, H, n_up)
    if HAS_BIAS:
        b_base = b_ptr + row_offset(e, n_up)
    else:
        b_base = b_ptr
    acc_ty = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    if GATED:
        # Operand column c: gate column j + c for c < BLOCK_N, up column I + j + c - BLOCK_N above; two runs of
        # BLOCK_N contiguous columns, so the loads stay vectorised and asynchronous.
        c = tl.arange(0, 2 * BLOCK_N)
        inner = pid_n * BLOCK_N + c % BLOCK_N
        w_cols = inner + (c // BLOCK_N) * INNER
        w_ok = inner < INNER
        acc = gemm_tile(a_ptrs, row_ok, w_base + offs_k[:, None] * n_up + w_cols[None, :], w_ok, H, n_up, EVEN_K,
                        BLOCK_M, 2 * BLOCK_N, BLOCK_K, UPCAST, PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_base + w_cols, mask=w_ok, other=0.0).to(acc_ty)[None, :]
        # [BM, 2 * BN] -> [BM, 2, BN] -> [BM, BN, 2] -> gate, up: each thread keeps its own columns (for the MMA
        # layouts a thread holding column c of the tile also holds c + BN), so no data moves.
        acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    else:
        acc_g = gemm_tile(a_ptrs, row_ok, w_base + offs_k[:, None] * n_up + cols[None, :], col_ok, H, n_up, EVEN_K,
                          BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
        if HAS_BIAS:
            acc_g += tl.load(b_base + cols, mask=col_ok, other=0.0).to(acc_ty)[None, :]
        acc_u = acc_g
    # The epilogue by column quarters: each needs its own activation temporaries, and n = 256 spilled at once.
    g_lo, g_hi = _halves(acc_g)
    u_lo, u_hi = _halves(acc_u)
    _up_store_halves(g_lo, u_lo, rows, row_ok, pid_n * BLOCK_N, h_ptr, pre_ptr, INNER, n_up, ACT, GATED, STORE_PRE)
    _up_store_halves(g_hi, u_hi, rows, row_ok, pid_n * BLOCK_N + BLOCK_N // 2, h_ptr, pre_ptr, INNER, n_up, ACT, GATED,
                     STORE_PRE)


@triton.jit
def _up_store_halves(acc_g, acc_u, rows, row_ok, col0, h_ptr, pre_ptr, INNER, n_up,
                     ACT: tl.constexpr, GATED: tl.constexpr, STORE_PRE: tl.constexpr):
    """_up_store on the two column halves of acc_g, acc_u [BLOCK_M, C] (inner columns col0 + [0, C))."""
    g_lo, g_hi = _halves(acc_g)
    u_lo, u_hi = _halves(acc_u)
    cols = col0 + tl.arange(0, acc_g.shape[1] // 2)
    _up_store(g_lo, u_lo, rows, row_ok, cols, h_ptr, pre_ptr, INNER, n_up, ACT, GATED, STORE_PRE)
    _up_store(g_hi, u_hi, rows, row_ok, cols + acc_g.shape[1] // 2, h_ptr, pre_ptr, INNER, n_up, ACT, GATED, STORE_PRE)


@triton.jit
def _up_store(acc_g, acc_u, rows, row_ok, cols, h_ptr, pre_ptr, INNER, n_up,
              ACT: tl.constexpr, GATED: tl.constexpr, STORE_PRE: tl.constexpr):
    """up_kernel's epilogue on inner columns `cols` [C]: acc_g, acc_u [BLOCK_M, C] the gate and up pre-activations
    (acc_u unused when not GATED); stores pre (STORE_PRE) and h."""
    mask = row_ok[:, None] & (cols < INNER)[None, :]
    out_ty = h_ptr.dtype.element_ty
    if STORE_PRE:
        pre_ptrs = pre_ptr + row_offset(rows, n_up)[:, None] + cols[None, :]
        tl.store(pre_ptrs, acc_g.to(out_ty), mask=mask)
        if GATED:
            tl.store(pre_ptrs + INNER, acc_u.to(out_ty), mask=mask)
    h = expert_act(acc_g, acc_u, ACT, GATED)
    tl.store(h_ptr + row_offset(rows, INNER)[:, None] + cols[None, :], h.to(out_ty), mask=mask)


@triton.jit
def rows_gemm_kernel(
    out_ptr,  # output: [R, N] by sorted row (x's dtype), or with ATOMIC [T, N] fp32/fp64 by token (+=)
    a_ptr, b_ptr, bias_ptr, weight_ptr, order_ptr, counts_ptr,  # a [R, K], B[e] [K, N] via strides, bias [E, N],
    K, N, E, stride_be, stride_bk, stride_bn,  # weight [T * TOPK], order [R] int32, counts [E] int32
    TOPK: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, ATOMIC: tl.constexpr,
    EVEN_K: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = (a[rows] @ B[e] + bias[e]) * weight[order[row]] for the rows of each expert.

    The down projection (B = w_down[e], stride_bk = H) and the input gradient (B = w_up[e]^T, read through
    transposed strides, no copy). SCALE applies the routing weight in the epilogue; ATOMIC adds each row
    into its token's output row instead of storing it (the non-deterministic combine).
    """
    e, row0, rows_left, pid_n = grouped_row_tile(tl.program_id(0), counts_ptr, E, tl.cdiv(N, BLOCK_N), E_PAD,
                                                 BLOCK_M, GROUP_M)
    if e >= E:
        return
    offs_m = tl.arange(0, BLOCK_M)
    rows = row0 + offs_m
    row_ok = offs_m < rows_left
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + row_offset(rows, K)[:, None] + offs_k[None, :]
    b_ptrs = b_ptr + row_offset(e, stride_be) + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = gemm_tile(a_ptrs, row_ok, b_ptrs, col_ok, K, stride_bk, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
    if ATOMIC:
        # An int64 offset for this load: with i32 ptxas gives sm_90's 16-bit atomic epilogue 40 more registers.
        src = tl.load(order_ptr + rows.to(tl.int64), mask=row_ok, other=0)
    elif SCALE:
        src = tl.load(order_ptr + rows, mask=row_ok, other=0)
    if SCALE:
        wt = tl.load(weight_ptr + src, mask=row_ok, other=0.0).to(acc.dtype)
    else:
        wt = tl.zeros((BLOCK_M,), acc.dtype)  # unused without SCALE
    if ATOMIC:
        dst = src // TOPK  # each row adds into its token's row
    else:
        dst = rows
    # The epilogue by column quarters, as in act_grad_kernel: a 256-column tile's stores (atomics above all) then
    # need no more registers at once than a 64-column tile's.
    lo, hi = _halves(acc)
    _rows_store_halves(lo, pid_n * BLOCK_N, dst, row_ok, e, wt, out_ptr, bias_ptr, N, HAS_BIAS, SCALE, ATOMIC)
    _rows_store_halves(hi, pid_n * BLOCK_N + BLOCK_N // 2, dst, row_ok, e, wt, out_ptr, bias_ptr, N, HAS_BIAS, SCALE,
                       ATOMIC)


@triton.jit
def _rows_store(acc, cols, dst, row_ok, e, wt, out_ptr, bias_ptr, N,
                HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, ATOMIC: tl.constexpr):
    """rows_gemm_kernel's epilogue on columns `cols` [C] of acc [BLOCK_M, C]: bias, routing weight wt [BLOCK_M],
    stored at (ATOMIC: added to) rows dst [BLOCK_M] of out."""
    col_ok = cols < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + row_offset(e, N) + cols, mask=col_ok, other=0.0).to(acc.dtype)[None, :]
    if SCALE:
        acc = acc * wt[:, None]
    mask = row_ok[:, None] & col_ok[None, :]
    ptrs = out_ptr + row_offset(dst, N)[:, None] + cols[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_store_halves(acc, col0, dst, row_ok, e, wt, out_ptr, bias_ptr, N,
                       HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, ATOMIC: tl.constexpr):
    """_rows_store on the two column halves of acc [BLOCK_M, C] (columns col0 + [0, C)), one after the other."""
    lo, hi = _halves(acc)
    cols = col0 + tl.arange(0, acc.shape[1] // 2)
    _rows_store(lo, cols, dst, row_ok, e, wt, out_ptr, bias_ptr, N, HAS_BIAS, SCALE, ATOMIC)
    _rows_store(hi, cols + acc.shape[1] // 2, dst, row_ok, e, wt, out_ptr, bias_ptr, N, HAS_BIAS, SCALE, ATOMIC)


@triton.jit
def _act_grad_cols(acc, rows, row_ok, cols, wt, pre_ptr, dpre_ptr, hw_ptr, INNER, n_up,
                   ACT: tl.constexpr, GATED: tl.constexpr, SCALE: tl.constexpr, HW: tl.constexpr):
    """act_grad_kernel's epilogue on some columns of its tile: acc [BLOCK_M, C] = u on inner columns `cols` [C]
    (int32) of rows `rows` [BLOCK_M]; wt [BLOCK_M] the rows' routing weights (SCALE). Stores dpre and (HW) h * weight,
    returns <u, h> over these columns [BLOCK_M] (the routing-weight gradient's share)."""
    acc_ty = acc.dtype
    col_ok = cols < INNER
    mask = row_ok[:, None] & col_ok[None, :]
    pre_ptrs = pre_ptr + row_offset(rows, n_up)[:, None] + cols[None, :]
    gate = tl.load(pre_ptrs, mask=mask, other=0.0).to(acc_ty)
    if GATED:
        up = tl.load(pre_ptrs + INNER, mask=mask, other=0.0).to(acc_ty)
        h = glu_fwd(gate, up, ACT)
        if act_has_params(ACT):
            # A parameterised activation's derivatives right away, so that h, dh/dgate and dh/dup, not the
            # pre-activations and the activation's intermediates, stay live across the weight-gradient reduction
            # (they spilled otherwise). swiglu and geglu keep the order and form below, which spill less for them.
            d_gate, d_up = glu_grad(gate, up, ACT)
    else:
        h = act_fwd(gate, ACT)
    out_ty = dpre_ptr.dtype.element_ty
    if HW:
        hw_ptrs = hw_ptr + row_offset(rows, INNER)[:, None] + cols[None, :]
        if SCALE:
            tl.store(hw_ptrs, (h * wt[:, None]).to(out_ty), mask=mask)
        else:
            tl.store(hw_ptrs, h.to(out_ty), mask=mask)
    part = tl.sum(tl.where(mask, acc * h, 0.0), 1)
    if SCALE:
        acc = acc * wt[:, None]
    dpre_ptrs = dpre_ptr + row_offset(rows, n_up)[:, None] + cols[None, :]
    if GATED:
        if act_has_params(ACT):
            tl.store(dpre_ptrs, (acc * d_gate).to(out_ty), mask=mask)
            tl.store(dpre_ptrs + INNER, (acc * d_up).to(out_ty), mask=mask)
        else:  # act(gate) * up
            tl.store(dpre_ptrs, (acc * up * act_grad(gate, ACT)).to(out_ty), mask=mask)
            tl.store(dpre_ptrs + INNER, (acc * act_fwd(gate, ACT)).to(out_ty), mask=mask)
    else:
        tl.store(dpre_ptrs, (acc * act_grad(gate, ACT)).to(out_ty), mask=mask)
    return part


@triton.jit
def _act_grad_quarters(acc, col0, rows, row_ok, wt, pre_ptr, dpre_ptr, hw_ptr, INNER, n_up,
                       ACT: tl.constexpr, GATED: tl.constexpr, SCALE: tl.constexpr, HW: tl.constexpr):
    """_act_grad_cols on the two column halves of acc [BLOCK_M, C] (inner columns col0 + [0, C)), one after the
    other; returns the sum of their <u, h> [BLOCK_M]."""
    lo, hi = _halves(acc)
    cols = col0 + tl.arange(0, acc.shape[1] // 2)
    part = _act_grad_cols(lo, rows, row_ok, cols, wt, pre_ptr, dpre_ptr, hw_ptr, INNER, n_up, ACT, GATED, SCALE, HW)
    part += _act_grad_cols(hi, rows, row_ok, cols + acc.shape[1] // 2, wt, pre_ptr, dpre_ptr, hw_ptr, INNER, n_up,
                           ACT, GATED, SCALE, HW)
    return part


@triton.jit
def act_grad_kernel(
    dpre_ptr, hw_ptr, dw_ptr,  # outputs: dpre [R, N_UP], HW: h * weight [R, I] (x's dtype); DW: routing-weight
    g_ptr, order_ptr, counts_ptr, weight_ptr, wd_ptr, pre_ptr, bd_ptr,  # partials [T*TOPK, NT] fp32 (zeroed);
    H, INNER, E, NT,  # g [T or R, H], w_down [E, I, H], pre [R, N_UP], b_down [E, H]; NT = cdiv(I, BLOCK_N)
    TOPK: tl.constexpr, GATHER: tl.constexpr, SCALE: tl.constexpr, DW: tl.constexpr, HW: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward through the down projection and the activation, for one tile of rows x inner columns (tiles in
    grouped order, grouped_row_tile).

    u = g[token] @ w_down[e]^T (the gradient of the unweighted expert output y, g gathered by token);
    dh = u * weight; dpre = dact(pre) applied to dh (gated: d gate = dh * dh/dgate, d up = dh * dh/dup, from
    common.glu_grad).
    h is recomputed from pre in fp32 (the forward does not keep it). HW stores h * weight (h in rows mode, SCALE
    off): the A operand of dW_down, so the weight-gradient kernel streams a plain operand and scales nothing.
    DW: the routing-weight gradient <g_t, y_row> = <u, h> + <g_t, b_down[e]> is reduced per tile into
    dw[assignment, pid_n] (<u, h> over the tile's columns plus the bias term over a 1/NT share of the hidden
    columns); the host sums the NT columns in a fixed order.
    The epilogue runs on the four column quarters of the tile one after the other (_act_grad_cols): each needs
    its own gate, up, h and derivatives, so a 128-column tile (one MMA of n = 128) holds no more at once than a
    32-column one would (whole, it spilled up to 2.5 KiB on sm_90; by quarters it takes at most 183 registers).
    """
    e, row0, rows_left, pid_n = grouped_row_tile(tl.program_id(0), counts_ptr, E, NT, E_PAD, BLOCK_M, GROUP_M)
    if e >= E:
        return
    offs_m = tl.arange(0, BLOCK_M)
    rows = row0 + offs_m
    row_ok = offs_m < rows_left
    if GATHER or SCALE or DW:
        src = tl.load(order_ptr + rows, mask=row_ok, other=0)
    if GATHER:
        tok = src // TOPK
    else:
        tok = rows
    if GATED:
        n_up = 2 * INNER
    else:
        n_up = INNER
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INNER
    offs_k = tl.arange(0, BLOCK_K)
    g_ptrs = g_ptr + row_offset(tok, H)[:, None] + offs_k[None, :]
    wd_base = wd_ptr + expert_offset(e, INNER, H)
    b_ptrs = wd_base + cols[None, :] * H + offs_k[:, None]  # w_down[e]^T: element (k, n) = w_down[e][n, k]
    acc_ty = tl.float64 if g_ptr.dtype.element_ty == tl.float64 else tl.float32
    bias_dot = tl.zeros((BLOCK_M,), acc_ty)
    if DW and HAS_BIAS:
        # This program's share of <g_t, b_down[e]>: the cdiv(H, BLOCK_K) blocks of hidden columns split among the
        # NT column tiles of the row tile, so each reads about H / NT columns of g more, and the main loop below
        # feeds its g tiles to the MMA alone (summing them there kept them in registers: spills at n = 128).
        share = tl.cdiv(tl.cdiv(H, BLOCK_K), NT) * BLOCK_K
        for k0 in range(pid_n * share, tl.minimum(pid_n * share + share, H), BLOCK_K):
            k_ok = k0 + offs_k < H
            g = tl.load(g_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(acc_ty)
            bd = tl.load(bd_ptr + row_offset(e, H) + k0 + offs_k, mask=k_ok, other=0.0).to(acc_ty)
            bias_dot += tl.sum(g * bd[None, :], 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), acc_ty)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            k_ok = offs_k < BLOCK_K
        else:
            k_ok = k0 + offs_k < H
        g = tl.load(g_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(g.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION, out_dtype=acc.dtype)
        else:
            acc = tl.dot(g, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        g_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if SCALE:
        wt = tl.load(weight_ptr + src, mask=row_ok, other=0.0).to(acc_ty)
    else:
        wt = tl.zeros((BLOCK_M,), acc_ty)  # unused without SCALE
    acc_lo, acc_hi = _halves(acc)
    part = _act_grad_quarters(acc_lo, pid_n * BLOCK_N, rows, row_ok, wt, pre_ptr, dpre_ptr, hw_ptr, INNER, n_up,
                              ACT, GATED, SCALE, HW)
    part += _act_grad_quarters(acc_hi, pid_n * BLOCK_N + BLOCK_N // 2, rows, row_ok, wt, pre_ptr, dpre_ptr, hw_ptr,
                               INNER, n_up, ACT, GATED, SCALE, HW)
    part += bias_dot
    if DW:
        tl.store(dw_ptr + row_offset(src, NT) + pid_n, part.to(dw_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def weight_grad_kernel(
    dw_ptr, db_ptr,  # outputs: dW [E, M, N] (weight dtype), db [E, N] (HAS_BIAS)
    a_ptr, b_ptr, order_ptr, counts_ptr, weight_ptr,  # a [., M] rows, b [., N] rows, order [R] int32,
    M, N, E,  # counts [E] int32, weight [T * TOPK] (DB_SCALE)
    TOPK: tl.constexpr, A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, DB_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dW[e] = sum over e's rows r of A[r]^T B[r], looping over the expert's rows (the reduction dimension), and
    (HAS_BIAS) db[e] = sum over e's rows of weight[r] * B[r] (DB_SCALE) or of B[r]. A_GATHER / B_GATHER read token
    order[r] // TOPK's row instead of row r. An expert without rows gets zeros.
      w_down: A = h * weight [R, I] (act_grad_kernel), B = output gradient gathered by token, db scaled.
      w_up:   A = x gathered, B = dpre.
    A 1-D grid, expert by expert: cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N) GEMM tiles of expert e (grouped order), then
    (HAS_BIAS) its cdiv(N, BLOCK_N) column-sum programs, so the programs running together share one expert's
    rows of A and B, read from HBM once and then from L2. The GEMM loop loads its two tiles and does one dot,
    nothing else (no scaling, no sums): Triton's pipeliner keeps BLOCK_K-row chunks of both in flight
    (num_stages buffers, cp.async) instead of waiting for every load before each MMA.
    """
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    n_gemm = tiles_m * tiles_n
    if HAS_BIAS:
        per_e = n_gemm + tiles_n
    else:
        per_e = n_gemm
    pid = tl.program_id(0)
    e = pid // per_e
    local = pid % per_e
    row0, n_e = expert_rows(e, counts_ptr, E, E_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    acc_ty = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    if HAS_BIAS and local >= n_gemm:  # column sums
        offs_n = (local - n_gemm) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        col_sum = tl.zeros((BLOCK_N,), acc_ty)
        for r0 in range(0, n_e, BLOCK_K):
            rows = row0 + r0 + offs_k
            k_ok = r0 + offs_k < n_e
            if B_GATHER or DB_SCALE:
                src = tl.load(order_ptr + rows, mask=k_ok, other=0)
            if B_GATHER:
                b_rows = src // TOPK
            else:
                b_rows = rows
            b = tl.load(b_ptr + row_offset(b_rows, N)[:, None] + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0).to(acc_ty)
            if DB_SCALE:
                b = b * tl.load(weight_ptr + src, mask=k_ok, other=0.0).to(acc_ty)[:, None]
            col_sum += tl.sum(b, 0)
        tl.store(db_ptr + row_offset(e, N) + offs_n, col_sum.to(db_ptr.dtype.element_ty), mask=n_ok)
        return
    pid_m, pid_n = grouped_tile(local, tiles_m, tiles_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), acc_ty)
    if A_GATHER or B_GATHER:
        src = tl.load(order_ptr + row0 + offs_k, mask=offs_k < n_e, other=0)
    for r0 in range(0, n_e, BLOCK_K):
        rows = row0 + r0 + offs_k
        k_ok = r0 + offs_k < n_e
        if A_GATHER or B_GATHER:
            src_next = tl.load(order_ptr + rows + BLOCK_K, mask=r0 + BLOCK_K + offs_k < n_e, other=0)
        if A_GATHER:
            a_rows = src // TOPK
        else:
            a_rows = rows
        if B_GATHER:
            b_rows = src // TOPK
        else:
            b_rows = rows
        a_t = tl.load(a_ptr + row_offset(a_rows, M)[None, :] + offs_m[:, None], mask=m_ok[:, None] & k_ok[None, :],
                      other=0.0)
        b = tl.load(b_ptr + row_offset(b_rows, N)[:, None] + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        if UPCAST:
            acc = tl.dot(a_t.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION, out_dtype=acc.dtype)
        else:
            acc = tl.dot(a_t, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        if A_GATHER or B_GATHER:
            src = src_next
    dw_ptrs = dw_ptr + expert_offset(e, M, N) + offs_m[:, None] * N + offs_n[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
