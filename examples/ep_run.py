"""Run an expert-parallel FusedMoE forward + backward on random data and print per-rank stats.

    torchrun --nproc-per-node 4 examples/ep_run.py --transport shm         # CPU ranks, POSIX shared memory
    torchrun --nproc-per-node 4 examples/ep_run.py --transport alltoall    # the all-to-all baseline (gloo)
    mpirun -np 2 python examples/ep_run.py --transport mpi                 # MPI-3 RMA windows
    torchrun --nproc-per-node 8 examples/ep_run.py --device cuda --transport nvshmem   # GPUs

Each rank draws its own number of tokens (ranks differ on purpose), runs `--steps` forward/backward
passes and prints: tokens, rows sent to each rank, bytes it put to other ranks, and the step time.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

import flashmoe_py as fm
from flashmoe_py.parallel import init_process_group


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transport", default="auto", help="auto | shm | mpi | nvshmem | alltoall")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    ap.add_argument("--tokens", type=int, default=256, help="mean tokens per rank (each rank draws 50%%..150%%)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds a rank waits for a peer")
    args = ap.parse_args()

    rank, world = init_process_group("nccl" if args.device == "cuda" else "gloo")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(rank)  # the replicated router is broadcast from rank 0; each rank's experts are its own
    cfg = fm.MoEConfig(hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_experts=args.experts,
                       top_k=args.topk, aux_loss_coef=1e-2)
    layer = fm.FusedMoE(cfg, process_group=dist.group.WORLD, transport=args.transport, device=device, dtype=dtype,
                        max_tokens_per_rank=2 * args.tokens, timeout_s=args.timeout)
    gen = torch.Generator().manual_seed(1234 + rank)
    tokens = int(args.tokens * (0.5 + torch.rand((), generator=gen).item()))
    times = []
    for _ in range(args.steps):
        x = torch.randn(tokens, args.hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        start = time.perf_counter()
        y = layer(x)
        (y.float().square().mean() + layer.aux_loss).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    s = layer.stats
    lines = [f"rank {rank}/{world} transport={layer.transport} experts {layer.rank * layer.num_local_experts}.."
             f"{(layer.rank + 1) * layer.num_local_experts - 1} tokens={tokens}",
             f"  rows_per_peer={s.rows_per_peer.tolist()} bytes_sent={s.bytes_sent}",
             f"  step median {sorted(times)[len(times) // 2] * 1e3:.2f} ms; |y|={y.float().norm():.4f} "
             f"|dx|={x.grad.float().norm():.4f} |dw_up|={layer.w_up.grad.float().norm():.4f}"]
    for r in range(world):  # print rank by rank so lines do not interleave
        if r == rank:
            print("\n".join(lines), flush=True)
        dist.barrier()
    if layer.expert_parallel is not None:
        layer.expert_parallel.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
