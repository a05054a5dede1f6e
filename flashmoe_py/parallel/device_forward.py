"""The expert-parallel routed experts over device-initiated exchanges (device_exchange.py): forward.py's
per-(token, rank) protocol with every count on the device, so neither the forward nor the backward synchronises
the host. Used with the `triton` backend over heaps reachable by pointers (shm under the interpreter, nvshmem).

Rank r, T tokens, k slots, W ranks, S = slab_rows (max_tokens_per_rank), E_local experts per rank:
  routing      on [T, k, W]: slot j of t is kept and on rank d's experts; nrec [T, W] = slots of t on d;
               hits = nrec > 0 (the pairs); pos [T, W] = t's row in d's packet (pairs before it, token order);
               rpos [T, W] = its first record there; a slot's record: (weight, local id << 1 | last of its row)
               at rpos[t, d] + (its place among t's slots on d)
  DISPATCH     x[t] -> row pos[t, d] of d's packet for every pair, the records beside them
  on rank d    rows [W * S, H] (block s from rank s), each row's slots rebuilt from its records (ids -1 past
               them), `token_rows_moe` (triton_backend): the partial sum of the row's weighted expert outputs in
               slot order, fp32 (fp64), rounded once to the layer dtype
  RETURN       partial row i of block s -> row i of s's packet: rank r gets back [W * S, H], block d from d
  combine      out_t = sum over d ascending with hits[t, d] of block d's row pos[t, d], in fp32 (fp64)
The summation orders are forward.py's; the backward mirrors the forward the same way (output gradients out once per
(token, rank); row gradients summed on the expert's rank, one weight gradient per record back; rank order sums).
"""

from __future__ import annotations

import torch

from ..records import MoEParams
from .forward import _acc_dtype
from .layout import DISPATCH, RETURN


def _block_rows(counts: torch.Tensor, slab: int) -> torch.Tensor:
    """counts [W] int32 rows of each block -> dest_row [W * slab, W] int32: row i of block s goes to row i of rank
    s's packet when i < counts[s], nowhere (-1) otherwise."""
    w = counts.shape[0]
    r = torch.arange(w * slab, device=counts.device)
    block, i = r // slab, r % slab
    table = torch.full((w * slab, w), -1, dtype=torch.int32, device=counts.device)
    valid = i < counts.to(torch.int64)[block]
    table[r, block] = torch.where(valid, i, -1).to(torch.int32)
    return table


