"""The persistent fused MoE kernel (DESIGN §6): routing, dispatch, expert GEMMs, return and combine of one
MoE layer forward on one rank, in one launch.

A persistent grid (one program per SM on a GPU) works through six kinds of tasks, claimed one at a time
from device counters in a fixed order; a task waits only on flags and counters that tasks of an earlier
kind set, here or on a peer rank:

  ROUTE     token block b: router logits (x @ router_weight^T in fp32, or given), scores, top-k, weights;
            per-expert counts of the block into a table; loss partials. The last route task turns the
            table into per-block offsets, writes counts / stats / losses and raises the `routed` flag (the
            grid-wide barrier before sorted positions exist).
  DISPATCH  token block b: order/slot_of of its assignments (sorted by global expert, token order within
            an expert: the Triton backend's layout); a routing record per assignment bound for another rank
            (weight, code = t * top_k + slot) staged at its sorted position in this rank's own record slab;
            each token's row stored once into row t of its DISPATCH slab at every other rank owning one of its
            experts (one row per (token, rank), however many of its experts that rank owns). The last
            dispatch task copies each rank's records (sorted by its local expert) to it and signals its
            per-expert packets (seq << 32 | records). Capacity: order tasks, then stage tasks (rank, keep,
            place, stage records), then row tasks (the rows, once every kept assignment is known).
  GEMM0     first W tasks RECV(s): wait for source s's packet signals, check and copy the counts, mark s
            ready. Then (g, group): row tile g of the received packets (sources in the order me, me+1, ...; a
            tile never spans two packets), TN0 inner column tiles: h = act(x_rows @ w_up[e]) (gated:
            act(gate) * up), rows gathered from x (own tokens, by the sorted order) or from the source's
            DISPATCH slab (by the records' token index); the first group of a tile records, for each received
            (token, slot), where its output row will be (`posmap`); adds TN0 finished column tiles to row tile
            g's counter.
  GEMM1     (g, group): waits until all GEMM0 column tiles of g are done; for TN1 hidden column tiles
            y = h @ w_down[e] + b_down in the layer dtype, into the y buffer; counts finished tiles per source.
  REDUCE    (s, row block), s another rank: once every GEMM1 tile of s's rows is done, each received token's
            partial sum sum_j w_tj * y_tj over its slots on this rank (fp32/fp64, slot order), stored in the
            layer dtype into row t of this rank's RETURN slab at s; the last task of s signals s (one word).
  COMBINE   token block: waits for every RETURN signal, then out_t = sum over ranks r ascending of partial_r(t)
            (own rank: sum_j w_tj * y_tj over own slots, fp32/fp64, slot order, not rounded) (+ the
            shared-expert addend). Deterministic: every sum has a fixed order.

Sequence numbers instead of resets: `sync[EPOCH]` counts finished launches; signals of launch n carry
seq = n + 1; per-launch counters live in one of two halves of `sync` (n % 2), and launch n zeroes the other
half for launch n + 1 while it routes. `posmap` entries carry seq too. The last program to finish bumps the
epoch. So nothing is reset from the host, and a CUDA graph replays correctly.

Waits are bounded spins (GPU: %globaltimer nanoseconds; the interpreter: iterations). A wait that gives up
sets sync[ABORT] (first one wins) and writes what it waited for to `status` (code, rank, peer, region,
slot, expected seq, word seen); every later wait then returns at once and the launch drains. The host
turns the status into an error naming rank, peer and slot.

The interpreter runs a launch's programs one after another, so a program must never wait on a later
program of its own launch: the host launches PHASE = ROUTE, DISPATCH, GEMM0, GEMM1, REDUCE, COMBINE one after
another there (each phase only waits on earlier phases, or on peer processes, which run concurrently);
GPUs run PHASE = ALL. Remote writes: PUTS = "ptr" stores through peer-mapped addresses (the shm heap, or
NVLink peers of an NVSHMEM heap); PUTS = "nvshmem" stages in this rank's own segment and calls NVSHMEM's block
puts (kernels/nvshmem.py), a quiet before a task is counted done, the signal after the last.

Heap addressing (flashmoe_py/parallel/layout.py, HeapLayout): heap_rows / heap_words / heap_recw / heap_codes
are this rank's segment viewed as the layer dtype / int64 / the weights' dtype / int32; a peer's copy of an
offset is at `+ rows_delta[peer]` elements (rows; words_delta[peer] int64 words, times 8 / itemsize for the
others) (ptr), or at the same symmetric address on PE `peer` (nvshmem, addresses from heap_addr).
"""

import triton
import triton.language as tl

from . import nvshmem
from .common import expert_act
from .experts import gemm_tile, up_tile
from .routing import rank_in_expert, router_logits_tile, scan_block_table, select_topk, slot_of_tile, token_hits
from .signals import _aborted, _fail, _wait_counter, _wait_words

# PHASE values (the host uses PHASES)
PHASES = {"all": 0, "route": 1, "dispatch": 2, "gemm0": 3, "gemm1": 4, "combine": 5, "reduce": 6}
PHASE_ORDER = ("route", "dispatch", "gemm0", "gemm1", "reduce", "combine")  # the interpreter's launches
_ALL = tl.constexpr(0)
_ROUTE = tl.constexpr(1)
_DISPATCH = tl.constexpr(2)
_GEMM0 = tl.constexpr(3)
_GEMM1 = tl.constexpr(4)
_COMBINE = tl.constexpr(5)
_REDUCE = tl.constexpr(6)

# sync words (int32): header, then two halves of per-launch counters. Half layout (offsets in a half):
#   CLAIM[5] task claim counters (route, dispatch, gemm0, gemm1, combine), ROUTE_DONE, ROUTED flag, DONE
#   (finished programs), STAGE_CLAIM and ORDERED (capacity: stage-task claims, finished order tasks), STAGED
#   (finished stage tasks), ROW_CLAIM (capacity row tasks), DISPATCHED (finished row-writing tasks),
#   REDUCE_CLAIM, then per source rank s: READY[W] s decoded, SDONE[W] finished GEMM1 tiles of s's rows,
#   REDUCED[W] finished reduce tasks of s, ROWBOUND[W] 1 + the largest token index received from s; RCOUNT[E]
#   the received packet counts (copied by RECV: a peer that has finished this launch may already overwrite its
#   signal words with the next launch's), TILE[G_MAX] finished GEMM0 column tiles per row tile.
SYNC_HEADER = 8
_EPOCH = tl.constexpr(0)
_HALF0 = tl.constexpr(SYNC_HEADER)
_CLAIM = tl.constexpr(0)
_ROUTE_DONE = tl.constexpr(5)
_ROUTED = tl.constexpr(6)
_DONE = tl.constexpr(7)
_STAGE_CLAIM = tl.constexpr(8)
_ORDERED = tl.constexpr(9)
_STAGED = tl.constexpr(10)
_ROW_CLAIM = tl.constexpr(11)
_DISPATCHED = tl.constexpr(12)
_REDUCE_CLAIM = tl.constexpr(13)
_READY = tl.constexpr(14)
_FIXED_WORDS = 14
PER_SOURCE = 4  # READY, SDONE, REDUCED, ROWBOUND
_PER_SOURCE = tl.constexpr(PER_SOURCE)


def half_words(world: int, num_experts: int, max_tiles: int) -> int:
    """int32 words of one half of `sync` (the per-source counters, RCOUNT and TILE follow the fixed counters)."""
    return _FIXED_WORDS + PER_SOURCE * world + num_experts + max_tiles


# Status codes (status[0]); the host names them.
STATUS = {1: "dispatch", 2: "return", 3: "count", 4: "local"}
_ST_DISPATCH = tl.constexpr(1)  # timed out waiting for a peer's packet signal (DISPATCH region)
_ST_RETURN = tl.constexpr(2)  # timed out waiting for a peer's partial sums (RETURN region)
_ST_COUNT = tl.constexpr(3)  # a peer signalled more records than its record slab holds
_ST_LOCAL = tl.constexpr(4)  # a wait on this rank's own programs timed out (detail: which)
_MASK32 = tl.constexpr(0xFFFFFFFF)


