"""What one MoE layer call must compute and move, counted from its config and routing (DESIGN §8).

FLOPs (a multiply-add is 2 FLOPs; only matmuls are counted, element-wise work -- activation, softmax,
top-k, the weighted combine -- is left out, as is usual for GEMM-bound layers):

    forward  = 2*T*H*E                      router logits
             + 2*A*H*N_up + 2*A*I*H         routed experts, A = kept (token, expert) assignments
             + 2*T*H*N_sh + 2*T*I_sh*H      shared expert (N_sh = its up width, 2*I_sh when gated)
             + 2*T*H                        shared-expert gate, when there is one
    backward = 2 * forward                  (each matmul's input gradient and weight gradient)
    fwdbwd   = 3 * forward

Minimum bytes through device memory (s = bytes per element of the layer dtype; each tensor read or
written once, nothing else; intermediates may stay on chip in a fused kernel, so they cost nothing):

    forward  = W + 2*T*H*s                  weights once, x read, out written
    backward = 2*W + 3*T*H*s                weights read, weight gradients written, x and dy read, dx written
    fwdbwd   = forward + backward

where W = the weights a call touches: the router (E*H, in its own dtype), the routed experts that
receive at least one row (E_hit*(H*N_up + I*H)*s, plus their biases) and the shared expert.

Bytes on the wire for expert parallelism (total over all ranks for one forward): the least any
transport can move is one row out and one result row back per (token, remote rank) pair -- a rank sends
a token once to each other rank that owns any of its experts, and the owner sums that token's experts
before replying -- and, with the rows out, what the owner needs to know of each remote assignment: its
routing weight (w = 4 bytes, fp32; 8 for fp64 layers) and its local expert id (an int32):
wire_min = 2 * P * H * s + A_r * (w + 4), P = pairs and A_r = remote kept assignments over all ranks. What
the transports move, exactly (their stats.bytes_sent summed over ranks):

    one-sided (shm, mpi, nvshmem)  wire_min + 2 * W * (W-1) * 8
                                   one row per (token, rank) each way, one routing record (weight, id << 1 |
                                   last-of-row) per remote assignment with the rows out, and one signal word per
                                   (source, receiver) pair and direction
    alltoall (Megatron's unit)     2 * A_r * H * s + 2 * W * (W-1) * E_local * 8
                                   one row per remote (token, expert) assignment each way, plus the counts

Roofline efficiency = max(FLOPs / matmul rate, bytes / copy bandwidth) / measured time: 1.0 means the
call ran at the speed of whichever of the two ceilings binds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MoEConfig

MODES = ("fwd", "bwd", "fwdbwd")


@dataclass(frozen=True)
class Work:
    """The counted work of one call: `flops` FLOPs and at least `min_bytes` bytes through memory."""

    flops: float
    min_bytes: float


def forward_flops(cfg: MoEConfig, tokens: int, assignments: float) -> float:
    """Matmul FLOPs of one forward over `tokens` tokens with `assignments` kept (token, expert) pairs."""
    h, i, e = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts
    flops = 2.0 * tokens * h * e
    flops += 2.0 * assignments * h * cfg.up_size + 2.0 * assignments * i * h
    if cfg.num_shared_experts:
        flops += 2.0 * tokens * h * cfg.shared_up_size + 2.0 * tokens * cfg.shared_hidden_size * h
        if cfg.shared_expert_gate:
            flops += 2.0 * tokens * h
    return flops


def weight_bytes(cfg: MoEConfig, experts_hit: float, itemsize: int, router_itemsize: int | None = None) -> float:
    """Bytes of the weights one forward reads: router, the `experts_hit` routed experts, shared expert."""
    h, i, e = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts
    total = e * h * (itemsize if router_itemsize is None else router_itemsize)
    per_expert = h * cfg.up_size + i * h + ((cfg.up_size + h) if cfg.bias else 0)
    total += experts_hit * per_expert * itemsize
    if cfg.num_shared_experts:
        total += (h * cfg.shared_up_size + cfg.shared_hidden_size * h + (h if cfg.shared_expert_gate else 0)) * itemsize
    return float(total)


def work(cfg: MoEConfig, tokens: int, assignments: float, experts_hit: float, itemsize: int, mode: str,
         router_itemsize: int | None = None) -> Work:
    """FLOPs and minimum bytes of one timed call in `mode` (see the module docstring for the formulas)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    f = forward_flops(cfg, tokens, assignments)
    w = weight_bytes(cfg, experts_hit, itemsize, router_itemsize)
    act = tokens * cfg.hidden_size * itemsize
    fwd_bytes, bwd_bytes = w + 2 * act, 2 * w + 3 * act
    if mode == "fwd":
        return Work(f, fwd_bytes)
    if mode == "bwd":
        return Work(2 * f, bwd_bytes)
    return Work(3 * f, fwd_bytes + bwd_bytes)


