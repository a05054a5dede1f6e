"""Baselines the benchmark times against our backends, on the same weights and routing.

`naive_loop` is what transformers' eager experts do: for each expert that has tokens, find them with a
mask, gather, run the FFN, scale by the routing weight and index_add into the output.
"""

from __future__ import annotations

import torch

from ..activations import apply_activation
from ..config import MoEConfig
from ..records import MoEParams


def naive_loop(x: torch.Tensor, params: MoEParams, cfg: MoEConfig, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor) -> torch.Tensor:
    """x [T, H], topk_ids [T, k] int64, topk_weights [T, k] float -> routed-expert output [T, H] in x.dtype
    (no shared expert, no capacity: the dropless routed part only)."""
    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(topk_ids, cfg.num_experts).permute(2, 1, 0)  # [E, k, T]
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = int(e)
        slot, tok = torch.where(mask[e])
        pre = x[tok] @ params.w_up[e]
        if params.b_up is not None:
            pre = pre + params.b_up[e]
        y = apply_activation(pre, cfg.activation) @ params.w_down[e]
        if params.b_down is not None:
            y = y + params.b_down[e]
        out.index_add_(0, tok, (y * topk_weights[tok, slot, None]).to(x.dtype))
    return out
