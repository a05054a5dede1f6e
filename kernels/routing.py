"""Routing kernels (DESIGN §2.1-4): scores and top-k selection, expert counts, sort by expert, capacity.

Pipeline on the device, no host read in between:
  select_topk      the routing math of a block of tokens (a helper, also called by the fused kernel)
  route_kernel     logits -> scores, topk ids/weights, per-expert counts (before capacity)
  sort_kernel      ids (+ kept flags) and counts -> order (flat assignment of each sorted row), slot_of
  capacity_kernel  order before capacity -> kept flags (the C best assignments of every expert)
  count_kernel     ids (+ kept flags) -> per-expert counts, for routing the caller supplied
Assignment i = t * TOPK + j is token t's j-th choice.
"""

import triton
import triton.language as tl

from .common import expert_rows


@triton.jit
def route_kernel(
    ids_ptr, weights_ptr, scores_ptr, counts_ptr,  # outputs: [T, TOPK] int64, [T, TOPK], [T, E], [E] int32 (+=)
    logits_ptr, bias_ptr,  # inputs: [T, E] fp32/fp64 router logits, [E] fp32 selection bias (or None)
    T, scale_hi, scale_lo,
    E: tl.constexpr, TOPK: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
    E_PAD: tl.constexpr, K_PAD: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program routes BLOCK_T tokens.

    scores = softmax(logits) or sigmoid(logits); sel = scores (+ bias). With GROUPS > 1 only experts of the
    TOPK_GROUPS groups with the largest top-2 sum of sel can be chosen. Top-k over sel, ties to the lower
    expert id (and to the lower group id); a NaN counts as larger than every number, as in torch.sort.
    weights = scores at the chosen experts, divided by their sum when RENORM, times the scaling factor
    (scale_hi, plus scale_lo, its fp32 remainder, for fp64 weights).
    counts[e] += chosen assignments of e in this block (one atomic per expert per program).
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    ex = tl.arange(0, E_PAD)
    ex_ok = ex < E
    mask = row_ok[:, None] & ex_ok[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * E + ex[None, :], mask=mask, other=float("-inf"))
    scores, chosen, weights, taken = select_topk(logits, row_ok, bias_ptr, scale_hi, scale_lo, E, TOPK, GROUPS,
                                                 TOPK_GROUPS, SIGMOID, HAS_BIAS, RENORM, E_PAD, K_PAD, G_PAD, BLOCK_T)
    tl.store(scores_ptr + rows[:, None] * E + ex[None, :], scores, mask=mask)
    kx = tl.arange(0, K_PAD)
    out_mask = row_ok[:, None] & (kx < TOPK)[None, :]
    tl.store(ids_ptr + rows[:, None] * TOPK + kx[None, :], chosen, mask=out_mask)
    tl.store(weights_ptr + rows[:, None] * TOPK + kx[None, :], weights, mask=out_mask)
    block_counts = tl.sum((taken & row_ok[:, None]).to(tl.int32), 0)
    tl.atomic_add(counts_ptr + ex, block_counts, mask=ex_ok & (block_counts > 0))


@triton.jit
def count_kernel(
    counts_ptr,  # output [E] int32, zero-initialised, += assignments per expert
    ids_ptr, kept_ptr,  # [N] int64 expert ids, [N] bool (or None: all count)
    N, HAS_KEPT: tl.constexpr, BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < N
    ids = tl.load(ids_ptr + idx, mask=ok, other=0)
    if HAS_KEPT:
        ok = ok & (tl.load(kept_ptr + idx, mask=ok, other=0) != 0)
    tl.atomic_add(counts_ptr + ids, 1, mask=ok)


@triton.jit
def sort_kernel(
    order_ptr, slot_ptr,  # outputs: [N] int32 sorted rows -> assignment, [N] int32 assignment -> sorted row
    ids_ptr, kept_ptr, counts_ptr,  # [N] int64, [N] bool (or None), [E] int32 kept rows per expert
    N, E, HAS_KEPT: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Counting sort, one program per expert: program e scans all assignments in order and places its own
    at rows offset[e], offset[e] + 1, ... (token order within an expert, as a stable sort gives).

    order[offset[e] + r] = i and slot_of[i] = offset[e] + r for the r-th kept assignment i of expert e;
    rows past sum(counts) stay unwritten. With HAS_KEPT, program 0 also writes slot_of = -1 for dropped
    assignments. A write never leaves expert e's rows, even if counts disagreed with the flags.
    """
    e = tl.program_id(0)
    base, n_e = expert_rows(e, counts_ptr, E, E_PAD)
    offs = tl.arange(0, BLOCK)
    filled = n_e * 0
    for start in range(0, N, BLOCK):
        idx = start + offs
        ok = idx < N
        mine = ok & (tl.load(ids_ptr + idx, mask=ok, other=-1) == e)
        if HAS_KEPT:
            kept = tl.load(kept_ptr + idx, mask=ok, other=0) != 0
            mine = mine & kept
            if e == 0:  # (a scalar condition as an `if`: the interpreter rejects it inside a mask)
                tl.store(slot_ptr + idx, tl.full((BLOCK,), -1, tl.int32), mask=ok & ~kept)
        rank = filled + tl.cumsum(mine.to(tl.int32), 0) - 1
        mine = mine & (rank < n_e)
        dest = base + rank
        tl.store(order_ptr + dest, idx.to(tl.int32), mask=mine)
        tl.store(slot_ptr + idx, dest, mask=mine)
        filled += tl.sum(mine.to(tl.int32), 0)


@triton.jit
def capacity_kernel(
    kept_ptr,  # output [N] bool: assignment survives capacity
    order_ptr, ids_ptr, weights_ptr, counts_ptr,  # dropless order [N] int32, ids [N] int64, weights [N], [E] int32
    N, E, cap, E_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """kept[i] = rank of assignment i within its expert < cap, ranking by weight descending, then by lower
    assignment (= token) index. NaN weights rank first (torch.sort's descending order), which makes the
    order total, so exactly min(count, cap) assignments of every expert are kept.

    One program ranks BLOCK_R consecutive rows of the dropless order against every row of their experts'
    segments, BLOCK_C at a time: work is sum over experts of count^2, spread over all programs.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    src = tl.load(order_ptr + rows, mask=row_ok, other=0)
    e = tl.load(ids_ptr + src, mask=row_ok, other=0)
    w = tl.load(weights_ptr + src, mask=row_ok, other=0.0)
    w = tl.where(w != w, float("inf"), w)
    ex = tl.arange(0, E_PAD)
    n = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    seg_lo = tl.sum(tl.where(ex[None, :] < e[:, None], n[None, :], 0), 1)
    seg_hi = seg_lo + tl.sum(tl.where(ex[None, :] == e[:, None], n[None, :], 0), 1)
    lo = tl.min(tl.where(row_ok, seg_lo, N), 0)
    hi = tl.max(tl.where(row_ok, seg_hi, 0), 0)
    rank = tl.zeros((BLOCK_R,), tl.int32)
    for c0 in range(lo, hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < hi
        src_c = tl.load(order_ptr + cols, mask=col_ok, other=0)
        e_c = tl.load(ids_ptr + src_c, mask=col_ok, other=-1)
        w_c = tl.load(weights_ptr + src_c, mask=col_ok, other=0.0)
        w_c = tl.where(w_c != w_c, float("inf"), w_c)
        ahead = (w_c[None, :] > w[:, None]) | ((w_c[None, :] == w[:, None]) & (src_c[None, :] < src[:, None]))
        beats = (e_c[None, :] == e[:, None]) & col_ok[None, :] & ahead
        rank += tl.sum(beats.to(tl.int32), 1)
    tl.store(kept_ptr + src, rank < cap, mask=row_ok)


@triton.jit
def select_topk(logits, row_ok, bias_ptr, scale_hi, scale_lo,
                E: tl.constexpr, TOPK: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
                E_PAD: tl.constexpr, K_PAD: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """Routing math of one block of tokens (DESIGN §2.1-3), shared by route_kernel and the fused kernel.

    logits [BLOCK_T, E_PAD] fp32/fp64 (columns >= E and rows where row_ok is False are ignored) ->
    scores [BLOCK_T, E_PAD], chosen [BLOCK_T, K_PAD] int64 expert ids (best first), weights [BLOCK_T, K_PAD],
    taken [BLOCK_T, E_PAD] bool (the chosen experts as a mask). See route_kernel for the rules.
    """
    ex = tl.arange(0, E_PAD)
    ex_ok = ex < E
    logits = tl.where(ex_ok[None, :], logits, float("-inf"))  # padding columns take no share of the softmax
    logits = tl.where(row_ok[:, None], logits, 0.0)  # rows past T: finite, so no inf - inf below
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    else:
        shifted = tl.exp(logits - tl.max(logits, 1)[:, None])
        scores = shifted / tl.sum(shifted, 1)[:, None]

    sel = scores
    if HAS_BIAS:
        sel = sel + tl.load(bias_ptr + ex, mask=ex_ok, other=0.0).to(scores.dtype)[None, :]
    # key orders the candidates: NaN above everything (torch.sort's order), padding below everything.
    key = tl.where(sel != sel, float("inf"), sel)
    key = tl.where(ex_ok[None, :], key, float("-inf"))

    if GROUPS > 1:
        GROUP_SIZE: tl.constexpr = E // GROUPS
        group_of = ex // GROUP_SIZE
        gx = tl.arange(0, G_PAD)
        group_score = tl.full((BLOCK_T, G_PAD), float("-inf"), key.dtype)
        for g in range(GROUPS):
            v = tl.where((group_of == g)[None, :], key, float("-inf"))
            top1 = tl.max(v, 1)
            score = top1
            if GROUP_SIZE > 1:
                first = tl.min(tl.where(v == top1[:, None], ex[None, :], E_PAD), 1)
                score += tl.max(tl.where(ex[None, :] == first[:, None], float("-inf"), v), 1)
            group_score = tl.where((gx == g)[None, :], score[:, None], group_score)
        group_taken = tl.zeros((BLOCK_T, G_PAD), tl.int1)
        allowed = tl.zeros((BLOCK_T, E_PAD), tl.int1)
        for _ in range(TOPK_GROUPS):
            cand = tl.where(group_taken | (gx >= GROUPS)[None, :], float("-inf"), group_score)
            best = tl.max(cand, 1)
            pick = (cand == best[:, None]) & ~group_taken & (gx < GROUPS)[None, :]
            g_best = tl.minimum(tl.min(tl.where(pick, gx[None, :], G_PAD), 1), GROUPS - 1)
            group_taken = group_taken | (gx[None, :] == g_best[:, None])
            allowed = allowed | (group_of[None, :] == g_best[:, None])
        key = tl.where(allowed, key, float("-inf"))

    kx = tl.arange(0, K_PAD)
    taken = tl.zeros((BLOCK_T, E_PAD), tl.int1)
    chosen = tl.zeros((BLOCK_T, K_PAD), tl.int64)
    weights = tl.zeros((BLOCK_T, K_PAD), scores.dtype)
    for j in range(TOPK):
        cand = tl.where(taken, float("-inf"), key)
        best = tl.max(cand, 1)
        pick = (cand == best[:, None]) & ~taken & ex_ok[None, :]
        # The clamp only guards memory if every candidate were -inf; top_k <= reachable experts prevents it.
        e_best = tl.minimum(tl.min(tl.where(pick, ex[None, :], E_PAD), 1), E - 1)
        hit = ex[None, :] == e_best[:, None]
        taken = taken | hit
        s_best = tl.sum(tl.where(hit, scores, 0.0), 1)
        chosen = tl.where((kx == j)[None, :], e_best.to(tl.int64)[:, None], chosen)
        weights = tl.where((kx == j)[None, :], s_best[:, None], weights)

    if RENORM:
        if TOPK == 1:
            weights = weights / weights  # exactly 1 (NaN stays NaN), as the reference computes it
        else:
            weights = weights / tl.sum(weights, 1)[:, None]
    if weights.dtype == tl.float64:
        weights = weights * scale_hi + weights * scale_lo
    else:
        weights = weights * scale_hi
    return scores, chosen, weights, taken
