"""The reference backend against the independent per-token float64 implementation (tests/per_token.py)."""

from __future__ import annotations

import pytest
import torch

import flashmoe_py as fm
from tests.helpers import ACTIVATION_CONFIGS, random_params, to_fp64_leaves
from tests.per_token import per_token_moe
from tests.tolerances import assert_close

# Together these cover every option of DESIGN §2; each line says what it adds.
CONFIGS = {
    # Mixtral: swiglu, softmax, top-2 with renormalisation.
    "mixtral": dict(hidden_size=32, ffn_hidden_size=24, num_experts=8, top_k=2),
    # DeepSeek-V3: sigmoid scores, selection bias, group-limited top-k, routed scaling, two shared experts.
    "deepseek": dict(hidden_size=24, ffn_hidden_size=16, num_experts=16, top_k=4, score_func="sigmoid",
                     expert_bias=True, num_expert_groups=4, topk_groups=2, routed_scaling_factor=2.5,
                     num_shared_experts=2),
    # Qwen2-MoE: no renormalisation, shared expert of its own width behind a sigmoid gate.
    "qwen2": dict(hidden_size=20, ffn_hidden_size=12, num_experts=6, top_k=2, renormalize=False,
                  num_shared_experts=1, shared_ffn_hidden_size=40, shared_expert_gate=True),
    # geglu with expert biases, capacity that drops, and both auxiliary losses weighted in.
    "geglu_bias_capacity": dict(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2, activation="geglu",
                                bias=True, capacity_factor=1.0, aux_loss_coef=0.01, z_loss_coef=0.001),
    # Plain exact-erf gelu with sigmoid scores, unnormalised weights and a tight capacity (many drops).
    "gelu_sigmoid_tight": dict(hidden_size=12, ffn_hidden_size=10, num_experts=5, top_k=2, activation="gelu",
                               score_func="sigmoid", renormalize=False, capacity_factor=0.5),
    # k=1, prime E, odd H and I, relu with biases.
    "relu_k1_prime": dict(hidden_size=9, ffn_hidden_size=7, num_experts=7, top_k=1, activation="relu", bias=True),
    # k=E (every expert on every token), prime E, silu, shared expert.
    "silu_k_eq_e": dict(hidden_size=11, ffn_hidden_size=5, num_experts=5, top_k=5, activation="silu",
                        num_shared_experts=1),
    # Group-limited softmax with one expert per group (group score = that expert), atomics-style combine.
    "groups_of_one_nondet": dict(hidden_size=10, ffn_hidden_size=6, num_experts=6, top_k=2, num_expert_groups=6,
                                 topk_groups=3, deterministic=False),
    **ACTIVATION_CONFIGS,
}
NUM_TOKENS = 37  # not a multiple of anything in the configs


def _run_both(cfg: fm.MoEConfig, dtype, num_tokens=NUM_TOKENS, x=None, params=None):
    params = params or random_params(cfg, dtype)
    x = (torch.randn(num_tokens, cfg.hidden_size, dtype=torch.float64) if x is None else x).to(dtype)
    got = fm.moe(x, params, cfg, backend="reference")
    ref = per_token_moe(x.double(), {n: t.double() for n, t in params.items()}, cfg)
    return got, ref, x, params


def _check_routing(got, ref):
    assert got.routing.topk_ids.tolist() == ref["ids"], "chosen experts differ from the per-token selection"
    assert got.routing.kept.tolist() == ref["kept"], "capacity kept a different set of assignments"


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_fp64_matches_per_token(name, seed):
    cfg = fm.MoEConfig(**CONFIGS[name])
    got, ref, _, _ = _run_both(cfg, torch.float64)
    _check_routing(got, ref)
    assert_close(got.out, ref["out"], torch.float64, "out")
    ref_w = torch.tensor([[float(w) for w in row] for row in ref["weights"]], dtype=torch.float64)
    assert_close(got.routing.topk_weights, ref_w, torch.float64, "topk_weights")
    assert_close(got.lb_loss, ref["lb"], torch.float64, "lb_loss")
    assert_close(got.z_loss, ref["z"], torch.float64, "z_loss")
    counts = torch.zeros(cfg.num_experts, dtype=torch.long)
    for ids, kept in zip(ref["ids"], ref["kept"]):
        for e, keep in zip(ids, kept):
            counts[e] += keep
    assert got.stats.tokens_per_expert.tolist() == counts.tolist()
    assert int(got.stats.dropped) == NUM_TOKENS * cfg.top_k - int(counts.sum())


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_fp32_matches_per_token(name, seed):
    cfg = fm.MoEConfig(**CONFIGS[name])
    got, ref, _, _ = _run_both(cfg, torch.float32)
    assert got.out.dtype == torch.float32
    _check_routing(got, ref)
    assert_close(got.out, ref["out"], torch.float32, "out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["mixtral", "deepseek", "geglu_bias_capacity", "swiglu_oai_router_bias",
                                  "swiglu_softcap_capacity"])
