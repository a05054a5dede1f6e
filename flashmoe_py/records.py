"""Plain records passed between the layers: parameters in, routing/stats/output out.

Nothing here computes; every tensor's shape and dtype is given where it is declared.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

PARAM_NAMES = ("router_weight", "expert_bias", "w_up", "w_down", "b_up", "b_down",
               "shared_w_up", "shared_w_down", "shared_gate_weight", "router_bias")


@dataclass
class MoEParams:
    """The tensors of one MoE layer, by the names of DESIGN §3 (E_local = E on one rank).

    router_weight      [E, H]            float, any of fp64/fp32/bf16/fp16 (logits are computed in fp32)
    expert_bias        [E] or None       float32, added to the scores for selection only
    w_up               [E_local, H, N_up]  the layer dtype; N_up = 2I (gated: gate columns first) or I
    w_down             [E_local, I, H]
    b_up               [E_local, N_up] or None
    b_down             [E_local, H] or None
    shared_w_up        [H, N_up_shared] or None
    shared_w_down      [I_shared, H] or None
    shared_gate_weight [1, H] or None
    router_bias        [E] or None       float, any dtype: added to the router logits (MoEConfig.router_bias)
    """

    router_weight: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    expert_bias: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None
    shared_w_up: torch.Tensor | None = None
    shared_w_down: torch.Tensor | None = None
    shared_gate_weight: torch.Tensor | None = None
    router_bias: torch.Tensor | None = None

    @classmethod
    def from_mapping(cls, params) -> MoEParams:
        """Accept a MoEParams, a mapping by name (e.g. `dict(layer.named_parameters())`), or an object
        with those attributes (e.g. a FusedMoE layer)."""
        if isinstance(params, cls):
            return params
        if isinstance(params, dict):
            unknown = set(params) - set(PARAM_NAMES)
            if unknown:
                raise ValueError(f"params: unknown names {sorted(unknown)}; expected a subset of {PARAM_NAMES}")
            get = params.get
        else:
            def get(name, default=None):
                return getattr(params, name, default)
        missing = [n for n in ("router_weight", "w_up", "w_down") if get(n) is None]
        if missing:
            raise ValueError(f"params: missing required tensors {missing}")
        return cls(**{n: get(n) for n in PARAM_NAMES})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class Routing:
    """Which experts each token goes to, and with what weight.

    topk_ids     [T, k] int64      chosen global expert ids, best first (ties: lower id first)
    topk_weights [T, k] float32    (float64 for fp64 inputs) weights after renormalisation and scaling
    kept         [T, k] bool       False where capacity dropped the assignment (all True when dropless)
    logits       [T, E] float32    router logits, None when the caller supplied the routing
    scores       [T, E] float32    softmax/sigmoid of the logits, None when the caller supplied the routing
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    kept: torch.Tensor
    logits: torch.Tensor | None = None
    scores: torch.Tensor | None = None


@dataclass
class MoEStats:
    """Counters of one forward. Tensors stay on the layer's device (reading them is the caller's sync).

    tokens_per_expert [E] int64   assignments each expert processed (after capacity), global expert ids
    dropped           []  int64   assignments dropped by capacity
    bytes_sent        int         rows + routing records (a weight and a local expert id per remote assignment
                                  of the one-row-per-(token, rank) dispatches) + signal bytes this rank put to
                                  other ranks (0 on one rank); counted on the device by the fused backend and the
                                  device-initiated exchanges (triton over shm / nvshmem): a 0-d int64 tensor there
    rows_per_peer     [W] int64 or None   rows this rank sent to each rank in the last forward (distributed)
    kernel_launches   int or None kernel launches of the forward, where the backend counts them
    host_syncs        int or None host synchronisations of the forward, where the backend counts them
    tasks_per_program [P] int32 or None   tasks each program of the persistent launch claimed (fused backend, one
                                  launch): how the work spread over the grid
    """

    tokens_per_expert: torch.Tensor
    dropped: torch.Tensor
    bytes_sent: int = 0
    rows_per_peer: torch.Tensor | None = None
    kernel_launches: int | None = None
    host_syncs: int | None = None
    tasks_per_program: torch.Tensor | None = None


class MoEOutput:
    """What `flashmoe_py.moe` returns.

    out      [..., H] x.dtype   the layer output, same shape as x
    routing  Routing            over the flattened tokens T = x.numel() // H
    aux_loss []  float32        aux_loss_coef * lb_loss + z_loss_coef * z_loss (differentiable)
    lb_loss  []  float32        Switch load-balancing loss E * sum_e f_e * P_e
    z_loss   []  float32        mean(logsumexp(logits)^2)
    stats    MoEStats
    backend  str                the backend that ran

    The losses are given (aux_loss, lb_loss, z_loss) or computed on first read by `losses() -> (lb_loss,
    z_loss)` with the coefficients `loss_coefs` (lb, z): a backend that would otherwise run a dozen small kernels
    per call for losses nobody reads passes the function. With both coefficients 0, aux_loss is then 0 without
    computing them: 0 * anchor.sum() when `anchor` (a tensor of the router's graph, e.g. the logits) is given, so
    the router keeps a gradient (of zeros, not None: DDP expects one) as when the losses are computed; else a zero
    constant.
    """

    def __init__(self, out: torch.Tensor, routing: Routing, stats: MoEStats, backend: str = "reference", *,
                 aux_loss: torch.Tensor | None = None, lb_loss: torch.Tensor | None = None,
                 z_loss: torch.Tensor | None = None,
                 losses: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 loss_coefs: tuple[float, float] = (0.0, 0.0), anchor: torch.Tensor | None = None):
        if losses is None and (aux_loss is None or lb_loss is None or z_loss is None):
            raise ValueError("MoEOutput: give aux_loss, lb_loss and z_loss, or losses")
        self.out, self.routing, self.stats, self.backend = out, routing, stats, backend
        self._aux, self._lb, self._z = aux_loss, lb_loss, z_loss
        self._losses, self._coefs, self._anchor = losses, loss_coefs, anchor

    def _computed(self) -> None:
        if self._lb is None:
            self._lb, self._z = self._losses()

    @property
    def lb_loss(self) -> torch.Tensor:
        self._computed()
        return self._lb

    @property
    def z_loss(self) -> torch.Tensor:
        self._computed()
        return self._z

    @property
    def aux_loss(self) -> torch.Tensor:
        if self._aux is None:
            lb_coef, z_coef = self._coefs
            if lb_coef == 0 and z_coef == 0 and self._anchor is not None:
                self._aux = self._anchor.sum() * 0.0
            elif lb_coef == 0 and z_coef == 0:
                self._aux = torch.zeros((), dtype=torch.float32, device=self.out.device)
            else:
                self._aux = lb_coef * self.lb_loss + z_coef * self.z_loss
        return self._aux

    def __repr__(self) -> str:
        return f"MoEOutput(out={tuple(self.out.shape)}, backend={self.backend!r}, stats={self.stats!r})"
