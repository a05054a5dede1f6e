"""Device-initiated exchanges of the expert-parallel token-rank protocol (flashmoe_py/parallel/device_exchange.py):
the puts, signals and waits of protocol.py's exchanges, issued by device programs into the same `TokenLayout`
segment, so the host never reads a count.

  put_packets_kernel   grid (NB, W): program (b, d) stores rows block b of `src` that go to rank d (dest_row[r,
                       d] >= 0) at their rows of d's slab for this rank, and records block b that go to d at
                       their indices of d's record columns; then it counts itself done for d (ticket[d], acq_rel at
                       system scope). The last of d's NB programs release-stores d's signal word (seq << 32 |
                       count[d]), so the word is written after every program's stores to d are visible.
  collect_kernel       grid (W, slab_rows / ROWS): program (s, b) waits for source s's signal word to carry `seq`
                       (bounded: on timeout it aborts and writes the status, see signals.py), checks the count
                       against the slab, copies its ROWS of the n rows of s's slab into the dense output at row
                       s * slab_rows + b * ROWS; program (s, 0) also the records:
                       FLAGGED (forward dispatch) rebuilds each row's slots from the codes' last-of-row bits
                       (ids [., K] -1 past a row's records, weights, and each slot's record index), else copies
                       a known number of values (the backward's weight gradients).

Remote writes are stores through peer-mapped addresses: this rank's segment viewed as each dtype, a peer's copy of
an element at `+ delta[peer]` elements (the shm heap under the interpreter; the NVLink peers of an NVSHMEM heap on
GPUs, which NvshmemHeap requires). Own packets go through this rank's own segment like any other, so a receiver
treats every source alike. The interpreter runs a launch's programs one after another, which these kernels allow:
no program waits on a later program of its own launch (collect waits only on puts of earlier launches, here or on
peer processes, which run concurrently).
"""

import triton
import triton.language as tl

from .signals import _fail, _wait_words

_COUNT_MASK = tl.constexpr((1 << 31) - 1)  # layout.COUNT_BITS: the signal word's count field
_LAST_OF_ROW = tl.constexpr(1)  # layout.LAST_OF_ROW
_ST_WAIT = tl.constexpr(1)  # status codes: device_exchange.DeviceExchange.check turns them into errors
_ST_COUNT = tl.constexpr(3)


# seq changes every exchange: one compiled variant for every value (the JIT would specialise seq == 1 on its own).
@triton.jit(do_not_specialize=["seq"])
def put_packets_kernel(src_ptr, dest_row_ptr, counts_ptr, rec_val_ptr, rec_code_ptr, rec_dest_ptr, rec_at_ptr,
                       heap_rows_ptr, rows_delta_ptr, heap_vals_ptr, vals_delta_ptr, heap_codes_ptr, codes_delta_ptr,
                       heap_words_ptr, words_delta_ptr, ticket_ptr,
                       R, Q, H, seq, data_off, vals_off, codes_off, sig_idx, NB,
                       W: tl.constexpr, HAS_REC: tl.constexpr, HAS_CODE: tl.constexpr, BR: tl.constexpr,
                       BH: tl.constexpr, BQ: tl.constexpr):
    """src [R, H] rows; dest_row [R, W] int32 (row in rank d's packet, -1: not sent to d); counts [W] int32 rows per
    rank; records rec_val [Q] (weights or their gradients), rec_code [Q] int32 (HAS_CODE), rec_dest [Q] int32 (the
    rank, -1: none), rec_at [Q] int32 (index in that rank's packet). *_off: element offsets of this rank's slab /
    columns in a receiver's segment (in each view's elements); sig_idx: int64 word index of this rank's signal word
    there. ticket [W] int32, zero before the launch."""
    b = tl.program_id(0)
    d = tl.program_id(1)
    rows = b * BR + tl.arange(0, BR)
    j = tl.load(dest_row_ptr + rows.to(tl.int64) * W + d, mask=rows < R, other=-1)
    ok = j >= 0
    dst = heap_rows_ptr + tl.load(rows_delta_ptr + d) + data_off.to(tl.int64)
    cols = tl.arange(0, BH)
    for c0 in range(0, H, BH):
        m = ok[:, None] & ((c0 + cols) < H)[None, :]
        v = tl.load(src_ptr + rows.to(tl.int64)[:, None] * H + (c0 + cols)[None, :], mask=m)
        tl.store(dst + j.to(tl.int64)[:, None] * H + (c0 + cols)[None, :], v, mask=m)
    if HAS_REC:
        q = b * BQ + tl.arange(0, BQ)
        mine = tl.load(rec_dest_ptr + q, mask=q < Q, other=-1) == d
        at = tl.load(rec_at_ptr + q, mask=mine, other=0).to(tl.int64)
        vdst = heap_vals_ptr + tl.load(vals_delta_ptr + d) + vals_off.to(tl.int64)
        tl.store(vdst + at, tl.load(rec_val_ptr + q, mask=mine), mask=mine)
        if HAS_CODE:
            cdst = heap_codes_ptr + tl.load(codes_delta_ptr + d) + codes_off.to(tl.int64)
            tl.store(cdst + at, tl.load(rec_code_ptr + q, mask=mine), mask=mine)
    tl.debug_barrier()  # every thread's stores precede the release below
    done = tl.atomic_add(ticket_ptr + d, 1, sem="acq_rel", scope="sys")
    if done == NB - 1:  # the last program for d: every other program's stores to d were released before its add
        word = (seq.to(tl.int64) << 32) | tl.load(counts_ptr + d).to(tl.int64)
        tl.atomic_xchg(heap_words_ptr + tl.load(words_delta_ptr + d) + sig_idx, word, sem="release", scope="sys")


