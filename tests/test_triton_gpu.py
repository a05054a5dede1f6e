"""The `triton` backend on a real GPU (`make gpu-check`); skipped without CUDA (tests/conftest.py says why).

Accuracy is judged by the rule from flash-attention: against an fp32-or-better reference, the kernels'
error at bf16/fp16 may be at most twice the error PyTorch itself makes at that dtype (the reference
backend run in that dtype). Then the properties that only a GPU can show: no host synchronisation in
forward + backward, CUDA-graph capture and replay, torch.compile.
"""

import pytest
import torch

import flashmoe_py as fm
from tests.helpers import random_params
from tests.tolerances import rel_err

pytestmark = pytest.mark.gpu

# Mid-sized, aligned for the reference's grouped_mm path, several tiles per expert in both directions.
SHAPE = dict(hidden_size=512, ffn_hidden_size=384, num_experts=16, top_k=4)
TOKENS = 1024


def _layer(dtype, **extra):
    torch.manual_seed(0)
    cfg = fm.MoEConfig(**SHAPE, **extra)
    layer = fm.FusedMoE(cfg, backend="triton", device="cuda", dtype=dtype)
    return cfg, layer


def _run(backend, cfg, params, x, upstream, ids, weights):
    p = {n: t.detach().clone().requires_grad_(n != "expert_bias") for n, t in params.items()}
    xg = x.detach().clone().requires_grad_()
    out = fm.moe(xg, p, cfg, backend=backend, topk_ids=ids, topk_weights=weights).out
    (out.double() * upstream).sum().backward()
    return [out, xg.grad] + [p[n].grad for n in sorted(p) if p[n].grad is not None]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("extra", [dict(), dict(activation="gelu", bias=True, deterministic=False)])
def test_half_precision_error_within_twice_pytorchs(dtype, extra, seed):
    cfg = fm.MoEConfig(**SHAPE, **extra)
    exact = {n: t.cuda() for n, t in random_params(cfg, torch.float64).items()}
    x64 = torch.randn(TOKENS, cfg.hidden_size, dtype=torch.float64, device="cuda")
    upstream = torch.randn_like(x64)
    # The same (fp64) routing for every run, so the comparison measures the expert math.
    r = fm.moe(x64, exact, cfg, backend="reference")
    ids, weights = r.routing.topk_ids, r.routing.topk_weights.float()
    params = {n: t.to(dtype) for n, t in exact.items()}
    x = x64.to(dtype)
    truth = _run("reference", cfg, {n: t.double() for n, t in params.items()}, x.double(), upstream, ids, weights)
    ours = _run("triton", cfg, params, x, upstream, ids, weights)
    torch_err = _run("reference", cfg, params, x, upstream, ids, weights)
    names = ["out", "grad x"] + [f"grad {n}" for n in sorted(params) if n not in ("router_weight", "expert_bias")]
    for name, a, b, t in zip(names, ours, torch_err, truth):
        e_ours, e_torch = rel_err(a, t), rel_err(b, t)
        assert e_ours <= 2 * e_torch + 1e-6, f"{name}: triton error {e_ours:.2e} > 2 x PyTorch's {e_torch:.2e}"


def test_no_host_sync_in_forward_and_backward(seed):
    cfg, layer = _layer(torch.bfloat16, capacity_factor=1.25, num_shared_experts=1, aux_loss_coef=0.01,
                        z_loss_coef=0.001)
    x = torch.randn(TOKENS, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    (layer(x).float().square().mean() + layer.aux_loss).backward()  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
        (y.float().square().mean() + layer.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert layer.last_output.backend == "triton"


def test_cuda_graph_capture_and_replay(seed):
    cfg, layer = _layer(torch.bfloat16, bias=True)
    static_x = torch.randn(TOKENS, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    static_g = torch.randn_like(static_x)
    params = [p for p in layer.parameters()]

    def step():
        y = layer(static_x)
        return (y, *torch.autograd.grad(y, [static_x, *params], static_g))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: compile kernels, settle the caching allocator
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        with torch.no_grad():
            static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for c, e in zip(captured, eager):
            assert torch.equal(c, e), "graph replay differs from an eager run on the same input"


def test_torch_compile_layer(seed):
    cfg, layer = _layer(torch.bfloat16, num_shared_experts=1)
    x = torch.randn(4, TOKENS // 4, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    eager = layer(x)
    compiled = torch.compile(layer)
    y = compiled(x)
    assert y.shape == x.shape
    assert rel_err(y, eager) < 1e-2  # the shared expert's matmuls may be fused differently by inductor
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.w_up.grad is not None


def test_auto_picks_triton_on_cuda():
    assert "triton" in fm.available_backends("cuda")
    layer = fm.FusedMoE(**SHAPE, device="cuda", dtype=torch.bfloat16)
    layer(torch.randn(8, SHAPE["hidden_size"], device="cuda", dtype=torch.bfloat16))
    assert layer.last_output.backend == "triton"
