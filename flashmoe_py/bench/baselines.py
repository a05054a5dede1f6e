"""Baselines the benchmark times against our backends, on the same weights and the same routing.

Each computes the routed experts only -- `experts(x, topk_ids, topk_weights) -> [T, H]` -- and
`candidates.py` wraps it with the reference router and shared expert, so every row computes the same
layer and the FLOP count applies to all alike.

- `naive_loop`: what transformers' eager experts do: for each expert that has tokens, find them with a
  mask, gather, run the FFN, scale by the routing weight and index_add into the output.
- `grouped_mm_experts`: what a user writes with torch alone: sort the (token, expert) rows by expert and
  run both projections as `torch.nn.functional.grouped_mm` (one call each for all experts).
- `HFExperts`: transformers' own experts module (`MixtralExperts`: gate_up_proj [E, 2I, H], down_proj
  [E, H, I], the `nn.Linear` layout) with one of its registered experts implementations (`eager`,
  `grouped_mm`, `batched_mm`), holding copies of our weights in its layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
        y = apply_activation(pre, cfg.activation_key) @ params.w_down[e]
        if params.b_down is not None:
            y = y + params.b_down[e]
        out.index_add_(0, tok, (y * topk_weights[tok, slot, None]).to(x.dtype))
    return out


def grouped_mm_unavailable(cfg: MoEConfig, dtype: torch.dtype) -> str | None:
    """Why `grouped_mm_experts` cannot run for this layer, or None."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"grouped_mm takes float32/bfloat16/float16, not {dtype}"
    itemsize = torch.empty((), dtype=dtype).element_size()
    bad = {n: v for n, v in (("H", cfg.hidden_size), ("N_up", cfg.up_size), ("I", cfg.ffn_hidden_size))
           if v * itemsize % 16}
    if bad:
        return f"grouped_mm needs rows of 16-byte multiples; {bad} x {itemsize} bytes is not"
    return None


def grouped_mm_experts(x: torch.Tensor, params: MoEParams, cfg: MoEConfig, topk_ids: torch.Tensor,
                       topk_weights: torch.Tensor) -> torch.Tensor:
    """Same contract as `naive_loop`; the k slots of each token are summed in fp32 in slot order."""
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    expert_of_row, perm = torch.sort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=cfg.num_experts), 0).to(torch.int32)
    pre = F.grouped_mm(x[perm // k], params.w_up, offs=offs)
    if params.b_up is not None:
        pre = pre + params.b_up[expert_of_row]
    y = F.grouped_mm(apply_activation(pre, cfg.activation_key), params.w_down, offs=offs)
    if params.b_down is not None:
        y = y + params.b_down[expert_of_row]
    weighted = y.float() * topk_weights.reshape(-1)[perm].float().unsqueeze(1)
    slots = weighted.new_zeros(t * k, x.shape[1]).index_copy(0, perm, weighted)
    return slots.view(t, k, -1).sum(dim=1).to(x.dtype)


# transformers' experts implementations this benchmark knows how to drive on a plain CPU or GPU
# ("deepgemm" and "sonicmoe" are vendor kernels with their own requirements).
HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
_HF_ACT = {"swiglu": "silu", "geglu": "gelu"}  # gated activations: act(gate) * up, gate columns first


def hf_unavailable(impl: str, cfg: MoEConfig) -> str | None:
    """Why transformers' `impl` experts cannot compute this layer, or None."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError as e:
        return f"transformers with an experts interface is not installed ({e}); pip install 'flashmoe_py[bench]'"
    if impl != "eager" and impl not in ALL_EXPERTS_FUNCTIONS:
        return f"this transformers has no {impl!r} experts implementation"
    if cfg.activation not in _HF_ACT:
        return f"transformers' gated experts have no counterpart for activation={cfg.activation!r}"
    if cfg.bias:
        return "MixtralExperts has no expert biases"
    return None


class HFExperts:
    """transformers' MixtralExperts with experts implementation `impl`, on copies of our expert weights.

    Its parameters (leaves for the backward) are gate_up_proj [E, 2I, H] = w_up^T and down_proj
    [E, H, I] = w_down^T per expert; `grads()` maps their gradients back to our layout.
    """

    def __init__(self, impl: str, params: MoEParams, cfg: MoEConfig, requires_grad: bool):
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        hf_cfg = MixtralConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                               num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                               hidden_act=_HF_ACT[cfg.activation], experts_implementation=impl)
        with torch.device("meta"):
            module = MixtralExperts(hf_cfg)  # allocate nothing; the weights come from ours below
        module.gate_up_proj = torch.nn.Parameter(params.w_up.detach().transpose(1, 2).contiguous(),
                                                 requires_grad=requires_grad)
        module.down_proj = torch.nn.Parameter(params.w_down.detach().transpose(1, 2).contiguous(),
                                              requires_grad=requires_grad)
        self.module = module

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        # transformers' MoE blocks hand the experts routing weights in the hidden dtype.
        return self.module(x, topk_ids, topk_weights.to(x.dtype))

    def leaves(self) -> list[torch.Tensor]:
        return [self.module.gate_up_proj, self.module.down_proj]

    def grads(self) -> dict[str, torch.Tensor]:
        return {"w_up": self.module.gate_up_proj.grad.transpose(1, 2),
                "w_down": self.module.down_proj.grad.transpose(1, 2)}


def batched_mm_bytes(cfg: MoEConfig, tokens: int, itemsize: int) -> int:
    """transformers' batched_mm gathers both projections' weights for every (token, expert) pair."""
    return tokens * cfg.top_k * (cfg.up_size + cfg.ffn_hidden_size) * cfg.hidden_size * itemsize
