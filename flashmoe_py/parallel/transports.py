"""Transport registry: which transports exist, whether one can run here, and what `auto` means.

| transport | tensors | heap | launcher |
|---|---|---|---|
| `nvshmem` | CUDA | NVSHMEM symmetric tensors (nvshmem4py) | torchrun or mpirun |
| `shm` | CPU, one node | POSIX shared memory | torchrun, torch.multiprocessing, mpirun |
| `mpi` | CPU, any nodes | MPI-3 RMA windows (mpi4py) | mpirun |
| `alltoall` | any | none: torch.distributed.all_to_all_single | any |

`auto`: CUDA tensors -> nvshmem when it can run, else alltoall; CPU tensors -> shm when the extension is
built, else alltoall (on several nodes, `shm` says so at construction and names mpi/alltoall instead).
A transport named explicitly that cannot run raises `TransportUnavailable` with the reason.
"""

from __future__ import annotations

import importlib

import torch

from .heap import TransportUnavailable

TRANSPORT_NAMES = ("nvshmem", "shm", "mpi", "alltoall")
_AUTO_ORDER = {"cuda": ("nvshmem", "alltoall"), "cpu": ("shm", "alltoall")}


def _module(name: str):
    return importlib.import_module(f"flashmoe_py.parallel.{name}")


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when transport `name` can run with tensors on `device`, else a sentence saying why not."""
    if name not in TRANSPORT_NAMES:
        return f"unknown transport; choose one of {('auto',) + TRANSPORT_NAMES}"
    return _module(name).unavailable_reason(torch.device(device))


def resolve(name: str, device: torch.device | str) -> str:
    device = torch.device(device)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("alltoall",)):
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "alltoall"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise TransportUnavailable(f"transport={name!r} cannot run on {device}: {reason}")
    return name
