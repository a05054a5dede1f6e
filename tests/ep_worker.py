"""Expert-parallel scenarios run by several CPU ranks at once; tests/test_ep.py launches them and reads results.

One launch per world size runs every scenario for each of its transports in sequence (spawning processes
is the slow part on 2 cores), and each rank writes `rank<r>.json`: per "transport/scenario" {"ok": bool,
"error": traceback, "info": {...}, "seconds": float}. Every rank builds the same global parameters and
every rank's tokens from the shared seed, runs its own part through the layer, and checks it against the
single-process reference path.

    python -m tests.ep_worker --launcher spawn --world 2 --transport shm,alltoall --seed 1 --out DIR
    mpirun -np 2 python -m tests.ep_worker --launcher mpirun --transport mpi --seed 1 --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

import flashmoe_py as fm
from flashmoe_py.bench import counting
from flashmoe_py.parallel import ExchangeTimeout, ExpertParallel, HeapOverflow
from tests.helpers import fused_wire_bytes, random_params
from tests.tolerances import assert_close

H, FFN, E = 16, 8, 8  # hidden size, expert width, experts
TIMEOUT_S = 20.0  # generous: a failing scenario makes its peers wait at most this long
SCENARIOS: dict = {}
ONE_SIDED = ("shm", "mpi")
SIGNAL_BYTES = 8


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


@dataclass
class Ctx:
    rank: int
    world: int
    transport: str
    seed: int

    @property
    def group(self):
        return dist.group.WORLD

    def el(self, cfg) -> int:
        return cfg.num_experts // self.world

    def local(self, cfg) -> slice:
        el = self.el(cfg)
        return slice(self.rank * el, (self.rank + 1) * el)


def _data(ctx: Ctx, cfg, dtype, tokens: list[int], tag: int):
    """The same global params and per-rank tokens/output-gradients on every rank."""
    torch.manual_seed(ctx.seed * 1000 + tag)
    params = random_params(cfg, dtype)
    xs = [torch.randn(t, cfg.hidden_size, dtype=torch.float64).to(dtype) for t in tokens[:ctx.world]]
    gs = [torch.randn(t, cfg.hidden_size, dtype=torch.float64).to(dtype) for t in tokens[:ctx.world]]
    return params, xs, gs


def _layer(ctx: Ctx, cfg, dtype, params: dict, **kw) -> fm.FusedMoE:
    layer = fm.FusedMoE(cfg, process_group=ctx.group, transport=ctx.transport, dtype=dtype,
                        timeout_s=kw.pop("timeout_s", TIMEOUT_S), **kw)
    loc = ctx.local(cfg)
    with torch.no_grad():
        for name, t in params.items():
            target = getattr(layer, name)
            target.copy_(t[loc] if name in ("w_up", "w_down", "b_up", "b_down") else t)
    return layer


def _reference(cfg, params: dict, xs, gs, per_rank: bool, routing=None, weight_grads: bool = False):
    """Single-process reference: output and gradients of sum(out * g). On the concatenation of all ranks'
    tokens, or rank by rank where capacity makes a rank's result depend on its own token count. Returns (outs,
    x grads, parameter grads), and the caller routing weights' grads per rank too with weight_grads=True
    (tests/fused_worker.py uses the three-value form)."""
    leaves = {n: t.detach().clone().requires_grad_(n != "expert_bias") for n, t in params.items()}
    x_leaves = [x.detach().clone().requires_grad_() for x in xs]
    w_leaves = None
    if per_rank:
        outs = [fm.moe(x, leaves, cfg, backend="reference").out for x in x_leaves]
    else:
        kw = {}
        if routing is not None:
            w_leaves = [w.detach().clone().requires_grad_() for w in routing[1]]
            kw = dict(topk_ids=torch.cat(routing[0]), topk_weights=torch.cat(w_leaves))
        out = fm.moe(torch.cat(x_leaves), leaves, cfg, backend="reference", **kw).out
        outs = list(out.split([x.shape[0] for x in xs]))
    loss = sum((o.double() * g.double()).sum() for o, g in zip(outs, gs))
    loss.backward()
    wgrads = None if w_leaves is None else [w.grad if w.grad is not None else torch.zeros_like(w) for w in w_leaves]
    got = [o.detach() for o in outs], [x.grad for x in x_leaves], {n: t.grad for n, t in leaves.items()}
    return (*got, wgrads) if weight_grads else got


def _run(ctx: Ctx, cfg, dtype, params, xs, gs, *, routing=None, ep=None, backend="auto", layer=None):
    """This rank's tokens forward + backward (a layer, or the functional API with `ep` and caller routing) ->
    (out, x.grad, {parameter name: tensor holding .grad}, stats, routing weights or None)."""
    r = ctx.rank
    x = xs[r].clone().requires_grad_()
    weights = None
    if ep is None:
        layer = layer or _layer(ctx, cfg, dtype, params, backend=backend)
        out = layer(x)
        stats = layer.stats
        grads_of = {n: p for n, p in layer.named_parameters()}
    else:
        loc = ctx.local(cfg)
        grads_of = {n: (t[loc] if n in ("w_up", "w_down", "b_up", "b_down") else t).clone().requires_grad_()
                    for n, t in params.items() if n != "expert_bias"}
        p = dict(grads_of, **({"expert_bias": params["expert_bias"]} if "expert_bias" in params else {}))
        weights = routing[1][r].clone().requires_grad_()
        res = fm.moe(x, p, cfg, topk_ids=routing[0][r], topk_weights=weights, expert_parallel=ep, backend=backend)
        out, stats = res.out, res.stats
    out.mul(gs[r]).sum().backward()
    return out, x.grad, grads_of, stats, weights


def _check(ctx: Ctx, cfg, dtype, params, xs, gs, *, per_rank=False, routing=None, ep=None, backend="auto",
           layer=None) -> dict:
    """Run this rank's tokens forward + backward (layer, or functional API with `ep`) and compare with the
    single-process reference on all ranks' tokens: output, x.grad, parameter gradients, and with caller routing
    the routing weights' gradient (it comes back from the experts' ranks)."""
    r = ctx.rank
    out, x_grad, grads_of, stats, weights = _run(ctx, cfg, dtype, params, xs, gs, routing=routing, ep=ep,
                                                 backend=backend, layer=layer)
    outs, xgrads, pgrads, wgrads = _reference(cfg, params, xs, gs, per_rank, routing, weight_grads=True)
    assert_close(out, outs[r], dtype, f"rank {r} out")
    assert_close(x_grad, xgrads[r], dtype, f"rank {r} x.grad")
    if weights is not None:
        assert_close(weights.grad, wgrads[r], dtype, f"rank {r} topk_weights.grad")
    loc = ctx.local(cfg)
    for name, p in grads_of.items():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if pgrads[name] is None:  # e.g. the router under caller-supplied routing: no gradient anywhere
            assert p.grad is None or not p.grad.any(), f"rank {r} {name}.grad should be zero"
            continue
        if name in ("w_up", "w_down", "b_up", "b_down"):
            assert_close(g, pgrads[name][loc], dtype, f"rank {r} {name}.grad (local experts)")
        else:  # replicated: each rank holds the gradient of its own tokens; their sum is the reference's
            total = g.detach().clone()
            dist.all_reduce(total, group=ctx.group)
            assert_close(total, pgrads[name], dtype, f"rank {r} {name}.grad summed over ranks")
    return {"bytes_sent": int(stats.bytes_sent), "rows_per_peer": stats.rows_per_peer.tolist()}


@scenario
def softmax_fp64(ctx: Ctx):
    # uneven token counts per rank; biases on the experts
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2, bias=True)
    return _check(ctx, cfg, torch.float64, *_data(ctx, cfg, torch.float64, [7, 12, 3, 9], 1))


@scenario
def sigmoid_grouped_shared_fp32(ctx: Ctx):
    # DeepSeek-style: sigmoid scores, selection bias, group-limited top-3, scaling, gated shared expert
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=3, activation="gelu",
                       score_func="sigmoid", expert_bias=True, num_expert_groups=4, topk_groups=2,
                       routed_scaling_factor=2.5, num_shared_experts=1, shared_expert_gate=True)
    return _check(ctx, cfg, torch.float32, *_data(ctx, cfg, torch.float32, [10, 5, 8, 6], 2))


@scenario
def capacity_fp64(ctx: Ctx):
    # capacity applies per rank to its own tokens: the reference runs rank by rank. cf=0.3 makes drops certain
    # on every rank, whatever the routing: C = ceil(0.3 * T * 2 / 8) is 1 for T <= 13 and 2 for T = 14, so at
    # most E*C = 8 or 16 of the 2T = 14..28 assignments fit (cf=0.6 left a well-spread rank with no drop).
    # The triton backend too on the one-sided transports (its capacity kernel, on this rank's tokens).
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2, capacity_factor=0.3)
    params, xs, gs = _data(ctx, cfg, torch.float64, [12, 9, 14, 7], 3)
    info = {}
    for backend in ("reference", "triton") if ctx.transport in ONE_SIDED else ("reference",):
        layer = _layer(ctx, cfg, torch.float64, params, backend=backend, max_tokens_per_rank=16)
        info[backend] = _check(ctx, cfg, torch.float64, params, xs, gs, per_rank=True, layer=layer)
        assert int(layer.stats.dropped) == int(fm.moe(xs[ctx.rank], params, cfg, backend="reference").stats.dropped)
    dropped = fm.moe(xs[ctx.rank], params, cfg, backend="reference").stats.dropped
    assert int(dropped) > 0 or xs[ctx.rank].shape[0] == 0, "capacity_factor=0.3 dropped nothing: not exercised"
    return info


@scenario
def zero_tokens_shared_aux_fp64(ctx: Ctx):
    # rank 1 has no tokens; shared expert; the aux loss is that of each rank's own tokens. The triton backend too on
    # the one-sided transports (over shm: the device-initiated exchanges, a rank routing nothing still exchanging).
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2, activation="relu",
                       num_shared_experts=2, aux_loss_coef=0.01, z_loss_coef=0.001)
    params, xs, gs = _data(ctx, cfg, torch.float64, [6, 0, 9, 4], 4)
    info = {}
    for backend in ("reference", "triton") if ctx.transport in ONE_SIDED else ("reference",):
        layer = _layer(ctx, cfg, torch.float64, params, backend=backend, max_tokens_per_rank=16)
        x = xs[ctx.rank].clone().requires_grad_()
        layer(x).mul(gs[ctx.rank]).sum().backward()
        own = fm.moe(xs[ctx.rank], params, cfg, backend="reference")
        assert_close(layer.aux_loss, own.aux_loss, torch.float64, f"{backend}: rank {ctx.rank} aux_loss")
        layer.zero_grad()
        info[backend] = _check(ctx, cfg, torch.float64, params, xs, gs, layer=layer)
    return info


@scenario
def caller_routing_all_to_rank0(ctx: Ctx):
    # functional API; every token routed to rank 0's experts, so the other ranks' experts get no rows;
    # rank 1 has no tokens. One row per (token, rank) on the one-sided transports, per (token, expert) on alltoall.
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2, activation="geglu")
    params, xs, gs = _data(ctx, cfg, torch.float64, [5, 0, 7, 3], 5)
    el = ctx.el(cfg)
    ids = [torch.stack([torch.randperm(el)[:2] for _ in range(x.shape[0])]) if x.shape[0]
           else torch.empty(0, 2, dtype=torch.int64) for x in xs]
    weights = [torch.rand(x.shape[0], 2, dtype=torch.float64) + 0.1 for x in xs]
    ep = ExpertParallel(cfg, ctx.group, ctx.transport, max_tokens_per_rank=16, timeout_s=TIMEOUT_S)
    info = _check(ctx, cfg, torch.float64, params, xs, gs, routing=(ids, weights), ep=ep)
    per_row = 1 if ctx.transport in ONE_SIDED else 2
    expect = [per_row * xs[ctx.rank].shape[0]] + [0] * (ctx.world - 1)
    assert info["rows_per_peer"] == expect, f"rows_per_peer {info['rows_per_peer']} != {expect}"
    ep.close()
    return info


@scenario
def triton_softmax_fp64(ctx: Ctx):
    # the Triton backend's expert FFN (interpreter) under the transport; top-3 so a rank often holds two or three
    # of a token's experts (reduced there, in slot order); uneven token counts, a rank with few, biases
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=3, bias=True)
    params, xs, gs = _data(ctx, cfg, torch.float64, [7, 12, 3, 9], 11)
    layer = _layer(ctx, cfg, torch.float64, params, backend="triton", max_tokens_per_rank=16)
    return _check(ctx, cfg, torch.float64, params, xs, gs, layer=layer)


@contextlib.contextmanager
def _no_host_reads():
    """Every Tensor.item / tolist / cpu / nonzero and int() / float() / bool() / index of a tensor called from
    flashmoe_py's own code raises while this is on: the reads that synchronise a GPU's host (Triton's interpreter
    and the tests may still read)."""
    names = ["item", "tolist", "cpu", "nonzero", "__int__", "__float__", "__bool__", "__index__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def guard(name, fn):
        def wrapped(self, *a, **kw):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("flashmoe_py"):
                raise AssertionError(f"host read Tensor.{name} from {caller} (a host synchronisation on a GPU)")
            return fn(self, *a, **kw)
        return wrapped

    for n, fn in saved.items():
        setattr(torch.Tensor, n, guard(n, fn))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


@scenario
def triton_device_exchange_no_host_sync(ctx: Ctx):
    # The triton backend over shm runs the device-initiated exchanges (kernels/exchange.py, interpreted, peer
    # pointers into the shm heap): forward and backward read nothing back to the host from flashmoe_py's code
    # (_no_host_reads), report host_syncs == 0, and equal the reference, forward and backward (the router's
    # gradient through the routing weights' gradients that come back), once with the interpreter's programs one
    # after another and once with them concurrent, as a GPU runs them; bytes_sent is exact. (Caller routing is
    # validated with one counted host read: all_k_on_one_remote_rank_fp64 runs it.) Other transports: the
    # host-driven protocol.
    if ctx.transport != "shm":
        return {"skipped": "device-initiated exchanges need peer pointers (shm, nvshmem)"}
    from flashmoe_py import interpreter_threads

    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=3, activation="gelu", bias=True)
    params, xs, gs = _data(ctx, cfg, torch.float64, [6, 9, 4, 5], 21)
    owners = [fm.moe(x, params, cfg, backend="reference").routing.topk_ids // ctx.el(cfg) for x in xs]
    info = {}
    for mode in ("sequential", "concurrent"):
        layer = _layer(ctx, cfg, torch.float64, params, backend="triton", max_tokens_per_rank=16)
        with torch.no_grad():
            layer(xs[ctx.rank])  # the first call allocates the heap: a barrier, counted
        assert layer.stats.host_syncs == 1, f"{mode}: the allocating call counted {layer.stats.host_syncs} syncs"
        with interpreter_threads.concurrent_programs() if mode == "concurrent" else contextlib.nullcontext():
            with _no_host_reads():
                _run(ctx, cfg, torch.float64, params, xs, gs, layer=layer)
            assert layer.stats.host_syncs == 0, f"{mode}: host_syncs {layer.stats.host_syncs}"
            layer.zero_grad()
            got = _check(ctx, cfg, torch.float64, params, xs, gs, layer=layer)
        expect, acc = _expected_bytes(ctx, cfg, owners, 8)
        assert got["bytes_sent"] == expect, f"{mode}: bytes_sent {got['bytes_sent']} != exact {expect} ({acc})"
        info[mode] = dict(got, **acc)
    return info


@scenario
def triton_device_exchange_many_rows(ctx: Ctx):
    # Packets of more rows than one collect program copies (device_exchange._COLLECT_ROWS = 64): 70 and 66 tokens
    # on a heap of 71 rows per source, so two programs per source copy each packet; fp32 rows of 64 bytes, so the
    # slabs (128-byte aligned) are padded apart and the in-place reads of the returned rows must stride over the
    # padding; equal to the reference.
    if ctx.transport != "shm":
        return {"skipped": "device-initiated exchanges need peer pointers (shm, nvshmem)"}
    from flashmoe_py.parallel import device_exchange

    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2)
    params, xs, gs = _data(ctx, cfg, torch.float32, [70, 66, 3, 0], 22)
    layer = _layer(ctx, cfg, torch.float32, params, backend="triton", max_tokens_per_rank=71)
    lay = layer.expert_parallel.exchange_layout_for(torch.float32)
    assert lay.slab_rows > device_exchange._COLLECT_ROWS and lay.slab_bytes > lay.slab_rows * lay.row_bytes
    return _check(ctx, cfg, torch.float32, params, xs, gs, layer=layer)


def _pairs(owners: list, world: int) -> list:
    """owners[s] [T_s, k] owner rank of each slot -> per source s the [T_s, W] bool: token t has a slot on rank d."""
    out = []
    for o in owners:
        hit = torch.zeros(o.shape[0], world, dtype=torch.bool)
        if o.numel():
            hit[torch.arange(o.shape[0]).unsqueeze(1).expand_as(o), o] = True
        out.append(hit)
    return out


def _expected_bytes(ctx: Ctx, cfg, owners: list, itemsize: int) -> tuple[int, dict]:
    """What this rank must have put in one forward, exactly, and the global accounting beside it.

    one-sided: (pairs to other ranks + pairs returned to other ranks) * row + (assignments on other ranks) * routing
    record (weight itemsize + 4) + 2 (W-1) signal words: the least possible plus the signal words. alltoall: one row
    per (token, expert) each way plus (W-1) * E_local count words per exchange."""
    w, r, el = ctx.world, ctx.rank, ctx.el(cfg)
    row = cfg.hidden_size * itemsize
    remote = _pairs(owners, w)
    for s, h in enumerate(remote):
        h[:, s] = False
    pairs_total = int(sum(int(h.sum()) for h in remote))
    weight_item = 8 if itemsize == 8 else 4
    record = weight_item + 4
    remote_assign = [int((o != s).sum()) for s, o in enumerate(owners)]
    wire_min = counting.wire_min_bytes(pairs_total, cfg.hidden_size, itemsize, sum(remote_assign), weight_item)
    assert wire_min == 2 * pairs_total * row + sum(remote_assign) * record
    if ctx.transport in ONE_SIDED:
        out_pairs, in_pairs = int(remote[r].sum()), sum(int(h[:, r].sum()) for s, h in enumerate(remote) if s != r)
        mine = out_pairs * row + remote_assign[r] * record + in_pairs * row + 2 * (w - 1) * SIGNAL_BYTES
        total = counting.one_sided_wire_bytes(pairs_total, sum(remote_assign), cfg.hidden_size, itemsize, weight_item,
                                              w)
        assert total == wire_min + 2 * w * (w - 1) * SIGNAL_BYTES, (total, wire_min)
    else:
        sent = int((owners[r] != r).sum())
        recv = sum(int((o == r).sum()) for s, o in enumerate(owners) if s != r)
        mine = (sent + recv) * row + 2 * (w - 1) * el * SIGNAL_BYTES
        assign = sum(int((o != s).sum()) for s, o in enumerate(owners))
        total = 2 * assign * row + 2 * w * (w - 1) * el * SIGNAL_BYTES
    return mine, {"wire_total": total, "wire_min": int(wire_min), "ratio": round(total / wire_min, 4),
                  "remote_pairs": pairs_total}


def _fused_bytes(ctx: Ctx, cfg, ids: list, itemsize: int, unfused: int) -> int:
    """What the fused kernel's rank puts (tests.helpers.fused_wire_bytes, from every rank's ids), checked to be the
    unfused protocol's `unfused` bytes plus its extra signal words alone: one per (peer, local expert) record packet
    out and one per peer back, where the unfused protocol has one per peer each way (the same rows and records)."""
    w, el = ctx.world, ctx.el(cfg)
    fused = fused_wire_bytes(ids, el, ctx.rank, cfg.hidden_size, itemsize)
    extra = ((w - 1) * (el + 1) - 2 * (w - 1)) * SIGNAL_BYTES
    assert fused == unfused + extra, f"fused bytes {fused} != unfused {unfused} + {extra} of signal words"
    return fused


@scenario
def bytes_exact_k3_h128_fp32(ctx: Ctx):
    # bytes_sent is exact: at W=4 (and 2), k=3, H=128 the one-sided transports put the least possible (one row out
    # and one back per (token, remote rank), a weight and an expert id per remote assignment) plus two signal words
    # per peer; alltoall one row per (token, expert) plus its count words. Two runs give the same bits, forward and
    # backward.
    # The triton backend too on the one-sided transports (device-initiated exchanges over shm, host-driven over mpi),
    # and the fused kernel over shm (its own signal words: _fused_bytes).
    cfg = fm.MoEConfig(hidden_size=128, ffn_hidden_size=FFN, num_experts=E, top_k=3)
    params, xs, gs = _data(ctx, cfg, torch.float32, [9, 4, 11, 6], 6)
    el = ctx.el(cfg)
    owners = [fm.moe(x, params, cfg, backend="reference").routing.topk_ids // el for x in xs]
    expect, info = _expected_bytes(ctx, cfg, owners, 4)
    rows = _pairs(owners, ctx.world)[ctx.rank].sum(0) if ctx.transport in ONE_SIDED else \
        torch.bincount(owners[ctx.rank].reshape(-1), minlength=ctx.world)
    found = {}
    for backend in ("reference", "triton") + (("fused",) if ctx.transport == "shm" else ()) \
            if ctx.transport in ONE_SIDED else ("reference",):
        want, want_total = expect, info["wire_total"]
        if backend == "fused":
            want = _fused_bytes(ctx, cfg, [o * el for o in owners], 4, expect)  # (only ids // el counts there)
            want_total += ctx.world * (want - expect)  # every rank has the same extra signal words
        layer = _layer(ctx, cfg, torch.float32, params, backend=backend, max_tokens_per_rank=16)
        runs = []
        for _ in range(2):
            layer.zero_grad()
            out, x_grad, grads_of, _, _ = _run(ctx, cfg, torch.float32, params, xs, gs, layer=layer)
            runs.append([out.detach(), x_grad] + [p.grad.clone() for p in grads_of.values()])
        names = ["out", "x.grad"] + [f"{n}.grad" for n in grads_of]
        for name, a, b in zip(names, *runs):
            assert torch.equal(a, b), f"{backend}: {name}: two runs differ"
        sent = int(layer.stats.bytes_sent)
        assert sent == want, f"{backend}: bytes_sent {sent} != exact {want} ({info})"
        total = torch.tensor([float(sent)])
        dist.all_reduce(total, group=ctx.group)
        assert int(total) == want_total, f"{backend}: total bytes {int(total)} != {want_total} ({info})"
        got_rows = layer.stats.rows_per_peer.tolist()
        assert got_rows == rows.tolist(), f"{backend}: rows_per_peer {got_rows} != {rows}"
        found[backend] = sent
    return dict(info, bytes_sent=found, rows_per_peer=rows.tolist())


@scenario
def all_k_on_one_remote_rank_fp64(ctx: Ctx):
    # every token's k=3 experts sit on the next rank: one row out, one row back per token (k per token on
    # alltoall), and the result still equals the reference, routing-weight gradients included; both backends.
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=16, top_k=3, activation="gelu", bias=True)
    params, xs, gs = _data(ctx, cfg, torch.float64, [6, 9, 4, 5], 12)
    el, w = ctx.el(cfg), ctx.world
    gen = torch.Generator().manual_seed(ctx.seed + 12)
    ids = [((s + 1) % w) * el + torch.stack([torch.randperm(el, generator=gen)[:3] for _ in range(x.shape[0])])
           for s, x in enumerate(xs)]
    weights = [torch.rand(x.shape[0], 3, dtype=torch.float64, generator=gen) + 0.1 for x in xs]
    ep = ExpertParallel(cfg, ctx.group, ctx.transport, max_tokens_per_rank=16, timeout_s=TIMEOUT_S)
    info = {}
    for backend in ("reference", "triton") + (("fused",) if ctx.transport == "shm" else ()):
        got = _check(ctx, cfg, torch.float64, params, xs, gs, routing=(ids, weights), ep=ep, backend=backend)
        expect, acc = _expected_bytes(ctx, cfg, [i // el for i in ids], 8)
        if backend == "fused":
            expect = _fused_bytes(ctx, cfg, ids, 8, expect)
        assert got["bytes_sent"] == expect, f"{backend}: bytes_sent {got['bytes_sent']} != exact {expect} ({acc})"
        t = xs[ctx.rank].shape[0]
        rows = [0] * w
        rows[(ctx.rank + 1) % w] = t if ctx.transport in ONE_SIDED else 3 * t
        assert got["rows_per_peer"] == rows, f"{backend}: rows_per_peer {got['rows_per_peer']} != {rows}"
        info[backend] = dict(acc, bytes_sent=got["bytes_sent"])
    ep.close()
    return info


@scenario
def bf16_caller_routing_k3(ctx: Ctx):
    # bf16: each expert rank rounds its partial sum to bf16 once, the token's rank adds the W partials in fp32 and
    # rounds again; that stays within the bf16 tolerance of the single-rank path (caller routing: the same experts)
    cfg = fm.MoEConfig(hidden_size=32, ffn_hidden_size=FFN, num_experts=E, top_k=3)
    params, xs, gs = _data(ctx, cfg, torch.bfloat16, [10, 7, 12, 5], 14)
    gen = torch.Generator().manual_seed(ctx.seed + 14)
    ids = [torch.stack([torch.randperm(E, generator=gen)[:3] for _ in range(x.shape[0])]) for x in xs]
    weights = [torch.rand(x.shape[0], 3, generator=gen) + 0.1 for x in xs]
    ep = ExpertParallel(cfg, ctx.group, ctx.transport, max_tokens_per_rank=16, timeout_s=TIMEOUT_S)
    info = _check(ctx, cfg, torch.bfloat16, params, xs, gs, routing=(ids, weights), ep=ep)
    ep.close()
    return info


@scenario
def exchange_experts_rounds_fp64(ctx: Ctx):
    # exchange_experts (per-(token, expert) rows: the fused backend's backward recomputes its forward with it) over
    # a heap that holds 4 rows per source: the one-sided exchange sends more in rounds, and every rank runs as many
    # rounds as the busiest pair needs; outputs, row and expert-weight gradients equal direct per-expert compute.
    from flashmoe_py import reference
    from flashmoe_py.parallel.forward import exchange_experts
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=3)
    el, w, r = ctx.el(cfg), ctx.world, ctx.rank
    torch.manual_seed(ctx.seed * 1000 + 13)
    params = random_params(cfg, torch.float64)
    counts = [torch.randint(0, 3 if s else 6, (w, el)) for s in range(w)]  # rank 0 sends the most
    rows = [torch.randn(int(c.sum()), H, dtype=torch.float64) for c in counts]
    gs = [torch.randn_like(x) for x in rows]
    leaves = {n: params[n].clone().requires_grad_() for n in ("w_up", "w_down")}
    experts = reference.per_expert(fm.MoEParams(router_weight=None, **leaves))
    ref_rows = [x.clone().requires_grad_() for x in rows]
    loss = 0
    for s in range(w):
        blocks, at = [], 0
        for d in range(w):
            for e in range(el):
                n = int(counts[s][d, e])
                blocks.append(reference.expert_block(ref_rows[s][at:at + n], experts[d * el + e], cfg.activation_key))
                at += n
        y_s = torch.cat(blocks)
        loss = loss + (y_s * gs[s]).sum()
        if s == r:
            want = y_s.detach()
    loss.backward()
    ep = ExpertParallel(cfg, ctx.group, ctx.transport, max_tokens_per_rank=4, timeout_s=TIMEOUT_S)
    exchange = ep.exchange_for(torch.float64, torch.device("cpu"))
    loc = ctx.local(cfg)
    mine = {n: params[n][loc].clone().requires_grad_() for n in ("w_up", "w_down")}
    x = rows[r].clone().requires_grad_()
    y, nbytes = exchange_experts(x, counts[r], exchange, reference.expert_ffn, cfg.activation_key, mine["w_up"],
                                 mine["w_down"])
    (y * gs[r]).sum().backward()
    assert_close(y, want, torch.float64, f"rank {r} expert outputs")
    assert_close(x.grad, ref_rows[r].grad, torch.float64, f"rank {r} row gradients")
    for n in mine:
        assert_close(mine[n].grad, leaves[n].grad[loc], torch.float64, f"rank {r} {n}.grad")
    rounds = max(1, max(-(-int(c.sum(1).max()) // 4) for c in counts))
    if ctx.transport in ONE_SIDED:
        out_rows = int(counts[r].sum()) - int(counts[r][r].sum())
        in_rows = sum(int(c[r].sum()) for s, c in enumerate(counts) if s != r)
        expect = out_rows * (H * 8 + 12) + in_rows * H * 8 + rounds * 2 * (w - 1) * SIGNAL_BYTES
        assert nbytes == expect, f"bytes {nbytes} != {expect} ({rounds} rounds)"
    ep.close()
    return {"rounds": rounds, "bytes": nbytes}


@scenario
def repeat_100(ctx: Ctx):
    # 100 forwards on one heap, token counts changing (zero included): sequence numbers, no reset
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2)
    params, _, _ = _data(ctx, cfg, torch.float64, [1], 7)
    layer = _layer(ctx, cfg, torch.float64, params, max_tokens_per_rank=8)
    heaps = None
    for it in range(100):
        gen = torch.Generator().manual_seed(ctx.seed + it)
        sizes = [int(v) for v in torch.randint(0, 9, (ctx.world,), generator=gen)]
        xs = [torch.randn(t, H, dtype=torch.float64, generator=gen) for t in sizes]
        out = layer(xs[ctx.rank])
        with torch.no_grad():
            ref = fm.moe(torch.cat(xs), params, cfg, backend="reference").out.split(sizes)[ctx.rank]
        assert_close(out.detach(), ref, torch.float64, f"rank {ctx.rank} forward {it}")
        current = [(id(h), h.peer_address(ctx.rank)) for h in layer.expert_parallel.heaps]
        assert heaps is None or current == heaps, f"forward {it}: the heap was re-allocated"
        heaps = current
    if ctx.transport in ONE_SIDED:
        ex = next(iter(layer.expert_parallel._exchanges.values()))
        lay = ex.layout
        assert ex.heap.read_word(lay.seq_offset(0)) == 100 and ex.heap.read_word(lay.seq_offset(1)) == 100, \
            "sequence words should count 100 dispatch and 100 return exchanges"
    return {"forwards": 100}


@scenario
def host_and_device_exchanges_share_a_heap(ctx: Ctx):
    # One ExpertParallel, forwards alternating the reference backend (host-driven exchanges) and triton (over shm:
    # device-initiated) on its one heap, token counts changing (zero included): both advance the same sequence
    # numbers, nothing is reset, every forward equals the reference.
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2)
    params, _, _ = _data(ctx, cfg, torch.float64, [1], 8)
    local = {n: (t[ctx.local(cfg)] if n in ("w_up", "w_down", "b_up", "b_down") else t) for n, t in params.items()}
    ep = ExpertParallel(cfg, ctx.group, ctx.transport, max_tokens_per_rank=8, timeout_s=TIMEOUT_S)
    n = 12
    for it in range(n):
        gen = torch.Generator().manual_seed(ctx.seed + 100 + it)
        sizes = [int(v) for v in torch.randint(0, 9, (ctx.world,), generator=gen)]
        xs = [torch.randn(t, H, dtype=torch.float64, generator=gen) for t in sizes]
        backend = ("reference", "triton")[it % 2]
        out = fm.moe(xs[ctx.rank], local, cfg, expert_parallel=ep, backend=backend).out
        ref = fm.moe(torch.cat(xs), params, cfg, backend="reference").out.split(sizes)[ctx.rank]
        assert_close(out, ref, torch.float64, f"rank {ctx.rank} forward {it} ({backend})")
    if ctx.transport in ONE_SIDED:
        ex = next(iter(ep._exchanges.values()))
        seqs = [ex.heap.read_word(ex.layout.seq_offset(r)) for r in (0, 1)]
        assert seqs == [n, n], f"sequence words {seqs}, expected {n} dispatch and {n} return exchanges"
    ep.close()
    return {"forwards": n}


@scenario
def too_many_tokens(ctx: Ctx):
    # rank 0 passes more tokens than the heap holds: HeapOverflow before anything is sent
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2)
    layer = fm.FusedMoE(cfg, process_group=ctx.group, transport=ctx.transport, max_tokens_per_rank=4,
                        dtype=torch.float64, timeout_s=TIMEOUT_S)
    if ctx.rank == 0:
        try:
            layer(torch.randn(5, H, dtype=torch.float64))
        except HeapOverflow as err:
            assert "max_tokens_per_rank=4" in str(err) and "5 tokens" in str(err), str(err)
        else:
            raise AssertionError("5 tokens with max_tokens_per_rank=4 did not raise HeapOverflow")
    return {}


@scenario
def peer_skips_forward(ctx: Ctx):
    # The last rank never sends: every other rank raises ExchangeTimeout within the timeout; the one-sided
    # transports name the missing peer and slot, the device-initiated exchanges (triton over shm) too. Each layer
    # gets a group of its own, so the collective the alltoall ranks leave pending cannot pair with a later
    # collective of the world group.
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2)
    timeout = 1.5
    dead = ctx.world - 1
    info = {}
    for backend in ("reference", "triton") if ctx.transport == "shm" else ("reference",):
        group = dist.new_group(list(range(ctx.world)), timeout=timedelta(seconds=30))
        layer = fm.FusedMoE(cfg, process_group=group, transport=ctx.transport, dtype=torch.float64,
                            max_tokens_per_rank=8, timeout_s=timeout, backend=backend)
        layer(torch.randn(3, H, dtype=torch.float64))  # allocate the heap (collective) with everyone present
        if ctx.rank == dead:
            continue
        start = time.monotonic()
        try:
            layer(torch.randn(3, H, dtype=torch.float64))
        except ExchangeTimeout as err:
            elapsed = time.monotonic() - start
            msg = str(err)
            assert f"rank {ctx.rank}" in msg, msg
            if ctx.transport in ONE_SIDED:
                assert f"peer {dead}" in msg and "dispatch slot" in msg, msg
            # the interpreted device wait counts polls (parallel.heap.INTERPRETER_SPIN_S each), which take longer
            # on a loaded machine: a looser bound there, still far from a hang
            bound = timeout + 5.0 if backend == "reference" else 4 * timeout + 5.0
            assert elapsed < bound, f"{backend}: timed out after {elapsed:.1f} s, configured {timeout} s"
            info[backend] = {"elapsed_s": round(elapsed, 2)}
            continue
        raise AssertionError(f"{backend}: no ExchangeTimeout although the last rank skipped its forward")
    return info


@scenario
def construction_errors(ctx: Ctx):
    # bad expert-parallel arguments fail at construction with the argument named (DESIGN §9)
    from flashmoe_py.parallel import TransportUnavailable
    bad = [
        (dict(num_experts=7), {}, ValueError, "divisible by the expert-parallel world size"),
        (dict(num_experts=8), dict(transport="nvshmem"), TransportUnavailable, "needs CUDA"),
        (dict(num_experts=8), dict(transport="carrier-pigeon"), TransportUnavailable, "unknown transport"),
        (dict(num_experts=8), dict(max_tokens_per_rank=0), ValueError, "max_tokens_per_rank"),
        (dict(num_experts=8), dict(timeout_s=-1.0), ValueError, "timeout_s"),
    ]
    for cfg_kw, kw, err, text in bad:
        cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, top_k=2, **cfg_kw)
        try:
            fm.FusedMoE(cfg, process_group=ctx.group, **{"transport": ctx.transport, **kw})
        except err as e:
            assert text in str(e), f"{kw or cfg_kw}: message {e!r} does not say {text!r}"
        else:
            raise AssertionError(f"{kw or cfg_kw}: no {err.__name__}")
    layer = fm.FusedMoE(fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=8, top_k=2),
                        process_group=ctx.group, transport=ctx.transport)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    el = 8 // ctx.world
    assert shapes == {"router_weight": (8, H), "w_up": (el, H, 2 * FFN), "w_down": (el, FFN, H)}, shapes
    gathered = [torch.empty_like(layer.router_weight) for _ in range(ctx.world)]
    dist.all_gather(gathered, layer.router_weight.detach(), group=ctx.group)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "the router is not replicated across ranks"
    return {}


@scenario
def triton_interpreter_puts_into_peer_heap(ctx: Ctx):
    # DESIGN §6 on this heap: device code (a Triton kernel under TRITON_INTERPRET=1) puts a packet into the
    # next rank's segment through an int64 address cast to a pointer and release-signals it; the receiver's
    # acquire wait sees the rows. This is how the fused kernel will use the layout.
    if ctx.transport != "shm":
        return {"skipped": "peer addresses exist in this process only for the shm heap"}
    os.environ["TRITON_INTERPRET"] = "1"  # chosen when the kernel is defined below
    import triton
    import triton.language as tl

    from flashmoe_py.parallel.layout import DISPATCH, HeapLayout
    from flashmoe_py.parallel.shm import ShmHeap

    @triton.jit
    def put_packet(src_ptr, dst_address, signal_address, word, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        dst = dst_address.to(tl.pointer_type(tl.float64))
        tl.store(dst + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)
        tl.atomic_xchg(signal_address.to(tl.pointer_type(tl.int64)), word, sem="release", scope="sys")

    rows, el = 5, 2
    lay = HeapLayout(world_size=ctx.world, num_local_experts=el, slab_rows=8, row_bytes=H * 8)
    heap = ShmHeap(lay, ctx.group)
    nxt, prev = (ctx.rank + 1) % ctx.world, (ctx.rank - 1) % ctx.world
    packet = torch.randn(rows, H, dtype=torch.float64, generator=torch.Generator().manual_seed(ctx.seed + ctx.rank))
    for e in range(el):  # one packet per expert slot; slot 1 is empty (count 0)
        n = rows if e == 0 else 0
        put_packet[(1,)](packet, heap.peer_address(nxt) + lay.data_offset(DISPATCH, ctx.rank),
                         heap.peer_address(nxt) + lay.signal_offset(DISPATCH, ctx.rank, e), (1 << 32) | n, n * H,
                         BLOCK=triton.next_power_of_2(rows * H))
    missing, seen = heap.wait(lay.signal_offset(DISPATCH, prev), el, 1, TIMEOUT_S)
    assert missing == -1, f"no signal from rank {prev}"
    assert (seen & 0xFFFFFFFF).tolist() == [rows, 0], seen
    got = heap.local(lay.data_offset(DISPATCH, prev), rows * H * 8).view(torch.float64).view(rows, H)
    want = torch.randn(rows, H, dtype=torch.float64, generator=torch.Generator().manual_seed(ctx.seed + prev))
    assert torch.equal(got, want), "the rows the peer's kernel put are not in this rank's slab"
    dist.barrier()
    heap.close()
    return {}


def run_scenario(results: dict, key: str, call) -> None:
    """results[key] = {"ok", "info" (what call() returned) or "error" (its traceback), "seconds"}; then every rank
    waits for the others, so the next scenario starts together (shared by the shm, fused and mpirun workers)."""
    start = time.monotonic()
    try:
        results[key] = {"ok": True, "info": call()}
    except Exception:
        results[key] = {"ok": False, "error": traceback.format_exc()}
    results[key]["seconds"] = round(time.monotonic() - start, 3)
    dist.barrier()


def write_and_leave(results: dict, out: str, rank: int) -> None:
    """This rank's results to <out>/rank<r>.json, then leave the process group together."""
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()  # leave together: tearing gloo down while a peer still works was seen to abort at exit
    dist.destroy_process_group()


