"""Combine (DESIGN §2.6): each token's rows summed in a fixed order, so reruns give the same bits."""

import triton
import triton.language as tl

from .experts import row_offset


@triton.jit
def combine_kernel(
    out_ptr,  # output [T, H] (any float dtype)
    rows_ptr, slot_ptr, addend_ptr,  # rows [R, H] by sorted row, slot_of [T * TOPK] int32 (-1: dropped), addend [T, H]
    T, H,
    TOPK: tl.constexpr, HAS_ADDEND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t] = sum over j = 0..TOPK-1 of rows[slot_of[t * TOPK + j]] (dropped slots skipped), then + addend[t].

    The sum runs in fp32 (fp64 for fp64 rows) in slot order; the forward's rows already carry the routing
    weight (applied in the down projection's epilogue), the input gradient's rows need none.
    """
    # int64 from the start: every use of toks is an offset, and T * H (1.9e9 at T = 256k) is near 2^31.
    toks = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    tok_ok = toks < T
    col_ok = cols < H
    acc_ty = tl.float64 if rows_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_T, BLOCK_H), acc_ty)
    for j in range(TOPK):
        slot = tl.load(slot_ptr + row_offset(toks, TOPK) + j, mask=tok_ok, other=-1)
        ok = slot >= 0
        acc += tl.load(rows_ptr + row_offset(slot, H)[:, None] + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                       other=0.0).to(acc_ty)
    mask = tok_ok[:, None] & col_ok[None, :]
    if HAS_ADDEND:
        acc += tl.load(addend_ptr + row_offset(toks, H)[:, None] + cols[None, :], mask=mask, other=0.0).to(acc_ty)
    tl.store(out_ptr + row_offset(toks, H)[:, None] + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
