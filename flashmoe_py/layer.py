"""`FusedMoE`: the drop-in nn.Module. It owns the parameters and the last forward's loss and stats;
all computation goes through `flashmoe_py.ops.moe`."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import backends
from .config import MoEConfig
from .ops import moe
from .records import MoEOutput, MoEParams, MoEStats


class FusedMoE(nn.Module):
    """A Mixture-of-Experts layer: y = FusedMoE(cfg)(x), y.shape == x.shape, autograd on every backend.

    Expert parallelism (DESIGN §5): with `process_group` (W ranks), rank r owns experts [r*E/W, (r+1)*E/W)
    and its w_up/w_down/b_up/b_down hold only those; the router, expert_bias and shared expert are
    replicated (broadcast from the group's rank 0 at construction). Each rank passes its own tokens (any
    count, zero too) and gets its own outputs. `transport` picks how rows travel ("auto", "shm", "mpi",
    "nvshmem", "alltoall"); `max_tokens_per_rank` sizes the symmetric heap (more tokens is an error);
    `timeout_s` bounds every wait for a peer. Defaults come from FLASHMOE_EP_MAX_TOKENS and
    FLASHMOE_EP_TIMEOUT_S (flashmoe_py/env.py). Construction and every forward/backward are collective.

    Parameters (DESIGN §3; E_local = E on one rank, E/W with a process group):
      router_weight [E, H]; router_bias [E] (cfg.router_bias); buffer expert_bias [E] float32 (cfg.expert_bias)
      w_up [E_local, H, N_up], w_down [E_local, I, H]; b_up [E_local, N_up], b_down [E_local, H] (cfg.bias)
      shared_w_up [H, N_up_shared], shared_w_down [I_shared, H] (cfg.num_shared_experts > 0)
      shared_gate_weight [1, H] (cfg.shared_expert_gate)
    After each forward: `aux_loss` (scalar, differentiable) and `stats` (MoEStats), and `last_output`.
    """

    def __init__(self, config: MoEConfig | None = None, *, backend: str = "auto", process_group=None,
                 transport: str = "auto", max_tokens_per_rank: int | None = None, timeout_s: float | None = None,
                 device=None, dtype=None, **config_kwargs):
        super().__init__()
        if config is None:
            config = MoEConfig(**config_kwargs)
        elif config_kwargs:
            raise TypeError(f"FusedMoE: pass either a MoEConfig or config fields, not both "
                            f"(got extra {sorted(config_kwargs)})")
        elif not isinstance(config, MoEConfig):
            raise TypeError(f"config: expected a MoEConfig, got {type(config).__name__}")
        if backend != "auto" and backend not in backends.BACKEND_NAMES:
            raise ValueError(f"backend={backend!r}: choose one of {('auto',) + backends.BACKEND_NAMES}")
        self.config = config
        self.backend = backend
        self.process_group = process_group
        self.expert_parallel = None
        self.world_size, self.rank = 1, 0
        if process_group is not None:
            from .parallel.expert_parallel import ExpertParallel
            self.expert_parallel = ExpertParallel(config, process_group, transport, device=device,
                                                  max_tokens_per_rank=max_tokens_per_rank, timeout_s=timeout_s)
            self.world_size, self.rank = self.expert_parallel.world_size, self.expert_parallel.rank
            transport = self.expert_parallel.transport
        elif max_tokens_per_rank is not None or timeout_s is not None:
            raise ValueError("max_tokens_per_rank/timeout_s: only meaningful with a process_group")
        self.transport = transport
        self.num_local_experts = config.num_experts // self.world_size

        cfg, fk = config, {"device": device, "dtype": dtype}
        el, h, i = self.num_local_experts, cfg.hidden_size, cfg.ffn_hidden_size
        self.router_weight = nn.Parameter(torch.empty(cfg.num_experts, h, **fk))
        self.router_bias = nn.Parameter(torch.empty(cfg.num_experts, **fk)) if cfg.router_bias else None
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, device=device, dtype=torch.float32)
                             if cfg.expert_bias else None)
        self.w_up = nn.Parameter(torch.empty(el, h, cfg.up_size, **fk))
        self.w_down = nn.Parameter(torch.empty(el, i, h, **fk))
        self.b_up = nn.Parameter(torch.empty(el, cfg.up_size, **fk)) if cfg.bias else None
        self.b_down = nn.Parameter(torch.empty(el, h, **fk)) if cfg.bias else None
        shared = cfg.num_shared_experts > 0
        self.shared_w_up = nn.Parameter(torch.empty(h, cfg.shared_up_size, **fk)) if shared else None
        self.shared_w_down = nn.Parameter(torch.empty(cfg.shared_hidden_size, h, **fk)) if shared else None
        self.shared_gate_weight = nn.Parameter(torch.empty(1, h, **fk)) if cfg.shared_expert_gate else None
        self.stats: MoEStats | None = None
        self.last_output: MoEOutput | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default scale for every projection: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases too.
        The expert bias starts at zero (it is steered by the trainer, not learned by gradient)."""
        cfg = self.config

        def uniform_(t: torch.Tensor | None, fan_in: int) -> None:
            if t is not None:
                bound = 1.0 / math.sqrt(fan_in)
                t.uniform_(-bound, bound)

        h, i, ish = cfg.hidden_size, cfg.ffn_hidden_size, cfg.shared_hidden_size
        for t, fan_in in ((self.router_weight, h), (self.router_bias, h), (self.w_up, h), (self.w_down, i),
                          (self.b_up, h), (self.b_down, i), (self.shared_w_up, h), (self.shared_w_down, ish),
                          (self.shared_gate_weight, h)):
            uniform_(t, fan_in)
        if self.expert_bias is not None:
            self.expert_bias.zero_()
        if self.expert_parallel is not None:
            from .parallel.replicate import broadcast_replicated
            broadcast_replicated([self.router_weight, self.router_bias, self.expert_bias, self.shared_w_up,
                                  self.shared_w_down, self.shared_gate_weight], self.process_group)

    def params(self) -> MoEParams:
        return MoEParams.from_mapping(self)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor | None = None,
                topk_weights: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., H] in the layer dtype -> [..., H]. Optional caller routing: topk_ids/topk_weights [T, k]."""
        result = moe(x, self.params(), self.config, backend=self.backend, topk_ids=topk_ids,
                     topk_weights=topk_weights, expert_parallel=self.expert_parallel)
        self.stats, self.last_output = result.stats, result
        return result.out

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The last forward's aux_loss (None before the first): computed when first read (MoEOutput)."""
        return None if self.last_output is None else self.last_output.aux_loss

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"hidden_size={c.hidden_size}", f"ffn_hidden_size={c.ffn_hidden_size}",
                 f"num_experts={c.num_experts}", f"top_k={c.top_k}", f"activation={c.activation_key}",
                 f"score_func={c.score_func}"]
        if c.num_expert_groups > 1:
            parts.append(f"groups={c.topk_groups}/{c.num_expert_groups}")
        if c.capacity_factor is not None:
            parts.append(f"capacity_factor={c.capacity_factor}")
        if c.num_shared_experts:
            parts.append(f"shared={c.shared_hidden_size}{'+gate' if c.shared_expert_gate else ''}")
        parts.append(f"backend={self.backend}")
        if self.world_size > 1:
            parts.append(f"world_size={self.world_size}, transport={self.transport}")
        return ", ".join(parts)
