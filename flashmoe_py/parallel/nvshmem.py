"""`nvshmem` transport: the symmetric heap as one NVSHMEM symmetric tensor per rank (nvshmem4py), on GPUs.

Bootstrap: under mpirun with mpi4py, `nvshmem.core.init(mpi_comm=COMM_WORLD)`; otherwise (torchrun,
torch.multiprocessing, mpirun without mpi4py) rank 0 of the process group creates an NVSHMEM unique id and
broadcasts it over the group, and every rank calls `init(uid=..., rank=group rank, nranks=W)`. NVSHMEM is
initialised once per process. The heap is `nvshmem.core.tensor((layout.size,), uint8)`, zeroed, with the layout
of layout.py.

Primitives (host-driven, like protocol.py on the CPU heaps):
- put:    a copy into the peer's segment through its peer-mapped tensor (`get_peer_tensor`, NVLink/P2P),
          ordered on the current stream.
- signal: `_C.cuda_store_release` (csrc/ep_signal_cuda.cu): a system-scope release store, after the puts on
          the stream.
- wait:   `_C.cuda_wait_signals`: a device spin with acquire loads and a globaltimer deadline; the host then
          reads which slot was missing to raise `ExchangeTimeout` (rank, peer, slot).

Limits of this version, stated plainly: the host reads the per-peer counts to size the copies, so each
exchange synchronises the host once (DESIGN §5.4 is met by the fused kernel, which puts rows and signals
from the device into this same layout); peers must be reachable by peer pointers (one NVLink node).
Nothing here runs at import time; selecting it without CUDA says "needs CUDA". NVSHMEM, once initialised, is
finalised at process exit (atexit), after the heaps still alive are freed.
"""

from __future__ import annotations

import atexit
import importlib.util
import sys
import weakref

import torch
import torch.distributed as dist

from .. import env
from .heap import SymmetricHeap, TransportUnavailable
from .layout import HeapLayout, TokenLayout

_runtime = {"initialized": False, "finalized": False}
_live_heaps: "weakref.WeakSet" = weakref.WeakSet()  # heaps still holding symmetric memory, freed before finalize


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return (f"needs CUDA: NVSHMEM symmetric memory lives on GPUs and the tensors are on {device}; "
                "on CPUs use transport='shm' (one node), 'mpi' (mpirun) or 'alltoall'")
    if not torch.cuda.is_available():
        return "needs CUDA, and torch sees no CUDA device"
    if importlib.util.find_spec("nvshmem") is None:
        return "nvshmem4py is not installed (pip install nvshmem4py-cu13 nvidia-nvshmem-cu13)"
    try:
        from flashmoe_py import _C
    except ImportError:
        return "flashmoe_py._C is not built (reinstall with `pip install --no-build-isolation -e .`)"
    if not getattr(_C, "with_cuda", False):
        return "flashmoe_py._C was built without its CUDA part (needs nvcc and a CUDA torch at build time)"
    return None


def _init_runtime(group, device: torch.device) -> None:
    if _runtime["initialized"]:
        return
    import nvshmem.core as nvshmem
    from cuda.core import Device

    dev = Device(device.index if device.index is not None else torch.cuda.current_device())
    dev.set_current()
    if env.launch_env().launcher == "mpirun" and importlib.util.find_spec("mpi4py") is not None:
        from mpi4py import MPI
        nvshmem.init(device=dev, mpi_comm=MPI.COMM_WORLD, initializer_method="mpi")
    else:
        rank = dist.get_rank(group)
        uid = [nvshmem.get_unique_id() if rank == 0 else None]
        src = dist.get_global_rank(group, 0) if group not in (None, dist.group.WORLD) else 0
        dist.broadcast_object_list(uid, src=src, group=group)
        nvshmem.init(device=dev, uid=uid[0], rank=rank, nranks=dist.get_world_size(group), initializer_method="uid")
    _runtime["initialized"] = True
    atexit.register(_finalize)


def _finalize() -> None:
    """At process exit (once NVSHMEM was initialised here): free the symmetric tensors still alive, then
    finalise NVSHMEM, so its proxy thread and bootstrap end cleanly instead of being torn down mid-flight (which
    can hang the exit or leave peers waiting). Errors are reported, not raised: the process is exiting."""
    if not _runtime["initialized"] or _runtime["finalized"]:
        return
    _runtime["finalized"] = True
    try:
        import nvshmem.core as nvshmem

        for heap in list(_live_heaps):
            heap.close()
        nvshmem.finalize()
    except Exception as err:  # noqa: BLE001 - at exit there is no caller to raise to
        print(f"flashmoe_py: NVSHMEM finalize at exit failed: {err!r}", file=sys.stderr)


class NvshmemHeap(SymmetricHeap):
    name = "nvshmem"

    def __init__(self, layout: HeapLayout | TokenLayout, group, device: torch.device):
        super().__init__(layout, dist.get_rank(group), dist.get_world_size(group))
        import nvshmem.core as nvshmem

        from flashmoe_py import _C
        self._C, self._nvshmem, self.device = _C, nvshmem, device
        _init_runtime(group, device)
        if (nvshmem.my_pe(), nvshmem.n_pes()) != (self.rank, self.world_size):
            raise TransportUnavailable(f"transport='nvshmem': NVSHMEM PE {nvshmem.my_pe()} of {nvshmem.n_pes()} does "
                                       f"not match process-group rank {self.rank} of {self.world_size}")
        self._tensor = nvshmem.tensor((layout.size,), dtype=torch.uint8)
        self._tensor.zero_()
        header = torch.tensor(layout.header(), dtype=torch.int64)
        self._tensor[:header.numel() * 8].copy_(header.view(torch.uint8))
        self._peers = []
        for pe in range(self.world_size):
            peer = self._tensor if pe == self.rank else nvshmem.get_peer_tensor(self._tensor, pe)
            if peer is None:
                raise TransportUnavailable(f"transport='nvshmem': rank {pe} is not reachable by peer pointers from "
                                           f"rank {self.rank}; this version needs all ranks on one NVLink node")
            self._peers.append(peer)
        self._addresses = [p.data_ptr() for p in self._peers]
        _live_heaps.add(self)
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # every segment is zeroed before any rank signals into it

    def put(self, peer: int, offset: int, data: torch.Tensor) -> None:
        raw = data.reshape(-1).view(torch.uint8)
        self._peers[peer][offset:offset + raw.numel()].copy_(raw, non_blocking=True)

    def signal(self, peer: int, offset: int, words: torch.Tensor) -> None:
        self._C.cuda_store_release(self._addresses[peer] + offset, words.to(self.device, non_blocking=True))

    def wait(self, offset: int, n: int, seq: int, timeout_s: float) -> tuple[int, torch.Tensor]:
        missing, seen = self._C.cuda_wait_signals(self._addresses[self.rank] + offset, n, seq, timeout_s, self.device)
        missing = int(missing)  # the host-driven protocol's sync: it needs the counts to size the copies
        return (-1 if missing == n else missing), seen.cpu()

    def local(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._tensor[offset:offset + nbytes]

    def peer_address(self, peer: int) -> int:
        return self._addresses[peer]

    def close(self) -> None:
        if self._tensor is not None:
            torch.cuda.synchronize(self.device)
            self._peers, self._addresses = [], []
            self._nvshmem.free_tensor(self._tensor)
            self._tensor = None
        _live_heaps.discard(self)