def routing_counts(topk_ids: torch.Tensor, kept: torch.Tensor, num_experts: int) -> tuple[int, int]:
    """(kept assignments A, experts with at least one kept row) of one routing; topk_ids/kept [T, k]."""
    ids = topk_ids[kept]
    hit = int((torch.bincount(ids, minlength=num_experts) > 0).sum()) if ids.numel() else 0
    return int(ids.numel()), hit


def _remote_hits(topk_ids: torch.Tensor, kept: torch.Tensor, num_experts: int, world_size: int,
                 rank: int) -> torch.Tensor:
    """[T, W] bool: token t has a kept assignment on rank d != rank (rank d owns [d*E/W, (d+1)*E/W))."""
    owner = topk_ids // (num_experts // world_size)  # [T, k]
    hits = torch.zeros(topk_ids.shape[0], world_size, dtype=torch.bool, device=topk_ids.device)
    token = torch.arange(topk_ids.shape[0], device=topk_ids.device).unsqueeze(1).expand_as(owner)
    hits[token[kept], owner[kept]] = True
    hits[:, rank] = False
    return hits


def remote_pairs(topk_ids: torch.Tensor, kept: torch.Tensor, num_experts: int, world_size: int, rank: int) -> int:
    """(token, remote rank) pairs of this rank's tokens: topk_ids/kept [T, k]; rank r owns experts
    [r*E/W, (r+1)*E/W). Each pair is the least one row out and one row back can carry."""
    if topk_ids.numel() == 0:
        return 0
    return int(_remote_hits(topk_ids, kept, num_experts, world_size, rank).sum())


def remote_assignments(topk_ids: torch.Tensor, kept: torch.Tensor, num_experts: int, world_size: int,
                       rank: int) -> int:
    """Kept assignments of this rank's tokens (topk_ids/kept [T, k]) to experts of other ranks."""
    return int((kept & (topk_ids // (num_experts // world_size) != rank)).sum())


def wire_min_bytes(pairs_total: int, hidden_size: int, itemsize: int, assignments_total: int = 0,
                   weight_itemsize: int = 4) -> float:
    """Least bytes on the wire for one forward over all ranks: one row out and one back per (token, remote rank)
    pair, and a routing weight and an int32 expert id per remote assignment (see the module docstring)."""
    return 2.0 * pairs_total * hidden_size * itemsize + assignments_total * (weight_itemsize + 4)


def one_sided_wire_bytes(pairs_total: int, assignments_total: int, hidden_size: int, itemsize: int,
                         weight_itemsize: int, world_size: int) -> int:
    """Exactly what the one-sided transports put in one forward over all ranks (the sum of stats.bytes_sent):
    wire_min + two signal words per ordered pair of ranks."""
    return int(wire_min_bytes(pairs_total, hidden_size, itemsize, assignments_total, weight_itemsize)) + \
        2 * world_size * (world_size - 1) * 8


def wire_ratio(wire_bytes: float | None, wire_min: float | None) -> float | None:
    """wire_bytes / wire_min (1.0 = the least possible), None where either is unknown or the minimum is 0."""
    if wire_bytes is None or not wire_min:
        return None
    return wire_bytes / wire_min


def roofline_efficiency(w: Work, seconds: float, matmul_flops_per_s: float, copy_bytes_per_s: float
                        ) -> tuple[float, str]:
    """(efficiency in [0, ~1], 'compute' or 'memory': which ceiling binds) of a call that took `seconds`."""
    t_compute, t_memory = w.flops / matmul_flops_per_s, w.min_bytes / copy_bytes_per_s
    bound = "compute" if t_compute >= t_memory else "memory"
    return max(t_compute, t_memory) / seconds, bound