def _rank_main(rank: int, args) -> None:
    world = args.world
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    names = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    results = {}
    for transport in args.transport.split(","):  # one launch serves several transports: starting ranks is slow
        ctx = Ctx(rank, world, transport, args.seed)
        for name in names:
            run_scenario(results, f"{transport}/{name}", lambda: SCENARIOS[name](ctx))
    write_and_leave(results, args.out, rank)


def main() -> None:
    if not torch.cuda.is_available():  # Triton's interpreter, chosen before anything imports triton (conftest.py)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    ap = argparse.ArgumentParser()
    ap.add_argument("--launcher", choices=("spawn", "mpirun"), required=True)
    ap.add_argument("--world", type=int, default=0)
    ap.add_argument("--transport", required=True, help="comma-separated transports, run one after the other")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--store", required=True, help="file for the gloo rendezvous (FileStore)")
    ap.add_argument("--scenarios", default="", help="comma-separated subset (default: all)")
    args = ap.parse_args()
    if args.launcher == "spawn":
        torch.multiprocessing.spawn(_rank_main, args=(args,), nprocs=args.world, join=True)
    else:
        from flashmoe_py import env
        launch = env.launch_env()
        args.world = launch.world_size
        _rank_main(launch.rank, args)


if __name__ == "__main__":
    main()
