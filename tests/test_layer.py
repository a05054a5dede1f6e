"""FusedMoE and the functional API: parameters, shapes, losses, stats, backend selection, bad input (DESIGN §9)."""

from __future__ import annotations

import pytest
import torch

import flashmoe_py as fm
from tests.helpers import random_params
from tests.per_token import per_token_moe
from tests.tolerances import assert_close

CFG = dict(hidden_size=16, ffn_hidden_size=8, num_experts=6, top_k=2)


def _full_config(**extra):
    return fm.MoEConfig(**CFG, bias=True, num_shared_experts=1, shared_expert_gate=True, expert_bias=True,
                        aux_loss_coef=0.01, z_loss_coef=0.001, **extra)


def test_parameter_names_and_shapes():
    layer = fm.FusedMoE(_full_config(), dtype=torch.float64)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {
        "router_weight": (6, 16), "w_up": (6, 16, 16), "w_down": (6, 8, 16), "b_up": (6, 16), "b_down": (6, 16),
        "shared_w_up": (16, 16), "shared_w_down": (8, 16), "shared_gate_weight": (1, 16),
    }
    assert dict(layer.named_buffers())["expert_bias"].dtype == torch.float32
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert all(p.abs().sum() > 0 for p in layer.parameters()), "reset_parameters left a tensor at zero"


def test_kwargs_constructor_equals_config_constructor():
    a = fm.FusedMoE(**CFG)
    b = fm.FusedMoE(fm.MoEConfig(**CFG))
    assert a.config == b.config
    with pytest.raises(TypeError, match="not both"):
        fm.FusedMoE(fm.MoEConfig(**CFG), top_k=1)


def test_layer_forward_matches_per_token_and_records_loss_and_stats(seed):
    layer = fm.FusedMoE(_full_config(), dtype=torch.float64)
    with torch.no_grad():
        layer.expert_bias.copy_(torch.randn(6) * 0.1)
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    p = {n: t.detach() for n, t in layer.named_parameters()} | {"expert_bias": layer.expert_bias}
    ref = per_token_moe(x.detach().reshape(21, 16), p, layer.config)
    assert_close(y.reshape(21, 16), ref["out"], torch.float64, "out")
    assert_close(layer.aux_loss, 0.01 * ref["lb"] + 0.001 * ref["z"], torch.float64, "aux_loss")
    assert int(layer.stats.tokens_per_expert.sum()) == 21 * 2
    (y.square().sum() + layer.aux_loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert x.grad.shape == x.shape


def test_extra_repr_names_the_config():
    text = repr(fm.FusedMoE(_full_config(capacity_factor=1.5)))
    for part in ("hidden_size=16", "num_experts=6", "top_k=2", "capacity_factor=1.5", "shared=8+gate"):
        assert part in text


def test_functional_accepts_layer_dict_and_record(seed):
    layer = fm.FusedMoE(**CFG)
    x = torch.randn(5, 16)
    a = fm.moe(x, layer, layer.config).out
    b = fm.moe(x, dict(layer.named_parameters()), layer.config).out
    c = fm.moe(x, layer.params(), layer.config).out
    assert torch.equal(a, b) and torch.equal(a, c)


def test_backend_auto_is_reference_on_cpu_and_named_unavailable_backend_raises():
    assert fm.available_backends("cpu")[0] == "reference"
    layer = fm.FusedMoE(**CFG)
    layer(torch.randn(4, 16))
    assert layer.last_output.backend == "reference"
    with pytest.raises(ValueError, match="backend='nope'"):
        fm.FusedMoE(**CFG, backend="nope")
    cfg = fm.MoEConfig(**CFG)
    meta = {n: t.to("meta") for n, t in random_params(cfg, torch.float32).items()}  # CPU may run Triton interpreted
    with pytest.raises(fm.BackendUnavailable, match="backend='triton' cannot run on meta: "):
        fm.moe(torch.randn(4, 16, device="meta"), meta, cfg, backend="triton")


def test_every_backend_name_has_an_implementation():
    # A name in the registry is a backend that exists (issue 14: `cuda` was listed with nothing behind it); the
    # CUDA C++ in csrc/ is the heaps' signal words, not a backend, so `cuda` is an unknown name until one exists.
    import importlib.util

    from flashmoe_py import backends
    assert backends.BACKEND_NAMES == tuple(backends._REGISTRY) == backends.built_backends()
    for name, entry in backends._REGISTRY.items():
        assert importlib.util.find_spec(f"flashmoe_py.{entry.module}") is not None, name
    assert "cuda" not in backends.BACKEND_NAMES and "cuda" not in fm.available_backends("cpu")
    with pytest.raises(ValueError, match=r"backend='cuda': choose one of \('auto', 'reference', 'triton', 'fused'\)"):
        fm.FusedMoE(**CFG, backend="cuda")
    cfg = fm.MoEConfig(**CFG)
    with pytest.raises(fm.BackendUnavailable, match="backend='cuda' cannot run on cpu: unknown backend"):
        fm.moe(torch.randn(4, 16), random_params(cfg, torch.float32), cfg, backend="cuda")
    from flashmoe_py.bench import candidates
    assert "cuda" not in candidates.all_names() and "cuda" not in candidates.default_names(torch.device("cpu"))


# ----- bad input (DESIGN §9): each error names the argument and what was seen -----

@pytest.fixture
def setup():
    cfg = fm.MoEConfig(**CFG, bias=True)
    return cfg, random_params(cfg, torch.float32)


def test_x_wrong_hidden_size(setup):
    cfg, p = setup
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., hidden_size=16\], got \(4, 15\)"):
        fm.moe(torch.randn(4, 15), p, cfg)


