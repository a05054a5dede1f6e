"""Routing kernels (DESIGN §2.1-4): scores and top-k selection, the sort by expert, capacity.

The sort is a counting sort over blocks of BT tokens (every launch of one call uses the same BT), in three steps
that no program waits on: each block counts its assignments per expert into a block table [NB, E]; the last
program to finish (a ticket counter) scans the table into per-block offsets, the counts and the stats; then each
block places its assignments at (first row of the expert) + (offset of the block) + (rank within the block), in
token order within an expert, as a stable sort gives. The fused kernel's route and dispatch tasks run the same
helpers.

Pipeline on the device, no host read in between:
  route_kernel     logits (given, or x @ router^T computed here) -> scores, topk ids/weights (kept flags when
                   dropless); block table, then (last program) counts and stats before capacity
  hist_kernel      ids (+ kept flags) of routing the caller supplied -> block table, counts, stats
  scatter_kernel   ids (+ kept flags), block table, counts -> order (flat assignment of each sorted row), slot_of
  capacity_kernel  order before capacity -> kept flags (the C best assignments of every expert) and the block
                   table, counts and stats of the kept ones
Helpers (also called by the fused kernel): select_topk, router_logits_tile, token_hits, slot_of_tile,
scan_block_table, finish_counts, last_to_finish, rank_in_expert.
Assignment i = t * TOPK + j is token t's j-th choice.
"""

import triton
import triton.language as tl


