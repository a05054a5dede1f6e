"""`ExpertParallel`: the expert placement and transport state of one expert-parallel MoE layer.

Rank r of a group of W owns the global experts [r*E/W, (r+1)*E/W) (E % W == 0, checked here). The
router, the expert_bias buffer and the shared expert are replicated. Construction is collective (every
rank of the group constructs it at the same point): it checks the transport, and the shm transport checks
that every rank is on one node. The symmetric heap of a one-sided transport is allocated on the first
forward for each (dtype, device) the layer sees (also collective) and reused by every later forward;
nothing is re-allocated or reset between forwards.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import env
from ..config import MoEConfig
from . import transports
from .heap import HeapOverflow
from .layout import HeapLayout, TokenLayout
from .protocol import ExchangeResult


class ExpertParallel:
    """Placement + transport for one layer. `exchange_for(dtype, device)` gives the object that moves rows:
    a `protocol.OneSidedExchange` (one row per (token, rank)) or an `alltoall.AllToAllExchange` (one row per
    (token, expert)); their `row_unit` says which."""

    def __init__(self, cfg: MoEConfig, process_group, transport: str = "auto", *,
                 max_tokens_per_rank: int | None = None, timeout_s: float | None = None, device=None,
                 fused_sms: int | None = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group: torch.distributed is not initialized (call torch.distributed."
                             "init_process_group first, or use flashmoe_py.parallel.init_process_group)")
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        if self.rank < 0:
            raise ValueError("process_group: this process is not a member of the group")
        if cfg.num_experts % self.world_size:
            raise ValueError(f"num_experts={cfg.num_experts} must be divisible by the expert-parallel world size "
                             f"{self.world_size} (each rank owns E/W experts)")
        max_tokens = env.ep_max_tokens() if max_tokens_per_rank is None else max_tokens_per_rank
        if not (isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0):
            raise ValueError(f"max_tokens_per_rank: must be a positive int, got {max_tokens!r}")
        timeout = env.ep_timeout_s() if timeout_s is None else timeout_s
        if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and math.isfinite(timeout)
                and timeout > 0):
            raise ValueError(f"timeout_s: must be a finite number of seconds > 0, got {timeout!r}")
        if fused_sms is not None and not (isinstance(fused_sms, int) and not isinstance(fused_sms, bool)
                                          and fused_sms > 0):
            raise ValueError(f"fused_sms: must be a positive int (SMs of the fused kernel's grid), got {fused_sms!r}")
        self.fused_sms = fused_sms  # None: FLASHMOE_FUSED_SMS, else every SM
        self.config = cfg
        self.max_tokens_per_rank, self.timeout_s = max_tokens, float(timeout)
        self.num_local_experts = cfg.num_experts // self.world_size
        self.expert_offset = self.rank * self.num_local_experts
        self.device = torch.device("cpu" if device is None else device)
        self.transport = transports.resolve(transport, self.device)
        if self.transport == "shm":
            from .shm import check_one_node
            check_one_node(process_group)
        self._exchanges: dict = {}
        self._device_exchanges: dict = {}
        self.backend_state: dict = {}  # what a backend keeps per (dtype, device) here (the fused kernel's heap)
        self.last_bytes_sent = 0

    def barrier(self) -> bool:
        """Every rank of the group reaches this point before any leaves. True: the host waited (a sync)."""
        dist.barrier(group=self.group)
        return True

    def check_tokens(self, num_tokens: int) -> None:
        if num_tokens > self.max_tokens_per_rank:
            raise HeapOverflow(f"x: {num_tokens} tokens on rank {self.rank}, but the expert-parallel layer was built "
                               f"for max_tokens_per_rank={self.max_tokens_per_rank} (it sizes the symmetric heap); "
                               "pass a larger max_tokens_per_rank= or set FLASHMOE_EP_MAX_TOKENS")

    def layout_for(self, dtype: torch.dtype) -> HeapLayout:
        """The fused kernel's heap layout for `dtype` (fused_backend.py): rows per (token, rank), per-expert record
        packets, partial sums back."""
        cfg = self.config
        itemsize = torch.empty((), dtype=dtype).element_size()
        return HeapLayout.for_layer(self.world_size, self.num_local_experts, cfg.top_k, self.max_tokens_per_rank,
                                    cfg.hidden_size, itemsize)

    def exchange_layout_for(self, dtype: torch.dtype) -> TokenLayout:
        """The one-sided exchange's per-(token, rank) heap layout for `dtype` (protocol.py): rows of the layer dtype,
        routing weights in fp32 (fp64 for fp64 layers)."""
        cfg = self.config
        itemsize = torch.empty((), dtype=dtype).element_size()
        return TokenLayout.for_layer(self.world_size, cfg.top_k, self.max_tokens_per_rank, cfg.hidden_size, itemsize,
                                     8 if dtype == torch.float64 else 4)

    def exchange_for(self, dtype: torch.dtype, device: torch.device):
        """The exchange for tensors of `dtype` on `device`; the first call per key allocates the heap (collective)."""
        key = (dtype, torch.device(device))
        if key not in self._exchanges:
            reason = transports.unavailable_reason(self.transport, key[1])
            if reason is not None:
                raise transports.TransportUnavailable(f"transport={self.transport!r} cannot run on {key[1]}: {reason}")
            self._exchanges[key] = self._make_exchange(dtype, key[1])
        return self._exchanges[key]

    def _make_exchange(self, dtype: torch.dtype, device: torch.device):
        if self.transport == "alltoall":
            from .alltoall import AllToAllExchange
            return AllToAllExchange(self.group, self.num_local_experts, self.timeout_s)
        layout = self.exchange_layout_for(dtype)
        if self.transport == "shm":
            from .protocol import OneSidedExchange
            from .shm import ShmHeap
            return OneSidedExchange(ShmHeap(layout, self.group), layout, self.timeout_s)
        if self.transport == "mpi":
            from .mpi import MpiHeap
            from .protocol import OneSidedExchange
            return OneSidedExchange(MpiHeap(layout, self.group), layout, self.timeout_s)
        from .nvshmem import NvshmemHeap
        from .protocol import OneSidedExchange
        return OneSidedExchange(NvshmemHeap(layout, self.group, device), layout, self.timeout_s)

    def device_exchange_for(self, dtype: torch.dtype, device: torch.device, backend: str):
        """The device-initiated exchange (device_exchange.py) on the one-sided exchange's heap, or None where the
        host-driven protocol runs: backends other than `triton`, transports other than `shm` and `nvshmem` (mpi
        reaches peers only through library calls, alltoall is the baseline), or FLASHMOE_EP_DEVICE_EXCHANGE=0."""
        if backend != "triton" or self.transport not in ("shm", "nvshmem") or not env.ep_device_exchange():
            return None
        key = (dtype, torch.device(device))
        if key not in self._device_exchanges:
            from .device_exchange import DeviceExchange
            self._device_exchanges[key] = DeviceExchange(self.exchange_for(dtype, device))
        return self._device_exchanges[key]

    @property
    def heaps(self) -> list:
        """The symmetric heaps allocated so far (one per dtype/device seen)."""
        return [ex.heap for ex in self._exchanges.values() if hasattr(ex, "heap")]

    def close(self) -> None:
        """Free the heaps (collective)."""
        for ex in self._exchanges.values():
            ex.close()
        self._exchanges, self._device_exchanges = {}, {}
        for state in self.backend_state.values():
            if getattr(state, "heap", None) is not None:
                state.heap.close()
        self.backend_state = {}


__all__ = ["ExchangeResult", "ExpertParallel"]
