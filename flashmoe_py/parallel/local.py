"""Several expert-parallel ranks in one process (DESIGN §7.5): the fused kernel's cross-rank protocol with real
concurrency on a machine with one GPU, or on a CPU.

`LocalRanks(cfg, world)` holds W ranks. Their heaps are segments of one allocation, rank r's at r * segment
bytes, so every peer segment has an address in this process and the fused kernel's "ptr" puts reach it (the
same peer-offset addressing as the shm heap and NVLink peers of an NVSHMEM heap). `forward(xs, params)` runs
every rank's fused forward at once:

  CPU (interpreter)  one thread per rank, each rank's launch running its programs as concurrent threads
                     (flashmoe_py.interpreter_threads): several persistent grids spinning on each other's puts
  GPU                one CUDA stream per rank, launched back to back from this thread; the launches are
                     asynchronous, so the W persistent grids run at the same time. Each grid must fit beside
                     the others: `sms` (default: the device's SMs // W) programs per rank, one per SM.

Forward only: the fused backward's exchanges are host-driven collectives over a process group, which in-process
ranks do not have (the unfused transports are tested across processes instead).
"""

from __future__ import annotations

import threading

import torch

from ..config import MoEConfig
from .expert_parallel import ExpertParallel
from .heap import HeapOverflow, SymmetricHeap
from .layout import HeapLayout

_SEGMENT_ALIGN = 4096  # segments start on page boundaries, far beyond the 128 bytes the kernel needs