def test_forward_half_precision_within_tolerance(name, dtype, seed):
    cfg = fm.MoEConfig(**CONFIGS[name])
    got, ref, _, _ = _run_both(cfg, dtype)
    assert got.out.dtype == dtype
    # Selection runs on fp32 logits of the rounded inputs, the same values the fp64 reference sees,
    # but capacity can flip on weights that round together; compare outputs, not routing.
    assert_close(got.out, ref["out"], dtype, "out")


@pytest.mark.parametrize("name", ACTIVATION_CONFIGS)
def test_activation_parameters_are_exercised(name, seed):
    # The limits and caps bite: a good share of the pre-activations lies past them, so a wrong clamp or cap (or
    # a gradient passed where a clamp blocks it) changes the results the tests above compare.
    cfg = fm.MoEConfig(**ACTIVATION_CONFIGS[name])
    p = random_params(cfg, torch.float64)
    pre = torch.randn(200, cfg.hidden_size, dtype=torch.float64) @ p["w_up"][0]
    gate, up = pre.chunk(2, dim=-1) if cfg.is_gated else (pre, None)
    if cfg.activation == "relu2":
        assert 0.3 < (gate < 0).double().mean() < 0.7
        return
    if cfg.activation in ("gelu_tanh", "geglu_tanh"):  # where the tanh form and the erf form part most
        assert (gate.abs() > 1.5).double().mean() > 0.05
        return
    if cfg.activation == "swiglu_softcap":  # tanh(z / c) departs from z / c by over 10% once |z| > c / 2
        assert (gate.abs() > cfg.swiglu_gate_softcap / 2).double().mean() > 0.3
        assert (up.abs() > cfg.swiglu_up_softcap / 2).double().mean() > 0.3
        return
    assert (gate > cfg.swiglu_limit).double().mean() > 0.1 and (gate < -cfg.swiglu_limit).double().mean() > 0.1
    assert (up.abs() > cfg.swiglu_limit).double().mean() > 0.2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_match_per_token(name, dtype, seed):
    # Non-zero loss weights so router gradients through both losses are exercised too.
    cfg = fm.MoEConfig(**{**CONFIGS[name], "aux_loss_coef": 0.1, "z_loss_coef": 0.01})
    params = random_params(cfg, dtype)
    x = torch.randn(NUM_TOKENS, cfg.hidden_size, dtype=torch.float64).to(dtype)
    upstream = torch.randn(NUM_TOKENS, cfg.hidden_size, dtype=torch.float64)

    p_got = {n: t.detach().clone().requires_grad_(n != "expert_bias") for n, t in params.items()}
    x_got = x.detach().clone().requires_grad_()
    got = fm.moe(x_got, p_got, cfg, backend="reference")
    ((got.out.double() * upstream).sum() + got.aux_loss.double()).backward()

    p_ref = to_fp64_leaves(params)
    x_ref = x.detach().double().requires_grad_()
    ref = per_token_moe(x_ref, p_ref, cfg)
    ((ref["out"] * upstream).sum() + 0.1 * ref["lb"] + 0.01 * ref["z"]).backward()

    assert_close(x_got.grad, x_ref.grad, dtype, "grad x")
    for n in p_got:
        if n != "expert_bias":
            assert_close(p_got[n].grad, p_ref[n].grad, dtype, f"grad {n}")


