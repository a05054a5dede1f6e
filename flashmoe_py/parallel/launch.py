"""Start torch.distributed under torchrun or mpirun, for expert-parallel scripts.

torchrun sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT: the env:// rendezvous. Under mpirun (MPI's own
variables, `env.launch_env`, even where RANK/WORLD_SIZE are exported too) the rank and size come from the MPI
launcher, or from MPI itself where the launcher exports no size (PMIx); MASTER_ADDR/MASTER_PORT are used when
set (several nodes), otherwise rank 0 picks a free local port and broadcasts it with mpi4py (one node).
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch.distributed as dist

from .. import env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(backend: str = "gloo", timeout_s: float = 300.0):
    """Initialise the default process group from the launcher's environment; returns (rank, world_size)."""
    launch = env.launch_env()
    timeout = timedelta(seconds=timeout_s)
    if launch.launcher is None:
        raise RuntimeError("no launcher environment found: start with `torchrun --nproc-per-node N ...` or "
                           "`mpirun -np N ...`")
    if launch.launcher == "torchrun":
        dist.init_process_group(backend, timeout=timeout)
    else:
        rank, world_size = launch.rank, launch.world_size
        if world_size is None:
            from mpi4py import MPI
            rank, world_size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        if launch.master_addr and launch.master_port:
            addr, port = launch.master_addr, int(launch.master_port)
        else:
            from mpi4py import MPI
            addr, port = "127.0.0.1", MPI.COMM_WORLD.bcast(_free_port() if rank == 0 else None, root=0)
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world_size,
                                timeout=timeout)
    return dist.get_rank(), dist.get_world_size()
