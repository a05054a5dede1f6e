"""Reference routing (DESIGN §2.1-4, §2.7): scores, selection, weights, capacity, losses, expert order.

Pipeline: logits -> scores -> (bias, groups) selection -> weights -> capacity mask -> sort by expert.
Every step is vectorised over tokens; ties are broken by stable sorts so the choice is deterministic:
lower expert index first in top-k, lower token index first when capacity drops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MoEConfig
from .records import Routing


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64 (an fp64 layer stays fp64 throughout), else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def router_logits(x: torch.Tensor, router_weight: torch.Tensor,
                  router_bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H], router_weight [E, H], router_bias [E] or None -> logits [T, E] = x @ W.T (+ b) in fp32 (fp64
    when an input is fp64)."""
    dt = compute_dtype(x, router_weight, router_bias)
    logits = x.to(dt) @ router_weight.to(dt).t()
    return logits if router_bias is None else logits + router_bias.to(dt)


def scores_from_logits(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    return torch.softmax(logits, dim=-1) if score_func == "softmax" else torch.sigmoid(logits)


def _stable_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim; equal values keep the lower index first."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def select_experts(scores: torch.Tensor, cfg: MoEConfig, expert_bias: torch.Tensor | None) -> torch.Tensor:
    """scores [T, E] -> topk_ids [T, k] int64 (selection only; no gradient flows through it)."""
    sel = scores.detach()
    if cfg.expert_bias and expert_bias is not None:
        sel = sel + expert_bias.to(sel.dtype)
    g = cfg.num_expert_groups
    if g > 1:
        t, e = sel.shape
        grouped = sel.view(t, g, e // g)
        # A group's score is the sum of its top-2 selection values (top-1 when a group holds one expert).
        group_score = grouped.topk(min(2, e // g), dim=-1).values.sum(-1)
        best_groups = _stable_topk(group_score, cfg.topk_groups)
        allowed = torch.zeros(t, g, dtype=torch.bool, device=sel.device).scatter_(1, best_groups, True)
        sel = grouped.masked_fill(~allowed.unsqueeze(-1), float("-inf")).view(t, e)
    return _stable_topk(sel, cfg.top_k)


def capacity_mask(topk_ids: torch.Tensor, topk_weights: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """kept [T, k] bool: per expert, the C assignments with the highest weight, ties to the lower token."""
    t, k = topk_ids.shape
    cap = cfg.capacity(t)
    if cap is None:
        return torch.ones_like(topk_ids, dtype=torch.bool)
    ids = topk_ids.reshape(-1)
    w = topk_weights.detach().reshape(-1)
    # Flat index t*k + j is already in token order; two stable sorts make the order
    # (expert asc, weight desc, token asc) without a composite key.
    by_weight = torch.sort(w, descending=True, stable=True).indices
    by_expert = by_weight[torch.sort(ids[by_weight], stable=True).indices]
    counts = torch.bincount(ids, minlength=cfg.num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(ids.numel(), device=ids.device) - starts[ids[by_expert]]
    kept = torch.empty_like(ids, dtype=torch.bool)
    kept[by_expert] = rank_in_expert < cap
    return kept.view(t, k)


def route(x: torch.Tensor, router_weight: torch.Tensor, expert_bias: torch.Tensor | None,
          cfg: MoEConfig, router_bias: torch.Tensor | None = None) -> Routing:
    """x [T, H] -> Routing with logits and scores (differentiable w.r.t. x, router_weight and router_bias via the
    weights)."""
    logits = router_logits(x, router_weight, router_bias)
    scores = scores_from_logits(logits, cfg.score_func)
    topk_ids = select_experts(scores, cfg, expert_bias)
    weights = weights_from_scores(scores, topk_ids, cfg)
    return Routing(topk_ids, weights, capacity_mask(topk_ids, weights, cfg), logits, scores)


def weights_from_scores(scores: torch.Tensor, topk_ids: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """scores [T, E], topk_ids [T, k] -> routing weights [T, k] (DESIGN §2.3), differentiable w.r.t. scores."""
    weights = scores.gather(1, topk_ids)
    if cfg.renormalize and cfg.top_k == 1:
        # s/s is exactly 1 (NaN stays NaN), and its true gradient is 0; autograd's 1/s - s/s^2 would
        # only add rounding noise to the router gradient, so the weight is taken out of the graph.
        weights = (weights / weights).detach()
    elif cfg.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return weights


def routing_losses(routing: Routing, num_experts: int,
                   counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lb_loss, z_loss) scalars. f_e counts the routed assignments before capacity drops.

    counts [E] integer, optional: those assignments per expert when already counted on the device (a GPU
    backend passes its own; torch.bincount would read the maximum id back to the host).
    Both are 0 with no tokens or when the caller supplied the routing (no scores to differentiate).
    """
    if routing.scores is None or routing.scores.shape[0] == 0:
        dev = routing.topk_ids.device
        zero = torch.zeros((), device=dev, dtype=torch.float32)
        return zero, zero.clone()
    t, k = routing.topk_ids.shape
    if counts is None:
        counts = torch.bincount(routing.topk_ids.reshape(-1), minlength=num_experts)
    f = counts.to(routing.scores.dtype) / (t * k)
    p = routing.scores.mean(dim=0)
    lb = num_experts * (f * p).sum()
    z = torch.logsumexp(routing.logits, dim=-1).square().mean()
    return lb, z


@dataclass
class ExpertOrder:
    """The kept assignments sorted by expert (stable: token order within an expert).

    order   [A] int64   flat assignment index t*k + j of each sorted row; A = kept assignments
    counts  [E] int64   rows per expert (sums to A)
    slot_of [T*k] int64 sorted row of each flat assignment, A (one past the end) for dropped ones
    """

    order: torch.Tensor
    counts: torch.Tensor
    slot_of: torch.Tensor


def sort_by_expert(topk_ids: torch.Tensor, kept: torch.Tensor, num_experts: int) -> ExpertOrder:
    ids = topk_ids.reshape(-1)
    keep = kept.reshape(-1)
    # Dropped assignments get the sentinel id E so they sort past every real expert and are cut off.
    key = torch.where(keep, ids, torch.full_like(ids, num_experts))
    sorted_key, perm = torch.sort(key, stable=True)
    counts = torch.bincount(sorted_key, minlength=num_experts + 1)[:num_experts]
    # The reference path splits work by host-side counts; this is its one deliberate host sync.
    n_kept = int(keep.sum()) if keep.numel() else 0
    order = perm[:n_kept]
    slot_of = torch.full_like(ids, n_kept)
    slot_of[order] = torch.arange(n_kept, device=ids.device)
    return ExpertOrder(order, counts, slot_of)
