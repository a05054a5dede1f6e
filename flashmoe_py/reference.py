"""The `reference` backend: DESIGN §2 in plain PyTorch, differentiable by autograd, on any device.

Pipeline: route -> sort assignments by expert -> per expert: gather its rows, FFN, scale by the routing
weight, add into the fp32 output -> + shared expert.
It is the ground truth every other backend is tested against, and the CPU path users get.

Two ways to run the experts:
- loop (CPU, and any device where grouped_mm cannot run): one expert at a time on its own rows, added into
  the output with index_add. A token appears at most once per expert, so each index_add touches every
  output row at most once and the sum is in a fixed order (expert order) on every device, atomics or not.
  Intermediates are one expert's rows wide, which on a CPU matters more than it sounds: fresh
  [T*k, H] buffers cost page faults comparable to the matmuls themselves.
- grouped_mm (bf16/fp32, 16-byte aligned sizes; on CUDA always, on CPU for inference with few rows per
  expert): all rows in two grouped GEMMs without a host sync for the split, then a combine that sums each
  token's k slots in slot order (deterministic) or with index_add (atomics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import apply_activation
from .config import MoEConfig
from .records import MoEOutput, MoEParams, MoEStats, Routing
from .routing import ExpertOrder, compute_dtype, route, routing_losses, sort_by_expert


def _linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows [n, K] @ weight [K, N] (+ bias [N]); one BLAS call, fp32-or-wider accumulation."""
    return torch.mm(rows, weight) if bias is None else torch.addmm(bias, rows, weight)


def per_expert(params: MoEParams) -> list[tuple]:
    """(w_up[e], b_up[e] | None, w_down[e], b_down[e] | None) for every local expert, as views.

    Taken with one `unbind` per tensor rather than `w_up[e]` in the loop: the backward of an unbind
    stacks the experts' gradients once, while each indexing op's backward would materialise a zero
    gradient of the whole [E, ...] tensor, O(E^2) memory traffic per backward.
    """
    def split(t):
        return t.unbind(0) if t is not None else (None,) * params.w_up.shape[0]

    return list(zip(split(params.w_up), split(params.b_up), split(params.w_down), split(params.b_down)))


def expert_block(rows: torch.Tensor, weights: tuple, activation: str) -> torch.Tensor:
    """rows [n, H] of one expert, weights = per_expert(params)[e] -> y [n, H], both in the layer dtype."""
    w_up, b_up, w_down, b_down = weights
    return _linear(apply_activation(_linear(rows, w_up, b_up), activation), w_down, b_down)


# On CPU, grouped_mm beats the per-expert loop only when experts get few rows (decode): measured at
# 1.07-1.24x up to 16 rows per expert and 0.8-0.97x from 32 up (fp32, 1 thread, H 512-1024).
CPU_GROUPED_MM_MAX_ROWS_PER_EXPERT = 16


def use_grouped_mm(num_rows: int, rows: torch.Tensor, params: MoEParams) -> bool:
    """Whether to run the experts as torch grouped_mm rather than the loop.

    num_rows: rows to process (an upper bound known from shapes: no host sync). grouped_mm needs bf16/fp32 and
    16-byte aligned sizes. On CUDA it always wins. On CPU only for few rows per expert, and only when autograd
    is not recording: its CPU backward rejects experts without rows.
    """
    w_up, w_down = params.w_up, params.w_down
    if not hasattr(F, "grouped_mm") or rows.dtype not in (torch.bfloat16, torch.float32):
        return False
    if not all(s * rows.element_size() % 16 == 0 for s in (w_up.shape[1], w_up.shape[2], w_down.shape[1])):
        return False
    if rows.is_cuda:
        return True
    recording = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (rows, w_up, w_down, params.b_up, params.b_down))
    return (rows.device.type == "cpu" and not recording
            and num_rows <= CPU_GROUPED_MM_MAX_ROWS_PER_EXPERT * w_up.shape[0])


