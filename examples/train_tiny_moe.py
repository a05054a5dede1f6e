"""Train a tiny Mixture-of-Experts language model on synthetic text and print the loss.

    python examples/train_tiny_moe.py --steps 300                            # one process, CPU or one GPU
    torchrun --nproc-per-node 2 examples/train_tiny_moe.py --steps 300       # 2 ranks: expert + data parallel

On CPU the ranks talk over gloo and exchange token rows through the `shm` transport; on GPUs over NCCL and
`nvshmem` (`--transport` picks another, e.g. `alltoall`).

The data is a fixed random sparse Markov chain over a small vocabulary (each token has a few likely
successors), so the loss falls from ln(vocab) towards the chain's conditional entropy and nothing is
downloaded. The model: token embedding -> layers of (RMSNorm, causal self-attention, RMSNorm, FusedMoE), each
with a residual -> RMSNorm -> vocabulary projection.

Parallelism with W ranks: every rank holds a replica of everything except the routed experts, of which it
owns E/W (`FusedMoE(cfg, process_group=pg, transport=...)`). Each global step draws the same global batch
on every rank; rank r takes its B/W rows. The loss on each rank is its tokens' summed cross entropy divided
by the global token count, so the ranks' losses add up to the global mean: replicated parameters get their
gradients summed over ranks (all-reduce), expert parameters already receive every rank's contribution
through the expert-parallel backward. A step with W ranks is therefore the step W=1 takes on the same global
batch, up to summation order. (The load-balancing loss is a product of per-token averages, so with
--aux-loss-coef > 0 each rank balances its own tokens: only --aux-loss-coef 0 is exactly the W=1 step.)

Parameters are built identically on every rank from --seed before the experts are split, so the run does
not depend on W either.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import flashmoe_py as fm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--global-batch", type=int, default=16, help="sequences per step over all ranks (default 16)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--vocab", type=int, default=64, help="vocabulary size (default 64)")
    p.add_argument("--hidden", type=int, default=64, help="model width H (default 64)")
    p.add_argument("--ffn", type=int, default=64, help="expert inner width I (default 64)")
    p.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--experts", type=int, default=8, help="routed experts E, a multiple of the world size (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--shared-experts", type=int, default=1, help="shared experts (default 1)")
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="load-balancing loss weight (default 0.01)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="adamw (default) or sgd")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 3e-3 adamw, 0.3 sgd)")
    p.add_argument("--seed", type=int, default=0, help="parameter and data seed (default 0)")
    p.add_argument("--backend", default="auto", help="flashmoe_py backend (default auto)")
    p.add_argument("--transport", default=None, help="expert-parallel transport (default shm on CPU, nvshmem on GPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per process (default: torch's choice; torchrun sets 1 per rank)")
    p.add_argument("--log-every", type=int, default=10, help="print the loss every N steps (default 10)")
    p.add_argument("--losses-json", default=None, help="rank 0 writes every step's global loss here")
    return p.parse_args(argv)


class MarkovText:
    """Token sequences from a fixed random sparse Markov chain; batch `step` is the same on every rank."""

    def __init__(self, vocab: int, seed: int, successors: int = 3):
        gen = torch.Generator().manual_seed(seed)
        nxt = torch.stack([torch.randperm(vocab, generator=gen)[:successors] for _ in range(vocab)])
        probs = torch.rand(vocab, successors, generator=gen) + 0.2
        self.transition = torch.zeros(vocab, vocab).scatter_(1, nxt, probs / probs.sum(1, keepdim=True))
        self.vocab, self.seed = vocab, seed

    def entropy_rate(self) -> float:
        """The best achievable mean loss (nats/token) once the context is long: H(next | current) under the
        chain's stationary distribution (the first token of each sequence is uniform, so a little above this)."""
        pi = torch.full((self.vocab,), 1.0 / self.vocab)
        for _ in range(1000):
            pi = pi @ self.transition
        p = self.transition
        return float(-(pi[:, None] * p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum())

    def batch(self, step: int, sequences: int, length: int) -> torch.Tensor:
        """[sequences, length + 1] int64 token ids (inputs are [:, :-1], targets [:, 1:])."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        tokens = torch.empty(sequences, length + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(self.vocab, (sequences,), generator=gen)
        for t in range(length):
            tokens[:, t + 1] = torch.multinomial(self.transition[tokens[:, t]], 1, generator=gen).squeeze(1)
        return tokens


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, moe_cfg: fm.MoEConfig, backend: str):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.moe = fm.FusedMoE(moe_cfg, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.proj(attn)
        return x + self.moe(self.norm2(x))


class TinyMoELM(nn.Module):
    def __init__(self, args: argparse.Namespace):
        super().__init__()
        cfg = fm.MoEConfig(hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_experts=args.experts,
                           top_k=args.top_k, num_shared_experts=args.shared_experts, aux_loss_coef=args.aux_loss_coef)
        self.embed = nn.Embedding(args.vocab, args.hidden)
        self.blocks = nn.ModuleList(Block(args.hidden, args.heads, cfg, args.backend) for _ in range(args.layers))
        self.norm = nn.RMSNorm(args.hidden)
        self.head = nn.Linear(args.hidden, args.vocab, bias=False)

    def moe_layers(self) -> list[fm.FusedMoE]:
        return [blk.moe for blk in self.blocks]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


EXPERT_PARAMS = ("w_up", "w_down", "b_up", "b_down")


@torch.no_grad()
def split_experts(model: TinyMoELM, group, transport: str) -> None:
    """Replace each full FusedMoE by an expert-parallel one holding this rank's E/W experts, same values."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for blk in model.blocks:
        full = blk.moe
        local = fm.FusedMoE(full.config, backend=full.backend, process_group=group, transport=transport,
                            device=full.w_up.device, dtype=full.w_up.dtype)
        per_rank = full.config.num_experts // world
        for name, tensor in list(local.named_parameters()) + list(local.named_buffers()):
            src = getattr(full, name)
            tensor.copy_(src[rank * per_rank:(rank + 1) * per_rank] if name in EXPERT_PARAMS else src)
        blk.moe = local


def replicated_parameters(model: TinyMoELM, world: int) -> list[nn.Parameter]:
    """Parameters every rank holds a copy of: all but the routed experts' once they are split."""
    if world == 1:
        return list(model.parameters())
    local = {id(getattr(m, n)) for m in model.moe_layers() for n in EXPERT_PARAMS if getattr(m, n) is not None}
    return [p for p in model.parameters() if id(p) not in local]


def all_reduce_grads(params: list[nn.Parameter], group) -> None:
    """Sum the gradients of replicated parameters over the ranks, in one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def main(argv=None, script: bool = False) -> list[float]:
    """Run the training; returns each step's global loss (mean cross entropy + aux losses) on every rank.
    script: run as the script under torchrun, which then ends the process itself after the final barrier."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    distributed = dist.is_torchelastic_launched() and not dist.is_initialized()
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if args.global_batch % world or args.experts % world:
        raise SystemExit(f"--global-batch {args.global_batch} and --experts {args.experts} must be multiples of the "
                         f"world size {world}")
    transport = args.transport or ("nvshmem" if use_cuda else "shm")

    torch.manual_seed(args.seed)  # identical parameters on every rank, whatever W
    model = TinyMoELM(args).to(device)
    if world > 1:
        split_experts(model, dist.group.WORLD, transport)
    replicated = replicated_parameters(model, world)
    lr = args.lr if args.lr is not None else (3e-3 if args.optimizer == "adamw" else 0.3)
    opt = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0) if args.optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=lr))
    data = MarkovText(args.vocab, args.seed)
    rows = args.global_batch // world
    global_tokens = args.global_batch * args.seq_len
    if rank == 0:
        print(f"tiny MoE LM: {sum(p.numel() for p in model.parameters())} parameters on rank 0, world size {world}"
              f"{f', transport {transport}' if world > 1 else ''}, device {device}; "
              f"loss starts near ln({args.vocab}) = {math.log(args.vocab):.3f}, the data's entropy rate is "
              f"{data.entropy_rate():.3f}", flush=True)

    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        tokens = data.batch(step, args.global_batch, args.seq_len)[rank * rows:(rank + 1) * rows].to(device)
        logits = model(tokens[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, args.vocab).float(), tokens[:, 1:].reshape(-1), reduction="sum")
        aux = sum(m.aux_loss for m in model.moe_layers()) / world  # each rank's mean over its tokens
        loss = ce / global_tokens + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        report = loss.detach().clone()
        if world > 1:
            all_reduce_grads(replicated, dist.group.WORLD)
            dist.all_reduce(report)
        opt.step()
        losses.append(report.item())
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
    if rank == 0:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps, "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        if args.losses_json:
            with open(args.losses_json, "w") as f:
                json.dump(losses, f)
    if distributed:
        # Leave together: a rank that tears gloo down while a peer is still writing its results was seen to
        # abort at exit ("terminate called without an active exception") once in a loaded CI-like run.
        dist.barrier()
        if script:
            # Still seen, about one run in five on a loaded 2-core machine, after the barrier: in gloo's teardown
            # or the interpreter's. Every rank has passed the barrier and written what it writes, so the script
            # leaves without running C++ destructors.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main(script=True)
