"""The symmetric-heap interface the one-sided protocol (protocol.py) is written against.

A heap is one segment per rank, all of the same layout (layout.py: a `TokenLayout` for the host-driven exchange,
a `HeapLayout` for the fused kernel; a heap needs only its `size` and `header()`). A transport implements five
primitives:

    put(peer, offset, data)      copy bytes into the peer's segment (no ordering promised yet)
    signal(peer, offset, words)  store int64 words into the peer's segment *after* every earlier put to that
                                 peer is visible there (release)
    wait(offset, n, seq, timeout_s) -> (missing, seen)
                                 acquire-spin on n words of the local segment until each carries `seq`
    local(offset, nbytes)        a uint8 tensor view of the local segment (reads after a wait are acquire-ordered)
    close()

Implementations: `shm` (POSIX shared memory, every segment mapped into every process), `mpi` (MPI-3 RMA
windows), `nvshmem` (NVSHMEM symmetric tensors on GPUs).
"""

from __future__ import annotations

import abc

import torch

from .layout import HeapLayout, TokenLayout

INTERPRETER_SPIN_S = 2e-3  # seconds one spin iteration takes under the interpreter (device waits count iterations)


def device_wait_limit(timeout_s: float, timer: bool) -> int:
    """The `limit` argument of a device wait (kernels/signals.py) for a timeout of `timeout_s`: GPU (timer) units
    of 1024 ns, in an int32 (up to about 36 minutes); the interpreter counts polls of about INTERPRETER_SPIN_S."""
    return min(int(timeout_s * 1e9) >> 10, 2**31 - 1) if timer else max(1, int(timeout_s / INTERPRETER_SPIN_S))


class TransportUnavailable(RuntimeError):
    """The named transport cannot run here; the message says why."""


class ExchangeTimeout(TimeoutError):
    """A rank waited longer than the configured timeout for a peer's packet signal."""


class HeapOverflow(ValueError):
    """More rows than the symmetric heap was sized for (max_tokens_per_rank)."""


class SymmetricHeap(abc.ABC):
    """One rank's view of a symmetric heap: its own segment and a way to reach the others'."""

    name: str = "?"

    def __init__(self, layout: HeapLayout | TokenLayout, rank: int, world_size: int):
        self.layout, self.rank, self.world_size = layout, rank, world_size

    @abc.abstractmethod
    def put(self, peer: int, offset: int, data: torch.Tensor) -> None:
        """data: contiguous tensor on the heap's device, copied byte for byte to peer's segment at offset."""

    @abc.abstractmethod
    def signal(self, peer: int, offset: int, words: torch.Tensor) -> None:
        """words [n] int64: release-stored at peer's segment, offset, after every earlier put to peer."""

    @abc.abstractmethod
    def wait(self, offset: int, n: int, seq: int, timeout_s: float) -> tuple[int, torch.Tensor]:
        """Spin on n local words until each has sequence `seq` (word >> 32). Returns (-1 or the index of
        the first word that did not arrive in time, the words seen [n] int64 CPU)."""

    @abc.abstractmethod
    def local(self, offset: int, nbytes: int) -> torch.Tensor:
        """uint8 [nbytes] view of this rank's segment."""

    def peer_address(self, peer: int) -> int | None:
        """Base address of peer's segment in this process, for device code that puts with pointers;
        None where the transport reaches peers only through library calls (mpi)."""
        return None

    def read_word(self, offset: int) -> int:
        return int(self.local(offset, 8).view(torch.int64)[0])

    def write_local_word(self, offset: int, value: int) -> None:
        self.local(offset, 8).view(torch.int64)[0] = value

    def close(self) -> None:
        """Release the segments. Collective: every rank closes its heap at the same point."""
