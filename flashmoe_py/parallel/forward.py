"""The expert-parallel MoE forward: local routing -> dispatch -> local experts -> return -> local combine.

Pipeline on rank r (W ranks, E_local = E/W experts each):
  route r's own tokens with the replicated router; sort the kept assignments by global expert, which is
  also (owner rank, local expert) order since ranks own contiguous expert blocks
  send_rows   [S, H]        x[token of each kept assignment], peer-major then expert-major
  send_counts [W, E_local]  rows for (owner rank, its local expert)
  DISPATCH exchange -> recv rows [R, H] source-major; reordered expert-major for the backend's
  `expert_ffn(rows, counts [E_local], params, activation)` on r's own experts
  RETURN exchange  -> each rank gets its rows' expert outputs back in send order; weighted combine locally.

Autograd: `_ExpertParallelExperts` wraps dispatch + experts + return. Its backward runs the reverse
exchanges: output gradients travel to the experts' owners (DISPATCH region), the local expert graph
yields the expert weight gradients (they stay with the owner) and the row gradients, which travel back
to the tokens' ranks (RETURN region). Router, bias and shared-expert gradients are local, from this
rank's tokens. Backward always runs both exchanges, even where nothing on a rank needs a gradient, so
the ranks' exchange sequences stay in step; every rank must run backward through the layer if any does.
"""

from __future__ import annotations

import torch

from ..config import MoEConfig
from ..records import MoEOutput, MoEParams, MoEStats, Routing
from ..reference import shared_expert
from ..routing import ExpertOrder, route, routing_losses, sort_by_expert
from .expert_parallel import ExpertParallel
from .layout import DISPATCH, RETURN


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
    """send_rows [S, H] -> the expert outputs of those rows [S, H], computed on the rows' owner ranks."""

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


def exchange_experts(send_rows: torch.Tensor, send_counts: torch.Tensor, exchange, expert_ffn, activation: str,
                     w_up, w_down, b_up=None, b_down=None) -> tuple[torch.Tensor, int]:
    """Differentiable dispatch -> owners' experts -> return: send_rows [S, H] peer-major then expert-major,
    send_counts [W, E_local] int64 CPU -> (expert outputs of those rows [S, H], bytes this rank put).
    Collective; also what the fused backend's backward recomputes its forward with."""
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


def ep_moe_forward(x: torch.Tensor, params: MoEParams, cfg: MoEConfig, routing: Routing | None, ep: ExpertParallel,
                   expert_ffn, backend: str = "reference") -> MoEOutput:
    """x [T, H] this rank's tokens (validated, flattened) -> MoEOutput with out [T, H] in x.dtype.

    params hold the replicated router/shared expert and this rank's E_local experts. Capacity applies per
    rank to the rank's own tokens (cfg.capacity(T)), like the single-rank layer on those tokens; the losses
    are those of this rank's tokens.
    """
    ep.check_tokens(x.shape[0])
    if routing is None:
        routing = route(x, params.router_weight, params.expert_bias, cfg, params.router_bias)
    order = sort_by_expert(routing.topk_ids, routing.kept, cfg.num_experts)
    send_counts = order.counts.view(ep.world_size, ep.num_local_experts).cpu()
    send_rows = x.index_select(0, order.order // cfg.top_k)
    exchange = ep.exchange_for(x.dtype, x.device)
    y_rows, bytes_sent = exchange_experts(send_rows, send_counts, exchange, expert_ffn, cfg.activation_key, params.w_up,
                                          params.w_down, params.b_up, params.b_down)
    out = combine(y_rows, order, routing.topk_weights, cfg.deterministic)
    if cfg.num_shared_experts > 0:
        out = out + shared_expert(x, params, cfg)
    lb, z = routing_losses(routing, cfg.num_experts)
    ep.last_bytes_sent = bytes_sent
    stats = MoEStats(tokens_per_expert=order.counts, dropped=(~routing.kept).sum(), bytes_sent=bytes_sent,
                     rows_per_peer=send_counts.sum(1))
    return MoEOutput(out=out.to(x.dtype), routing=routing, aux_loss=cfg.aux_loss_coef * lb + cfg.z_loss_coef * z,
                     lb_loss=lb, z_loss=z, stats=stats, backend=backend)
