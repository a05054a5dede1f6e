"""The fused kernel across CPU ranks: expert parallelism over the shm heap, kernels under TRITON_INTERPRET=1.

tests/test_fused_ep.py starts these ranks once (spawning is the slow part) and reads each scenario's result.
Every rank builds the same global parameters and every rank's tokens from the shared seed, runs its own
tokens through a fused layer and compares with the single-process reference path. Cross-rank waits are
real: each rank is a process spinning on its own shm segment while its peer's kernel puts into it.

    TRITON_INTERPRET=1 python -m tests.fused_worker --world 2 --seed 1 --out DIR --store FILE
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from datetime import timedelta
from unittest import mock

import torch
import torch.distributed as dist

import flashmoe_py as fm
from flashmoe_py import fused_backend, interpreter_threads
from flashmoe_py.parallel import ExchangeTimeout, ExpertParallel, HeapOverflow
from tests.ep_worker import Ctx, _data, _reference, run_scenario, write_and_leave
from tests.helpers import fused_wire_bytes, token_rank_hits
from tests.tolerances import assert_close

H, FFN, E = 24, 20, 8  # H: a full and a partial 16-wide reduction tile; FFN: a full and a partial column tile
TIMEOUT_S = 30.0  # generous: the interpreter is slow, and a failing scenario makes its peer wait this long
PHASED_LAUNCHES = 6  # phases of one forward under the plain interpreter
MODE = {"concurrent": False}  # --concurrent: every launch is the one PHASE=ALL launch, its programs as threads
SCENARIOS: dict = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def _layer(ctx: Ctx, cfg, dtype, params: dict, group=None, **kw) -> fm.FusedMoE:
    group = ctx.group if group is None else group
    layer = fm.FusedMoE(cfg, backend="fused", process_group=group, transport="shm", dtype=dtype,
                        timeout_s=kw.pop("timeout_s", TIMEOUT_S), max_tokens_per_rank=kw.pop("max_tokens", 16), **kw)
    w, r = dist.get_world_size(group), dist.get_rank(group)
    el = cfg.num_experts // w
    with torch.no_grad():
        for name, t in params.items():
            getattr(layer, name).copy_(t[r * el:(r + 1) * el] if name in ("w_up", "w_down", "b_up", "b_down") else t)
    return layer


def _rows_per_peer(ctx: Ctx, cfg, ids: torch.Tensor) -> list:
    """Rows a rank dispatches to each rank (own included): one per (token, rank) with a kept expert there."""
    return token_rank_hits(ids, ctx.el(cfg), ctx.world).sum(0).tolist()


def _min_bytes(ctx: Ctx, cfg, routed_ids: list, itemsize: int) -> int:
    return fused_wire_bytes(routed_ids, ctx.el(cfg), ctx.rank, cfg.hidden_size, itemsize)


def _train_step(ctx: Ctx, cfg, dtype, params, xs, gs) -> dict:
    """Inference forward (routing in the kernel), then forward + backward; all compared with the reference."""
    r = ctx.rank
    layer = _layer(ctx, cfg, dtype, params)
    outs, xgrads, pgrads = _reference(cfg, params, xs, gs, per_rank=False)
    with torch.no_grad():
        assert_close(layer(xs[r]), outs[r], dtype, f"rank {r} inference out")
    stats = layer.stats
    assert stats.kernel_launches == (1 if MODE["concurrent"] else PHASED_LAUNCHES), stats
    assert stats.host_syncs == 1, stats  # the layer's first forward: the barrier before its first launch
    if MODE["concurrent"]:  # several programs took tasks: the protocol ran with programs racing, not one alone
        busy = int((stats.tasks_per_program > 0).sum())
        assert busy > 1, f"only {busy} program claimed tasks: {stats.tasks_per_program.tolist()}"
    ids = [fm.moe(x, params, cfg, backend="reference").routing.topk_ids for x in xs]
    expect = _min_bytes(ctx, cfg, ids, torch.empty((), dtype=dtype).element_size())
    assert int(stats.bytes_sent) == expect, f"bytes_sent {int(stats.bytes_sent)} != minimum {expect}"
    per_peer = _rows_per_peer(ctx, cfg, ids[r])
    assert stats.rows_per_peer.tolist() == per_peer, f"rows_per_peer {stats.rows_per_peer} != {per_peer}"

    x = xs[r].clone().requires_grad_()
    out = layer(x)
    (out * gs[r]).sum().backward()
    assert_close(out, outs[r], dtype, f"rank {r} out")
    assert_close(x.grad, xgrads[r], dtype, f"rank {r} x.grad")
    loc = ctx.local(cfg)
    for name, p in layer.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if name in ("w_up", "w_down", "b_up", "b_down"):
            assert_close(g, pgrads[name][loc], dtype, f"rank {r} {name}.grad (local experts)")
        else:  # replicated: each rank holds the gradient of its own tokens; their sum is the reference's
            total = g.detach().clone()
            dist.all_reduce(total)
            assert_close(total, pgrads[name], dtype, f"rank {r} {name}.grad summed over ranks")
    return {"bytes_sent": int(stats.bytes_sent), "rows_per_peer": per_peer}


@scenario
def swiglu_bias_fp64(ctx: Ctx):
    # uneven token counts (partial row tiles everywhere), expert biases
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2, bias=True)
    return _train_step(ctx, cfg, torch.float64, *_data(ctx, cfg, torch.float64, [13, 6, 9, 4], 11))


@scenario
def sigmoid_grouped_shared_fp32(ctx: Ctx):
    # DeepSeek-style: sigmoid scores, selection bias, groups, scaling, gated shared expert; fp32
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=3, activation="gelu",
                       score_func="sigmoid", expert_bias=True, num_expert_groups=4, topk_groups=2,
                       routed_scaling_factor=2.5, num_shared_experts=1, shared_expert_gate=True)
    return _train_step(ctx, cfg, torch.float32, *_data(ctx, cfg, torch.float32, [7, 11, 5, 8], 12))


@scenario
def capacity_fp64(ctx: Ctx):
    # Capacity in the kernel, per rank on its own tokens (the unfused path's semantics): each expert keeps its
    # cfg.capacity(T_rank) best assignments of this rank's tokens, ranked on the device. cf=0.3 drops by
    # construction (fewer slots than assignments). Kept flags, drops, bytes (kept rows only), an inference
    # forward and a training step against the reference run rank by rank.
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2, capacity_factor=0.3,
                       aux_loss_coef=0.1)
    params, xs, gs = _data(ctx, cfg, torch.float64, [13, 6, 9, 4], 19)
    r = ctx.rank
    layer = _layer(ctx, cfg, torch.float64, params)
    outs, xgrads, pgrads = _reference(cfg, params, xs, gs, per_rank=True)
    refs = [fm.moe(x, params, cfg, backend="reference") for x in xs]
    with torch.no_grad():
        res = fm.moe(xs[r], layer, cfg, backend="fused", expert_parallel=layer.expert_parallel)
    assert_close(res.out, outs[r], torch.float64, f"rank {r} inference out")
    assert torch.equal(res.routing.kept, refs[r].routing.kept), "capacity kept different assignments"
    assert int(res.stats.dropped) == int(refs[r].stats.dropped) > 0, (res.stats.dropped, refs[r].stats.dropped)
    kept_ids = [torch.where(ref.routing.kept, ref.routing.topk_ids, -1) for ref in refs]
    expect = _min_bytes(ctx, cfg, kept_ids, 8)
    assert int(res.stats.bytes_sent) == expect, f"bytes_sent {int(res.stats.bytes_sent)} != minimum {expect}"
    x = xs[r].clone().requires_grad_()
    out = layer(x)
    (out * gs[r]).sum().backward()
    assert_close(out, outs[r], torch.float64, f"rank {r} out")
    assert_close(x.grad, xgrads[r], torch.float64, f"rank {r} x.grad")
    loc = ctx.local(cfg)
    for name in ("w_up", "w_down"):
        assert_close(getattr(layer, name).grad, pgrads[name][loc], torch.float64, f"rank {r} {name}.grad")
    total = layer.router_weight.grad.detach().clone()
    dist.all_reduce(total)
    assert_close(total, pgrads["router_weight"], torch.float64, f"rank {r} router_weight.grad summed over ranks")
    return {"dropped": int(res.stats.dropped), "bytes_sent": expect}


@scenario
def all_to_rank0_and_empty(ctx: Ctx):
    # Caller routing through the functional API: every token goes to rank 0's experts (rank 1's experts get
    # no rows: empty packets only), rank 1 has no tokens at all, and one token names an expert twice.
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2, activation="geglu")
    params, xs, gs = _data(ctx, cfg, torch.float64, [9, 0, 7, 3], 13)
    el, r = ctx.el(cfg), ctx.rank
    ids = [torch.stack([torch.randperm(el)[:2] for _ in range(x.shape[0])]) if x.shape[0]
           else torch.empty(0, 2, dtype=torch.int64) for x in xs]
    ids[0][4, 1] = ids[0][4, 0]
    weights = [torch.rand(x.shape[0], 2, dtype=torch.float64) + 0.1 for x in xs]
    ep = ExpertParallel(cfg, ctx.group, "shm", max_tokens_per_rank=16, timeout_s=TIMEOUT_S)
    loc = ctx.local(cfg)
    leaves = {n: (t[loc] if n in ("w_up", "w_down") else t).clone().requires_grad_() for n, t in params.items()}
    w = weights[r].clone().requires_grad_()
    x = xs[r].clone().requires_grad_()
    res = fm.moe(x, leaves, cfg, backend="fused", topk_ids=ids[r], topk_weights=w, expert_parallel=ep)
    (res.out * gs[r]).sum().backward()
    outs, xgrads, pgrads = _reference(cfg, params, xs, gs, per_rank=False, routing=(ids, weights))
    assert_close(res.out, outs[r], torch.float64, f"rank {r} out")
    assert_close(x.grad, xgrads[r], torch.float64, f"rank {r} x.grad")
    for name in ("w_up", "w_down"):  # rank 1's experts got no rows: zero gradients, on both sides
        assert_close(leaves[name].grad, pgrads[name][loc], torch.float64, f"rank {r} {name}.grad")
    if xs[r].shape[0]:
        ref_w = weights[r].clone().requires_grad_()
        ref = fm.moe(xs[r], params, cfg, backend="reference", topk_ids=ids[r], topk_weights=ref_w)
        (ref.out * gs[r]).sum().backward()
        assert_close(w.grad, ref_w.grad, torch.float64, f"rank {r} topk_weights.grad")
    # All k experts of every token on one rank: one row out and one back per token of the other ranks.
    sent = fused_wire_bytes(ids, el, r, cfg.hidden_size, 8)
    assert int(res.stats.bytes_sent) == sent, f"bytes_sent {int(res.stats.bytes_sent)} != minimum {sent}"
    expect = [xs[r].shape[0]] + [0] * (ctx.world - 1)  # one row per token, a repeated expert included
    assert res.stats.rows_per_peer.tolist() == expect, f"rows_per_peer {res.stats.rows_per_peer} != {expect}"
    ep.close()
    return {"rows_per_peer": expect}


@scenario
def repeated_forwards(ctx: Ctx):
    # Forwards on one heap with token counts changing (zero included): sequence numbers, no reset. The epoch
    # word counts the launches; every output is checked.
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2)
    params, _, _ = _data(ctx, cfg, torch.float64, [1], 14)
    layer = _layer(ctx, cfg, torch.float64, params, max_tokens=9)
    n = 6
    for it in range(n):
        gen = torch.Generator().manual_seed(ctx.seed + it)
        sizes = [int(v) for v in torch.randint(0, 10, (ctx.world,), generator=gen)]
        sizes[it % ctx.world] = 0 if it == 2 else sizes[it % ctx.world]
        xs = [torch.randn(t, H, dtype=torch.float64, generator=gen) for t in sizes]
        with torch.no_grad():
            out = layer(xs[ctx.rank])
            ref = fm.moe(torch.cat(xs), params, cfg, backend="reference").out.split(sizes)[ctx.rank]
        assert_close(out, ref, torch.float64, f"rank {ctx.rank} forward {it} sizes {sizes}")
    state, = layer.expert_parallel.backend_state.values()
    assert int(state.sync[0]) == n, f"epoch {int(state.sync[0])} after {n} forwards"
    return {"forwards": n}


@scenario
def bf16_caller_routing(ctx: Ctx):
    # bf16 rows on the heap and through the interpreter's upcast dot; routing from the fp64 reference so a
    # low-precision near-tie cannot choose differently.
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2)
    params, xs, _ = _data(ctx, cfg, torch.bfloat16, [10, 7, 5, 6], 15)
    routed = [fm.moe(x.double(), {n: t.double() for n, t in params.items()}, cfg, backend="reference").routing
              for x in xs]
    ids = [rt.topk_ids for rt in routed]
    weights = [rt.topk_weights.float() for rt in routed]
    layer = _layer(ctx, cfg, torch.bfloat16, params)
    out = layer(xs[ctx.rank], topk_ids=ids[ctx.rank], topk_weights=weights[ctx.rank])
    ref = fm.moe(torch.cat(xs), params, cfg, backend="reference", topk_ids=torch.cat(ids),
                 topk_weights=torch.cat(weights)).out.split([x.shape[0] for x in xs])[ctx.rank]
    assert_close(out, ref, torch.bfloat16, f"rank {ctx.rank} bf16 out")
    expect = _min_bytes(ctx, cfg, ids, 2)  # bf16 rows, fp32 weights in the records
    assert int(layer.stats.bytes_sent) == expect, f"bytes_sent {int(layer.stats.bytes_sent)} != minimum {expect}"
    # Every sum has a fixed order (slot order on the expert's rank, rank order on the token's), so a second run,
    # its programs racing differently, gives the same bits.
    again = layer(xs[ctx.rank], topk_ids=ids[ctx.rank], topk_weights=weights[ctx.rank])
    assert torch.equal(again, out), f"rank {ctx.rank}: a second forward differs by {(again - out).abs().max()}"
    return {"bytes_sent": expect}


@scenario
def world_size_one_groups(ctx: Ctx):
    # Each rank alone in a group of one, still on an shm heap: every packet is local, one rank's kernel
    # against the reference on its own tokens.
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2, activation="silu", bias=True)
    params, xs, _ = _data(ctx, cfg, torch.float64, [11, 9, 6, 5], 16)
    groups = [dist.new_group([r]) for r in range(ctx.world)]
    layer = _layer(ctx, cfg, torch.float64, params, group=groups[ctx.rank])
    for _ in range(2):
        with torch.no_grad():
            out = layer(xs[ctx.rank])
        assert_close(out, fm.moe(xs[ctx.rank], params, cfg, backend="reference").out, torch.float64,
                     f"rank {ctx.rank} alone")
    assert layer.stats.bytes_sent == 0 and layer.stats.rows_per_peer.tolist() == [xs[ctx.rank].shape[0]]
    return {}


@scenario
def refusals(ctx: Ctx):
    # More tokens than the heap holds: HeapOverflow before anything is launched (no peer is left waiting, as
    # both ranks skip the forward). A transport without a device-addressable heap: BackendUnavailable.
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2)
    layer = fm.FusedMoE(cfg, backend="fused", process_group=ctx.group, transport="shm", max_tokens_per_rank=4,
                        dtype=torch.float64, timeout_s=TIMEOUT_S)
    if ctx.rank == 0:
        try:
            layer(torch.randn(5, H, dtype=torch.float64))
        except HeapOverflow as err:
            assert "max_tokens_per_rank=4" in str(err), str(err)
        else:
            raise AssertionError("5 tokens with max_tokens_per_rank=4 did not raise HeapOverflow")
    a2a = fm.FusedMoE(cfg, backend="fused", process_group=ctx.group, transport="alltoall", dtype=torch.float64)
    try:
        a2a(torch.randn(3, H, dtype=torch.float64))
    except fm.BackendUnavailable as err:
        assert "transport='alltoall'" in str(err) and "shm" in str(err), str(err)
    else:
        raise AssertionError("backend='fused' over alltoall did not raise BackendUnavailable")
    return {}


@scenario
def peer_skips_forward(ctx: Ctx):
    # The last rank skips the second forward: the others' kernels give up waiting for its packets after about
    # timeout_s and the host raises ExchangeTimeout naming the rank, the peer and the slot; the layer then
    # refuses further use.
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2)
    timeout = 1.5
    params, xs, _ = _data(ctx, cfg, torch.float64, [5, 4, 6, 3], 17)
    layer = _layer(ctx, cfg, torch.float64, params, timeout_s=timeout)
    with torch.no_grad():
        layer(xs[ctx.rank])  # everyone present: heap allocated (collective), one good forward
    dead = ctx.world - 1
    if ctx.rank == dead:
        return {}
    start = time.monotonic()
    try:
        with torch.no_grad():
            layer(xs[ctx.rank])
    except ExchangeTimeout as err:
        elapsed = time.monotonic() - start
        msg = str(err)
        assert f"rank {ctx.rank}" in msg and f"peer {dead}" in msg and "slot" in msg, msg
        assert "dispatch" in msg and "expected sequence 2" in msg, msg
        # the interpreter counts spin iterations (parallel.heap.INTERPRETER_SPIN_S each): generous bound
        assert elapsed < 4 * timeout + 20, f"timed out after {elapsed:.1f} s, configured {timeout} s"
    else:
        raise AssertionError("no ExchangeTimeout although the last rank skipped its forward")
    try:
        with torch.no_grad():
            layer(xs[ctx.rank])
    except RuntimeError as err:
        assert "recreate the layer" in str(err), str(err)
    else:
        raise AssertionError("a layer whose forward timed out accepted another forward")
    return {"elapsed_s": round(elapsed, 2)}


@scenario
def late_first_forward(ctx: Ctx):
    # The last rank compiles the kernel (and initialises its module) far more slowly than the others, after the
    # collective heap allocation: the first launch waits for every rank (a barrier, counted as the one host sync
    # of that forward) instead of the early ranks' kernels timing out. Later forwards have no barrier.
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2)
    timeout = 1.0
    params, xs, _ = _data(ctx, cfg, torch.float64, [6, 5, 7, 4], 18)
    layer = _layer(ctx, cfg, torch.float64, params, timeout_s=timeout)
    ref = fm.moe(torch.cat(xs), params, cfg, backend="reference").out.split([x.shape[0] for x in xs])[ctx.rank]
    compile_variant = fused_backend._compile_variant

    def slow_compile(*args):
        time.sleep(LATE_S)
        return compile_variant(*args)

    late = ctx.rank == ctx.world - 1
    with mock.patch.object(fused_backend, "_compile_variant", slow_compile) if late else contextlib.nullcontext():
        for it in range(2):
            with torch.no_grad():
                out = layer(xs[ctx.rank])
            assert_close(out, ref, torch.float64, f"rank {ctx.rank} forward {it}")
            assert layer.stats.host_syncs == (1 if it == 0 else 0), layer.stats
    return {"late_s": LATE_S}


LATE_S = 8.0  # far beyond the 1 s timeout: without the barrier the early ranks' first launch gives up


def _rank_main(rank: int, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=rank, world_size=args.world,
                            timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    names = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    MODE["concurrent"] = args.concurrent
    results = {}
    for name in names:
        ctx = Ctx(rank, args.world, "shm", args.seed)

        def call():
            with interpreter_threads.concurrent_programs() if args.concurrent else contextlib.nullcontext():
                return SCENARIOS[name](ctx)
        run_scenario(results, name, call)
    write_and_leave(results, args.out, rank)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--store", required=True, help="file for the gloo rendezvous (FileStore)")
    ap.add_argument("--scenarios", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--concurrent", action="store_true",
                    help="run each forward as the one PHASE=ALL launch a GPU makes, its programs as concurrent threads "
                         "(flashmoe_py.interpreter_threads); default: phase by phase")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1: the fused kernel runs on CPU ranks only in the interpreter")
    torch.multiprocessing.spawn(_rank_main, args=(args,), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