# ----------------------------------------------------------------------------------------------------------
# Waits, failure, puts
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def slab_start(data, s, slab_elems):
    """Element offset (int64) of slab s of the heap region whose first element is `data`: DISPATCH (data0) or
    RETURN (data1), one slab per source / owner rank.

    data, s and slab_elems arrive as int32 when below 2^31 (Triton types small Python ints so), and the product
    and sum pass 2^31 at production sizes (8 ranks x 4096 tokens x k=8 x H=7168 in bf16: data1 + 2 * slab_elems
    already does), so both are widened before any arithmetic."""
    return data.to(tl.int64) + s.to(tl.int64) * slab_elems.to(tl.int64)


@triton.jit
def row_start(slab, row, H):
    """Element offset (int64) of row `row` of a slab starting at element `slab` (rows of H elements)."""
    return slab.to(tl.int64) + row.to(tl.int64) * H


@triton.jit
def _signal_remote(heap_words, words_delta_ptr, heap_addr, dst, idx, word, PUTS: tl.constexpr):
    """Release-store `word` into word idx of rank dst's segment (a peer)."""
    if PUTS == "nvshmem":
        nvshmem.signal_set(heap_addr + idx.to(tl.int64) * 8, word, dst)
    else:
        delta = tl.load(words_delta_ptr + dst)
        tl.atomic_xchg(heap_words + delta + idx, word, sem="release", scope="sys")


@triton.jit
def _copy_vec(dst_ptr, src_ptr, n, BV: tl.constexpr):
    """n elements from src_ptr to dst_ptr (1-D)."""
    v = tl.arange(0, BV)
    for i0 in range(0, n, BV):
        m = i0 + v < n
        tl.store(dst_ptr + i0 + v, tl.load(src_ptr + i0 + v, mask=m), mask=m)


@triton.jit
def _put_hit_rows(heap_addr, src_slab, dst_slab, rows, hit, dst, H, ITEM: tl.constexpr, BT: tl.constexpr):
    """nvshmem: row rows[i] (for each i with hit[i]) of this rank's slab at element offset src_slab -> the same row
    of rank dst's slab at element offset dst_slab (one block put per row; NVSHMEM's source must be symmetric,
    hence the staging in this rank's own segment)."""
    ar = tl.arange(0, BT)
    for i in range(BT):
        if tl.sum(tl.where((ar == i) & hit, 1, 0), 0) > 0:
            t = tl.sum(tl.where(ar == i, rows, 0), 0)
            nvshmem.putmem_block(heap_addr + row_start(dst_slab, t, H) * ITEM,
                                 heap_addr + row_start(src_slab, t, H) * ITEM, H.to(tl.int64) * ITEM, dst)


# ----------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _route_task(b, x_ptr, router_ptr, ebias_ptr, logits_ptr, ids_ptr, wts_ptr, scores_ptr, table_ptr, part_ptr,
                T, H, scale_hi, scale_lo,
                ROUTING: tl.constexpr, NATIVE_DOT: tl.constexpr, E: tl.constexpr, TOPK: tl.constexpr,
                GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, SIGMOID: tl.constexpr, HAS_EBIAS: tl.constexpr,
                RENORM: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr, G_PAD: tl.constexpr,
                BT: tl.constexpr, BK: tl.constexpr):
    """Route tokens [b*BT, b*BT+BT): ids/weights/scores (and logits when computed here); block counts per
    expert into table[b]; loss partials (sum of scores per expert, sum of logsumexp^2) into part[b]."""
    rows = b.to(tl.int64) * BT + tl.arange(0, BT)
    row_ok = rows < T
    ex = tl.arange(0, E_PAD)
    ex_ok = ex < E
    kx = tl.arange(0, K_PAD)
    k_mask = row_ok[:, None] & (kx < TOPK)[None, :]
    if ROUTING == "given":
        ids = tl.load(ids_ptr + rows[:, None] * TOPK + kx[None, :], mask=k_mask, other=E).to(tl.int32)
        hits = token_hits(ids, k_mask.to(tl.int32), TOPK, E_PAD, K_PAD, BT)
    else:
        mask = row_ok[:, None] & ex_ok[None, :]
        if ROUTING == "compute":
            logits = router_logits_tile(x_ptr, router_ptr, x_ptr, rows, row_ok, H, E, False, NATIVE_DOT, E_PAD, BT,
                                        BK)
            tl.store(logits_ptr + rows[:, None] * E + ex[None, :], logits, mask=mask)
        else:
            logits = tl.load(logits_ptr + rows[:, None] * E + ex[None, :], mask=mask, other=float("-inf"))
        scores, chosen, weights, taken = select_topk(logits, row_ok, ebias_ptr, scale_hi, scale_lo, E, TOPK, GROUPS,
                                                     TOPK_GROUPS, SIGMOID, HAS_EBIAS, RENORM, E_PAD, K_PAD, G_PAD, BT)
        tl.store(scores_ptr + rows[:, None] * E + ex[None, :], scores, mask=mask)
        tl.store(ids_ptr + rows[:, None] * TOPK + kx[None, :], chosen, mask=k_mask)
        tl.store(wts_ptr + rows[:, None] * TOPK + kx[None, :], weights, mask=k_mask)
        hits = (taken & row_ok[:, None]).to(tl.int32)
        # Loss partials of this block: sum_t scores[t, e] and sum_t logsumexp(logits[t])^2.
        lg = tl.where(ex_ok[None, :], logits, float("-inf"))
        lg = tl.where(row_ok[:, None], lg, 0.0)  # rows past T: finite (and masked out below)
        top = tl.max(lg, 1)
        lse = top + tl.log(tl.sum(tl.exp(lg - top[:, None]), 1))
        z_part = tl.sum(tl.where(row_ok, lse * lse, 0.0), 0)
        p_part = tl.sum(tl.where(mask, scores, 0.0), 0)
        tl.store(part_ptr + b.to(tl.int64) * (E + 1) + ex, p_part, mask=ex_ok)
        tl.store(part_ptr + b.to(tl.int64) * (E + 1) + E, z_part)
    tl.store(table_ptr + b.to(tl.int64) * E + ex, tl.sum(hits, 0), mask=ex_ok)


