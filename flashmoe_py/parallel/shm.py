"""`shm` transport: a symmetric heap in POSIX shared memory, for ranks on one node (CPU tensors).

Bootstrap (collective over the process group): every rank creates its own segment under /dev/shm with a
random name, the names are exchanged with `all_gather_object`, every rank maps every segment, and after a
barrier each rank unlinks its own name. From then on the mappings are anonymous: nothing is left behind in
/dev/shm, even if a rank dies. Segments start zeroed (ftruncate), so no signal word holds a sequence yet.

Puts are plain byte copies into the peer's mapping; the ordering that makes them safe is given by the
release store of the signal word and the acquire spin in `flashmoe_py._C` (csrc/ep_signal.cpp says why that
part is C++). Peer segments have real addresses in this process (`peer_address`), which is what device
code run by the Triton interpreter uses to put into a peer (DESIGN §6).
"""

from __future__ import annotations

import mmap
import os
import secrets
import socket

import torch
import torch.distributed as dist

from .heap import SymmetricHeap, TransportUnavailable
from .layout import HeapLayout, TokenLayout

SHM_DIR = "/dev/shm"


def _native():
    try:
        from flashmoe_py import _C
    except ImportError as err:
        raise TransportUnavailable(
            "transport='shm' needs the native extension flashmoe_py._C (csrc/), which is not built: "
            f"reinstall with `pip install --no-build-isolation -e .` ({err})") from None
    return _C


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"it is a CPU transport (POSIX shared memory); tensors on {device} need 'nvshmem' or 'alltoall'"
    if not os.path.isdir(SHM_DIR):
        return f"{SHM_DIR} does not exist on this machine"
    try:
        _native()
    except TransportUnavailable as err:
        return str(err)
    return None


def check_one_node(group) -> None:
    """All ranks of `group` must share this host (collective)."""
    hosts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    if len(set(hosts)) > 1:
        raise TransportUnavailable(f"transport='shm' needs every rank on one node, got hosts {sorted(set(hosts))}; "
                                   "use transport='mpi' (mpirun) or 'alltoall' across nodes")


class ShmHeap(SymmetricHeap):
    name = "shm"

    def __init__(self, layout: HeapLayout | TokenLayout, group):
        super().__init__(layout, dist.get_rank(group), dist.get_world_size(group))
        self._C = _native()
        own = f"flashmoe-{secrets.token_hex(8)}-r{self.rank}"
        path = os.path.join(SHM_DIR, own)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, layout.size)
            names: list = [None] * self.world_size
            dist.all_gather_object(names, own, group=group)
            self._maps = [self._map(fd if peer == self.rank else None, names[peer])
                          for peer in range(self.world_size)]
            dist.barrier(group=group)  # every rank has mapped every segment: the names can go
        finally:
            os.close(fd)
            os.unlink(path)
        self._segments = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        self._addresses = [s.data_ptr() for s in self._segments]
        header = torch.tensor(layout.header(), dtype=torch.int64)
        self.local(0, header.numel() * 8).copy_(header.view(torch.uint8))

    @staticmethod
    def _map(own_fd: int | None, name: str) -> mmap.mmap:
        if own_fd is not None:
            return mmap.mmap(own_fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            return mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def put(self, peer: int, offset: int, data: torch.Tensor) -> None:
        raw = data.reshape(-1).view(torch.uint8)
        self._segments[peer][offset:offset + raw.numel()].copy_(raw)

    def signal(self, peer: int, offset: int, words: torch.Tensor) -> None:
        self._C.store_release(self._addresses[peer] + offset, words)

    def wait(self, offset: int, n: int, seq: int, timeout_s: float) -> tuple[int, torch.Tensor]:
        return self._C.wait_signals(self._addresses[self.rank] + offset, n, seq, timeout_s)

    def local(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._segments[self.rank][offset:offset + nbytes]

    def peer_address(self, peer: int) -> int:
        return self._addresses[peer]

    def close(self) -> None:
        self._segments, self._addresses = [], []
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view handed out by local() is still alive; the GC unmaps it later
                pass
        self._maps = []