@triton.jit(do_not_specialize=["seq"])
def collect_kernel(out_rows_ptr, counts_out_ptr, out_vals_ptr, out_ids_ptr, rec_index_ptr, rec_counts_ptr,
                   heap_rows_ptr, heap_vals_ptr, heap_codes_ptr, heap_words_ptr, sync_ptr, clock_ptr, status_addr,
                   H, me, seq, region, limit, data0, slab_elems, vals0, codes0, vals_stride, codes_stride, sig0,
                   slab_rows, slab_records,
                   K: tl.constexpr, HAS_REC: tl.constexpr, FLAGGED: tl.constexpr, USE_TIMER: tl.constexpr,
                   LANES: tl.constexpr, COPY: tl.constexpr, ROWS: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr,
                   BQ: tl.constexpr):
    """Program (s, b): rows [b * ROWS, (b + 1) * ROWS) of the packet from rank s into out_rows [W * slab_rows, H] at
    row s * slab_rows; program (s, 0) also counts_out[s] = its rows and the records (every program of s waits for
    the word, so the copy of a large packet spreads over many programs). Records: FLAGGED: out_vals / out_ids /
    rec_index [W * slab_rows, K] (weights, local expert ids, the record index of each slot; -1 / 0 past a row's
    records, filled by the caller), rec_counts[s] = the records found; else rec_counts[s] (given) values into
    out_vals [W, slab_records] row s. data0 / vals0 / codes0 / sig0: element offsets of the region's first slab /
    columns / signal word in this rank's segment; slab s is at + s * slab_elems, its record columns at + s *
    vals_stride / codes_stride. clock [W * programs per source] int32, one word per program. COPY=False: the rows
    stay in the slab (the caller reads them there), programs wait and check only."""
    s = tl.program_id(0)
    b = tl.program_id(1)
    clock = clock_ptr + s * tl.num_programs(1) + b
    arrived, _, seen, words = _wait_words(heap_words_ptr + sig0 + s, 1, seq, sync_ptr, limit, USE_TIMER, clock,
                                          LANES)
    word = tl.sum(tl.where(tl.arange(0, LANES) == 0, words, 0), 0)
    n = (word & _COUNT_MASK).to(tl.int32)
    if not arrived:
        _fail(sync_ptr, status_addr, _ST_WAIT, me, s, region, 0, seq, seen)
    elif n > slab_rows:
        _fail(sync_ptr, status_addr, _ST_COUNT, me, s, region, 0, slab_rows, word)
    else:
        src = heap_rows_ptr + data0.to(tl.int64) + s.to(tl.int64) * slab_elems
        dst = out_rows_ptr + s.to(tl.int64) * slab_rows * H
        r = tl.arange(0, BR)
        c = tl.arange(0, BH)
        for r0 in tl.static_range(0, ROWS, BR):
            rows = b * ROWS + r0 + r
            if COPY and (b * ROWS + r0 < n):
                row_off = rows.to(tl.int64) * H
                for c0 in range(0, H, BH):
                    m = (rows < n)[:, None] & ((c0 + c) < H)[None, :]
                    off = row_off[:, None] + (c0 + c)[None, :]
                    tl.store(dst + off, tl.load(src + off, mask=m), mask=m)
        if b == 0:
            tl.store(counts_out_ptr + s, n)
        if HAS_REC and (b == 0):
            vsrc = heap_vals_ptr + vals0.to(tl.int64) + s.to(tl.int64) * vals_stride
            i = tl.arange(0, BQ)
            if FLAGGED:
                csrc = heap_codes_ptr + codes0.to(tl.int64) + s.to(tl.int64) * codes_stride
                closed = n * 0  # rows closed by the records before this chunk
                found = n * 0
                for q0 in range(0, tl.minimum(n * K, slab_records), BQ):
                    q = q0 + i
                    code = tl.load(csrc + q, mask=q < slab_records, other=_LAST_OF_ROW)
                    end = (code & _LAST_OF_ROW).to(tl.int32)
                    row = closed + tl.cumsum(end, 0) - end
                    # a record's place in its row: how many records right before it do not end a row (< K)
                    place = tl.zeros([BQ], tl.int32)
                    alive = q >= 0
                    for back in tl.static_range(1, K):
                        prev = tl.load(csrc + q - back, mask=(q - back) >= 0, other=_LAST_OF_ROW)
                        alive = alive & ((prev & _LAST_OF_ROW) == 0)
                        place += alive.to(tl.int32)
                    ok = (row < n) & (q < slab_records)
                    # int32: W * slab_rows * K slots (8 ranks x 4096 tokens x k=8 is 2^18), and one int64 less to
                    # hold kept ptxas from spilling on sm_80 (Triton 3.6)
                    slot = (s * slab_rows + row) * K + place
                    tl.store(out_ids_ptr + slot, code >> 1, mask=ok)
                    tl.store(out_vals_ptr + slot, tl.load(vsrc + q, mask=ok), mask=ok)
                    tl.store(rec_index_ptr + slot, q, mask=ok)
                    closed += tl.sum(end, 0)
                    found += tl.sum(ok.to(tl.int32), 0)
                tl.store(rec_counts_ptr + s, found)
            else:
                nq = tl.load(rec_counts_ptr + s)
                dstv = out_vals_ptr + s.to(tl.int64) * slab_records
                for q0 in range(0, nq, BQ):
                    q = q0 + i
                    tl.store(dstv + q, tl.load(vsrc + q, mask=q < nq), mask=q < nq)
