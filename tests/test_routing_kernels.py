"""The Triton backend's block-parallel routing (kernels/routing.py) and what one call costs in torch kernels.

The sort is a counting sort over blocks of tokens whose block table is scanned by whichever program finishes last
(a ticket counter). Run one after another, as the interpreter runs programs, the last is always the highest id;
under `concurrent_programs` any program can be, as on a GPU. The inference forward computes its router logits in
the route kernel; training keeps PyTorch's (the router's autograd graph).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import flashmoe_py as fm  # noqa: E402
from flashmoe_py import interpreter_threads  # noqa: E402
from flashmoe_py.bench import opcount  # noqa: E402
from tests.helpers import random_inputs  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poison")]

CONFIGS = {
    # gpt-oss style router bias, capacity that drops: route[logits], scatter, capacity, scatter.
    "router_bias_capacity": dict(hidden_size=24, ffn_hidden_size=8, num_experts=6, top_k=2, router_bias=True,
                                 capacity_factor=0.75),
    # groups and a selection bias, k=3, dropless.
    "groups_bias": dict(hidden_size=16, ffn_hidden_size=8, num_experts=8, top_k=3, score_func="sigmoid",
                        expert_bias=True, num_expert_groups=4, topk_groups=2),
}
TOKENS = 83  # 6 route blocks of 16 on the interpreter (the last partial): the last-program scan takes 3 steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CONFIGS)
def test_inference_forward_routes_in_the_kernel_like_the_reference(name, dtype, seed):
    cfg = fm.MoEConfig(**CONFIGS[name])
    params, x, _ = random_inputs(cfg, dtype, TOKENS)
    with torch.no_grad():
        got = fm.moe(x, params, cfg, backend="triton")
        ref = fm.moe(x, params, cfg, backend="reference")
    assert torch.equal(got.routing.topk_ids, ref.routing.topk_ids), "chosen experts differ"
    assert torch.equal(got.routing.kept, ref.routing.kept), "capacity kept different assignments"
    assert torch.equal(got.stats.tokens_per_expert, ref.stats.tokens_per_expert)
    assert int(got.stats.dropped) == int(ref.stats.dropped)
    assert (int(got.stats.dropped) > 0) == (cfg.capacity_factor is not None)
    assert_close(got.routing.logits, ref.routing.logits, torch.float32, "logits from the route kernel")
    assert_close(got.out, ref.out, dtype, "out")
    assert_close(got.lb_loss, ref.lb_loss, torch.float32, "lb_loss (computed when read)")
    assert_close(got.z_loss, ref.z_loss, torch.float32, "z_loss (computed when read)")


@pytest.mark.parametrize("name", CONFIGS)
def test_routing_is_the_same_whichever_program_finishes_last(name, seed):
    cfg = fm.MoEConfig(**CONFIGS[name])
    params, x, _ = random_inputs(cfg, torch.float64, TOKENS)
    with torch.no_grad():
        sequential = fm.moe(x, params, cfg, backend="triton")
        with interpreter_threads.concurrent_programs():
            concurrent = fm.moe(x, params, cfg, backend="triton")
    for field in ("topk_ids", "kept"):
        assert torch.equal(getattr(concurrent.routing, field), getattr(sequential.routing, field)), field
    assert torch.equal(concurrent.stats.tokens_per_expert, sequential.stats.tokens_per_expert)
    assert torch.equal(concurrent.out, sequential.out), "the sorted order differed (the combine is fixed-order)"


def test_inference_forward_runs_one_torch_kernel_and_losses_only_when_read(monkeypatch, seed):
    # Everything but the ticket's zeroing is a Triton launch: no fp32 copy of x for the router, no losses, no
    # clones or casts of the counts. Reading a loss computes it then.
    monkeypatch.delenv("FLASHMOE_DEBUG_POISON", raising=False)  # poisoning is a fill per buffer
    cfg = fm.MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2)
    params, x, _ = random_inputs(cfg, torch.bfloat16, 40)
    with torch.no_grad(), opcount.counting() as count:
        got = fm.moe(x, params, cfg, backend="triton")
        forward = dict(count.ops)
        lb = got.lb_loss
    assert forward == {"zeros": 1}, forward
    assert sum(count.launches.values()) == 5, count.launches  # route[logits], scatter, up, down, combine
    assert sum(count.ops.values()) > 3, "reading lb_loss computed nothing"
    assert lb.shape == () and torch.isfinite(lb)
    with torch.no_grad():
        assert_close(lb, fm.moe(x, params, cfg, backend="reference").lb_loss, torch.float32, "lb_loss")


def test_zero_loss_coefficients_keep_the_router_in_the_graph(seed):
    # k=1 with renormalisation: the weights are exactly 1, so only aux_loss (0 * ...) reaches the router; it must
    # get a gradient of zeros, as from the reference (DDP expects every parameter to), not None.
    cfg = fm.MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=1)
    params, x, _ = random_inputs(cfg, torch.float32, 40)
    router = params["router_weight"].requires_grad_()
    got = fm.moe(x, params, cfg, backend="triton")
    (got.out.sum() + got.aux_loss).backward()
    assert router.grad is not None and torch.equal(router.grad, torch.zeros_like(router))


def test_opcount_training_step_counts_the_backward_too(seed):
    # The benchmark's op counter on the training step: the backward's five Triton launches are counted, and a
    # non-zero loss coefficient costs the losses' kernels.
    plain = opcount.count_call("triton", torch.float32, True)
    losses = opcount.count_call("triton", torch.float32, True, aux_loss_coef=0.01, z_loss_coef=0.001)
    assert sum(plain.launches.values()) == 10, plain.launches
    assert {"dx", "dh[swiglu]", "dw[up]", "dw[down]"} <= set(plain.launches)
    assert sum(losses.ops.values()) > sum(plain.ops.values()) + 10