def test_gradcheck_small_fp64(seed):
    # Finite differences through routing, capacity-free top-2, biases, shared gate and both losses.
    cfg = fm.MoEConfig(hidden_size=6, ffn_hidden_size=4, num_experts=4, top_k=2, bias=True, num_shared_experts=1,
                       shared_expert_gate=True, aux_loss_coef=0.1, z_loss_coef=0.01)
    params = to_fp64_leaves(random_params(cfg))
    names = list(params)
    x = torch.randn(5, cfg.hidden_size, dtype=torch.float64, requires_grad=True)

    def f(x, *tensors):
        r = fm.moe(x, dict(zip(names, tensors)), cfg, backend="reference")
        return r.out, r.aux_loss

    assert torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-6, rtol=1e-5)


# ----- edge cases: each says what it exercises -----

@pytest.mark.parametrize("name", ["deepseek", "mixtral"])
def test_zero_tokens_gives_empty_output(name, seed):
    # T = 0: empty output of the right shape, zero losses, no crash in sort/bincount/cat, and a backward
    # that works with and without a shared expert (the routed part alone must stay in x's graph).
    cfg = fm.MoEConfig(**CONFIGS[name])
    x = torch.randn(0, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    r = fm.moe(x, random_params(cfg), cfg)
    assert r.out.shape == (0, cfg.hidden_size)
    assert float(r.lb_loss) == 0.0 and float(r.z_loss) == 0.0
    assert r.stats.tokens_per_expert.tolist() == [0] * cfg.num_experts
    r.out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("name", ["mixtral", "gelu_sigmoid_tight"])
def test_single_token(name, seed):
    # T = 1: one row per chosen expert; with capacity C = ceil(cf * k / E) = 1 nothing is dropped.
    cfg = fm.MoEConfig(**CONFIGS[name])
    got, ref, _, _ = _run_both(cfg, torch.float64, num_tokens=1)
    _check_routing(got, ref)
    assert_close(got.out, ref["out"], torch.float64, "out")


def test_all_tokens_to_one_expert(seed):
    # Router built so expert 3 wins for every (positive) token: one expert gets all T rows, others none.
    cfg = fm.MoEConfig(hidden_size=8, ffn_hidden_size=6, num_experts=6, top_k=1, bias=True)
    params = random_params(cfg)
    params["router_weight"] = torch.full_like(params["router_weight"], -1.0)
    params["router_weight"][3] = 1.0
    x = torch.rand(29, cfg.hidden_size, dtype=torch.float64) + 0.1
    got, ref, _, _ = _run_both(cfg, torch.float64, x=x, params=params)
    assert got.stats.tokens_per_expert.tolist() == [0, 0, 0, 29, 0, 0]
    assert_close(got.out, ref["out"], torch.float64, "out")


def test_experts_without_tokens(seed):
    # T*k = 3 < E = 8: at least five experts get no rows; the loop must skip them cleanly.
    cfg = fm.MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=8, top_k=1)
    got, ref, _, _ = _run_both(cfg, torch.float64, num_tokens=3)
    assert (got.stats.tokens_per_expert == 0).sum() >= 5
    assert_close(got.out, ref["out"], torch.float64, "out")


def test_capacity_ties_keep_lower_token_index(seed):
    # k=1 with renormalisation makes every weight exactly 1.0: capacity must keep, per expert,
    # the lowest token indices (C = ceil(0.5 * 16 * 1 / 4) = 2 of each expert's tokens).
    cfg = fm.MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=1, capacity_factor=0.5)
    got, ref, _, _ = _run_both(cfg, torch.float64, num_tokens=16)
    ids = got.routing.topk_ids[:, 0].tolist()
    expected_kept = [ids[:t].count(ids[t]) < 2 for t in range(16)]
    assert got.routing.kept[:, 0].tolist() == expected_kept
    assert got.routing.kept.tolist() == ref["kept"]
    assert_close(got.out, ref["out"], torch.float64, "out")


def test_capacity_drops_lowest_weights(seed):
    # Without ties: every expert keeps its C highest-weight assignments, and nothing else.
    cfg = fm.MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2, capacity_factor=0.75)
    got, _, _, _ = _run_both(cfg, torch.float64, num_tokens=24)
    cap = cfg.capacity(24)
    ids, w, kept = got.routing.topk_ids, got.routing.topk_weights, got.routing.kept
    assert int((~kept).sum()) > 0, "this configuration should drop something"
    for e in range(cfg.num_experts):
        mine = ids == e
        assert int((kept & mine).sum()) == min(cap, int(mine.sum()))
        if (kept & mine).any() and (~kept & mine).any():
            assert w[kept & mine].min() >= w[~kept & mine].max()


