"""The `fused` backend on a real GPU (`make gpu-check`); skipped without CUDA (tests/conftest.py says why).

What only a GPU shows: the forward is one kernel launch (counted by the profiler, not only by our own
stats), the persistent kernel's counters and sequence numbers survive CUDA-graph replay, no host sync in
forward and backward, the NVSHMEM symmetric heap as the kernel's heap (world size 1). Accuracy follows the
rule of tests/test_triton_gpu.py: against an fp64 truth, at most twice the error PyTorch itself makes at bf16.
"""

import os
import tempfile

import pytest
import torch

import flashmoe_py as fm
from tests.helpers import random_params
from tests.tolerances import rel_err

pytestmark = pytest.mark.gpu

SHAPE = dict(hidden_size=512, ffn_hidden_size=384, num_experts=16, top_k=4)
TOKENS = 1024


def _layer(dtype=torch.bfloat16, **extra):
    torch.manual_seed(0)
    cfg = fm.MoEConfig(**SHAPE, **extra)
    return cfg, fm.FusedMoE(cfg, backend="fused", device="cuda", dtype=dtype)


def _run(backend, cfg, params, x, upstream, ids, weights, **kw):
    p = {n: t.detach().clone().requires_grad_(n != "expert_bias") for n, t in params.items()}
    xg = x.detach().clone().requires_grad_()
    out = fm.moe(xg, p, cfg, backend=backend, topk_ids=ids, topk_weights=weights, **kw).out
    (out.double() * upstream).sum().backward()
    return [out, xg.grad] + [p[n].grad for n in sorted(p) if p[n].grad is not None]


@pytest.mark.parametrize("extra", [dict(), dict(activation="gelu", bias=True, deterministic=False)])
def test_bf16_error_within_twice_pytorchs(extra, seed):
    # Forward + backward (W = 1: the backward runs the Triton backend's kernels on what the fused kernel saved).
    cfg = fm.MoEConfig(**SHAPE, **extra)
    exact = {n: t.cuda() for n, t in random_params(cfg, torch.float64).items()}
    x64 = torch.randn(TOKENS, cfg.hidden_size, dtype=torch.float64, device="cuda")
    upstream = torch.randn_like(x64)
    r = fm.moe(x64, exact, cfg, backend="reference")
    ids, weights = r.routing.topk_ids, r.routing.topk_weights.float()
    params = {n: t.to(torch.bfloat16) for n, t in exact.items()}
    x = x64.to(torch.bfloat16)
    truth = _run("reference", cfg, {n: t.double() for n, t in params.items()}, x.double(), upstream, ids, weights)
    ours = _run("fused", cfg, params, x, upstream, ids, weights)
    torch_err = _run("reference", cfg, params, x, upstream, ids, weights)
    names = ["out", "grad x"] + [f"grad {n}" for n in sorted(params) if n not in ("router_weight", "expert_bias")]
    for name, a, b, t in zip(names, ours, torch_err, truth):
        e_ours, e_torch = rel_err(a, t), rel_err(b, t)
        assert e_ours <= 2 * e_torch + 1e-6, f"{name}: fused error {e_ours:.2e} > 2 x PyTorch's {e_torch:.2e}"


def test_one_kernel_launch_per_forward(seed):
    # Inference without a shared expert: routing (router GEMM included), dispatch, both GEMMs and the combine
    # are the only CUDA work of the forward: the profiler sees exactly one kernel, no memset, no copy.
    cfg, layer = _layer(torch.float32)
    x = torch.randn(TOKENS, cfg.hidden_size, device="cuda")
    with torch.no_grad():
        layer(x)  # compile and allocate the persistent state first
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            y = layer(x)
            torch.cuda.synchronize()
    gpu_work = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(gpu_work) == 1 and "fused_moe_kernel" in gpu_work[0], gpu_work
    assert layer.stats.kernel_launches == 1 and layer.stats.host_syncs == 0
    ref = fm.moe(x, layer, cfg, backend="reference")
    # fp32 router logits summed in another order may flip a near-tie: compare the tokens with a clear margin
    sel = torch.sort(ref.routing.scores, dim=-1, descending=True).values
    clear = (sel[:, cfg.top_k - 1] - sel[:, cfg.top_k]) > 1e-4
    assert clear.float().mean() > 0.9, "too few tokens without a near-tie to compare"
    assert torch.equal(layer.last_output.routing.topk_ids[clear], ref.routing.topk_ids[clear])
    assert rel_err(y[clear], ref.out[clear]) < 1e-3  # fp32 operands on tf32 or ieee dots
    assert rel_err(layer.aux_loss, ref.aux_loss) < 1e-4