@triton.jit
def router_logits_tile(x_ptr, router_ptr, rbias_ptr, rows, row_ok, H, E: tl.constexpr, HAS_RBIAS: tl.constexpr,
                       NATIVE_DOT: tl.constexpr, E_PAD: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """logits [BT, E_PAD] = x[rows] @ router^T (+ router bias), fp32 (fp64 when x is fp64); columns >= E are 0.

    x [T, H] and router [E, H] in their own dtypes; rbias [E] any float dtype. NATIVE_DOT: x and the router are
    16-bit of one dtype, so the MMA's products are exact and its fp32 sums are what an fp32 GEMM of the
    upcast operands computes (in another order); otherwise both are upcast and multiplied in IEEE fp32/fp64.
    BT >= 16 (tl.dot's smallest M)."""
    acc_ty = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    ex = tl.arange(0, E_PAD)
    ex_ok = ex < E
    logits = tl.zeros((BT, E_PAD), acc_ty)
    kk0 = tl.arange(0, BK)
    for k0 in range(0, H, BK):
        kk = k0 + kk0
        kk_ok = kk < H
        a = tl.load(x_ptr + rows[:, None] * H + kk[None, :], mask=row_ok[:, None] & kk_ok[None, :], other=0.0)
        w = tl.load(router_ptr + ex[None, :].to(tl.int64) * H + kk[:, None], mask=kk_ok[:, None] & ex_ok[None, :],
                    other=0.0)
        if NATIVE_DOT:
            logits = tl.dot(a, w, logits, out_dtype=logits.dtype)
        else:
            logits = tl.dot(a.to(acc_ty), w.to(acc_ty), logits, input_precision="ieee", out_dtype=logits.dtype)
    if HAS_RBIAS:
        logits += tl.load(rbias_ptr + ex, mask=ex_ok, other=0.0).to(acc_ty)[None, :]
    return logits


@triton.jit
def slot_of_tile(tile, j, K_PAD: tl.constexpr):
    """Column j of a [BT, K_PAD] tile (ids or 0/1 flags), as a [BT] vector."""
    return tl.sum(tl.where((tl.arange(0, K_PAD) == j)[None, :], tile, 0), 1)


@triton.jit
def token_hits(ids, ok, TOPK: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr, BT: tl.constexpr):
    """ids [BT, K_PAD] int32 expert ids, ok [BT, K_PAD] int32 0/1 (the assignments that count) -> hits [BT, E_PAD]
    int32: how many of each token's counted assignments go to each expert (a token may repeat an expert in routing
    the caller supplied)."""
    ex = tl.arange(0, E_PAD)
    hits = tl.zeros((BT, E_PAD), tl.int32)
    for j in tl.static_range(TOPK):
        e_j = slot_of_tile(ids, j, K_PAD)
        ok_j = slot_of_tile(ok, j, K_PAD) != 0
        hits += ((ex[None, :] == e_j[:, None]) & ok_j[:, None]).to(tl.int32)
    return hits


@triton.jit
def last_to_finish(ticket_ptr, n):
    """Whether this program is the last of `n` to arrive at the ticket word (int32, zero before the launch). Every
    write the program made before is visible to the one that gets True: the barrier orders all its threads' writes
    before the arrival, an acq_rel atomic (one thread's; its result is every thread's, so the branch on it is
    uniform)."""
    tl.debug_barrier()
    return tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == n - 1


@triton.jit
def scan_block_table(table_ptr, NB, E, E_PAD: tl.constexpr, CB: tl.constexpr):
    """In place, table [NB, E] int32 of per-block counts -> exclusive per-block offsets within each expert (the
    rows of expert e that earlier blocks hold); returns the column sums [E_PAD] int32 (0 past E). Starts with a
    barrier: the caller's arrival was one thread's acquire."""
    tl.debug_barrier()
    ex = tl.arange(0, E_PAD)
    ex_ok = ex < E
    cb = tl.arange(0, CB)
    running = tl.zeros((E_PAD,), tl.int32)
    for c0 in range(0, NB, CB):
        blk = c0 + cb
        m = (blk < NB)[:, None] & ex_ok[None, :]
        ptrs = table_ptr + blk.to(tl.int64)[:, None] * E + ex[None, :]
        tile = tl.load(ptrs, mask=m, other=0)
        tl.store(ptrs, tl.cumsum(tile, 0) - tile + running[None, :], mask=m)
        running += tl.sum(tile, 0)
    return running


@triton.jit
def finish_counts(table_ptr, counts_ptr, stats_ptr, NB, E, total, E_PAD: tl.constexpr, CB: tl.constexpr):
    """The last program's step: scan the block table (scan_block_table), then counts [E] int32 and stats [E + 1]
    int64 (tokens per expert, then `total` - their sum: the dropped assignments)."""
    counts = scan_block_table(table_ptr, NB, E, E_PAD, CB)
    ex = tl.arange(0, E_PAD)
    tl.store(counts_ptr + ex, counts, mask=ex < E)
    tl.store(stats_ptr + ex, counts.to(tl.int64), mask=ex < E)
    tl.store(stats_ptr + E, total.to(tl.int64) - tl.sum(counts, 0).to(tl.int64))


@triton.jit
def route_kernel(
    ids_ptr, weights_ptr, scores_ptr, table_ptr, counts_ptr, stats_ptr,  # outputs (see below)
    kept_ptr,  # [T, TOPK] bool output, all True (WRITE_KEPT: dropless, where nothing else writes the flags)
    logits_ptr,  # [T, E] fp32/fp64 router logits: input, or output when COMPUTE
    ticket_ptr,  # [1] int32, zero before the launch
    x_ptr, router_ptr, rbias_ptr,  # COMPUTE only: x [T, H], router [E, H], router bias [E] (or None)
    bias_ptr,  # [E] fp32 selection bias (or None)
    T, H, NB, scale_hi, scale_lo,
    E: tl.constexpr, TOPK: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, COMPUTE: tl.constexpr,
    HAS_RBIAS: tl.constexpr, NATIVE_DOT: tl.constexpr, WRITE_KEPT: tl.constexpr,
    E_PAD: tl.constexpr, K_PAD: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    CB: tl.constexpr,
):
    """One program routes BLOCK_T tokens (NB programs).

    COMPUTE: logits = x @ router^T (+ router bias) here (router_logits_tile), written to logits_ptr; else read.
    scores = softmax(logits) or sigmoid(logits); sel = scores (+ bias). With GROUPS > 1 only experts of the
    TOPK_GROUPS groups with the largest top-2 sum of sel can be chosen. Top-k over sel, ties to the lower
    expert id (and to the lower group id); a NaN counts as larger than every number, as in torch.sort.
    weights = scores at the chosen experts, divided by their sum when RENORM, times the scaling factor
    (scale_hi, plus scale_lo, its fp32 remainder, for fp64 weights).
    Outputs: ids [T, TOPK] int64, weights [T, TOPK] and scores [T, E] in the logits' dtype; table [NB, E] int32
    (exclusive per-block offsets once the last program has scanned it), counts [E] int32 and stats [E + 1] int64
    (tokens per expert, dropped = 0), all before capacity.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    ex = tl.arange(0, E_PAD)
    ex_ok = ex < E
    mask = row_ok[:, None] & ex_ok[None, :]
    if COMPUTE:
        logits = router_logits_tile(x_ptr, router_ptr, rbias_ptr, rows, row_ok, H, E, HAS_RBIAS, NATIVE_DOT, E_PAD,
                                    BLOCK_T, BLOCK_K)
        tl.store(logits_ptr + rows[:, None] * E + ex[None, :], logits, mask=mask)
    else:
        logits = tl.load(logits_ptr + rows[:, None] * E + ex[None, :], mask=mask, other=float("-inf"))
    scores, chosen, weights, taken = select_topk(logits, row_ok, bias_ptr, scale_hi, scale_lo, E, TOPK, GROUPS,
                                                 TOPK_GROUPS, SIGMOID, HAS_BIAS, RENORM, E_PAD, K_PAD, G_PAD, BLOCK_T)
    tl.store(scores_ptr + rows[:, None] * E + ex[None, :], scores, mask=mask)
    kx = tl.arange(0, K_PAD)
    out_mask = row_ok[:, None] & (kx < TOPK)[None, :]
    tl.store(ids_ptr + rows[:, None] * TOPK + kx[None, :], chosen, mask=out_mask)
    tl.store(weights_ptr + rows[:, None] * TOPK + kx[None, :], weights, mask=out_mask)
    if WRITE_KEPT:
        tl.store(kept_ptr + rows[:, None] * TOPK + kx[None, :], tl.full((BLOCK_T, K_PAD), 1, tl.int1), mask=out_mask)
    block_counts = tl.sum((taken & row_ok[:, None]).to(tl.int32), 0)
    tl.store(table_ptr + pid.to(tl.int64) * E + ex, block_counts, mask=ex_ok)
    if last_to_finish(ticket_ptr, NB):
        finish_counts(table_ptr, counts_ptr, stats_ptr, NB, E, T * TOPK, E_PAD, CB)


@triton.jit
def _block_slots(ids_ptr, kept_ptr, b, T, E, TOPK: tl.constexpr, HAS_KEPT: tl.constexpr, E_PAD: tl.constexpr,
                 K_PAD: tl.constexpr, BT: tl.constexpr):
    """Token block b of routing the caller supplied or routed: (rows [BT] int64, row_ok [BT], ids [BT, K_PAD] int32,
    ok [BT, K_PAD] int32 0/1, hits [BT, E_PAD] int32 from token_hits). ok marks the assignments that count (in
    range, and kept when HAS_KEPT); ids outside [0, E) never count (their slot is E, no expert's)."""
    rows = b.to(tl.int64) * BT + tl.arange(0, BT)
    row_ok = rows < T
    kx = tl.arange(0, K_PAD)
    in_range = row_ok[:, None] & (kx < TOPK)[None, :]
    offs = rows[:, None] * TOPK + kx[None, :]
    ids = tl.load(ids_ptr + offs, mask=in_range, other=E).to(tl.int32)
    ok = in_range & (ids >= 0) & (ids < E)
    if HAS_KEPT:
        ok = ok & (tl.load(kept_ptr + offs, mask=in_range, other=0) != 0)
    ok = ok.to(tl.int32)
    return rows, row_ok, ids, ok, token_hits(ids, ok, TOPK, E_PAD, K_PAD, BT)


@triton.jit
def hist_kernel(
    table_ptr, counts_ptr, stats_ptr,  # outputs: [NB, E] int32 block table (offsets), [E] int32, [E + 1] int64
    ticket_ptr,  # [1] int32, zero before the launch
    ids_ptr, kept_ptr,  # [T, TOPK] int64 expert ids, [T, TOPK] bool (or None: all count)
    T, NB, E, TOPK: tl.constexpr, HAS_KEPT: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, CB: tl.constexpr,
):
    """Routing the caller supplied: block b's kept assignments per expert -> table[b]; the last program scans it
    (finish_counts: counts, stats with dropped = T * TOPK - kept)."""
    pid = tl.program_id(0)
    rows, row_ok, ids, ok, hits = _block_slots(ids_ptr, kept_ptr, pid, T, E, TOPK, HAS_KEPT, E_PAD, K_PAD, BLOCK_T)
    ex = tl.arange(0, E_PAD)
    tl.store(table_ptr + pid.to(tl.int64) * E + ex, tl.sum(hits, 0), mask=ex < E)
    if last_to_finish(ticket_ptr, NB):
        finish_counts(table_ptr, counts_ptr, stats_ptr, NB, E, T * TOPK, E_PAD, CB)


@triton.jit
def scatter_kernel(
    order_ptr, slot_ptr,  # outputs: [T*TOPK] int32 sorted row -> assignment, assignment -> sorted row (-1: not
                          # kept)
    ids_ptr, kept_ptr,  # [T, TOPK] int64, [T, TOPK] bool (or None: all count)
    table_ptr, counts_ptr,  # [NB, E] int32 per-block offsets (scanned), [E] int32 rows per expert
    T, E, TOPK: tl.constexpr, HAS_KEPT: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Block b places its counted assignments: sorted row = (first row of expert e) + table[b, e] + (assignments of
    e in earlier tokens of the block) + (earlier choices of e by the same token), i.e. token order within an expert.
    Rows past sum(counts) stay unwritten; a row is never written twice."""
    pid = tl.program_id(0)
    rows, row_ok, ids, ok, hits = _block_slots(ids_ptr, kept_ptr, pid, T, E, TOPK, HAS_KEPT, E_PAD, K_PAD, BLOCK_T)
    ex = tl.arange(0, E_PAD)
    ex_ok = ex < E
    counts = tl.load(counts_ptr + ex, mask=ex_ok, other=0)
    first = tl.cumsum(counts, 0) - counts + tl.load(table_ptr + pid.to(tl.int64) * E + ex, mask=ex_ok, other=0)
    before = tl.cumsum(hits, 0) - hits + first[None, :]
    for j in tl.static_range(TOPK):
        e_j = slot_of_tile(ids, j, K_PAD)
        ok_j = slot_of_tile(ok, j, K_PAD) != 0
        sel = (ex[None, :] == e_j[:, None]) & ok_j[:, None]
        pos = tl.sum(tl.where(sel, before, 0), 1)
        before += sel.to(tl.int32)  # the token's next choice of the same expert goes one row further
        a = rows * TOPK + j
        tl.store(order_ptr + pos, a.to(tl.int32), mask=row_ok & ok_j)
        tl.store(slot_ptr + a, tl.where(ok_j, pos, -1), mask=row_ok)


@triton.jit
def rank_in_expert(order_ptr, ids_ptr, weights_ptr, src, e, row_ok, seg_lo, seg_hi, N,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Capacity rank (DESIGN §2.4) of BLOCK_R rows of the dropless order: for each row (assignment src [BLOCK_R], its
    expert e int32, its expert's segment [seg_lo, seg_hi) of the order), how many assignments of the same expert come
    first: a higher weight, or the same weight and a lower assignment (= token) index. NaN weights count as +inf (first,
    as torch.sort's descending order), which makes the order total. Shared by capacity_kernel and the fused kernel's
    stage tasks; the columns scanned are the union of the rows' segments, BLOCK_C at a time."""
    w = tl.load(weights_ptr + src, mask=row_ok, other=0.0)
    w = tl.where(w != w, float("inf"), w)
    lo = tl.min(tl.where(row_ok, seg_lo, N), 0)
    hi = tl.max(tl.where(row_ok, seg_hi, 0), 0)
    rank = tl.zeros((BLOCK_R,), tl.int32)
    for c0 in range(lo, hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < hi
        src_c = tl.load(order_ptr + cols, mask=col_ok, other=0)
        e_c = tl.load(ids_ptr + src_c, mask=col_ok, other=-1).to(tl.int32)
        w_c = tl.load(weights_ptr + src_c, mask=col_ok, other=0.0)
        w_c = tl.where(w_c != w_c, float("inf"), w_c)
        ahead = (w_c[None, :] > w[:, None]) | ((w_c[None, :] == w[:, None]) & (src_c[None, :] < src[:, None]))
        rank += tl.sum(((e_c[None, :] == e[:, None]) & col_ok[None, :] & ahead).to(tl.int32), 1)
    return rank


@triton.jit
def capacity_kernel(
    kept_ptr,  # output [N] bool: assignment survives capacity
    table_ptr, counts_out_ptr, stats_ptr,  # outputs: [NB, E] int32 (zero before the launch), [E] int32, [E+1] int64
    ticket_ptr,  # [1] int32, zero before the launch
    order_ptr, ids_ptr, weights_ptr, counts_ptr,  # dropless order [N] int32, ids [N] int64, weights [N], [E] int32
    N, E, cap, NB, TOPK: tl.constexpr, E_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr, CB: tl.constexpr,
):
    """kept[i] = rank of assignment i within its expert < cap, ranking by weight descending, then by lower
    assignment (= token) index. NaN weights rank first (torch.sort's descending order), which makes the
    order total, so exactly min(count, cap) assignments of every expert are kept.

    One program ranks BLOCK_R consecutive rows of the dropless order against every row of their experts'
    segments, BLOCK_C at a time: work is sum over experts of count^2, spread over all programs. Each kept
    assignment also counts into the block table of its token's block of BLOCK_T tokens (integer atomics: the
    sums do not depend on their order), which the last program scans (finish_counts) for the scatter of the kept.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    src = tl.load(order_ptr + rows, mask=row_ok, other=0)
    e = tl.load(ids_ptr + src, mask=row_ok, other=0).to(tl.int32)
    ex = tl.arange(0, E_PAD)
    n = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    seg_lo = tl.sum(tl.where(ex[None, :] < e[:, None], n[None, :], 0), 1)
    seg_hi = seg_lo + tl.sum(tl.where(ex[None, :] == e[:, None], n[None, :], 0), 1)
    rank = rank_in_expert(order_ptr, ids_ptr, weights_ptr, src, e, row_ok, seg_lo, seg_hi, N, BLOCK_R, BLOCK_C)
    keep = rank < cap
    tl.store(kept_ptr + src, keep, mask=row_ok)
    block = (src // TOPK) // BLOCK_T
    tl.atomic_add(table_ptr + block.to(tl.int64) * E + e, 1, mask=row_ok & keep, sem="relaxed", scope="gpu")
    if last_to_finish(ticket_ptr, tl.num_programs(0)):
        finish_counts(table_ptr, counts_out_ptr, stats_ptr, NB, E, N, E_PAD, CB)


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
