"""Functional API: `moe(x, params, cfg)` validates, flattens, dispatches to a backend, restores shape."""

from __future__ import annotations

import torch

from . import backends
from .config import MoEConfig
from .records import MoEOutput, MoEParams, Routing
from .routing import capacity_mask, compute_dtype
from .validation import check_input, check_params, check_routing


def moe(x: torch.Tensor, params, cfg: MoEConfig, *, backend: str = "auto", topk_ids: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None, expert_parallel=None) -> MoEOutput:
    """One MoE layer forward (DESIGN §2), on a single rank or expert-parallel.

    x            [..., H] fp64/fp32/bf16/fp16; any leading dims (flattened to T tokens, restored on output)
    params       MoEParams, a dict by parameter name, or a FusedMoE layer
    topk_ids     [T, k] integer, optional caller-supplied routing (skips the router; losses are then 0)
    topk_weights [T, k] floating, given together with topk_ids
    expert_parallel  a `flashmoe_py.parallel.ExpertParallel` (process group + transport; collective): x holds
                 this rank's tokens, params this rank's E/W experts (w_up [E/W, H, N_up], ...) and the
                 replicated router/shared expert; rows go to the experts' owners and come back
    returns MoEOutput; .out has the shape and dtype of x
    """
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg: expected a MoEConfig, got {type(cfg).__name__}")
    check_input(x, cfg)
    params = MoEParams.from_mapping(params)
    if expert_parallel is not None:
        ep_cfg = expert_parallel.config
        if (ep_cfg.num_experts, ep_cfg.top_k, ep_cfg.hidden_size) != (cfg.num_experts, cfg.top_k, cfg.hidden_size):
            raise ValueError("expert_parallel: built for num_experts/top_k/hidden_size "
                             f"{(ep_cfg.num_experts, ep_cfg.top_k, ep_cfg.hidden_size)}, but cfg has "
                             f"{(cfg.num_experts, cfg.top_k, cfg.hidden_size)}")
    local_experts = cfg.num_experts if expert_parallel is None else expert_parallel.num_local_experts
    check_params(params, cfg, x, num_local_experts=local_experts)
    name = backends.resolve(backend, x.device, cfg, expert_parallel)
    x2d = x.reshape(-1, cfg.hidden_size)
    routing, syncs = None, 0
    if topk_ids is not None or topk_weights is not None:
        syncs = check_routing(topk_ids, topk_weights, x2d.shape[0], cfg, x)
        ids = topk_ids.long()
        weights = topk_weights.to(compute_dtype(x))
        routing = Routing(ids, weights, capacity_mask(ids, weights, cfg))
    if expert_parallel is not None and backends.handles_expert_parallel(name):
        result = backends.forward_fn(name)(x2d, params, cfg, routing, expert_parallel=expert_parallel)
    elif expert_parallel is not None:
        from .parallel.forward import ep_moe_forward
        result = ep_moe_forward(x2d, params, cfg, routing, expert_parallel, backends.expert_ffn_fn(name), name)
    else:
        result = backends.forward_fn(name)(x2d, params, cfg, routing)
    result.out = result.out.view(x.shape)
    if syncs and result.stats.host_syncs is not None:  # the routing check's read counts too
        result.stats.host_syncs += syncs
    return result
