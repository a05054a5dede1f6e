"""One rank of an mpirun job started by one of the usual recipes (tests/test_ep.py::test_mpirun_recipe): start
torch.distributed, record what flashmoe_py sees of the launch, run expert-parallel scenarios of tests/ep_worker.py
over the `mpi` transport, write `rank<r>.json`.

    mpirun -np 2 python -m tests.mpirun_worker --init flashmoe --out DIR --seed 1
    mpirun -np 2 -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29500 -x WORLD_SIZE=2 \\
        sh -c 'RANK=$OMPI_COMM_WORLD_RANK exec "$0" "$@"' python -m tests.mpirun_worker --init env --out DIR --seed 1

--init flashmoe: `flashmoe_py.parallel.init_process_group()`; --init env: torch's own env:// rendezvous
(`torch.distributed.init_process_group("gloo")`, reading RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT).
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from tests import ep_worker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", choices=("flashmoe", "env"), required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenarios", default="softmax_fp64,construction_errors")
    args = ap.parse_args()
    if args.init == "flashmoe":
        from flashmoe_py.parallel import init_process_group
        init_process_group("gloo", timeout_s=120)
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    from mpi4py import MPI

    from flashmoe_py import env
    from flashmoe_py.parallel import transports
    launch = env.launch_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict = {"launch": {
        "launcher": launch.launcher, "rank": launch.rank, "world_size": launch.world_size,
        "mpi_rank": MPI.COMM_WORLD.Get_rank(), "mpi_size": MPI.COMM_WORLD.Get_size(), "torch_rank": rank,
        "torch_world": world, "RANK": os.environ.get("RANK"), "WORLD_SIZE": os.environ.get("WORLD_SIZE"),
        "mpi_reason": transports.unavailable_reason("mpi", torch.device("cpu"))}}
    ctx = ep_worker.Ctx(rank, world, "mpi", args.seed)
    for name in args.scenarios.split(","):
        ep_worker.run_scenario(results, name, lambda: ep_worker.SCENARIOS[name](ctx))
    ep_worker.write_and_leave(results, args.out, rank)


if __name__ == "__main__":
    main()
