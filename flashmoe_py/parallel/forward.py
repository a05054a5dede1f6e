"""The expert-parallel MoE forward: local routing -> dispatch -> local experts -> return -> local combine.

One-sided transports (shm, mpi, nvshmem; protocol.OneSidedExchange): one row per (token, destination rank).
Pipeline on rank r (W ranks, E_local = E/W experts each, k slots per token):
  route r's own tokens with the replicated router (capacity per rank, on r's tokens)
  pairs       the (destination rank d, token t) pairs with at least one kept slot of t on d's experts, ordered
              by d, then t: P rows, rows_per_peer [W]
  send rows   [P, H]  x[t] of each pair;  routing records, one per kept slot j of t on d's experts, in slot
              order: the routing weight w_tj (fp32; fp64 for fp64 layers) and the int32 code (d's local expert
              id << 1 | last record of the row) (pack_slots; layout.TokenLayout)
  DISPATCH    -> rank d receives its rows source-major with their records, and rebuilds each row's slots: its
              records in order, then empty slots (unpack_slots)
  on rank d   expand rows to (row, slot) pairs with an expert, sort them by local expert (stable: row, then slot),
              run the backend's `expert_ffn(rows, counts [E_local], params, activation)` on them, and sum each
              row's weighted outputs, w_tj * y_e(x_t), in the accumulation dtype (fp32; fp64) in slot order j
              ascending; the sum is rounded once to the layer dtype: one partial row per (token, rank)
  RETURN      -> rank r gets its P partial rows back in send order
  combine     out_t = sum over the destination ranks of t, in rank order d ascending, of its partials (in the
              accumulation dtype), + the shared expert; rounded once to the layer dtype
The backward mirrors it: the gradients of the partial rows go out once per (token, rank) (DISPATCH); on the
expert's rank the saved local graph gives the expert-weight gradients (they stay there), the gradient of each
row -- its local slots' input gradients summed in the accumulation dtype in slot order, rounded once -- and the
gradient of each slot's routing weight (the dot of the row's output gradient with y_e, in the accumulation dtype),
which go back (RETURN: one row per (token, rank) plus one weight gradient per record); the token's rank sums its rows'
gradients over ranks in rank order and hands the weight gradients to the router's graph.

Over shm and nvshmem the `triton` backend runs this protocol with device-initiated exchanges instead
(device_forward.py, device_exchange.py: the same packets, records, summation orders and bytes, every count on the
device, no host synchronisation); this module's host-driven exchanges serve the other backends and mpi.

`alltoall` (AllToAllExchange) is the baseline with Megatron's all-to-all dispatcher's unit: one row per
(token, expert). Its pipeline: sort the kept assignments by global expert, which is also (owner rank, local
expert) order; send_rows [S, H] peer-major then expert-major, send_counts [W, E_local]; DISPATCH -> recv rows
source-major, reordered expert-major for `expert_ffn`; RETURN -> each rank gets its rows' expert outputs back in
send order; weighted combine locally (`combine`, in slot order, like the reference).

Autograd: `_TokenRankExperts` (one-sided) and `_ExpertParallelExperts` (alltoall) wrap dispatch + experts +
return. Router, bias and shared-expert gradients are local, from this rank's tokens. Backward always runs both
exchanges, even where nothing on a rank needs a gradient, so the ranks' exchange sequences stay in step; every
rank must run backward through the layer if any does.
"""

from __future__ import annotations

import torch

from ..config import MoEConfig
from ..records import MoEOutput, MoEParams, MoEStats, Routing
from ..reference import shared_expert
from ..routing import ExpertOrder, route, router_logits, routing_losses, scores_from_logits, sort_by_expert
from .expert_parallel import ExpertParallel
from .layout import DISPATCH, LAST_OF_ROW, RETURN, TOKEN_RANK
from .protocol import check_send


