"""torch.compile(FusedMoE): same outputs, auxiliary loss and gradients as eager.

On CPU the reference backend compiles with graph breaks (fullgraph=False, the default): its expert loop reads
the per-expert counts on the host (DESIGN §4, docs/DECISIONS.md), and dynamo splits the graph there and at
the data-dependent-shape ops around it. The GPU test compiles the Triton backend, which has no host sync.

The compile gate's own PTX checks are tested in tests/test_ptx_checks.py.
"""

from __future__ import annotations

import pytest
import torch

import flashmoe_py as fm
from tests.tolerances import assert_close

CFG = dict(hidden_size=32, ffn_hidden_size=16, num_experts=6, top_k=2, num_shared_experts=1, shared_expert_gate=True,
           aux_loss_coef=0.01, z_loss_coef=0.001)


def _compare_compiled_with_eager(layer: fm.FusedMoE, x: torch.Tensor, dtype) -> None:
    compiled = torch.compile(layer)
    x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = layer(x_eager)
    aux_eager = layer.aux_loss
    cotangent = torch.randn_like(y_eager)
    (y_eager * cotangent).sum().add(aux_eager).backward()
    grads_eager = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)

    y_comp = compiled(x_comp)
    aux_comp = layer.aux_loss
    (y_comp * cotangent).sum().add(aux_comp).backward()
    assert_close(y_comp, y_eager, dtype, "compiled output")
    assert_close(aux_comp, aux_eager, dtype, "compiled aux_loss")
    assert_close(x_comp.grad, x_eager.grad, dtype, "compiled d x")
    for name, g in grads_eager.items():
        assert_close(layer.get_parameter(name).grad, g, dtype, f"compiled d {name}")


@pytest.mark.slow  # inductor compiles each of the ~12 graph pieces: about a minute on 2 cores with a cold cache
def test_compiled_reference_layer_matches_eager_on_cpu(seed):
    layer = fm.FusedMoE(**CFG, backend="reference")
    _compare_compiled_with_eager(layer, torch.randn(4, 8, CFG["hidden_size"]), torch.float32)


@pytest.mark.gpu
def test_compiled_triton_layer_matches_eager_on_gpu(seed):
    layer = fm.FusedMoE(**CFG, backend="triton", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 64, CFG["hidden_size"], device="cuda", dtype=torch.bfloat16)
    _compare_compiled_with_eager(layer, x, torch.bfloat16)