def rank_order_sum(blocks: torch.Tensor, hits: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [W, slab, H]; hits, pos [T, W] -> [T, H] in dtype: out_t = sum over d ascending with hits[t, d] of
    blocks[d, pos[t, d]] (a fixed order; differentiable, each block row read by at most one token)."""
    t, w = hits.shape
    out = torch.zeros(t, blocks.shape[2], dtype=dtype, device=blocks.device)
    for d in range(w):
        rows = blocks[d].index_select(0, pos[:, d].clamp(min=0).to(torch.int64)).to(dtype)
        out = out + torch.where(hits[:, d].unsqueeze(1), rows, torch.zeros((), dtype=dtype, device=blocks.device))
    return out


class _Plan:
    """Where this rank's tokens and records go (module docstring), all on the device, from ids [T, k] int64 (global
    experts) and kept [T, k] bool:

    hits [T, W] bool, pos [T, W] int32, dest_row [T, W] int32 (pos, -1 where no hit), counts [W] int32 (rows to
    each rank); per slot, flat [T * k]: rec_dest int32 (owner rank, -1 if dropped), rec_at int32 (index in the
    owner's records), rec_code int32; rec_counts [W] int64 (records to each rank); kept, owner [T, k]."""

    def __init__(self, ids: torch.Tensor, kept: torch.Tensor, num_local: int, world: int):
        dev = ids.device
        owner = ids // num_local
        on = kept.unsqueeze(2) & (owner.unsqueeze(2) == torch.arange(world, device=dev))  # [T, k, W]
        nrec = on.sum(1)  # [T, W]
        self.hits = nrec > 0
        self.pos = (torch.cumsum(self.hits, 0) - self.hits.long()).to(torch.int32)
        self.dest_row = torch.where(self.hits, self.pos, -1).to(torch.int32)
        self.counts = self.hits.sum(0).to(torch.int32)
        rpos = torch.cumsum(nrec, 0) - nrec  # [T, W]
        place = torch.cumsum(on.long(), 1) - on.long()  # [T, k, W]: a slot's place among t's slots on d
        o = owner.clamp(0, world - 1).unsqueeze(2)
        place_j = place.gather(2, o).squeeze(2)
        rpos_j = rpos.gather(1, owner.clamp(0, world - 1))
        last = place_j == nrec.gather(1, owner.clamp(0, world - 1)) - 1
        self.rec_dest = torch.where(kept, owner, -1).to(torch.int32).reshape(-1)
        self.rec_at = (rpos_j + place_j).to(torch.int32).reshape(-1)
        self.rec_code = (((ids % num_local) << 1) | last.long()).to(torch.int32).reshape(-1)
        self.rec_counts = nrec.sum(0)  # [W] records this rank sends each rank
        self.kept, self.owner = kept, owner.clamp(0, world - 1)


class _DeviceTokenRankExperts(torch.autograd.Function):
    """x [T, H], weights [T, k] fp32/fp64 -> the partial rows rank r gets back [W, S, H] (block d from rank d, in
    the heap's RETURN slabs; row pos[t, d] is token t's when hits[t, d])."""

    @staticmethod
    def forward(ctx, x, weights, plan, dex, moe, activation, info, w_up, w_down, b_up, b_down):
        lay, k, hidden = dex.layout, weights.shape[1], x.shape[1]
        wdtype = weights.dtype
        track = any(ctx.needs_input_grad)
        params = (w_up, w_down, b_up, b_down)
        if track:
            params = tuple(None if p is None else p.detach().requires_grad_(p.requires_grad) for p in params)
        local = MoEParams(router_weight=None, w_up=params[0], w_down=params[1], b_up=params[2], b_down=params[3])
        sent = dex.put(DISPATCH, x.detach(), plan.dest_row, plan.counts,
                       (weights.detach().reshape(-1).contiguous(), plan.rec_code, plan.rec_dest, plan.rec_at))
        # Without a graph to keep, the received rows are read in place where the slabs lie back to back (rows of a
        # multiple of 128 bytes): the experts' kernels read them before this rank's return below lets the peers
        # write the slabs again. A graph would keep them past that: copied.
        in_place = not track and lay.slab_bytes == lay.slab_rows * lay.row_bytes
        got = dex.collect(DISPATCH, x.dtype, hidden, k, "flagged", wdtype, in_place=in_place)
        rows_recv, w_recv = got["rows"].reshape(-1, hidden), got["weights"]
        with torch.enable_grad() if track else torch.no_grad():
            if track:
                rows_recv.requires_grad_(True)
                w_recv.requires_grad_(True)
            partial = moe(rows_recv, got["ids"], w_recv, local, activation)
        back_table = _block_rows(got["counts"], lay.slab_rows)
        sent = sent + dex.put(RETURN, partial.detach(), back_table, got["counts"])
        # in place: the rows are only gathered from (rank_order_sum), before this rank's next exchange lets the
        # peers overwrite them (its backward's dispatch, or the next forward's)
        back = dex.collect(RETURN, x.dtype, hidden, k, in_place=True)
        info["bytes_sent"] = sent
        ctx.dex, ctx.plan, ctx.params, ctx.k, ctx.wdtype = dex, plan, params, k, wdtype
        ctx.graph = (rows_recv, w_recv, partial, got, back_table) if track else None
        return back["rows"]

    @staticmethod
    def backward(ctx, grad_back):
        dex, plan, lay = ctx.dex, ctx.plan, ctx.dex.layout
        if ctx.graph is None:
            raise RuntimeError("expert-parallel MoE: backward ran twice through one forward (retain_graph); each "
                               "forward's exchanges can be reversed once, on every rank together")
        rows_recv, w_recv, partial, got, back_table = ctx.graph
        hidden = grad_back.shape[-1]
        dex.put(DISPATCH, grad_back.reshape(-1, hidden).contiguous(), _block_rows(plan.counts, lay.slab_rows),
                plan.counts)
        grad_partial = dex.collect(DISPATCH, grad_back.dtype, hidden, ctx.k, in_place=True)["rows"]
        # [W * S, H] (a copy where the slabs are padded apart); read by the kernels autograd.grad launches below,
        # before this rank's return lets the peers write the slab again
        grad_partial = grad_partial.reshape(-1, hidden)
        leaves = [p for p in ctx.params if p is not None and p.requires_grad]
        targets = [rows_recv, w_recv] + leaves
        found = torch.autograd.grad(partial, targets, grad_partial, allow_unused=True)
        found = [torch.zeros_like(t) if g is None else g for t, g in zip(targets, found)]
        ids = got["ids"]
        slot_src = (torch.arange(ids.shape[0], device=ids.device) // lay.slab_rows).unsqueeze(1).expand_as(ids)
        rec_dest = torch.where(ids >= 0, slot_src, -1).to(torch.int32).reshape(-1)
        dex.put(RETURN, found[0].contiguous(), back_table, got["counts"],
                (found[1].reshape(-1).contiguous(), None, rec_dest, got["rec_index"].reshape(-1)))
        back = dex.collect(RETURN, grad_back.dtype, hidden, ctx.k, "known", ctx.wdtype, plan.rec_counts,
                           in_place=True)
        rows_back, wvals = back["rows"], back["values"]  # [W, S, H] in the heap, [W, slab_records]
        grad_x = rank_order_sum(rows_back, plan.hits, plan.pos, _acc_dtype(grad_back.dtype)).to(grad_back.dtype)
        flat = plan.owner.reshape(-1).to(torch.int64) * lay.slab_records + \
            plan.rec_at.clamp(min=0).to(torch.int64)
        grad_w = torch.where(plan.kept.reshape(-1), wvals.reshape(-1).index_select(0, flat),
                             torch.zeros((), dtype=ctx.wdtype, device=wvals.device)).view(plan.kept.shape)
        it = iter(found[2:])
        param_grads = [next(it) if p is not None and p.requires_grad else None for p in ctx.params]
        ctx.graph = None
        return (grad_x, grad_w, None, None, None, None, None, *param_grads)


def device_token_rank_routed(x: torch.Tensor, routing, params: MoEParams, activation: str, ep, dex, moe):
    """The routed part over device-initiated exchanges -> (out [T, H] fp32/fp64, bytes put: 0-d int64 tensor,
    rows per peer [W] int64 on the device). Collective; no host synchronisation."""
    ids, kept, weights = routing.topk_ids, routing.kept, routing.topk_weights
    plan = _Plan(ids, kept, ep.num_local_experts, ep.world_size)
    info: dict = {}
    back = _DeviceTokenRankExperts.apply(x, weights, plan, dex, moe, activation, info, params.w_up, params.w_down,
                                         params.b_up, params.b_down)
    out = rank_order_sum(back, plan.hits, plan.pos, weights.dtype)
    return out, info["bytes_sent"], plan.counts.to(torch.int64)