def test_three_dimensional_input(seed):
    # Leading dims [2, 5] are flattened to T=10 tokens and restored.
    cfg = fm.MoEConfig(**CONFIGS["qwen2"])
    params = random_params(cfg)
    x = torch.randn(2, 5, cfg.hidden_size, dtype=torch.float64)
    got = fm.moe(x, params, cfg)
    flat = fm.moe(x.reshape(10, -1), params, cfg)
    assert got.out.shape == x.shape
    assert torch.equal(got.out.reshape(10, -1), flat.out)
    ref = per_token_moe(x.reshape(10, -1), params, cfg)
    assert_close(got.out.reshape(10, -1), ref["out"], torch.float64, "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_calls_are_bit_identical(dtype, seed):
    cfg = fm.MoEConfig(**CONFIGS["deepseek"])
    params = random_params(cfg, dtype)
    x = torch.randn(NUM_TOKENS, cfg.hidden_size).to(dtype)
    first = fm.moe(x, params, cfg).out
    for _ in range(3):
        assert torch.equal(fm.moe(x, params, cfg).out, first)


def test_caller_supplied_routing_matches_per_token(seed):
    # topk_ids/topk_weights skip the router (as transformers' experts interface does); capacity still applies.
    cfg = fm.MoEConfig(hidden_size=12, ffn_hidden_size=8, num_experts=6, top_k=3, capacity_factor=1.0, bias=True)
    params = random_params(cfg)
    x = torch.randn(NUM_TOKENS, cfg.hidden_size, dtype=torch.float64)
    ids = torch.stack([torch.randperm(6)[:3] for _ in range(NUM_TOKENS)])
    w = torch.rand(NUM_TOKENS, 3, dtype=torch.float64)
    got = fm.moe(x, params, cfg, topk_ids=ids, topk_weights=w)
    ref = per_token_moe(x, params, cfg, routing=(ids.tolist(), w))
    assert got.routing.kept.tolist() == ref["kept"]
    assert_close(got.out, ref["out"], torch.float64, "out")
    assert float(got.aux_loss) == 0.0


def test_nan_propagates_to_its_token_only(seed):
    # A NaN token gives a NaN output row (like PyTorch) and leaves the other tokens exact.
    cfg = fm.MoEConfig(**CONFIGS["mixtral"])
    params = random_params(cfg)
    x = torch.randn(9, cfg.hidden_size, dtype=torch.float64)
    x[4, 2] = float("nan")
    out = fm.moe(x, params, cfg).out
    assert torch.isnan(out[4]).all()
    clean = torch.cat([x[:4], x[5:]])
    # Not bit-equal: the per-expert matmuls see one row fewer, which may change BLAS blocking.
    assert_close(torch.cat([out[:4], out[5:]]), fm.moe(clean, params, cfg).out, torch.float64, "clean tokens")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_grouped_mm_inference_path(dtype, seed):
    # Decode-sized inference on CPU takes torch grouped_mm (few rows per expert, no autograd): it must give
    # what the per-token implementation gives, with experts that get no rows among them.
    from flashmoe_py.reference import use_grouped_mm

    # 7 tokens x 2 = 14 assignments for 16 experts: at least 2 experts get no rows, whatever the seed.
    cfg = fm.MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=16, top_k=2, bias=True)
    params = random_params(cfg, dtype)
    x = torch.randn(7, cfg.hidden_size).to(dtype)
    with torch.no_grad():
        assert use_grouped_mm(7 * 2, x, fm.MoEParams.from_mapping(params))
        got = fm.moe(x, params, cfg)
    assert (got.stats.tokens_per_expert == 0).any()
    ref = per_token_moe(x.double(), {n: t.double() for n, t in params.items()}, cfg)
    assert_close(got.out, ref["out"], dtype, "out")
    # With autograd recording the loop runs instead (grouped_mm's CPU backward rejects empty experts).
    leaf = {n: t.clone().requires_grad_() for n, t in params.items()}
    assert not use_grouped_mm(7 * 2, x, fm.MoEParams.from_mapping(leaf))