class LocalHeap:
    """The symmetric heap of W ranks in one process: one zeroed uint8 allocation of W segments."""

    def __init__(self, layout: HeapLayout, world: int, device: torch.device):
        self.layout, self.world = layout, world
        self.segment_bytes = -(-layout.size // _SEGMENT_ALIGN) * _SEGMENT_ALIGN
        self.storage = torch.zeros(world * self.segment_bytes, dtype=torch.uint8, device=device)

    def view(self, rank: int) -> "LocalHeapView":
        return LocalHeapView(self, rank)


class LocalHeapView(SymmetricHeap):
    """Rank `rank`'s view of a LocalHeap: its own segment, and every peer's by address. Only the fused kernel
    uses it (it puts from device code); the host-driven put/signal/wait of the unfused protocol are not offered."""

    name = "local"

    def __init__(self, heap: LocalHeap, rank: int):
        super().__init__(heap.layout, rank, heap.world)
        self.heap = heap

    def _segment(self, peer: int) -> torch.Tensor:
        start = peer * self.heap.segment_bytes
        return self.heap.storage[start:start + self.layout.size]

    def local(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._segment(self.rank)[offset:offset + nbytes]

    def peer_address(self, peer: int) -> int:
        return self.heap.storage.data_ptr() + peer * self.heap.segment_bytes

    def put(self, peer, offset, data):
        raise NotImplementedError("in-process ranks: only the fused kernel moves rows (device puts)")

    signal = wait = put


class LocalRank(ExpertParallel):
    """The ExpertParallel of one in-process rank (no process group: `transport` is "local")."""

    def __init__(self, cfg: MoEConfig, world: int, rank: int, heaps: dict, barrier, *, max_tokens_per_rank: int,
                 timeout_s: float, device, sms: int | None):
        self.group = None
        self.world_size, self.rank = world, rank
        if cfg.num_experts % world:
            raise ValueError(f"num_experts={cfg.num_experts} must be divisible by the world size {world}")
        self.config = cfg
        self.max_tokens_per_rank, self.timeout_s = max_tokens_per_rank, float(timeout_s)
        self.num_local_experts = cfg.num_experts // world
        self.expert_offset = rank * self.num_local_experts
        self.device = torch.device(device)
        self.transport = "local"
        self.fused_sms = sms
        self._exchanges: dict = {}
        self.backend_state: dict = {}
        self.last_bytes_sent = 0
        self._heaps = heaps  # dtype -> LocalHeap, shared by the W ranks
        self._barrier = barrier

    def barrier(self) -> bool:
        """CPU: the ranks are threads, and wait for each other (True: the host waited). GPU: one thread launches
        every rank's kernel, each only after the previous one was compiled, so there is nothing to wait for (and
        waiting would hang)."""
        if self.device.type == "cuda":
            return False
        self._barrier.wait(timeout=self.timeout_s)
        return True

    def heap_view(self, dtype: torch.dtype) -> LocalHeapView:
        return self._heaps[dtype].view(self.rank)

    def exchange_for(self, dtype, device):
        raise NotImplementedError("in-process ranks run the fused forward only: the backward's exchanges are "
                                  "collectives over a process group (run the ranks as processes for training)")

    def close(self) -> None:
        self.backend_state = {}


class LocalRanks:
    """W expert-parallel ranks of one layer in this process (module docstring).

    cfg                  the layer (num_experts divisible by world)
    world                ranks
    device               "cpu" (interpreter) or a CUDA device, every rank on it
    max_tokens_per_rank  sizes the heap
    timeout_s            how long a rank's kernel waits for a peer before it gives up (ExchangeTimeout)
    sms                  programs (SMs) of each rank's persistent grid; default: the device's SMs // world on
                         a GPU, the interpreter's default (fused_backend.INTERPRETER_CONCURRENT_PROGRAMS) on CPU
    """

    def __init__(self, cfg: MoEConfig, world: int, *, device="cpu", max_tokens_per_rank: int = 64,
                 timeout_s: float = 30.0, sms: int | None = None):
        if world < 1:
            raise ValueError(f"world: must be >= 1, got {world}")
        self.cfg, self.world, self.device = cfg, world, torch.device(device)
        if sms is None and self.device.type == "cuda":
            sms = max(1, torch.cuda.get_device_properties(self.device).multi_processor_count // world)
        self._heaps: dict = {}
        barrier = threading.Barrier(world)
        self.ranks = [LocalRank(cfg, world, r, self._heaps, barrier, max_tokens_per_rank=max_tokens_per_rank,
                                timeout_s=timeout_s, device=self.device, sms=sms) for r in range(world)]

    def _heap(self, dtype: torch.dtype) -> None:
        if dtype not in self._heaps:
            self._heaps[dtype] = LocalHeap(self.ranks[0].layout_for(dtype), self.world, self.device)

    def forward(self, xs: list, params: list, topk_ids: list | None = None, topk_weights: list | None = None) -> list:
        """xs[r] [T_r, H]: rank r's tokens; params[r]: rank r's parameters (its local experts' w_up [E/W, H, N_up]
        etc., the replicated router); optional caller routing per rank (topk_ids[r] [T_r, k] int64 global expert
        ids, topk_weights[r] [T_r, k] float). Returns each rank's MoEOutput, computed by the fused backend with
        every rank's kernel running at the same time (no autograd)."""
        from .. import interpreter_threads
        from ..ops import moe

        if len(xs) != self.world or len(params) != self.world:
            raise ValueError(f"xs, params: one entry per rank ({self.world}), got {len(xs)} and {len(params)}")
        for r, x in enumerate(xs):
            if x.shape[0] > self.ranks[r].max_tokens_per_rank:
                raise HeapOverflow(f"xs[{r}]: {x.shape[0]} tokens, more than max_tokens_per_rank="
                                   f"{self.ranks[r].max_tokens_per_rank}")
        self._heap(xs[0].dtype)
        results: list = [None] * self.world

        def run(r):
            with torch.no_grad():
                routing = {} if topk_ids is None else dict(topk_ids=topk_ids[r], topk_weights=topk_weights[r])
                results[r] = moe(xs[r], params[r], self.cfg, backend="fused", expert_parallel=self.ranks[r],
                                 **routing)

        if self.device.type == "cuda":
            streams = [torch.cuda.Stream(self.device) for _ in range(self.world)]
            here = torch.cuda.current_stream(self.device)
            for r, stream in enumerate(streams):
                stream.wait_stream(here)  # the inputs were made on this stream
                with torch.cuda.stream(stream):
                    run(r)
            for stream in streams:
                here.wait_stream(stream)
            here.synchronize()  # a test harness: read every rank's kernel status now, not at its next call
            for rank in self.ranks:
                for state in rank.backend_state.values():
                    state.check()
            return results
        errors: list = []

        def guarded(r):
            try:
                run(r)
            except BaseException as e:  # noqa: BLE001 - re-raised below, naming the rank
                errors.append((r, e))

        with interpreter_threads.concurrent_programs():
            threads = [threading.Thread(target=guarded, args=(r,), name=f"rank-{r}") for r in range(self.world)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            r, err = min(errors, key=lambda item: item[0])
            raise err
        return results

    def close(self) -> None:
        for rank in self.ranks:
            rank.close()
        self._heaps.clear()


__all__ = ["LocalHeap", "LocalHeapView", "LocalRank", "LocalRanks"]