@triton.jit
def _finish_routing(half, table_ptr, part_ptr, counts_ptr, gstart_ptr, stats_ptr, loss_ptr,
                    NB, T, me, lb_coef, z_coef, cap,
                    ROUTING: tl.constexpr, E: tl.constexpr, EL: tl.constexpr, W: tl.constexpr,
                    TOPK: tl.constexpr, REC_BYTES: tl.constexpr, E_PAD: tl.constexpr, W_PAD: tl.constexpr,
                    CB: tl.constexpr, CAPACITY: tl.constexpr):
    """Run by the last route task: block table -> exclusive per-block offsets, counts and gstart (first sorted
    row of each expert); stats and losses; then raise the `routed` flag.
    CAPACITY: counts are min(assignments, cap) and gstart their offsets; the dropless counts and offsets (what
    the order tasks sort by) go to counts_ptr + 2E and + 3E."""
    ex = tl.arange(0, E_PAD)
    ex_ok = ex < E
    cb = tl.arange(0, CB)
    counts_all = scan_block_table(table_ptr, NB, E, E_PAD, CB)  # starts with the barrier the arrival needs
    if CAPACITY:
        tl.store(counts_ptr + 2 * E + ex, counts_all, mask=ex_ok)
        tl.store(counts_ptr + 3 * E + ex, tl.cumsum(counts_all, 0) - counts_all, mask=ex_ok)
        counts = tl.minimum(counts_all, cap)
    else:
        counts = counts_all
    gstart = tl.cumsum(counts, 0) - counts
    tl.store(counts_ptr + ex, counts, mask=ex_ok)
    tl.store(gstart_ptr + ex, gstart, mask=ex_ok)

    # stats: tokens_per_expert [E], dropped, bytes_sent, rows_per_peer [W]. Here the records and the dispatch
    # signal words; the row tasks add their rows (and rows_per_peer), the reduce tasks the partial sums returned.
    tl.store(stats_ptr + ex, counts.to(tl.int64), mask=ex_ok)
    tl.store(stats_ptr + E, tl.sum(counts_all - counts, 0).to(tl.int64))
    owner = ex // EL
    wx = tl.arange(0, W_PAD)
    tl.store(stats_ptr + E + 2 + wx, tl.zeros((W_PAD,), tl.int64), mask=wx < W)
    records = tl.sum(tl.where(ex_ok & (owner != me), counts, 0), 0).to(tl.int64)
    tl.store(stats_ptr + E + 1, records * REC_BYTES + (W - 1) * EL * 8)

    # losses [lb, z, aux]
    if ROUTING == "given":
        tl.store(loss_ptr + tl.arange(0, 4), tl.zeros((4,), loss_ptr.dtype.element_ty), mask=tl.arange(0, 4) < 3)
    else:
        acc_ty = loss_ptr.dtype.element_ty
        p_sum = tl.zeros((E_PAD,), acc_ty)
        z_sum = tl.zeros((CB,), acc_ty)
        for c0 in range(0, NB, CB):
            blk = (c0 + cb).to(tl.int64)
            p_sum += tl.sum(tl.load(part_ptr + blk[:, None] * (E + 1) + ex[None, :],
                                    mask=(blk < NB)[:, None] & ex_ok[None, :], other=0.0), 0)
            z_sum += tl.load(part_ptr + blk * (E + 1) + E, mask=blk < NB, other=0.0)
        t_den = tl.maximum(T, 1).to(acc_ty)
        f = counts_all.to(acc_ty) / (t_den * TOPK)  # before capacity, as the Triton backend's loss
        lb = E * tl.sum(f * (p_sum / t_den), 0)
        z = tl.sum(z_sum, 0) / t_den
        lb = tl.where(T > 0, lb, 0.0)
        z = tl.where(T > 0, z, 0.0)
        tl.store(loss_ptr, lb)
        tl.store(loss_ptr + 1, z)
        tl.store(loss_ptr + 2, lb_coef * lb + z_coef * z)

    tl.debug_barrier()
    tl.atomic_xchg(half + _ROUTED, 1, sem="release", scope="sys")


