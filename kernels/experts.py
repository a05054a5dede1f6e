"""Grouped expert GEMMs (DESIGN §2.5) and their backward, over rows sorted by expert.

Rows of one expert are contiguous in the sorted order; counts_ptr [E] int32 holds rows per expert and
every kernel finds its expert from the counts on the device (common.expert_tile), so grids are sized from
an upper bound and surplus programs exit. With GATHER, sorted row r holds assignment order[r] of token
order[r] // TOPK, and the kernel loads that token's row of x (or of the output gradient) directly: no
gathered copy of x is ever made. Without GATHER the rows are already grouped (the expert-parallel path).

  up_tile, gemm_tile the tile loops (helpers, also called by the fused kernel)
  row_offset, expert_offset  int64 element offsets of rows and expert slabs (helpers, see row_offset)
  up_kernel          pre = x[rows] @ w_up[e] + b_up[e];  h = glu(gate, up)  or  act(pre)  (common.expert_act)
  rows_gemm_kernel   out = (a[rows] @ B[e] + bias[e]) * weight[row], stored by row or added to its token
  act_grad_kernel    u = g[token] @ w_down[e]^T; weight gradient <u, h> + <g, b_down>; dpre = dact(u * weight)
  weight_grad_kernel dW[e] = A[rows]^T @ B[rows] (optionally gathered / scaled), db[e] = column sums of B

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
def up_tile(a_ptrs, row_ok, w_base, b_base, cols, col_ok, H, INNER,
            GATED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One up-projection tile: (acc_gate, acc_up) [BLOCK_M, BLOCK_N] fp32 (fp64 for fp64 rows), bias included.

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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Tile (BLOCK_M sorted rows of one expert) x (BLOCK_N of the I inner columns). Gated: two accumulators,
    gate columns [0, I) and up columns [I, 2I) of the same tile, so act(gate) * up never leaves registers."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, row0, rows_left = expert_tile(pid_m, counts_ptr, E, E_PAD, BLOCK_M)
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
    if HAS_BIAS:
        b_base = b_ptr + row_offset(e, n_up)
    else:
        b_base = b_ptr
    acc_g, acc_u = up_tile(a_ptrs, row_ok, w_ptr + expert_offset(e, H, n_up), b_base, cols, col_ok, H, INNER,
                           GATED, HAS_BIAS, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = (a[rows] @ B[e] + bias[e]) * weight[order[row]] for the rows of each expert.

    The down projection (B = w_down[e], stride_bk = H) and the input gradient (B = w_up[e]^T, read through
    transposed strides, no copy). SCALE applies the routing weight in the epilogue; ATOMIC adds each row
    into its token's output row instead of storing it (the non-deterministic combine).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, row0, rows_left = expert_tile(pid_m, counts_ptr, E, E_PAD, BLOCK_M)
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
    acc_ty = acc.dtype
    if HAS_BIAS:
        acc += tl.load(bias_ptr + row_offset(e, N) + cols, mask=col_ok, other=0.0).to(acc_ty)[None, :]
    if ATOMIC:
        # An int64 offset for this load: with i32 ptxas gives sm_90's 16-bit atomic epilogue 40 more registers.
        src = tl.load(order_ptr + rows.to(tl.int64), mask=row_ok, other=0)
    elif SCALE:
        src = tl.load(order_ptr + rows, mask=row_ok, other=0)
    if SCALE:
        acc = acc * tl.load(weight_ptr + src, mask=row_ok, other=0.0).to(acc_ty)[:, None]
    mask = row_ok[:, None] & col_ok[None, :]
    if ATOMIC:
        tok = src // TOPK
        tl.atomic_add(out_ptr + row_offset(tok, N)[:, None] + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                      mask=mask)
    else:
        tl.store(out_ptr + row_offset(rows, N)[:, None] + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def act_grad_kernel(
    dpre_ptr, dw_ptr,  # outputs: dpre [R, N_UP] (x's dtype); DW: routing-weight partials [T*TOPK, NT] fp32 (zeroed)
    g_ptr, order_ptr, counts_ptr, weight_ptr, wd_ptr, pre_ptr, bd_ptr,  # g [T or R, H], w_down [E, I, H],
    H, INNER, E, NT,  # pre [R, N_UP], b_down [E, H]; NT = cdiv(I, BLOCK_N) partial columns
    TOPK: tl.constexpr, GATHER: tl.constexpr, SCALE: tl.constexpr, DW: tl.constexpr, ACT: tl.constexpr,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward through the down projection and the activation, for one tile of rows x inner columns.

    u = g[token] @ w_down[e]^T (the gradient of the unweighted expert output y, g gathered by token);
    dh = u * weight; dpre = dact(pre) applied to dh (gated: d gate = dh * dh/dgate, d up = dh * dh/dup, from
    common.glu_grad).
    DW: the routing-weight gradient <g_t, y_row> = <u, h> + <g_t, b_down[e]> is reduced per tile into
    dw[assignment, pid_n] (the bias term goes to column 0); the host sums the NT columns in a fixed order.
    h is recomputed from pre in fp32 here rather than read back.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, row0, rows_left = expert_tile(pid_m, counts_ptr, E, E_PAD, BLOCK_M)
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), acc_ty)
    bias_dot = tl.zeros((BLOCK_M,), acc_ty)
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
        if DW and HAS_BIAS:
            bd = tl.load(bd_ptr + row_offset(e, H) + k0 + offs_k, mask=k_ok, other=0.0).to(acc_ty)
            bias_dot += tl.sum(g.to(acc_ty) * bd[None, :], 1)
        g_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

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
    if DW:
        part = tl.sum(tl.where(mask, acc * h, 0.0), 1)
        if HAS_BIAS:
            if pid_n == 0:
                part += bias_dot
        tl.store(dw_ptr + row_offset(src, NT) + pid_n, part.to(dw_ptr.dtype.element_ty), mask=row_ok)
    if SCALE:
        acc = acc * tl.load(weight_ptr + src, mask=row_ok, other=0.0).to(acc_ty)[:, None]
    out_ty = dpre_ptr.dtype.element_ty
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


@triton.jit
def weight_grad_kernel(
    dw_ptr, db_ptr,  # outputs: dW [E, M, N] (weight dtype), db [E, N] (HAS_BIAS)
    a_ptr, b_ptr, order_ptr, counts_ptr, weight_ptr,  # a [., M] rows, b [., N] rows, order [R] int32,
    M, N, E,  # counts [E] int32, weight [T * TOPK]
    TOPK: tl.constexpr, A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, B_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dW[e] = sum over e's rows r of A[r]^T B[r]; one program per (output tile, expert), looping over the
    expert's rows (the reduction dimension). A_GATHER / B_GATHER read token order[r] // TOPK's row instead
    of row r; B_SCALE multiplies B's rows by the routing weight. An expert without rows gets zeros.
      w_down: A = h [R, I], B = output gradient gathered by token, scaled.   w_up: A = x gathered, B = dpre.
    db[e] = column sums of B (written by the programs of the first row of tiles).
    """
    pid = tl.program_id(0)
    e = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    row0, n_e = expert_rows(e, counts_ptr, E, E_PAD)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc_ty = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), acc_ty)
    col_sum = tl.zeros((BLOCK_N,), acc_ty)
    for r0 in range(0, n_e, BLOCK_K):
        rows = row0 + r0 + offs_k
        k_ok = r0 + offs_k < n_e
        if A_GATHER or B_GATHER or B_SCALE:
            src = tl.load(order_ptr + rows, mask=k_ok, other=0)
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
        if B_SCALE:
            w = tl.load(weight_ptr + src, mask=k_ok, other=0.0).to(acc_ty)
            b = (b.to(acc_ty) * w[:, None]).to(b_ptr.dtype.element_ty)
        if UPCAST:
            acc = tl.dot(a_t.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION, out_dtype=acc.dtype)
        else:
            acc = tl.dot(a_t, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        if HAS_BIAS:
            col_sum += tl.sum(b.to(acc_ty), 0)
    out_mask = m_ok[:, None] & n_ok[None, :]
    dw_ptrs = dw_ptr + expert_offset(e, M, N) + offs_m[:, None] * N + offs_n[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=out_mask)
    if HAS_BIAS:
        if pid_m == 0:
            tl.store(db_ptr + row_offset(e, N) + offs_n, col_sum.to(db_ptr.dtype.element_ty), mask=n_ok)
