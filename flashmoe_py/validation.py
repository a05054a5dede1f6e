"""Argument checks of DESIGN §9: every error names the argument and what was seen.

Shapes and dtypes are checked on the host from metadata only (no device sync), except the range
check of caller-supplied expert ids, which has to read them.
"""

from __future__ import annotations

import torch

from .config import MoEConfig
from .records import MoEParams


def check_input(x, cfg: MoEConfig) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != cfg.hidden_size:
        raise ValueError(f"x: expected shape [..., hidden_size={cfg.hidden_size}], got {tuple(x.shape)}")


def _check_tensor(name: str, t, shape: tuple[int, ...], x: torch.Tensor, dtype: torch.dtype | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of x), got {t.dtype}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: on {t.device} but x is on {x.device}")


def _check_presence(name: str, t, wanted: bool, why: str) -> bool:
    if wanted and t is None:
        raise ValueError(f"params.{name}: required because {why}, got None")
    if not wanted and t is not None:
        raise ValueError(f"params.{name}: given, but the config has no use for it ({why} is off)")
    return wanted


def check_params(params: MoEParams, cfg: MoEConfig, x: torch.Tensor, num_local_experts: int) -> None:
    """Shapes of DESIGN §3; expert weights in x.dtype; router and gate in any float dtype; one device."""
    h, i, el = cfg.hidden_size, cfg.ffn_hidden_size, num_local_experts
    _check_tensor("params.router_weight", params.router_weight, (cfg.num_experts, h), x, None)
    _check_tensor("params.w_up", params.w_up, (el, h, cfg.up_size), x, x.dtype)
    _check_tensor("params.w_down", params.w_down, (el, i, h), x, x.dtype)
    if _check_presence("router_bias", params.router_bias, cfg.router_bias, "router_bias"):
        _check_tensor("params.router_bias", params.router_bias, (cfg.num_experts,), x, None)
    if _check_presence("expert_bias", params.expert_bias, cfg.expert_bias, "expert_bias"):
        _check_tensor("params.expert_bias", params.expert_bias, (cfg.num_experts,), x, None)
    if _check_presence("b_up", params.b_up, cfg.bias, "bias"):
        _check_tensor("params.b_up", params.b_up, (el, cfg.up_size), x, x.dtype)
    if _check_presence("b_down", params.b_down, cfg.bias, "bias"):
        _check_tensor("params.b_down", params.b_down, (el, h), x, x.dtype)
    shared = cfg.num_shared_experts > 0
    if _check_presence("shared_w_up", params.shared_w_up, shared, "num_shared_experts > 0"):
        _check_tensor("params.shared_w_up", params.shared_w_up, (h, cfg.shared_up_size), x, x.dtype)
    if _check_presence("shared_w_down", params.shared_w_down, shared, "num_shared_experts > 0"):
        _check_tensor("params.shared_w_down", params.shared_w_down, (cfg.shared_hidden_size, h), x, x.dtype)
    if _check_presence("shared_gate_weight", params.shared_gate_weight, cfg.shared_expert_gate,
                       "shared_expert_gate"):
        _check_tensor("params.shared_gate_weight", params.shared_gate_weight, (1, h), x, None)


def check_routing(topk_ids, topk_weights, num_tokens: int, cfg: MoEConfig, x: torch.Tensor) -> int:
    """Caller-supplied routing: ids [T, k] integer in [0, E), weights [T, k] floating, on x's device.

    The range check reads the ids' smallest and largest value on the host: for ids on a GPU that is one host
    synchronisation, which is returned (0 or 1) so the forward's stats count it. An out-of-range id would index
    past the expert weights in every backend, so the check is not optional."""
    if (topk_ids is None) != (topk_weights is None):
        raise ValueError("topk_ids and topk_weights: give both or neither")
    want = (num_tokens, cfg.top_k)
    for name, t, floating in (("topk_ids", topk_ids, False), ("topk_weights", topk_weights, True)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != want:
            raise ValueError(f"{name}: expected shape [T={want[0]}, top_k={want[1]}], got {tuple(t.shape)}")
        if t.is_floating_point() != floating or t.is_complex() or t.dtype == torch.bool:
            kind = "a floating-point" if floating else "an integer"
            raise TypeError(f"{name}: expected {kind} dtype, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device} but x is on {x.device}")
    if not topk_ids.numel():
        return 0
    lo, hi = torch.stack(torch.aminmax(topk_ids)).tolist()  # one read of both: one sync on a GPU
    if lo < 0 or hi >= cfg.num_experts:
        raise ValueError(f"topk_ids: expert ids must lie in [0, num_experts={cfg.num_experts}), "
                         f"got values in [{lo}, {hi}]")
    return 1 if topk_ids.device.type == "cuda" else 0