def expert_major(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [W, E_local] of a source-major row block -> (perm [R] int64, per-expert counts [E_local]).

    Row i of the expert-major order (expert, then source) is row perm[i] of the source-major order.
    """
    w, el = counts.shape
    flat = counts.reshape(-1)
    src_major_start = (torch.cumsum(flat, 0) - flat).view(w, el)
    lengths = counts.t().reshape(-1)  # blocks visited expert by expert
    starts = src_major_start.t().reshape(-1)
    exp_major_start = torch.cumsum(lengths, 0) - lengths
    total = int(flat.sum())
    perm = torch.arange(total) + torch.repeat_interleave(starts - exp_major_start, lengths, output_size=total)
    return perm, counts.sum(0)


class _ExpertParallelExperts(torch.autograd.Function):
    """The `alltoall` baseline's unit, one row per (token, expert): send_rows [S, H] -> the expert outputs of those
    rows [S, H], computed on the rows' owner ranks."""

    @staticmethod
    def forward(ctx, send_rows, send_counts, exchange, expert_ffn, activation, info, w_up, w_down, b_up, b_down):
        sent = exchange.run(DISPATCH, send_rows.detach(), send_counts)
        perm, counts = expert_major(sent.counts)
        perm = perm.to(send_rows.device)
        rows = sent.rows.index_select(0, perm)
        weights = (w_up, w_down, b_up, b_down)
        track = any(ctx.needs_input_grad)
        with torch.enable_grad() if track else torch.no_grad():
            if track:
                rows = rows.requires_grad_(True)
                weights = tuple(None if t is None else t.detach().requires_grad_(t.requires_grad) for t in weights)
            local = MoEParams(router_weight=None, w_up=weights[0], w_down=weights[1], b_up=weights[2],
                              b_down=weights[3])
            y = expert_ffn(rows, counts.to(send_rows.device), local, activation)
        y_src = y.detach().new_empty(y.shape).index_copy_(0, perm, y.detach())
        back = exchange.run(RETURN, y_src, sent.counts)
        if not torch.equal(back.counts, send_counts):
            raise RuntimeError(f"rank {exchange.rank}: the return exchange delivered {back.counts.tolist()} rows per "
                               f"(peer, expert), but this rank dispatched {send_counts.tolist()}")
        info["bytes_sent"] = sent.bytes_sent + back.bytes_sent
        ctx.exchange, ctx.perm, ctx.recv_counts, ctx.send_counts = exchange, perm, sent.counts, send_counts
        ctx.graph = (rows, weights, y) if track else None
        return back.rows

    @staticmethod
    def backward(ctx, grad_back):
        ex, perm = ctx.exchange, ctx.perm
        if ctx.graph is None:
            raise RuntimeError("expert-parallel MoE: backward ran twice through one forward (retain_graph); each "
                               "forward's exchanges can be reversed once, on every rank together")
        grads_in = ex.run(DISPATCH, grad_back.contiguous(), ctx.send_counts)
        grad_y = grads_in.rows.index_select(0, perm)
        rows, weights, y = ctx.graph
        leaves = [rows] + [t for t in weights if t is not None and t.requires_grad]
        if y.grad_fn is not None:
            found = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)
        else:  # no rows reached this rank's experts: every gradient is zero
            found = [None] * len(leaves)
        found = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, found)]
        grad_rows_src = found[0].new_empty(found[0].shape).index_copy_(0, perm, found[0])
        back = ex.run(RETURN, grad_rows_src, ctx.recv_counts)
        it = iter(found[1:])
        weight_grads = [next(it) if t is not None and t.requires_grad else None for t in weights]
        grad_send = back.rows if ctx.needs_input_grad[0] else None
        ctx.graph = None
        return (grad_send, None, None, None, None, None, *weight_grads)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def ordered_sum(values: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, num_rows: int, width: int) -> torch.Tensor:
    """values [A, H]; row, pos [A] int64 with (row, pos) distinct and pos < width -> [num_rows, H] in values.dtype.

    out[i] = sum of the values with row == i, added in ascending pos (a fixed order, so the same input gives the
    same bits; no atomics). Differentiable (its backward is a gather).
    """
    buf = values.new_zeros(num_rows * width, values.shape[1]).index_copy(0, row * width + pos, values)
    return buf.view(num_rows, width, values.shape[1]).sum(dim=1)


class _OrderedGather(torch.autograd.Function):
    """src [N, H] -> src[index] [A, H]. Backward: the gradients of a source row are summed in the accumulation
    dtype (fp32; fp64 for fp64) in ascending `pos` and rounded once, instead of index_add's unordered adds."""

    @staticmethod
    def forward(ctx, src, index, pos, width):
        ctx.save_for_backward(index, pos)
        ctx.num_rows, ctx.width = src.shape[0], width
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        index, pos = ctx.saved_tensors
        total = ordered_sum(grad.to(_acc_dtype(grad.dtype)), index, pos, ctx.num_rows, ctx.width)
        return total.to(grad.dtype), None, None, None