def test_no_host_sync_in_forward_and_backward(seed):
    cfg, layer = _layer(num_shared_experts=1, aux_loss_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(TOKENS, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    (layer(x).float().square().mean() + layer.aux_loss).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
        (y.float().square().mean() + layer.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert layer.last_output.backend == "fused"


def test_caller_routing_check_is_one_counted_sync(seed):
    # Caller ids are range-checked on the host: one synchronisation, and the stats say so.
    cfg, layer = _layer()
    x = torch.randn(TOKENS, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(cfg.num_experts, device="cuda")[:cfg.top_k] for _ in range(TOKENS)])
    w = torch.rand(TOKENS, cfg.top_k, device="cuda")
    with torch.no_grad():
        layer(x, topk_ids=ids, topk_weights=w)
        assert layer.stats.host_syncs == 1
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with pytest.raises(RuntimeError, match="synchroniz"):
                layer(x, topk_ids=ids, topk_weights=w)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_replay(seed):
    # The kernel keeps its epoch, counters and sequence numbers on the device: a captured forward replays
    # with new inputs, bit for bit what an eager forward gives (the sums run in a fixed order).
    cfg, layer = _layer(bias=True)
    static_x = torch.randn(TOKENS, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            layer(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        captured = layer(static_x)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        with torch.no_grad():
            eager = layer(static_x)
        torch.cuda.synchronize()
        assert torch.equal(captured, eager), "graph replay differs from an eager forward on the same input"


def test_graph_replays_after_state_growth_and_release(seed):
    # The graph holds the pointers of the state it captured. An eager forward with more tokens on the same stream
    # replaces that state, and release_states() drops the rest; the captured one must stay alive, so replays
    # still equal eager forwards.
    from flashmoe_py import fused_backend

    cfg, layer = _layer()
    static_x = torch.randn(TOKENS // 4, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.stream(side):
        layer(static_x)
        with torch.cuda.graph(graph, stream=side):
            captured = layer(static_x)
        layer(torch.randn(2 * TOKENS, cfg.hidden_size, device="cuda", dtype=torch.bfloat16))  # grows the state
    torch.cuda.current_stream().wait_stream(side)
    fused_backend.release_states()
    for _ in range(2):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        with torch.no_grad():
            eager = layer(static_x)
        torch.cuda.synchronize()
        assert torch.equal(captured, eager), "replay after the captured state was replaced differs"


def test_two_streams_of_one_shape_at_once(seed):
    # Forwards of one shape on two streams at the same time: each stream has its own state (counters), so the
    # two persistent kernels cannot corrupt each other.
    cfg, layer = _layer()
    xs = [torch.randn(TOKENS, cfg.hidden_size, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    with torch.no_grad():
        want = [layer(x) for x in xs]
    streams = [torch.cuda.Stream() for _ in range(2)]
    outs = [None, None]
    for _ in range(3):
        for i, (st, x) in enumerate(zip(streams, xs)):
            st.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(st):
                outs[i] = layer(x)
        torch.cuda.synchronize()
        for got, ref in zip(outs, want):
            assert torch.equal(got, ref), "a forward on a second stream changed the result"


def test_world_size_one_on_the_nvshmem_heap(seed):
    # A one-rank process group with transport="nvshmem": the kernel's heap is an NVSHMEM symmetric tensor.
    import torch.distributed as dist

    from flashmoe_py.parallel import transports

    reason = transports.unavailable_reason("nvshmem", torch.device("cuda"))
    if reason is not None:
        pytest.skip(f"transport='nvshmem' cannot run here: {reason}")
    store = tempfile.mktemp(prefix="flashmoe-store-")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        cfg = fm.MoEConfig(**SHAPE)
        params = {n: t.cuda().to(torch.bfloat16) for n, t in random_params(cfg, torch.float64).items()}
        layer = fm.FusedMoE(cfg, backend="fused", process_group=dist.group.WORLD, transport="nvshmem",
                            device="cuda", dtype=torch.bfloat16, max_tokens_per_rank=TOKENS)
        with torch.no_grad():
            for n, t in params.items():
                getattr(layer, n).copy_(t)
        x = torch.randn(TOKENS, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        r = fm.moe(x.double(), {n: t.double() for n, t in params.items()}, cfg, backend="reference")
        kw = dict(topk_ids=r.routing.topk_ids, topk_weights=r.routing.topk_weights.float())
        for _ in range(2):
            y = layer(x, **kw)
            assert layer.stats.kernel_launches == 1
            torch_err = rel_err(fm.moe(x, params, cfg, backend="reference", **kw).out, r.out)
            assert rel_err(y, r.out) <= 2 * torch_err + 1e-6
        layer.expert_parallel.close()
    finally:
        dist.destroy_process_group()
        if os.path.exists(store):
            os.unlink(store)


def test_auto_keeps_triton_on_one_gpu():
    cfg, layer = _layer()
    assert fm.backends.resolve("auto", "cuda", cfg) == "triton"
