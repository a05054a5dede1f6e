"""Keep the replicated parameters of an expert-parallel layer (router, expert_bias, shared expert) equal
on every rank: broadcast from the group's first rank, as DDP does at construction."""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def broadcast_replicated(tensors: list, group) -> None:
    src = dist.get_global_rank(group, 0) if group is not None and group != dist.group.WORLD else 0
    nccl = dist.get_backend(group) == "nccl"
    for t in tensors:
        if t is None:
            continue
        # NCCL moves only CUDA tensors; a layer still on the CPU goes through the current device.
        staged = t.data.cuda() if nccl and not t.is_cuda else t.data
        dist.broadcast(staged, src=src, group=group)
        if staged is not t.data:
            t.data.copy_(staged.cpu())