@triton.jit
def _dispatch_task(b, ids_ptr, wts_ptr, order_ptr, slot_ptr, table_ptr, gstart_ptr, own_recw, own_codes,
                   T, me, E: tl.constexpr, EL: tl.constexpr, W: tl.constexpr, TOPK: tl.constexpr,
                   E_PAD: tl.constexpr, K_PAD: tl.constexpr, BT: tl.constexpr, ORDER_ONLY: tl.constexpr):
    """Sorted positions of the block's assignments (order, slot_of); the routing record of each assignment bound
    for another rank (weight, code = assignment index t * top_k + j) staged at its sorted position in this rank's
    own record slab (own_recw / own_codes). The rows follow (_write_rows).
    ORDER_ONLY (capacity): only the dropless order, into the scratch order_ptr, by the dropless offsets gstart_ptr;
    the stage tasks rank, place and stage."""
    rows = b.to(tl.int64) * BT + tl.arange(0, BT)
    row_ok = rows < T
    ex = tl.arange(0, E_PAD)
    ex_ok = ex < E
    kx = tl.arange(0, K_PAD)
    in_range = row_ok[:, None] & (kx < TOPK)[None, :]
    ids = tl.load(ids_ptr + rows[:, None] * TOPK + kx[None, :], mask=in_range, other=E).to(tl.int32)
    hits = token_hits(ids, in_range.to(tl.int32), TOPK, E_PAD, K_PAD, BT)
    before = tl.cumsum(hits, 0) - hits  # assignments of each expert in earlier tokens of the block
    first = tl.load(gstart_ptr + ex, mask=ex_ok, other=0) + \
        tl.load(table_ptr + b.to(tl.int64) * E + ex, mask=ex_ok, other=0)  # first sorted row of block b per expert
    own = tl.zeros((BT, E_PAD), tl.int32)  # earlier choices of the same token (caller routing may repeat one)
    for j in tl.static_range(TOPK):
        e_j = slot_of_tile(ids, j, K_PAD)
        sel = ex[None, :] == e_j[:, None]
        pos = tl.sum(tl.where(sel, before + own + first[None, :], 0), 1)
        own += sel.to(tl.int32)
        a = rows * TOPK + j
        tl.store(order_ptr + pos, a.to(tl.int32), mask=row_ok)
        if not ORDER_ONLY:
            tl.store(slot_ptr + a, pos, mask=row_ok)
        if (W > 1) and (not ORDER_ONLY):
            remote = row_ok & (e_j // EL != me)
            tl.store(own_recw + pos, tl.load(wts_ptr + a, mask=remote), mask=remote)
            tl.store(own_codes + pos, a.to(tl.int32), mask=remote)


@triton.jit
def _write_rows(b, x_ptr, ids_ptr, slot_ptr, stats_ptr, heap_rows, rows_delta_ptr, heap_addr, T, H, me, slab_elems,
                data0, PUTS: tl.constexpr, E: tl.constexpr, EL: tl.constexpr, W: tl.constexpr, TOPK: tl.constexpr,
                ITEM: tl.constexpr, ROW_BYTES: tl.constexpr, K_PAD: tl.constexpr, BT: tl.constexpr,
                BH: tl.constexpr, CAPACITY: tl.constexpr):
    """Token block b: each token's row, once, into row t of this rank's DISPATCH slab at every other rank that owns
    one of its kept experts (CAPACITY: slot_of >= 0); the rows per rank (own included) into rows_per_peer, the
    bytes of those sent into bytes_sent."""
    rows = b.to(tl.int64) * BT + tl.arange(0, BT)
    row_ok = rows < T
    kx = tl.arange(0, K_PAD)
    k_mask = row_ok[:, None] & (kx < TOPK)[None, :]
    owner = tl.load(ids_ptr + rows[:, None] * TOPK + kx[None, :], mask=k_mask, other=0).to(tl.int32) // EL
    kept = k_mask
    if CAPACITY:
        kept = kept & (tl.load(slot_ptr + rows[:, None] * TOPK + kx[None, :], mask=k_mask, other=-1) >= 0)
    c = tl.arange(0, BH)
    own_slab = slab_start(data0, me, slab_elems)
    if PUTS == "nvshmem":  # stage the block's rows bound anywhere else once, in this rank's own DISPATCH slab
        away = tl.sum((kept & (owner != me)).to(tl.int32), 1) > 0
        for c0 in range(0, H, BH):
            m = away[:, None] & ((c0 + c) < H)[None, :]
            v = tl.load(x_ptr + rows[:, None] * H + (c0 + c)[None, :], mask=m)
            tl.store(heap_rows + own_slab + rows[:, None] * H + (c0 + c)[None, :], v, mask=m)
        tl.debug_barrier()
    sent = me * 0
    for d in range(W):
        hit = tl.sum((kept & (owner == d)).to(tl.int32), 1) > 0
        n = tl.sum(hit.to(tl.int32), 0)
        tl.atomic_add(stats_ptr + E + 2 + d, n.to(tl.int64))
        if (d != me) & (n > 0):
            sent += n
            if PUTS == "nvshmem":
                _put_hit_rows(heap_addr, own_slab, own_slab, rows, hit, d, H, ITEM, BT)
            else:
                dst = heap_rows + tl.load(rows_delta_ptr + d) + own_slab
                for c0 in range(0, H, BH):
                    m = hit[:, None] & ((c0 + c) < H)[None, :]
                    v = tl.load(x_ptr + rows[:, None] * H + (c0 + c)[None, :], mask=m)
                    tl.store(dst + rows[:, None] * H + (c0 + c)[None, :], v, mask=m)
    tl.atomic_add(stats_ptr + E + 1, sent.to(tl.int64) * ROW_BYTES)


@triton.jit
def _finish_dispatch(n_tasks, counts_ptr, gstart_ptr, half, heap_words, heap_recw, heap_codes, words_delta_ptr,
                     heap_addr, me, seq, rec0w, rec0c, rec_stride_w, rec_stride_c, sig0,
                     PUTS: tl.constexpr, E: tl.constexpr, EL: tl.constexpr, W: tl.constexpr, REC_W: tl.constexpr,
                     E_PAD: tl.constexpr, BV: tl.constexpr):
    """A row-writing task is done: the last of n_tasks copies each other rank's records (its packets, sorted by its
    local expert, at the start of this rank's record slab there) and signals every packet (seq << 32 | records),
    own ones included, empty ones with count 0."""
    if PUTS == "nvshmem":
        nvshmem.quiet()  # this task's row puts are complete before it counts itself done
    tl.debug_barrier()
    old = tl.atomic_add(half + _DISPATCHED, 1, sem="acq_rel", scope="sys")
    if old == n_tasks - 1:
        tl.debug_barrier()  # what the other tasks staged is read below, after their release seen above
        ex = tl.arange(0, E_PAD)
        ex_ok = ex < E
        counts = tl.load(counts_ptr + ex, mask=ex_ok, other=0)
        gstart = tl.load(gstart_ptr + ex, mask=ex_ok, other=0)
        if W > 1:
            own_w = slab_start(rec0w, me, rec_stride_w)
            own_c = slab_start(rec0c, me, rec_stride_c)
            for d in range(W):
                first = tl.sum(tl.where(ex == d * EL, gstart, 0), 0)
                n = tl.sum(tl.where(ex_ok & (ex // EL == d), counts, 0), 0)
                if (d != me) & (n > 0):
                    if PUTS == "nvshmem":
                        nvshmem.putmem_block(heap_addr + own_w * REC_W, heap_addr + (own_w + first) * REC_W,
                                             n.to(tl.int64) * REC_W, d)
                        nvshmem.putmem_block(heap_addr + own_c * 4, heap_addr + (own_c + first) * 4,
                                             n.to(tl.int64) * 4, d)
                    else:
                        wd = tl.load(words_delta_ptr + d)
                        _copy_vec(heap_recw + wd * (8 // REC_W) + own_w, heap_recw + own_w + first, n, BV)
                        _copy_vec(heap_codes + wd * 2 + own_c, heap_codes + own_c + first, n, BV)
            if PUTS == "nvshmem":
                nvshmem.quiet()
            tl.debug_barrier()
        for ge in range(E):
            n = tl.sum(tl.where(ex == ge, counts, 0), 0)
            dst = ge // EL
            idx = sig0 + me * EL + ge % EL
            word = (seq << 32) | n.to(tl.int64)
            if dst == me:
                tl.atomic_xchg(heap_words + idx, word, sem="release", scope="sys")
            else:
                _signal_remote(heap_words, words_delta_ptr, heap_addr, dst, idx, word, PUTS)


@triton.jit
def _stage_task(r, ids_ptr, wts_ptr, dl_order_ptr, order_ptr, slot_ptr, counts_ptr, gstart_ptr, half,
                own_recw, own_codes, T, me, cap,
                E: tl.constexpr, EL: tl.constexpr, W: tl.constexpr, TOPK: tl.constexpr,
                BRS: tl.constexpr, BCS: tl.constexpr):
    """Capacity (DESIGN §2.4): rows [r*BRS, r*BRS+BRS) of the dropless order, each ranked within its expert's
    segment (weight descending, then lower assignment index = token; NaN first, as torch.sort) as the Triton
    backend's capacity kernel ranks; the `cap` best of each expert are kept at gstart[e] + rank (so an expert's
    rows lie in rank order), the others get slot -1. The records of kept assignments for other ranks are staged
    at their sorted positions; the row tasks follow once every stage task is done. Work: the sum over experts of
    count^2, BRS x BCS at a time."""
    n_all = T * TOPK
    rows = r * BRS + tl.arange(0, BRS)
    row_ok = rows < n_all
    a = tl.load(dl_order_ptr + rows, mask=row_ok, other=0)
    e = tl.load(ids_ptr + a, mask=row_ok, other=0).to(tl.int32)
    seg_lo = tl.load(counts_ptr + 3 * E + e, mask=row_ok, other=0)  # dropless offsets and counts
    seg_hi = seg_lo + tl.load(counts_ptr + 2 * E + e, mask=row_ok, other=0)
    rank = rank_in_expert(dl_order_ptr, ids_ptr, wts_ptr, a, e, row_ok, seg_lo, seg_hi, n_all, BRS, BCS)
    kept = row_ok & (rank < cap)
    pos = tl.load(gstart_ptr + e, mask=row_ok, other=0) + rank
    tl.store(order_ptr + pos, a, mask=kept)
    tl.store(slot_ptr + a, tl.where(kept, pos, -1), mask=row_ok)
    if W > 1:
        remote = kept & (e // EL != me)
        tl.store(own_recw + pos, tl.load(wts_ptr + a, mask=remote), mask=remote)
        tl.store(own_codes + pos, a, mask=remote)
    tl.debug_barrier()
    tl.atomic_add(half + _STAGED, 1, sem="release", scope="gpu")


@triton.jit
def _recv_task(s, sync_ptr, half, status_addr, heap_words, me, seq, slab_records, sig0, sig1, limit,
               USE_TIMER: tl.constexpr, W: tl.constexpr, EL: tl.constexpr, clock, WAIT_LANES: tl.constexpr):
    """Wait for source s's DISPATCH signals (every packet, empty ones too), check the counts and copy them to
    RCOUNT, mark s ready. RECV(me) with no own rows sets this rank's own RETURN word (the combine waits on all W)."""
    arrived, slot, seen, w = _wait_words(heap_words + sig0 + s * EL, EL, seq, sync_ptr, limit, USE_TIMER, clock,
                                         WAIT_LANES)
    if arrived == 0:
        _fail(sync_ptr, status_addr, _ST_DISPATCH, me, s, 0, slot, seq, seen)
    # Decisions on the counts use the wait's lanes (one per thread: uniform reductions), not a vector of EL_PAD,
    # which each warp would hold, load and reduce on its own.
    lanes = tl.arange(0, WAIT_LANES)
    cnt = tl.where(lanes < EL, w & _MASK32, 0)
    tl.store(half + _READY + _PER_SOURCE * W + s * EL + lanes, cnt.to(tl.int32), mask=lanes < EL)
    total = tl.sum(cnt, 0)
    if arrived & (s != me) & (total > slab_records):  # own packets are counts of this rank's sorted rows
        _fail(sync_ptr, status_addr, _ST_COUNT, me, s, 0, -1, slab_records, total)
    if (s == me) & (total == 0):  # no own rows, so no GEMM1 task to say they are done (_gemm1_task)
        tl.atomic_xchg(heap_words + sig1 + me, seq << 32, sem="release", scope="gpu")
    tl.debug_barrier()
    tl.atomic_xchg(half + _READY + s, 1, sem="release", scope="sys")


@triton.jit
def _decode(g, sync_ptr, half, me, limit,
            USE_TIMER: tl.constexpr, W: tl.constexpr, EL: tl.constexpr, EL_PAD: tl.constexpr, BM: tl.constexpr,
            clock):
    """Row tile g of the received packets -> (found, source, local expert, tile of the packet, packet rows,
    first slab row of the packet, first h row of the source). found = 0 past the last tile (every source
    decoded), -1 after an abort. Sources in the order me, me+1, ...: own rows first, available soonest."""
    ev = tl.arange(0, EL_PAD)
    e_ok = ev < EL
    zero = me * 0
    found = zero
    s_f = zero
    el_f = zero
    m_f = zero
    n_f = zero
    pst_f = zero
    hb_f = zero
    base_t = zero
    base_r = zero
    for i in tl.static_range(W):
        s = (me + i) % W
        if found == 0:
            ready = _wait_counter(half + _READY + s, 1, sync_ptr, limit, USE_TIMER, clock)
            if ready & (_aborted(sync_ptr) == 0):
                cnt = tl.load(half + _READY + _PER_SOURCE * W + s * EL + ev, mask=e_ok, other=0)
                tiles = (cnt + BM - 1) // BM
                tot = tl.sum(tiles, 0)
                if g < base_t + tot:
                    local = g - base_t
                    el = tl.sum(((tl.cumsum(tiles, 0) <= local) & e_ok).to(tl.int32), 0)
                    found = zero + 1
                    s_f = zero + s
                    el_f = el
                    m_f = local - tl.sum(tl.where(ev < el, tiles, 0), 0)
                    n_f = tl.sum(tl.where(ev == el, cnt, 0), 0)
                    pst_f = tl.sum(tl.where(ev < el, cnt, 0), 0)
                    hb_f = base_r
                base_t += tot
                base_r += tl.sum(cnt, 0)
            else:
                found = zero - 1
    return found, s_f, el_f, m_f, n_f, pst_f, hb_f


@triton.jit
def _gemm0_task(g, n_lo, n_hi, s, el, m, n_e, pst, hbase, half, x_ptr, order_ptr, gstart_ptr, heap_rows, heap_codes,
                posmap_ptr, w_up_ptr, b_up_ptr, h_ptr, pre_ptr, H, INNER, me, seq, slab_rows, slab_elems, data0,
                rec0c, rec_stride_c,
                W: tl.constexpr, EL: tl.constexpr, TOPK: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
                HAS_BIAS: tl.constexpr, SAVE_PRE: tl.constexpr, EVEN_K: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """h[rows of tile g, inner column tiles n_lo..n_hi-1] = act(rows @ w_up[el] + b_up[el]); then counts those
    column tiles as finished for row tile g. Rows of another rank: record pst + r of its record slab names the
    token (code // top_k) whose row it put into row `token` of its DISPATCH slab here, and the slot; the first
    column group (n_lo == 0) writes posmap[s, token, slot] = seq << 32 | record and raises ROWBOUND[s]."""
    offs_m = tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    r_loc = m * BM + offs_m
    row_ok = offs_m < n_e - m * BM
    hrow = (hbase + pst + r_loc).to(tl.int64)
    if W == 1:
        is_own = True
    else:
        is_own = s == me
    if is_own:  # own tokens: gather rows of x by the sorted order (no copy of x)
        first = tl.load(gstart_ptr + me * EL)
        a_idx = tl.load(order_ptr + first + pst + r_loc, mask=row_ok, other=0)
        tok = (a_idx // TOPK).to(tl.int64)
        a_ptrs = x_ptr + tok[:, None] * H + offs_k[None, :]
    else:  # the rows another rank put into this rank's DISPATCH slab, one per (token, rank), named by the records
        rec = pst + r_loc
        code = tl.load(heap_codes + slab_start(rec0c, s, rec_stride_c) + rec, mask=row_ok, other=0)
        tok = (code // TOPK).to(tl.int64)
        row_ok = row_ok & (tok >= 0) & (tok < slab_rows)  # a corrupt record never reads or writes out of bounds
        a_ptrs = heap_rows + slab_start(data0, s, slab_elems) + tok.to(tl.int64)[:, None] * H + offs_k[None, :]
        if n_lo == 0:
            slot = code % TOPK
            pm = (s.to(tl.int64) * slab_rows + tok) * TOPK + slot
            tl.store(posmap_ptr + pm, (seq << 32) | rec.to(tl.int64), mask=row_ok)
            top = tl.max(tl.where(row_ok, tok + 1, 0), 0).to(tl.int32)
            tl.atomic_max(half + _READY + 3 * W + s, top, sem="relaxed", scope="gpu")
    if GATED:
        n_up = 2 * INNER
    else:
        n_up = INNER
    if HAS_BIAS:
        b_base = b_up_ptr + el.to(tl.int64) * n_up
    else:
        b_base = b_up_ptr
    out_ty = h_ptr.dtype.element_ty
    for n0 in range(n_lo, n_hi):
        cols = n0 * BN + tl.arange(0, BN)
        col_ok = cols < INNER
        acc_g, acc_u = up_tile(a_ptrs, row_ok, w_up_ptr + el.to(tl.int64) * H * n_up, b_base, cols, col_ok, H,
                               INNER, GATED, HAS_BIAS, EVEN_K, BM, BN, BK, UPCAST, PRECISION)
        mask = row_ok[:, None] & col_ok[None, :]
        if SAVE_PRE:
            pre_ptrs = pre_ptr + hrow[:, None] * n_up + cols[None, :]
            tl.store(pre_ptrs, acc_g.to(out_ty), mask=mask)
            if GATED:
                tl.store(pre_ptrs + INNER, acc_u.to(out_ty), mask=mask)
        h = expert_act(acc_g, acc_u, ACT, GATED)
        tl.store(h_ptr + hrow[:, None] * INNER + cols[None, :], h.to(out_ty), mask=mask)
    tl.debug_barrier()
    tl.atomic_add(half + _READY + _PER_SOURCE * W + W * EL + g, n_hi - n_lo, sem="release", scope="gpu")


@triton.jit
def _gemm1_task(g, n_lo, n_hi, s, el, m, n_e, pst, hbase, half, h_ptr, y_ptr, w_down_ptr, b_down_ptr, heap_words, H,
                INNER, me, seq, sig1, NB1,
                W: tl.constexpr, EL: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                EL_PAD: tl.constexpr):
    """y[rows of tile g, hidden column tiles n_lo..n_hi-1] = h @ w_down[el] + b_down[el] in the layer dtype (y has
    h's rows); then counts those tiles as finished for source s (SDONE). The task finishing this rank's own rows
    release-stores its own RETURN word: the combine reads those y rows itself."""
    offs_m = tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    r_loc = m * BM + offs_m
    row_ok = offs_m < n_e - m * BM
    hrow = (hbase + pst + r_loc).to(tl.int64)
    a_ptrs = h_ptr + hrow[:, None] * INNER + offs_k[None, :]
    for n1 in range(n_lo, n_hi):
        cols = n1 * BN + tl.arange(0, BN)
        col_ok = cols < H
        b_ptrs = w_down_ptr + el.to(tl.int64) * INNER * H + offs_k[:, None] * H + cols[None, :]
        acc = gemm_tile(a_ptrs, row_ok, b_ptrs, col_ok, INNER, H, EVEN_K, BM, BN, BK, UPCAST, PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_down_ptr + el.to(tl.int64) * H + cols, mask=col_ok, other=0.0).to(acc.dtype)[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        tl.store(y_ptr + hrow[:, None] * H + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    done = tl.atomic_add(half + _READY + W + s, n_hi - n_lo, sem="acq_rel", scope="gpu") + (n_hi - n_lo)
    if s == me:
        ev = tl.arange(0, EL_PAD)
        cnt = tl.load(half + _READY + _PER_SOURCE * W + me * EL + ev, mask=ev < EL, other=0)
        if done == tl.sum((cnt + BM - 1) // BM, 0) * NB1:
            tl.atomic_xchg(heap_words + sig1 + me, seq << 32, sem="release", scope="gpu")


@triton.jit
def _reduce_task(c, sync_ptr, half, stats_ptr, y_ptr, posmap_ptr, heap_rows, heap_words, heap_recw, rows_delta_ptr,
                 words_delta_ptr, heap_addr, H, me, seq, slab_rows, slab_elems, data0, data1, sig1, rec0w,
                 rec_stride_w, NR, NB1, limit,
                 PUTS: tl.constexpr, USE_TIMER: tl.constexpr, E: tl.constexpr, W: tl.constexpr, EL: tl.constexpr,
                 TOPK: tl.constexpr, ITEM: tl.constexpr, ROW_BYTES: tl.constexpr, EL_PAD: tl.constexpr,
                 K_PAD: tl.constexpr, BM: tl.constexpr, BTC: tl.constexpr, BH: tl.constexpr, clock):
    """Task c: rows [rb*BTC, rb*BTC+BTC) of source s = me + 1 + c // NR (mod W), rb = c % NR. Once every GEMM1 tile
    of s's rows is done: for each of s's tokens t received here, partial_t = sum_j w_tj * y_tj over its slots j
    on this rank (fp32/fp64, slot order), stored in the layer dtype into row t of this rank's RETURN slab at s. The
    last task of s signals s (seq << 32)."""
    i = c // NR + 1
    s = (me + i) % W
    rb = c % NR
    ev = tl.arange(0, EL_PAD)
    e_ok = ev < EL
    # s's first y row: the rows of the sources decoded before it (me, me+1, ...), and how many tiles it has
    hb = me * 0
    expected = me * 0
    ok = me * 0 == 0
    for i2 in range(W):
        if i2 <= i:
            s2 = (me + i2) % W
            ok = ok & _wait_counter(half + _READY + s2, 1, sync_ptr, limit, USE_TIMER, clock)
            cnt = tl.load(half + _READY + _PER_SOURCE * W + s2 * EL + ev, mask=e_ok, other=0)
            if i2 < i:
                hb += tl.sum(cnt, 0)
            else:
                expected = tl.sum((cnt + BM - 1) // BM, 0) * NB1
    if ok:
        ok = _wait_counter(half + _READY + W + s, expected, sync_ptr, limit, USE_TIMER, clock)
    n_rows = me * 0
    if ok & (_aborted(sync_ptr) == 0):
        bound = tl.atomic_add(half + _READY + 3 * W + s, 0, sem="acquire", scope="gpu")
        rows = rb.to(tl.int64) * BTC + tl.arange(0, BTC)
        row_ok = rows < bound
        kx = tl.arange(0, K_PAD)
        k_mask = row_ok[:, None] & (kx < TOPK)[None, :]
        pm = tl.load(posmap_ptr + (s.to(tl.int64) * slab_rows + rows[:, None]) * TOPK + kx[None, :], mask=k_mask,
                     other=0)
        valid = k_mask & ((pm >> 32) == seq)
        rec = (pm & _MASK32).to(tl.int32)
        wts = tl.load(heap_recw + slab_start(rec0w, s, rec_stride_w) + rec, mask=valid, other=0.0)
        got = tl.sum(valid.to(tl.int32), 1) > 0
        n_rows = tl.sum(got.to(tl.int32), 0)
        if n_rows > 0:
            if PUTS == "nvshmem":  # staged in place of s's rows, consumed already (every GEMM1 tile of s is done)
                dst = heap_rows + slab_start(data0, s, slab_elems)
            else:
                dst = heap_rows + tl.load(rows_delta_ptr + s) + slab_start(data1, me, slab_elems)
            acc_ty = heap_recw.dtype.element_ty
            cc = tl.arange(0, BH)
            for c0 in range(0, H, BH):
                cols = c0 + cc
                col_ok = cols < H
                acc = tl.zeros((BTC, BH), acc_ty)
                for j in tl.static_range(TOPK):
                    v_j = tl.sum(tl.where((kx == j)[None, :] & valid, 1, 0), 1) > 0
                    r_j = tl.sum(tl.where((kx == j)[None, :], rec, 0), 1)
                    w_j = tl.sum(tl.where((kx == j)[None, :], wts, 0.0), 1)
                    y = tl.load(y_ptr + (hb + r_j).to(tl.int64)[:, None] * H + cols[None, :],
                                mask=v_j[:, None] & col_ok[None, :], other=0.0)
                    acc += w_j.to(acc_ty)[:, None] * y.to(acc_ty)
                tl.store(dst + rows[:, None] * H + cols[None, :], acc.to(heap_rows.dtype.element_ty),
                         mask=got[:, None] & col_ok[None, :])
            if PUTS == "nvshmem":
                tl.debug_barrier()
                _put_hit_rows(heap_addr, slab_start(data0, s, slab_elems), slab_start(data1, me, slab_elems), rows,
                              got, s, H, ITEM, BTC)
        tl.atomic_add(stats_ptr + E + 1, n_rows.to(tl.int64) * ROW_BYTES)
    if PUTS == "nvshmem":
        nvshmem.quiet()
    tl.debug_barrier()
    if tl.atomic_add(half + _READY + 2 * W + s, 1, sem="acq_rel", scope="sys") == NR - 1:
        if _aborted(sync_ptr) == 0:
            tl.atomic_add(stats_ptr + E + 1, 8)
            _signal_remote(heap_words, words_delta_ptr, heap_addr, s, sig1 + me, seq << 32, PUTS)


@triton.jit
def _own_part(y_ptr, yrow, wts, on, kx, cols, mask, H, TOPK: tl.constexpr, BTC: tl.constexpr, BH: tl.constexpr,
              acc_ty: tl.constexpr):
    """[BTC, BH] sum_j w_tj * y[yrow_tj] over the slots j with on[t, j], in slot order (acc_ty)."""
    part = tl.zeros((BTC, BH), acc_ty)
    for j in tl.static_range(TOPK):
        sel = (kx == j)[None, :]
        on_j = tl.sum(tl.where(sel & on, 1, 0), 1) > 0
        w_j = tl.sum(tl.where(sel, wts, 0.0), 1)
        y_j = tl.sum(tl.where(sel, yrow, 0), 1)
        y = tl.load(y_ptr + y_j[:, None] * H + cols[None, :], mask=mask & on_j[:, None], other=0.0)
        part += w_j.to(acc_ty)[:, None] * y.to(acc_ty)
    return part


@triton.jit
def _combine_task(c, sync_ptr, status_addr, out_ptr, ids_ptr, wts_ptr, slot_ptr, gstart_ptr, addend_ptr, y_ptr,
                  heap_rows, heap_words, T, H, me, seq, slab_elems, data1, sig1, limit,
                  USE_TIMER: tl.constexpr, EL: tl.constexpr, W: tl.constexpr, TOPK: tl.constexpr,
                  HAS_ADDEND: tl.constexpr, K_PAD: tl.constexpr, BTC: tl.constexpr, BH: tl.constexpr, clock,
                  WAIT_LANES: tl.constexpr, CAPACITY: tl.constexpr):
    """out[t] = sum over ranks r ascending of r's partial sum of token t (+ addend[t]) for tokens [c*BTC,
    c*BTC+BTC), in fp32 (fp64), after every rank's RETURN signal: another rank's partial is row t of its RETURN
    slab here (read where t has a kept expert there), this rank's own is sum_j w_tj * y_tj over its own slots
    in slot order (y row = sorted position - gstart[me * E_local])."""
    arrived, slot, seen, _ = _wait_words(heap_words + sig1, W, seq, sync_ptr, limit, USE_TIMER, clock, WAIT_LANES)
    if arrived == 0:
        _fail(sync_ptr, status_addr, _ST_RETURN, me, slot, 1, -1, seq, seen)
    rows = c.to(tl.int64) * BTC + tl.arange(0, BTC)
    row_ok = rows < T
    kx = tl.arange(0, K_PAD)
    k_mask = row_ok[:, None] & (kx < TOPK)[None, :]
    ids = tl.load(ids_ptr + rows[:, None] * TOPK + kx[None, :], mask=k_mask, other=0).to(tl.int32)
    wts = tl.load(wts_ptr + rows[:, None] * TOPK + kx[None, :], mask=k_mask, other=0.0)
    slots = tl.load(slot_ptr + rows[:, None] * TOPK + kx[None, :], mask=k_mask, other=0)
    owner = ids // EL
    kept = k_mask
    if CAPACITY:  # a dropped assignment (slot -1) contributes nothing
        kept = kept & (slots >= 0)
    first = tl.load(gstart_ptr + me * EL)  # first sorted row of this rank's own experts: y row 0
    yrow = (slots - first).to(tl.int64)
    acc_ty = tl.float64 if wts.dtype == tl.float64 else tl.float32
    cc = tl.arange(0, BH)
    for c0 in range(0, H, BH):
        cols = c0 + cc
        mask = row_ok[:, None] & (cols < H)[None, :]
        acc = tl.zeros((BTC, BH), acc_ty)
        for r in range(W):
            if r == me:
                acc += _own_part(y_ptr, yrow, wts, kept & (owner == me), kx, cols, mask, H, TOPK, BTC, BH, acc_ty)
            else:
                hit = tl.sum(tl.where(kept & (owner == r), 1, 0), 1) > 0
                at = row_start(slab_start(data1, me * 0 + r, slab_elems), rows, H)  # r: a Python int interpreted
                acc += tl.load(heap_rows + at[:, None] + cols[None, :], mask=mask & hit[:, None], other=0.0).to(acc_ty)
        if HAS_ADDEND:
            acc += tl.load(addend_ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        tl.store(out_ptr + rows[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------------------

# Integer arguments whose value changes between calls or ranks are not specialised (a value of 1 would
# otherwise become a compile-time constant: a new compile, and constants where loops need tensors).
NO_SPECIALIZE = ("T", "me", "NB", "NC", "nprog", "HALF", "G_MAX", "slab_rows", "slab_records", "sig0", "sig1",
                 "limit", "cap", "NS", "NR")


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def fused_moe_kernel(
    # outputs (per forward)
    out_ptr, ids_ptr, wts_ptr, scores_ptr, logits_ptr,  # out [T, H]; ids [T, K] int64; weights [T, K] fp32/fp64;
    # scores, logits [T, E] fp32/fp64 (ids/weights are inputs when ROUTING == "given", logits when "logits")
    order_ptr, slot_ptr, h_ptr, pre_ptr, stats_ptr, loss_ptr, claims_ptr,  # order, slot_of [T*K] int32; h [R, I];
    # pre [R, N_UP] (SAVE_PRE); stats [E + 2 + W] int64 (tokens per expert, dropped, bytes sent, rows per peer);
    # loss [3] lb, z, aux; claims [grid] int32: tasks each program claimed (PHASE=ALL only)
    y_ptr, posmap_ptr,  # scratch: y [R, H] expert outputs (layer dtype); posmap [W * slab_rows * K] int64
    # (seq << 32 | record) of each received (source, token, slot)
    # inputs
    x_ptr, router_ptr, ebias_ptr, addend_ptr, w_up_ptr, b_up_ptr, w_down_ptr, b_down_ptr,  # x [T, H]; router [E, H];
    # ebias [E] fp32; addend [T, H] fp32/fp64; w_up [E_local, H, N_UP], b_up [E_local, N_UP], w_down [E_local, I, H],
    # b_down [E_local, H]
    # persistent state
    sync_ptr, table_ptr, part_ptr, heap_rows, heap_words, heap_recw, heap_codes, rows_delta_ptr, words_delta_ptr,
    # sync int32 (module docstring); table [NB_MAX, E] int32 + counts [E] + gstart [E] (counts_ptr/gstart_ptr); part
    # [NB_MAX, E + 1]; heap_rows/heap_words/heap_recw/heap_codes this rank's heap segment as the layer dtype /
    # int64 / the weights' dtype / int32; deltas [W] int64 (ptr puts; rows: layer-dtype elements, words: int64)
    counts_ptr, gstart_ptr,
    heap_addr, status_addr,  # this rank's segment address (nvshmem puts), status words [8] int64 (address)
    # sizes and layout (element offsets in the segment: rows, int64 words, weights and codes)
    T, H, INNER, me, NB, NC, nprog, HALF, G_MAX, slab_rows, slab_records, slab_elems, data0, data1, sig0, sig1,
    rec0w, rec0c, rec_stride_w, rec_stride_c, limit,
    scale_hi, scale_lo, lb_coef, z_coef,
    dl_order_ptr, cap, NS,  # capacity: dropless order scratch [T*K] int32, rows kept per expert, stage tasks
    NR,  # reduce tasks per source: cdiv(slab_rows, BTC)
    PHASE: tl.constexpr, ROUTING: tl.constexpr, PUTS: tl.constexpr, USE_TIMER: tl.constexpr, WAIT_LANES: tl.constexpr,
    E: tl.constexpr, EL: tl.constexpr, W: tl.constexpr, TOPK: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ADDEND: tl.constexpr, SAVE_PRE: tl.constexpr, NATIVE_DOT: tl.constexpr,
    GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, SIGMOID: tl.constexpr, HAS_EBIAS: tl.constexpr,
    RENORM: tl.constexpr, ITEM: tl.constexpr, ROW_BYTES: tl.constexpr, REC_W: tl.constexpr,
    E_PAD: tl.constexpr, EL_PAD: tl.constexpr, W_PAD: tl.constexpr, K_PAD: tl.constexpr, G_PAD: tl.constexpr,
    BT: tl.constexpr, BTC: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr, CB: tl.constexpr,
    BM: tl.constexpr, BN0: tl.constexpr, BK0: tl.constexpr, BN1: tl.constexpr, BK1: tl.constexpr,
    TN0: tl.constexpr, TN1: tl.constexpr, EVEN_K0: tl.constexpr, EVEN_K1: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, CAPACITY: tl.constexpr, BRS: tl.constexpr, BCS: tl.constexpr,
):
    """One MoE layer forward on this rank (module docstring); PHASE = 0 runs all of it in one launch."""
    epoch = tl.load(sync_ptr + _EPOCH)
    seq = (epoch + 1).to(tl.int64)
    half = sync_ptr + _HALF0 + (epoch % 2) * HALF
    other = sync_ptr + _HALF0 + ((epoch + 1) % 2) * HALF
    nb0 = tl.cdiv(INNER, BN0)  # column tiles per row tile, up projection
    nb1 = tl.cdiv(H, BN1)  # and down projection
    ng0 = tl.cdiv(nb0, TN0)  # tasks per row tile: TN0 (TN1) column tiles each, so a decode serves several
    ng1 = tl.cdiv(nb1, TN1)
    n_tasks = epoch * 0  # tasks this program claimed (stats.tasks_per_program)
    clock = claims_ptr + tl.program_id(0)  # this program's clock word (_spent) until n_tasks is stored there

    if (PHASE == _ALL) or (PHASE == _ROUTE):
        zb = tl.arange(0, 128)
        chunk = tl.cdiv(HALF, NB)
        t = tl.atomic_add(half + _CLAIM + 0, 1)
        while t < NB:
            n_tasks += 1
            _route_task(t, x_ptr, router_ptr, ebias_ptr, logits_ptr, ids_ptr, wts_ptr, scores_ptr, table_ptr, part_ptr,
                        T, H, scale_hi, scale_lo, ROUTING, NATIVE_DOT, E, TOPK, GROUPS, TOPK_GROUPS, SIGMOID,
                        HAS_EBIAS, RENORM, E_PAD, K_PAD, G_PAD, BT, BK0)
            # The other half of `sync` belongs to the next launch: zero this task's share of it.
            for z0 in range(t * chunk, tl.minimum(t * chunk + chunk, HALF), 128):
                tl.store(other + z0 + zb, 0, mask=z0 + zb < tl.minimum(t * chunk + chunk, HALF))
            tl.debug_barrier()
            finished = tl.atomic_add(half + _ROUTE_DONE, 1, sem="acq_rel", scope="sys")
            if finished == NB - 1:
                _finish_routing(half, table_ptr, part_ptr, counts_ptr, gstart_ptr, stats_ptr, loss_ptr,
                                NB, T, me, lb_coef, z_coef, cap,
                                ROUTING, E, EL, W, TOPK, REC_W + 4, E_PAD, W_PAD, CB, CAPACITY)
            t = tl.atomic_add(half + _CLAIM + 0, 1)

    if (PHASE == _ALL) or (PHASE == _DISPATCH):
        own_recw = heap_recw + slab_start(rec0w, me, rec_stride_w)  # records staged here, at their sorted positions
        own_codes = heap_codes + slab_start(rec0c, me, rec_stride_c)
        # Capacity: these tasks only sort (the dropless order, into dl_order); the stage tasks below rank, keep,
        # place and stage records once every order task is done, the row tasks write rows once every stage task is
        # (each kind is claimed after all tasks of the one before).
        t = tl.atomic_add(half + _CLAIM + 1, 1)
        while t < NB:
            n_tasks += 1
            if _wait_counter(half + _ROUTED, 1, sync_ptr, limit, USE_TIMER, clock):
                if CAPACITY:
                    _dispatch_task(t, ids_ptr, wts_ptr, dl_order_ptr, slot_ptr, table_ptr, counts_ptr + 3 * E,
                                   own_recw, own_codes, T, me, E, EL, W, TOPK, E_PAD, K_PAD, BT, True)
                    tl.debug_barrier()
                    tl.atomic_add(half + _ORDERED, 1, sem="release", scope="gpu")
                else:
                    _dispatch_task(t, ids_ptr, wts_ptr, order_ptr, slot_ptr, table_ptr, gstart_ptr,
                                   own_recw, own_codes, T, me, E, EL, W, TOPK, E_PAD, K_PAD, BT, False)
                    _write_rows(t, x_ptr, ids_ptr, slot_ptr, stats_ptr, heap_rows, rows_delta_ptr, heap_addr, T, H, me,
                                slab_elems, data0, PUTS, E, EL, W, TOPK, ITEM, ROW_BYTES, K_PAD, BT, BH, False)
                    _finish_dispatch(NB, counts_ptr, gstart_ptr, half, heap_words, heap_recw, heap_codes,
                                     words_delta_ptr, heap_addr, me, seq, rec0w, rec0c, rec_stride_w, rec_stride_c,
                                     sig0, PUTS, E, EL, W, REC_W, E_PAD, BR * BH)
            else:
                _fail(sync_ptr, status_addr, _ST_LOCAL, me, me, 0, -1, 1, 0)
            t = tl.atomic_add(half + _CLAIM + 1, 1)
        if CAPACITY:
            t = tl.atomic_add(half + _STAGE_CLAIM, 1)
            while t < NS:
                n_tasks += 1
                if _wait_counter(half + _ORDERED, NB, sync_ptr, limit, USE_TIMER, clock):
                    _stage_task(t, ids_ptr, wts_ptr, dl_order_ptr, order_ptr, slot_ptr, counts_ptr, gstart_ptr, half,
                                own_recw, own_codes, T, me, cap, E, EL, W, TOPK, BRS, BCS)
                else:
                    _fail(sync_ptr, status_addr, _ST_LOCAL, me, me, 4, -1, NB, 0)
                t = tl.atomic_add(half + _STAGE_CLAIM, 1)
            t = tl.atomic_add(half + _ROW_CLAIM, 1)
            while t < NB:
                n_tasks += 1
                if _wait_counter(half + _STAGED, NS, sync_ptr, limit, USE_TIMER, clock):
                    _write_rows(t, x_ptr, ids_ptr, slot_ptr, stats_ptr, heap_rows, rows_delta_ptr, heap_addr, T, H, me,
                                slab_elems, data0, PUTS, E, EL, W, TOPK, ITEM, ROW_BYTES, K_PAD, BT, BH, True)
                    _finish_dispatch(NB, counts_ptr, gstart_ptr, half, heap_words, heap_recw, heap_codes,
                                     words_delta_ptr, heap_addr, me, seq, rec0w, rec0c, rec_stride_w, rec_stride_c,
                                     sig0, PUTS, E, EL, W, REC_W, E_PAD, BR * BH)
                else:
                    _fail(sync_ptr, status_addr, _ST_LOCAL, me, me, 5, -1, NS, 0)
                t = tl.atomic_add(half + _ROW_CLAIM, 1)

    if (PHASE == _ALL) or (PHASE == _GEMM0):
        c = tl.atomic_add(half + _CLAIM + 2, 1)
        go = c >= 0
        while go:
            if c < W:
                n_tasks += 1
                _recv_task((me + c) % W, sync_ptr, half, status_addr, heap_words, me, seq, slab_records, sig0, sig1,
                           limit, USE_TIMER, W, EL, clock, WAIT_LANES)
            else:
                g = (c - W) // ng0
                found, s, el, m, n_e, pst, hb = _decode(g, sync_ptr, half, me, limit,
                                                        USE_TIMER, W, EL, EL_PAD, BM, clock)
                if found == 1:
                    n_tasks += 1
                    if g < G_MAX:
                        n_lo = ((c - W) % ng0) * TN0
                        _gemm0_task(g, n_lo, tl.minimum(n_lo + TN0, nb0), s, el, m, n_e, pst, hb, half,
                                    x_ptr, order_ptr, gstart_ptr, heap_rows, heap_codes, posmap_ptr,
                                    w_up_ptr, b_up_ptr, h_ptr, pre_ptr, H, INNER, me, seq, slab_rows, slab_elems,
                                    data0, rec0c, rec_stride_c,
                                    W, EL, TOPK, ACT, GATED, HAS_BIAS, SAVE_PRE, EVEN_K0, BM, BN0, BK0, UPCAST,
                                    PRECISION)
                    else:
                        _fail(sync_ptr, status_addr, _ST_LOCAL, me, me, 2, g, G_MAX, 0)
                else:
                    go = c < 0
            if go:
                c = tl.atomic_add(half + _CLAIM + 2, 1)

    if (PHASE == _ALL) or (PHASE == _GEMM1):
        c = tl.atomic_add(half + _CLAIM + 3, 1)
        go = c >= 0
        while go:
            g = c // ng1
            found, s, el, m, n_e, pst, hb = _decode(g, sync_ptr, half, me, limit,
                                                    USE_TIMER, W, EL, EL_PAD, BM, clock)
            if found == 1:
                n_tasks += 1
                if _wait_counter(half + _READY + _PER_SOURCE * W + E + g, nb0, sync_ptr, limit, USE_TIMER, clock):
                    n_lo = (c % ng1) * TN1
                    _gemm1_task(g, n_lo, tl.minimum(n_lo + TN1, nb1), s, el, m, n_e, pst, hb, half, h_ptr, y_ptr,
                                w_down_ptr, b_down_ptr, heap_words, H, INNER, me, seq, sig1, nb1,
                                W, EL, HAS_BIAS, EVEN_K1, BM, BN1, BK1, UPCAST, PRECISION, EL_PAD)
                else:
                    _fail(sync_ptr, status_addr, _ST_LOCAL, me, me, 3, g, nb0, 0)
                c = tl.atomic_add(half + _CLAIM + 3, 1)
            else:
                go = c < 0

    if W > 1:
        if (PHASE == _ALL) or (PHASE == _REDUCE):
            c = tl.atomic_add(half + _REDUCE_CLAIM, 1)
            while c < (W - 1) * NR:
                n_tasks += 1
                _reduce_task(c, sync_ptr, half, stats_ptr, y_ptr, posmap_ptr, heap_rows, heap_words, heap_recw,
                             rows_delta_ptr, words_delta_ptr, heap_addr, H, me, seq, slab_rows, slab_elems, data0,
                             data1, sig1, rec0w, rec_stride_w, NR, nb1, limit,
                             PUTS, USE_TIMER, E, W, EL, TOPK, ITEM, ROW_BYTES, EL_PAD, K_PAD, BM, BTC, BH, clock)
                c = tl.atomic_add(half + _REDUCE_CLAIM, 1)

    if (PHASE == _ALL) or (PHASE == _COMBINE):
        c = tl.atomic_add(half + _CLAIM + 4, 1)
        while c < NC:
            n_tasks += 1
            _combine_task(c, sync_ptr, status_addr, out_ptr, ids_ptr, wts_ptr, slot_ptr, gstart_ptr, addend_ptr, y_ptr,
                          heap_rows, heap_words, T, H, me, seq, slab_elems, data1, sig1, limit,
                          USE_TIMER, EL, W, TOPK, HAS_ADDEND, K_PAD, BTC, BH, clock, WAIT_LANES, CAPACITY)
            c = tl.atomic_add(half + _CLAIM + 4, 1)
        if PUTS == "nvshmem":
            nvshmem.quiet()
        tl.debug_barrier()
        # The last program out hands the next launch its epoch (and so its half of `sync` and its sequence).
        if tl.atomic_add(half + _DONE, 1, sem="acq_rel", scope="gpu") == nprog - 1:
            tl.atomic_xchg(sync_ptr + _EPOCH, epoch + 1, sem="release", scope="gpu")
    if PHASE == _ALL:
        tl.store(claims_ptr + tl.program_id(0), n_tasks)