def expert_ffn(rows: torch.Tensor, counts: torch.Tensor, params: MoEParams, activation: str) -> torch.Tensor:
    """Apply local expert e to its contiguous block of rows (used where rows arrive already grouped).

    rows [A, H] layer dtype, sorted by local expert; counts [E_local] int64, sums to A -> y [A, H] layer dtype
    """
    if rows.shape[0] == 0:
        return rows.new_empty(0, params.w_down.shape[-1])
    if use_grouped_mm(rows.shape[0], rows, params):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        expert_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=rows.device), counts,
                                                output_size=rows.shape[0])
        pre = F.grouped_mm(rows, params.w_up, offs=offs)
        if params.b_up is not None:
            pre = pre + params.b_up[expert_of_row]
        y = F.grouped_mm(apply_activation(pre, activation), params.w_down, offs=offs)
        return y if params.b_down is None else y + params.b_down[expert_of_row]
    outs, start = [], 0
    experts = per_expert(params)
    for e, n in enumerate(counts.tolist()):  # the loop splits by host-side counts: one sync, on purpose
        if n:
            outs.append(expert_block(rows[start:start + n], experts[e], activation))
            start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def combine(y_rows: torch.Tensor, order: ExpertOrder, weights: torch.Tensor, deterministic: bool) -> torch.Tensor:
    """Weighted sum of each token's expert outputs.

    y_rows [A, H] layer dtype, in the order of order.order; weights [T, k] fp32/fp64 -> [T, H] weights.dtype.
    Deterministic: rows are placed at their (token, slot) position and summed over the k slots in slot
    order; otherwise accumulated with one index_add (atomics on CUDA).
    """
    t, k = weights.shape
    weighted = y_rows.to(weights.dtype) * weights.reshape(-1)[order.order].unsqueeze(1)
    if deterministic:
        slots = weighted.new_zeros(t * k, y_rows.shape[-1]).index_copy(0, order.order, weighted)
        return slots.view(t, k, -1).sum(dim=1)
    return weighted.new_zeros(t, y_rows.shape[-1]).index_add(0, order.order // k, weighted)


def routed_experts(x: torch.Tensor, order: ExpertOrder, weights: torch.Tensor, params: MoEParams,
                   cfg: MoEConfig) -> torch.Tensor:
    """x [T, H]; weights [T, k] compute dtype -> routed output [T, H] in the compute dtype."""
    k = cfg.top_k
    if x.shape[0] == 0:  # empty, but still part of x's graph so backward works like any PyTorch op
        return x.to(weights.dtype) * 0
    if use_grouped_mm(x.shape[0] * k, x, params):
        y_rows = expert_ffn(x[order.order // k], order.counts, params, cfg.activation_key)
        return combine(y_rows, order, weights, cfg.deterministic)
    token_of_row = order.order // k
    weight_of_row = weights.reshape(-1)[order.order].unsqueeze(1)
    out = torch.zeros(x.shape, dtype=weights.dtype, device=x.device)
    start = 0
    experts = per_expert(params)
    for e, n in enumerate(order.counts.tolist()):  # one host read of the counts
        if n == 0:
            continue
        tokens = token_of_row[start:start + n]
        y = expert_block(x.index_select(0, tokens), experts[e], cfg.activation_key)
        out.index_add_(0, tokens, y.to(weights.dtype) * weight_of_row[start:start + n])
        start += n
    return out


def shared_expert(x: torch.Tensor, params: MoEParams, cfg: MoEConfig) -> torch.Tensor:
    """x [T, H] -> [T, H] in the compute dtype (fp32, fp64 for fp64 inputs): the dense shared FFN,
    scaled by sigmoid(x @ shared_gate_weight.T) when the gate is on."""
    h = apply_activation(x @ params.shared_w_up, cfg.activation_key)
    dt = compute_dtype(x)
    y = (h @ params.shared_w_down).to(dt)
    if cfg.shared_expert_gate:
        y = y * torch.sigmoid(x.to(dt) @ params.shared_gate_weight.to(dt).t())
    return y


def moe_forward(x: torch.Tensor, params: MoEParams, cfg: MoEConfig, routing: Routing | None = None) -> MoEOutput:
    """x [T, H] (already flattened and validated) -> MoEOutput with out [T, H] in x.dtype."""
    if routing is None:
        routing = route(x, params.router_weight, params.expert_bias, cfg, params.router_bias)
    order = sort_by_expert(routing.topk_ids, routing.kept, cfg.num_experts)
    out = routed_experts(x, order, routing.topk_weights, params, cfg)
    if cfg.num_shared_experts > 0:
        out = out + shared_expert(x, params, cfg)
    lb, z = routing_losses(routing, cfg.num_experts)
    stats = MoEStats(tokens_per_expert=order.counts, dropped=(~routing.kept).sum())
    return MoEOutput(out=out.to(x.dtype), routing=routing, aux_loss=cfg.aux_loss_coef * lb + cfg.z_loss_coef * z,
                     lb_loss=lb, z_loss=z, stats=stats, backend="reference")