def test_x_wrong_dtype(setup):
    cfg, p = setup
    with pytest.raises(TypeError, match=r"params.w_up: expected dtype torch.float64 \(the dtype of x\)"):
        fm.moe(torch.randn(4, 16, dtype=torch.float64), p, cfg)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor, got dtype torch.int64"):
        fm.moe(torch.ones(4, 16, dtype=torch.long), p, cfg)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        fm.moe([[0.0] * 16], p, cfg)


def test_param_wrong_shape_and_missing(setup):
    cfg, p = setup
    with pytest.raises(ValueError, match=r"params.w_down: expected shape \(6, 8, 16\), got \(6, 16, 8\)"):
        fm.moe(torch.randn(4, 16), {**p, "w_down": p["w_down"].transpose(1, 2)}, cfg)
    with pytest.raises(ValueError, match="params.b_up: required because bias"):
        fm.moe(torch.randn(4, 16), {k: v for k, v in p.items() if k != "b_up"}, cfg)
    with pytest.raises(ValueError, match="params: unknown names"):
        fm.moe(torch.randn(4, 16), {**p, "w_gate": p["w_up"]}, cfg)


def test_param_on_another_device(setup):
    # The meta device stands in for a second device on a CPU-only machine.
    cfg, p = setup
    with pytest.raises(ValueError, match="params.router_weight: on meta but x is on cpu"):
        fm.moe(torch.randn(4, 16), {**p, "router_weight": p["router_weight"].to("meta")}, cfg)


def test_caller_routing_checked(setup):
    cfg, p = setup
    x = torch.randn(4, 16)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 6]])
    with pytest.raises(ValueError, match=r"topk_ids: expert ids must lie in \[0, num_experts=6\), got values in"):
        fm.moe(x, p, cfg, topk_ids=ids, topk_weights=torch.rand(4, 2))
    with pytest.raises(ValueError, match=r"topk_ids: expected shape \[T=4, top_k=2\], got \(4, 3\)"):
        fm.moe(x, p, cfg, topk_ids=torch.zeros(4, 3, dtype=torch.long), topk_weights=torch.rand(4, 3))
    with pytest.raises(TypeError, match="topk_ids: expected an integer dtype"):
        fm.moe(x, p, cfg, topk_ids=torch.zeros(4, 2), topk_weights=torch.rand(4, 2))
    with pytest.raises(ValueError, match="give both or neither"):
        fm.moe(x, p, cfg, topk_ids=ids.clamp(max=5))


def test_caller_routing_check_is_counted_as_a_host_sync(setup, monkeypatch):
    # The range check of caller ids reads them on the host: one read (min and max together), a sync when the ids
    # live on a GPU. The forward's stats must count it: a backend that syncs nowhere else reports exactly 1.
    from flashmoe_py import ops, validation

    cfg, p = setup
    x = torch.randn(4, 16)
    ids, w = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 5]]), torch.rand(4, 2)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.device) or tolist(t))
    assert validation.check_routing(ids, w, 4, cfg, x) == 0 and len(reads) == 1  # CPU ids: a read, no sync
    monkeypatch.setattr(ops, "check_routing", lambda *a: 1)  # as for ids on a GPU
    reference = ops.backends.forward_fn("reference")

    def counting_backend(*args, **kw):  # a backend that counts its syncs (the reference counts none: None)
        result = reference(*args, **kw)
        result.stats.host_syncs = 0
        return result

    monkeypatch.setattr(ops.backends, "forward_fn", lambda name: counting_backend)
    assert fm.moe(x, p, cfg, backend="reference").stats.host_syncs == 0
    assert fm.moe(x, p, cfg, backend="reference", topk_ids=ids, topk_weights=w).stats.host_syncs == 1


def test_zero_tokens_and_inf(setup):
    cfg, p = setup
    assert fm.moe(torch.randn(0, 16), p, cfg).out.shape == (0, 16)
    x = torch.randn(4, 16)
    x[1, 0] = float("inf")
    out = fm.moe(x, p, cfg).out  # must not crash; the Inf token's row is not finite, like PyTorch would give
    assert not torch.isfinite(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()