def pack_slots(weights: torch.Tensor, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The routing records of rows (layout.TokenLayout): weights [P, k] fp32/fp64, ids [P, k] int32 (-1: not the
    receiver's) -> (record columns [weights uint8 [Q, itemsize], codes uint8 [Q, 4]], one record per id >= 0,
    row-major, code = id << 1 | last-of-row; hits [P] int64: records per row)."""
    valid = ids >= 0
    r_idx, j_idx = valid.nonzero(as_tuple=True)
    hits = valid.sum(1)
    last = torch.zeros_like(r_idx, dtype=torch.int32)
    if r_idx.numel():
        last[torch.cumsum(hits[hits > 0], 0) - 1] = LAST_OF_ROW
    code = (ids[r_idx, j_idx] << 1) | last
    q = r_idx.numel()
    return [weights[r_idx, j_idx].contiguous().view(torch.uint8).view(q, weights.itemsize),
            code.to(torch.int32).contiguous().view(torch.uint8).view(q, 4)], hits


def unpack_slots(records: list[torch.Tensor], num_rows: int, k: int, dtype: torch.dtype):
    """The inverse of pack_slots on the receiver: record columns (weights uint8 [Q, itemsize], codes uint8 [Q, 4])
    of num_rows rows -> (weights [R, k] dtype, ids [R, k] int32, record_at [Q] int64). A row's records fill its
    first slots in their order (the slot order of the sender), -1 / 0 after them; record q sits at flat slot
    record_at[q] = row * k + place."""
    w_rec = records[0].contiguous().view(dtype).reshape(-1)
    code = records[1].contiguous().view(torch.int32).reshape(-1)
    ends = (code & LAST_OF_ROW) != 0
    first = torch.ones_like(ends)
    first[1:] = ends[:-1]  # a record opens a row when its predecessor closed one
    row_first = first.nonzero().flatten()
    row = torch.cumsum(first.long(), 0) - 1
    place = torch.arange(code.numel(), device=code.device) - row_first[row]
    if row_first.numel() != num_rows or (code.numel() and (not bool(ends[-1]) or int(place.max()) >= k)):
        raise RuntimeError(f"routing records for {num_rows} rows do not close {num_rows} rows of at most {k} "
                           "(a corrupt packet)")
    record_at = row * k + place
    weights = torch.zeros(num_rows * k, dtype=dtype, device=code.device).index_copy_(0, record_at, w_rec)
    ids = torch.full((num_rows * k,), -1, dtype=torch.int32, device=code.device).index_copy_(
        0, record_at, code >> 1)
    return weights.view(num_rows, k), ids.view(num_rows, k), record_at


def local_partials(rows: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert_ffn, params: MoEParams,
                   activation: str) -> torch.Tensor:
    """What the expert's rank computes for the rows it received.

    rows [R, H] layer dtype; ids [R, k] int32 local expert of each slot, -1 for none; weights [R, k] fp32/fp64
    -> partial [R, H] layer dtype: per row, sum over its slots j with ids >= 0, in ascending j, of
    weights[j] * y_{ids[j]}(row), accumulated in weights.dtype and rounded once. Differentiable w.r.t. rows,
    weights and params (autograd through the backend's expert_ffn).
    """
    num_rows, el = rows.shape[0], params.w_up.shape[0]
    if ids.numel() and (int(ids.max()) >= el or int(ids.min()) < -1):
        raise RuntimeError(f"a peer sent local expert ids in [{int(ids.min())}, {int(ids.max())}], but this rank owns "
                           f"{el} experts (the ranks disagree on the layer's configuration)")
    valid = ids >= 0
    r_idx, j_idx = valid.nonzero(as_tuple=True)  # row-major: by row, then slot
    experts, perm = torch.sort(ids[r_idx, j_idx].long(), stable=True)  # grouped by expert, (row, slot) within
    r_idx, j_idx = r_idx[perm], j_idx[perm]
    counts = torch.bincount(experts, minlength=el)
    pos = (valid.cumsum(1) - 1)[r_idx, j_idx]  # the slot's place among its row's local slots
    width = int(valid.sum(1).max()) if num_rows else 0
    y = expert_ffn(_OrderedGather.apply(rows, r_idx, pos, width), counts, params, activation)
    weighted = y.to(weights.dtype) * weights[r_idx, j_idx].unsqueeze(1)
    return ordered_sum(weighted, r_idx, pos, num_rows, width).to(rows.dtype)


class _TokenRankExperts(torch.autograd.Function):
    """rows [P, H] layer dtype, peer-major; slot_weights [P, k] fp32/fp64; slot_ids [P, k] int32 (the
    destination's local expert per slot, -1 for none); per_peer [W] int64 CPU -> partials [P, H] layer dtype,
    each row's `local_partials` computed on its destination rank.

    A call sends each peer at most `exchange.slab_rows` rows per round: the per-(token, rank) rows always fit
    one round (at most one per token); the per-(token, expert) rows of `exchange_experts` may take several. A
    round is DISPATCH then RETURN; a sender's signal words say whether it has rows for another round, so every
    rank knows after each dispatch whether one follows (module protocol.py). Backward replays the rounds.
    """

    @staticmethod
    def forward(ctx, rows, slot_weights, slot_ids, per_peer, exchange, expert_ffn, activation, info, w_up, w_down,
                b_up, b_down):
        slab, k, wdtype = exchange.slab_rows, slot_ids.shape[1], slot_weights.dtype
        per = per_peer.tolist()
        starts = [sum(per[:d]) for d in range(len(per))]
        track = any(ctx.needs_input_grad)
        weights = (w_up, w_down, b_up, b_down)
        if track:
            weights = tuple(None if t is None else t.detach().requires_grad_(t.requires_grad) for t in weights)
        local = MoEParams(router_weight=None, w_up=weights[0], w_down=weights[1], b_up=weights[2], b_down=weights[3])
        rows, slot_weights = rows.detach(), slot_weights.detach()
        out = rows.new_empty(rows.shape)
        rounds, bytes_sent, c = [], 0, 0
        while True:
            take = [max(0, min(slab, n - c * slab)) for n in per]
            more = any(n - c * slab > t for n, t in zip(per, take))
            idx = None if take == per else torch.cat(
                [torch.arange(s + c * slab, s + c * slab + t) for s, t in zip(starts, take)]).to(rows.device)

            def part(t, idx=idx):
                return t if idx is None else t.index_select(0, idx)

            take_t = torch.tensor(take, dtype=torch.int64)
            sent_ids = part(slot_ids)
            records, hits = pack_slots(part(slot_weights), sent_ids)
            ends = torch.cumsum(take_t, 0)
            cum = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(hits.cpu(), 0)])
            rec_per_peer = (cum[ends] - cum[ends - take_t]).tolist()
            sent = exchange.run(DISPATCH, part(rows), take_t, records, rec_per_peer, more=more)
            w_recv, ids_recv, record_at = unpack_slots(sent.records, int(sent.counts.sum()), k, wdtype)
            rows_recv = sent.rows
            with torch.enable_grad() if track else torch.no_grad():
                if track:
                    rows_recv.requires_grad_(True)
                    w_recv.requires_grad_(True)
                partial = local_partials(rows_recv, ids_recv, w_recv, expert_ffn, local, activation)
            back = exchange.run(RETURN, partial.detach(), sent.counts)
            if back.counts.tolist() != take:
                raise RuntimeError(f"rank {exchange.rank}: the return exchange delivered {back.counts.tolist()} rows "
                                   f"per peer, but this rank dispatched {take}")
            if idx is None:
                out = back.rows
            else:
                out.index_copy_(0, idx, back.rows)
            bytes_sent += sent.bytes_sent + back.bytes_sent
            rounds.append((idx, take_t, sent.counts, sent_ids >= 0, rec_per_peer, sent.record_counts, record_at,
                           (rows_recv, w_recv, partial) if track else None))
            if not sent.more:
                break
            c += 1
        info["bytes_sent"], info["rounds"] = bytes_sent, len(rounds)
        ctx.exchange, ctx.rounds, ctx.weights = exchange, rounds if track else None, weights
        ctx.shape, ctx.k, ctx.wdtype = rows.shape, k, wdtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ex = ctx.exchange
        if ctx.rounds is None:
            raise RuntimeError("expert-parallel MoE: backward ran twice through one forward (retain_graph); each "
                               "forward's exchanges can be reversed once, on every rank together")
        grad_out = grad_out.contiguous()
        grad_rows = grad_out.new_empty(ctx.shape)
        grad_w = torch.empty(ctx.shape[0], ctx.k, dtype=ctx.wdtype, device=grad_out.device)
        leaves = [t for t in ctx.weights if t is not None and t.requires_grad]
        totals = [None] * len(leaves)
        for idx, take, recv_counts, sent_valid, sent_records, recv_records, record_at, graph in ctx.rounds:
            rows_recv, w_recv, partial = graph
            got = ex.run(DISPATCH, grad_out if idx is None else grad_out.index_select(0, idx), take)
            if not torch.equal(got.counts, recv_counts):
                raise RuntimeError(f"rank {ex.rank}: the backward dispatch delivered {got.counts.tolist()} rows per "
                                   f"peer, but the forward's delivered {recv_counts.tolist()}")
            targets = [rows_recv, w_recv] + leaves
            found = (torch.autograd.grad(partial, targets, got.rows, allow_unused=True) if partial.grad_fn is not None
                     else [None] * len(targets))  # no slot of any received row is this rank's: all zero
            found = [torch.zeros_like(t) if g is None else g for t, g in zip(targets, found)]
            wgrad_records = found[1].reshape(-1).index_select(0, record_at).contiguous().view(torch.uint8)
            wgrad_col = wgrad_records.view(record_at.numel(), found[1].element_size())
            back = ex.run(RETURN, found[0], recv_counts, [wgrad_col], recv_records.tolist(), recv_records=sent_records)
            # the records come back in the order they went out: row-major over this round's rows, slot order within
            wgrads = torch.zeros(sent_valid.shape, dtype=ctx.wdtype, device=grad_out.device)
            wgrads[sent_valid] = back.records[0].view(ctx.wdtype).reshape(-1)
            if idx is None:
                grad_rows, grad_w = back.rows, wgrads
            else:
                grad_rows.index_copy_(0, idx, back.rows)
                grad_w.index_copy_(0, idx, wgrads)
            totals = [g if t is None else t + g for t, g in zip(totals, found[2:])]  # rounds in order: fixed
        it = iter(totals)
        weight_grads = [next(it) if t is not None and t.requires_grad else None for t in ctx.weights]
        ctx.rounds = None
        need = ctx.needs_input_grad
        return (grad_rows if need[0] else None, grad_w if need[1] else None, None, None, None, None, None, None,
                *weight_grads)


def exchange_token_rows(rows: torch.Tensor, slot_weights: torch.Tensor, slot_ids: torch.Tensor,
                        per_peer: torch.Tensor, exchange, expert_ffn, activation: str, w_up, w_down, b_up=None,
                        b_down=None) -> tuple[torch.Tensor, int]:
    """Differentiable dispatch -> owners' experts -> return over a one-sided exchange, one row per (token, rank):
    rows [P, H] peer-major, slot_weights [P, k] fp32/fp64, slot_ids [P, k] int32, per_peer [W] int64 CPU ->
    (partial rows [P, H] in the layer dtype, bytes this rank put in the forward). Collective."""
    info: dict = {}
    y = _TokenRankExperts.apply(rows, slot_weights, slot_ids, per_peer, exchange, expert_ffn, activation, info, w_up,
                                w_down, b_up, b_down)
    return y, info["bytes_sent"]


def exchange_experts(send_rows: torch.Tensor, send_counts: torch.Tensor, exchange, expert_ffn, activation: str,
                     w_up, w_down, b_up=None, b_down=None) -> tuple[torch.Tensor, int]:
    """Differentiable dispatch -> owners' experts -> return of per-(token, expert) rows: send_rows [S, H]
    peer-major then expert-major, send_counts [W, E_local] int64 CPU -> (expert outputs of those rows [S, H],
    bytes this rank put). Collective; what the fused backend's backward recomputes its forward with.

    Over a one-sided exchange each row travels as a row of its own with one slot (its local expert, weight 1,
    so the result is y itself, bit for bit); rows beyond a slab go in further rounds. Over `alltoall`, the
    per-(token, expert) exchanges themselves.
    """
    check_send(send_rows, send_counts, send_counts.shape[0], w_up.shape[0], None)
    if getattr(exchange, "row_unit", None) == TOKEN_RANK:
        w, el = send_counts.shape
        local = torch.arange(el).repeat(w).repeat_interleave(send_counts.reshape(-1), output_size=send_rows.shape[0])
        slot_ids = local.to(device=send_rows.device, dtype=torch.int32).unsqueeze(1)
        ones = torch.ones(send_rows.shape[0], 1, dtype=_acc_dtype(send_rows.dtype), device=send_rows.device)
        return exchange_token_rows(send_rows, ones, slot_ids, send_counts.sum(1), exchange, expert_ffn, activation,
                                   w_up, w_down, b_up, b_down)
    info: dict = {}
    y = _ExpertParallelExperts.apply(send_rows, send_counts, exchange, expert_ffn, activation, info, w_up, w_down,
                                     b_up, b_down)
    return y, info["bytes_sent"]


def combine(y_rows: torch.Tensor, order: ExpertOrder, weights: torch.Tensor, deterministic: bool) -> torch.Tensor:
    """y_rows [A, H] in order.order's order, weights [T, k] -> [T, H] in weights.dtype.

    Like reference.combine, but also for T = 0, and always through graph ops on y_rows: a rank with no
    tokens must still reach the expert-parallel Function in backward, or its peers would wait for it.
    """
    (t, k), h = weights.shape, y_rows.shape[-1]
    weighted = y_rows.to(weights.dtype) * weights.reshape(-1)[order.order].unsqueeze(1)
    if deterministic:
        slots = weighted.new_zeros(t * k, h).index_copy(0, order.order, weighted)
        return slots.view(t, k, h).sum(dim=1)
    return weighted.new_zeros(t, h).index_add(0, order.order // k, weighted)


def _token_rank_routed(x: torch.Tensor, params: MoEParams, cfg: MoEConfig, routing: Routing, ep: ExpertParallel,
                       exchange, expert_ffn) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The routed part over a one-sided exchange (module docstring) -> (out [T, H] fp32/fp64, bytes put,
    rows per peer [W] int64 CPU)."""
    ids, kept, weights = routing.topk_ids, routing.kept, routing.topk_weights
    t, el, w = ids.shape[0], ep.num_local_experts, ep.world_size
    owner = ids // el
    hits = torch.zeros(t, w, dtype=torch.bool, device=x.device)
    token = torch.arange(t, device=x.device).unsqueeze(1).expand_as(ids)
    hits[token[kept], owner[kept]] = True
    dest, tok = hits.t().nonzero(as_tuple=True)  # the (rank, token) pairs, by rank then token
    per_peer = hits.sum(0).cpu()
    pos = (hits.cumsum(1) - 1)[tok, dest]  # a pair's place among its token's ranks: the combine's order
    width = int(hits.sum(1).max()) if t else 0
    sel = kept[tok] & (owner[tok] == dest.unsqueeze(1))  # [P, k]: the token's slots on the pair's rank
    slot_ids = torch.where(sel, ids[tok] % el, -1).to(torch.int32)
    slot_weights = torch.where(sel, weights.index_select(0, tok), weights.new_zeros(()))
    rows = _OrderedGather.apply(x, tok, pos, width)
    partials, bytes_sent = exchange_token_rows(rows, slot_weights, slot_ids, per_peer, exchange, expert_ffn,
                                               cfg.activation_key, params.w_up, params.w_down, params.b_up,
                                               params.b_down)
    # ordered_sum is a graph op on partials even for T = 0: a rank without tokens still reaches the Function in
    # backward, where its peers wait for its exchanges.
    return ordered_sum(partials.to(weights.dtype), tok, pos, t, width), bytes_sent, per_peer


def ep_moe_forward(x: torch.Tensor, params: MoEParams, cfg: MoEConfig, routing: Routing | None, ep: ExpertParallel,
                   expert_ffn, backend: str = "reference") -> MoEOutput:
    """x [T, H] this rank's tokens (validated, flattened) -> MoEOutput with out [T, H] in x.dtype.

    params hold the replicated router/shared expert and this rank's E_local experts. Capacity applies per
    rank to the rank's own tokens (cfg.capacity(T)), like the single-rank layer on those tokens; the losses
    are those of this rank's tokens. stats.rows_per_peer counts the rows dispatched to each rank (own included):
    per (token, rank) on the one-sided transports, per (token, expert) on alltoall.
    """
    ep.check_tokens(x.shape[0])
    dex = ep.device_exchange_for(x.dtype, x.device, backend)
    if dex is not None:
        return _device_moe_forward(x, params, cfg, routing, ep, dex)
    if routing is None:
        routing = route(x, params.router_weight, params.expert_bias, cfg, params.router_bias)
    exchange = ep.exchange_for(x.dtype, x.device)
    if getattr(exchange, "row_unit", None) == TOKEN_RANK:
        out, bytes_sent, rows_per_peer = _token_rank_routed(x, params, cfg, routing, ep, exchange, expert_ffn)
        kept_ids = routing.topk_ids[routing.kept]
        tokens_per_expert = torch.bincount(kept_ids, minlength=cfg.num_experts)
    else:
        order = sort_by_expert(routing.topk_ids, routing.kept, cfg.num_experts)
        send_counts = order.counts.view(ep.world_size, ep.num_local_experts).cpu()
        send_rows = x.index_select(0, order.order // cfg.top_k)
        y_rows, bytes_sent = exchange_experts(send_rows, send_counts, exchange, expert_ffn, cfg.activation_key,
                                              params.w_up, params.w_down, params.b_up, params.b_down)
        out = combine(y_rows, order, routing.topk_weights, cfg.deterministic)
        rows_per_peer, tokens_per_expert = send_counts.sum(1), order.counts
    if cfg.num_shared_experts > 0:
        out = out + shared_expert(x, params, cfg)
    lb, z = routing_losses(routing, cfg.num_experts)
    ep.last_bytes_sent = bytes_sent
    stats = MoEStats(tokens_per_expert=tokens_per_expert, dropped=(~routing.kept).sum(), bytes_sent=bytes_sent,
                     rows_per_peer=rows_per_peer)
    return MoEOutput(out=out.to(x.dtype), routing=routing, aux_loss=cfg.aux_loss_coef * lb + cfg.z_loss_coef * z,
                     lb_loss=lb, z_loss=z, stats=stats, backend=backend)


def _device_moe_forward(x: torch.Tensor, params: MoEParams, cfg: MoEConfig, routing: Routing | None,
                        ep: ExpertParallel, dex) -> MoEOutput:
    """ep_moe_forward over device-initiated exchanges (device_forward.py) with the `triton` backend's kernels: the
    route kernel, the experts on the received rows, no host synchronisation (stats.host_syncs = 0, 1 for the call
    that allocated the heap; bytes_sent and rows_per_peer are device tensors)."""
    from .. import triton_backend
    from .device_forward import device_token_rank_routed

    t, k, e = x.shape[0], cfg.top_k, cfg.num_experts
    counts_all = None
    if routing is None and t == 0:  # nothing to route, but the router stays in the graph
        logits = router_logits(x, params.router_weight, params.router_bias)
        routing = Routing(torch.zeros(0, k, dtype=torch.int64, device=x.device),
                          torch.zeros(0, k, dtype=_acc_dtype(x.dtype), device=x.device),
                          torch.zeros(0, k, dtype=torch.bool, device=x.device), logits,
                          scores_from_logits(logits, cfg.score_func))
    elif t:
        routing, _, _, _, _, counts_all = triton_backend.route_on_device(x.contiguous(), params, cfg, routing)
    out, bytes_sent, rows_per_peer = device_token_rank_routed(x, routing, params, cfg.activation_key, ep, dex,
                                                              triton_backend.token_rows_moe)
    if cfg.num_shared_experts > 0:
        out = out + shared_expert(x, params, cfg)
    if counts_all is None and routing.scores is not None:
        counts_all = torch.zeros(e, dtype=torch.int64, device=x.device).index_add_(
            0, routing.topk_ids.reshape(-1), torch.ones(routing.topk_ids.numel(), dtype=torch.int64, device=x.device))
    lb, z = routing_losses(routing, e, counts_all)
    kept = routing.kept.reshape(-1).to(torch.int64)
    tokens_per_expert = torch.zeros(e, dtype=torch.int64, device=x.device).index_add_(
        0, routing.topk_ids.reshape(-1), kept)
    ep.last_bytes_sent = bytes_sent
    syncs, dex.setup_syncs = dex.setup_syncs, 0
    stats = MoEStats(tokens_per_expert=tokens_per_expert, dropped=(1 - kept).sum(), bytes_sent=bytes_sent,
                     rows_per_peer=rows_per_peer, host_syncs=syncs)
    return MoEOutput(out=out.to(x.dtype), routing=routing, aux_loss=cfg.aux_loss_coef * lb + cfg.z_loss_coef * z,
                     lb_loss=lb, z_loss=z, stats=stats, backend="triton")
