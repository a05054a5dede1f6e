"""The `triton` backend, kernel by kernel, against the reference path (DESIGN §7.2).

Where the kernels run. Without a CUDA device they run in Triton's interpreter on CPU tensors. Triton picks
compiled or interpreted when `@triton.jit` decorates a function, i.e. when `flashmoe_py.kernels` is first
imported, so this module sets TRITON_INTERPRET=1 as it is imported: pytest imports every test module
before running any test, and nothing imports the kernels at import time (the backend imports them at its
first launch), so the whole suite in one process sees interpreted kernels. On a CPU-only machine the
variable has no other effect (the compile gate, which needs compiled kernels, runs in its own process:
`make compile-check`). With a CUDA device the variable is left alone and the same tests run compiled on
the GPU (`make gpu-check` selects them). Had the kernels been imported in the other mode before this
module, the module fails at import rather than testing the wrong thing.

Every buffer a launcher allocates is poisoned (NaN / -2**30) before its kernel runs (FLASHMOE_DEBUG_POISON),
so an element a kernel forgets to write, or a padding row it wrongly reads, shows up in the comparisons.
Shapes are tiny (the interpreter tiles are 16 wide) but chosen to span several row, column and reduction
tiles with partial ones; each case says what it adds.
"""

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    if "flashmoe_py.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("flashmoe_py.kernels was imported compiled before the interpreter tests could set "
                           "TRITON_INTERPRET=1; run them in a fresh process")
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import flashmoe_py as fm  # noqa: E402
from flashmoe_py import reference, triton_backend  # noqa: E402
from flashmoe_py.kernels.experts import grouped_tile  # noqa: E402
from flashmoe_py.routing import capacity_mask, route, sort_by_expert  # noqa: E402
from tests.helpers import (  # noqa: E402
    ACTIVATION_CONFIGS,
    compare_to_reference,
    forward_backward,
    random_inputs,
    random_params,
)
from tests.tolerances import assert_close  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
NUM_TOKENS = 37  # > one 16-row tile, a multiple of nothing

# Together these cover every option of DESIGN §2; each line says what it adds beyond the tile coverage.
CONFIGS = {
    # Mixtral: swiglu, softmax top-2 renormalised; H=33 leaves a partial reduction tile, I=20 two column tiles.
    "mixtral": dict(hidden_size=33, ffn_hidden_size=20, num_experts=8, top_k=2),
    # DeepSeek-V3: sigmoid, selection bias, groups 4 pick 2, routed scaling, two shared experts, expert biases.
    "deepseek": dict(hidden_size=24, ffn_hidden_size=16, num_experts=16, top_k=4, score_func="sigmoid",
                     expert_bias=True, num_expert_groups=4, topk_groups=2, routed_scaling_factor=2.5,
                     num_shared_experts=2, bias=True),
    # Qwen2-MoE: no renormalisation, a gated shared expert of its own width.
    "qwen2": dict(hidden_size=20, ffn_hidden_size=12, num_experts=6, top_k=2, renormalize=False,
                  num_shared_experts=1, shared_ffn_hidden_size=40, shared_expert_gate=True),
    # geglu with biases and a capacity that drops assignments.
    "geglu_bias_capacity": dict(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2, activation="geglu",
                                bias=True, capacity_factor=1.0),
    # Plain exact gelu, sigmoid without renormalisation, tight capacity (many drops), atomic combine.
    "gelu_tight_atomic": dict(hidden_size=12, ffn_hidden_size=10, num_experts=5, top_k=2, activation="gelu",
                              score_func="sigmoid", renormalize=False, capacity_factor=0.5, deterministic=False),
    # k=1 (weight exactly 1), prime E, odd H and I below one tile, relu with biases.
    "relu_k1_prime": dict(hidden_size=9, ffn_hidden_size=7, num_experts=7, top_k=1, activation="relu", bias=True),
    # k = E: every token goes to every expert; prime E; plain silu; shared expert.
    "silu_k_eq_e": dict(hidden_size=11, ffn_hidden_size=5, num_experts=5, top_k=5, activation="silu",
                        num_shared_experts=1),
    # Groups of one expert (group score = that expert's), atomic combine.
    "groups_of_one_atomic": dict(hidden_size=10, ffn_hidden_size=6, num_experts=6, top_k=2, num_expert_groups=6,
                                 topk_groups=3, deterministic=False),
    # The parameterised gated activations (gpt-oss with a router bias, DeepSeek-V4, Inkling2) and relu2: the up
    # GEMM's epilogue and the backward's derivatives, with limits and caps the pre-activations cross.
    **ACTIVATION_CONFIGS,
}
LOSSES = dict(aux_loss_coef=0.1, z_loss_coef=0.01)  # so router gradients flow through both losses too

pytestmark = pytest.mark.usefixtures("poison")



def _inputs(cfg, dtype, num_tokens=NUM_TOKENS):
    return random_inputs(cfg, dtype, num_tokens, DEVICE)


def _compare(cfg, dtype, params, x, upstream, tol=None, **routing):
    got = compare_to_reference("triton", cfg, dtype, params, x, upstream, tol, **routing)
    return got


@pytest.mark.interpreter
@pytest.mark.parametrize("name", CONFIGS)
def test_forward_backward_fp64_match_reference(name, seed):
    # fp64 end to end: kernels and reference agree to rounding (1e-10), so every index, mask and
    # epilogue term is checked, not just approximately.
    cfg = fm.MoEConfig(**CONFIGS[name], **LOSSES)
    _compare(cfg, torch.float64, *_inputs(cfg, torch.float64))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype,name", [(torch.float32, "qwen2"), (torch.bfloat16, "mixtral"),
                                        (torch.bfloat16, "geglu_bias_capacity"), (torch.float16, "relu_k1_prime"),
                                        (torch.float32, "swiglu_oai_router_bias"),
                                        (torch.bfloat16, "swiglu_softcap_capacity")])
def test_low_precision_matches_reference(dtype, name, seed):
    # fp32 through the fp32 dot; bf16 through the interpreter's fp32 upcast of dot operands (Triton issue
    # 11584) with bf16 loads, stores and rounding as on a GPU; fp16 as is. Compared with the reference at
    # the same dtype, both within that dtype's tolerance of each other. Caller routing keeps a near-tie in
    # low-precision scores from choosing different experts in the two paths. A clamp's derivative jumps at its
    # limit, so bf16 rounding of a pre-activation next to it flips that element's gradient: the clamped
    # activation runs in fp32 here, the smooth softcapped one in bf16.
    cfg = fm.MoEConfig(**CONFIGS[name])
    params, x, upstream = _inputs(cfg, dtype)
    r = route(x.double(), params["router_weight"].double(), params.get("expert_bias"), cfg)
    routing = dict(topk_ids=r.topk_ids, topk_weights=r.topk_weights.float())
    tol = "tf32" if HAS_CUDA and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else dtype
    _compare(cfg, dtype, params, x, upstream, tol=tol, **routing)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["deepseek", "geglu_bias_capacity", "gelu_tight_atomic", "relu_k1_prime",
                                  "silu_k_eq_e"])
def test_routing_metadata_exact(name, seed):
    # The routing kernels alone, checked exactly: ids, kept, order, counts and slots equal the reference's;
    # plus the invariants any correct sort must satisfy.
    cfg = fm.MoEConfig(**CONFIGS[name])
    params, x, _ = _inputs(cfg, torch.float32)
    ref = route(x, params["router_weight"], params.get("expert_bias"), cfg)
    t, k, e = NUM_TOKENS, cfg.top_k, cfg.num_experts
    route_args = (params.get("expert_bias"), k, cfg.score_func, cfg.renormalize, cfg.routed_scaling_factor,
                  cfg.num_expert_groups, cfg.topk_groups)
    cap = cfg.capacity(t)
    ids, weights, scores, _, table, counts_all, stats_all, kept_all = triton_backend._route_op(
        ref.logits.contiguous(), None, None, None, *route_args, cap is None)
    # The inference variant computes the logits in the route kernel from x and the router.
    c_ids, c_weights, c_scores, c_logits, _, c_counts, _, _ = triton_backend._route_op(
        None, x, params["router_weight"].contiguous(), None, *route_args, cap is None)
    assert_close(c_logits, ref.logits, torch.float32, "logits computed in the route kernel")
    assert torch.equal(c_ids, ref.topk_ids) and torch.equal(c_counts, counts_all)
    assert torch.equal(ids, ref.topk_ids)
    assert_close(scores, ref.scores, torch.float32, "scores")
    assert_close(weights, ref.topk_weights, torch.float32, "weights")
    assert torch.equal(counts_all.long().cpu(), torch.bincount(ids.flatten().cpu(), minlength=e))
    assert torch.equal(stats_all.cpu(), torch.cat([counts_all.long().cpu(), torch.zeros(1, dtype=torch.long)]))

    order, slot_of, kept, counts, stats = triton_backend._order_op(ids, weights, table, counts_all,
                                                                   -1 if cap is None else cap, e)
    if cap is None:
        counts, stats, kept = counts_all, stats_all, kept_all
    kept = kept.view(t, k)
    assert torch.equal(kept, capacity_mask(ids, weights, cfg)), "capacity kept a different set"
    assert torch.equal(kept.flatten(), slot_of >= 0)
    expected = sort_by_expert(ids, kept, e)
    a = int(counts.sum())
    assert torch.equal(stats.cpu(), torch.cat([counts.long().cpu(), torch.tensor([t * k - a])]))
    order, slot_of, ids_flat = order.long().cpu(), slot_of.long().cpu(), ids.flatten().cpu()
    assert torch.equal(counts.long().cpu(), expected.counts.cpu())
    assert torch.equal(order[:a], expected.order.cpu())
    # Invariants: slot_of inverts order on the kept assignments, dropped ones have no slot, every row
    # lies in its expert's segment (offsets are the running sum of counts), nothing is lost.
    assert torch.equal(slot_of[order[:a]], torch.arange(a))
    assert (slot_of[~kept.flatten().cpu()] == -1).all()
    assert torch.equal(ids_flat[order[:a]], torch.repeat_interleave(torch.arange(e), counts.long().cpu()))
    assert a == t * k - int((~kept).sum())
    # Routing the caller supplied, with these kept flags: the same order.
    g_order, g_slot, g_counts, g_stats = triton_backend._given_order_op(ids, kept.contiguous(), e)
    assert torch.equal(g_counts.cpu(), counts.cpu()) and torch.equal(g_stats.cpu(), stats.cpu())
    assert torch.equal(g_order[:a].long().cpu(), order[:a]) and torch.equal(g_slot.long().cpu(), slot_of)
    if cap is not None:
        assert torch.equal(counts.long().cpu(), torch.clamp(counts_all.long().cpu(), max=cap))


@pytest.mark.interpreter
@pytest.mark.parametrize("groups", [1, 4])
def test_topk_ties_go_to_the_lower_expert_and_group(groups, seed):
    # Experts 2j and 2j+1 share a router row, so their scores tie exactly (and so do groups 2g, 2g+1 with
    # groups): the route kernel must pick the lower id, as the reference's stable sort does.
    cfg = fm.MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=8, top_k=3, num_expert_groups=groups,
                       topk_groups=2 if groups > 1 else 1)
    params, x, _ = _inputs(cfg, torch.float32, num_tokens=19)
    w = params["router_weight"]
    w[1::2] = w[0::2]
    if groups > 1:
        w[4:6], w[6:8] = w[0:2], w[2:4]
    ref = route(x, w, None, cfg)
    ids = triton_backend._route_op(ref.logits.contiguous(), None, None, None, None, cfg.top_k, cfg.score_func,
                                   cfg.renormalize, 1.0, cfg.num_expert_groups, cfg.topk_groups, True)[0]
    assert torch.equal(ids, ref.topk_ids)
    assert (ids[:, 0] % 2 == 0).all(), "the first choice of a tied pair must be its even (lower) expert"


@pytest.mark.interpreter
def test_capacity_ties_keep_lower_token_index(seed):
    # k=1 with renormalisation: every weight is exactly 1.0, so capacity ranks by token index alone.
    cfg = fm.MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=1, capacity_factor=0.5)
    params, x, upstream = _inputs(cfg, torch.float64, num_tokens=16)
    got = _compare(cfg, torch.float64, params, x, upstream)
    ids = got.routing.topk_ids[:, 0].tolist()
    assert got.routing.kept[:, 0].tolist() == [ids[:t].count(ids[t]) < 2 for t in range(16)]


@pytest.mark.interpreter
def test_all_tokens_to_one_expert(seed):
    # Every token prefers expert 3: one expert owns all rows (several tiles), the others are empty.
    cfg = fm.MoEConfig(hidden_size=8, ffn_hidden_size=6, num_experts=6, top_k=1, bias=True)
    params, _, upstream = _inputs(cfg, torch.float64)
    params["router_weight"] = torch.full_like(params["router_weight"], -1.0)
    params["router_weight"][3] = 1.0
    x = (torch.rand(NUM_TOKENS, cfg.hidden_size, dtype=torch.float64) + 0.1).to(DEVICE)
    got = _compare(cfg, torch.float64, params, x, upstream)
    assert got.stats.tokens_per_expert.tolist() == [0, 0, 0, NUM_TOKENS, 0, 0]


@pytest.mark.interpreter
def test_fewer_rows_than_experts(seed):
    # T=3 < one tile, T*k = 3 < E = 8: most experts empty, every tile partial.
    cfg = fm.MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=8, top_k=1, bias=True)
    got = _compare(cfg, torch.float64, *_inputs(cfg, torch.float64, num_tokens=3))
    assert int((got.stats.tokens_per_expert == 0).sum()) >= 5


@pytest.mark.interpreter
def test_caller_supplied_routing_with_capacity(seed):
    # topk_ids / topk_weights from the caller: the count kernel, kept flags from ops.py, weight gradients.
    # cf=0.5 makes drops certain: C = ceil(0.5 * 37 * 3 / 6) = 10, so at most 60 of the 111 assignments fit.
    cfg = fm.MoEConfig(hidden_size=12, ffn_hidden_size=8, num_experts=6, top_k=3, capacity_factor=0.5, bias=True)
    params, x, upstream = _inputs(cfg, torch.float64)
    ids = torch.stack([torch.randperm(6)[:3] for _ in range(NUM_TOKENS)]).to(DEVICE)
    w = torch.rand(NUM_TOKENS, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    got = fm.moe(x, params, cfg, backend="triton", topk_ids=ids, topk_weights=w)
    ref = fm.moe(x, params, cfg, backend="reference", topk_ids=ids, topk_weights=w)
    assert torch.equal(got.routing.kept, ref.routing.kept) and int(got.stats.dropped) > 0
    assert_close(got.out, ref.out, torch.float64, "out")
    g_got, = torch.autograd.grad((got.out * upstream).sum(), w)
    g_ref, = torch.autograd.grad((ref.out * upstream).sum(), w)
    assert_close(g_got, g_ref, torch.float64, "grad topk_weights")
    assert float(got.aux_loss) == 0.0


@pytest.mark.interpreter
@pytest.mark.parametrize("hidden, inner, counts", [
    (20, 12, [9, 0, 21, 3]),
    # 1 + 2 + 1 + 1 = 5 row tiles over experts with 9, 21, 3 and 12 rows, two empty: the interpreter's GROUP_M = 3
    # leaves a partial last group of the grouped launch order, with several column tiles.
    (50, 66, [9, 0, 21, 3, 0, 12]),
])
def test_expert_ffn_matches_reference(hidden, inner, counts, seed):
    # The expert-parallel entry point: rows already grouped by local expert (experts empty), no gather.
    cfg = fm.MoEConfig(hidden_size=hidden, ffn_hidden_size=inner, num_experts=len(counts), top_k=1, bias=True)
    params = {n: t.to(DEVICE) for n, t in random_params(cfg, torch.float64).items()}
    counts = torch.tensor(counts, device=DEVICE)
    rows = torch.randn(int(counts.sum()), cfg.hidden_size, dtype=torch.float64, device=DEVICE)
    upstream = torch.randn(int(counts.sum()), cfg.hidden_size, dtype=torch.float64, device=DEVICE)
    names = ["w_up", "w_down", "b_up", "b_down"]
    results = {}
    for name, fn in (("triton", triton_backend.expert_ffn), ("reference", reference.expert_ffn)):
        leaves = {n: params[n].detach().clone().requires_grad_() for n in names}
        r = rows.detach().clone().requires_grad_()
        y = fn(r, counts, fm.MoEParams(router_weight=params["router_weight"], **leaves), cfg.activation)
        (y * upstream).sum().backward()
        results[name] = (y, r.grad, {n: leaves[n].grad for n in names})
    (y, gr, gp), (y_ref, gr_ref, gp_ref) = results["triton"], results["reference"]
    assert_close(y, y_ref, torch.float64, "rows out")
    assert_close(gr, gr_ref, torch.float64, "grad rows")
    for n in names:
        assert_close(gp[n], gp_ref[n], torch.float64, f"grad {n}")  # empty experts: zero gradient


@pytest.mark.interpreter
def test_deterministic_reruns_are_bit_identical(seed):
    # deterministic=True: the combine sums slots in order and no kernel uses atomics on floats, so forward
    # and backward give the same bits every time.
    cfg = fm.MoEConfig(**CONFIGS["geglu_bias_capacity"], **LOSSES)
    params, x, upstream = _inputs(cfg, torch.float32)
    first, gx, gp = forward_backward("triton", cfg, params, x, upstream)
    again, gx2, gp2 = forward_backward("triton", cfg, params, x, upstream)
    assert torch.equal(first.out, again.out)
    assert torch.equal(gx, gx2)
    assert all(torch.equal(gp[n], gp2[n]) for n in gp)


@pytest.mark.interpreter
def test_layer_with_triton_backend(seed):
    # FusedMoE(backend="triton") end to end: leading dims restored, loss and stats recorded, grads flow.
    cfg = fm.MoEConfig(**CONFIGS["qwen2"], **LOSSES)
    layer = fm.FusedMoE(cfg, backend="triton", device=DEVICE, dtype=torch.float64)
    x = torch.randn(2, 9, cfg.hidden_size, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and layer.last_output.backend == "triton"
    ref = fm.moe(x.detach(), layer, cfg, backend="reference")
    assert_close(y, ref.out, torch.float64, "out")
    assert_close(layer.aux_loss, ref.aux_loss, torch.float64, "aux_loss")
    assert layer.stats.host_syncs == 0 and int(layer.stats.tokens_per_expert.sum()) == 18 * cfg.top_k
    (y.square().sum() + layer.aux_loss).backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.interpreter
def test_nan_token_stays_in_its_row(seed):
    # A NaN token gives a NaN output row (as PyTorch would) and leaves every other token's row correct.
    cfg = fm.MoEConfig(**CONFIGS["mixtral"])
    params, x, _ = _inputs(cfg, torch.float64, num_tokens=9)
    x[4, 2] = float("nan")
    out = fm.moe(x, params, cfg, backend="triton").out
    assert torch.isnan(out[4]).all()
    clean = torch.cat([x[:4], x[5:]])
    assert_close(torch.cat([out[:4], out[5:]]), fm.moe(clean, params, cfg, backend="reference").out,
                 torch.float64, "clean tokens")


@pytest.mark.interpreter
def test_zero_tokens(seed):
    cfg = fm.MoEConfig(**CONFIGS["mixtral"])
    params, _, _ = _inputs(cfg, torch.float32)
    x = torch.randn(0, cfg.hidden_size, device=DEVICE, requires_grad=True)
    r = fm.moe(x, params, cfg, backend="triton")
    assert r.out.shape == (0, cfg.hidden_size) and r.backend == "triton"
    r.out.sum().backward()
    assert x.grad.shape == x.shape


# ----- no kernel launches below: availability, the config table, what the compile gate compiles -----

def test_unavailable_reason_on_cpu_names_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = triton_backend.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    with pytest.raises(fm.BackendUnavailable, match="TRITON_INTERPRET=1"):
        fm.moe(torch.randn(2, 8), random_params(fm.MoEConfig(8, 4, 2, 1), torch.float32), fm.MoEConfig(8, 4, 2, 1),
               backend="triton")
    assert "not on mps" in triton_backend.unavailable_reason(torch.device("mps"))


def test_launch_config_table_is_complete_and_wgmma_shaped():
    from flashmoe_py.kernels import configs

    pow2 = {16, 32, 64, 128, 256}
    for target in ("sm_90", "sm_80"):
        for regime in ("decode", "prefill"):
            for kernel in ("up", "down", "dx", "dh", "dw"):
                for itemsize in (2, 4, 8):
                    bm, bn, bk, warps, stages, group_m = configs.gemm_config(target, regime, kernel, itemsize)
                    assert {bm, bn, bk} <= pow2 and warps in (1, 2, 4, 8) and stages >= 1, (target, regime, kernel)
                    assert group_m >= (0 if kernel == "dw" else 1), (target, regime, kernel)  # dw: 0 = per launch
                    if target == "sm_90" and itemsize == 2:
                        # wgmma: a warpgroup (4 warps) owns 64 rows.
                        assert bm % 64 == 0 and warps % 4 == 0 and bm // 64 >= warps // 4, (regime, kernel)
    assert configs.regime(8, 64) == "decode" and configs.regime(16384 * 6, 64) == "prefill"


def test_compile_gate_reaches_every_kernel():
    # The gate compiles what plan_launches finds; every @triton.jit kernel of the package must be among it.
    from flashmoe_py import kernels
    from flashmoe_py.config import ACTIVATIONS
    from flashmoe_py.triton_compile_check import CASES, FUSED_CASES, case_configs

    reached, epilogues = set(), set()
    for _, overrides, tokens, backward, rows_mode, given in CASES:
        for cfg in case_configs(overrides):
            for launch in triton_backend.plan_launches(cfg, torch.bfloat16, tokens, "sm_90", backward, rows_mode,
                                                       given):
                reached.add(launch.kernel.fn.__name__)
                epilogues.add(launch.name)
    assert reached == {n for n in kernels.__all__ if n.endswith("_kernel")}
    # Every activation's forward and backward epilogue is compiled (both targets; plain relu and silu are gelu's
    # epilogue with a cheaper function), and the fused kernel's up-GEMM epilogue for every parameterised
    # activation and relu2.
    assert {f"{k}[{a}]" for a in set(ACTIVATIONS) - {"relu", "silu"} for k in ("up", "dh")} <= epilogues
    fused = {cfg.activation for c in FUSED_CASES for cfg in case_configs(c[1])}
    assert {"swiglu_oai", "swiglu_clamped", "swiglu_softcap", "relu2"} <= fused


# ----- launch order: the grouped decode of every GEMM kernel (experts.grouped_tile / grouped_row_tile) -----

@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [True, False])
def test_grouped_launch_order_covers_every_tile(deterministic, seed):
    # The interpreter's GEMM config has GROUP_M = 3 and 16-wide tiles. Caller routing fills experts 0, 2, 3, 5 with
    # 20, 33, 17 and 4 rows: 2 + 3 + 2 + 1 = 8 row tiles (not a multiple of 3, so the last group is partial), experts
    # 1 and 4 empty, and the grid's upper bound leaves surplus programs that must exit. Column tiles: I = 66 gives 5
    # for up and dh (dW_down: 5 x 4 tiles), H = 50 gives 4 for down and dx (dW_up: 4 x 9). Every buffer is poisoned,
    # so a tile that no program (or the wrong program) covers shows as NaN or as a wrong value. The routing weights'
    # gradient is checked too: the act-grad kernel's column tiles each add a share of the b_down term (4 blocks of
    # hidden columns over 5 column tiles: the last one adds none).
    cfg = fm.MoEConfig(hidden_size=50, ffn_hidden_size=66, num_experts=6, top_k=2, bias=True,
                       deterministic=deterministic)
    params, x, upstream = _inputs(cfg, torch.float64)
    ids = torch.tensor([[2, 0]] * 20 + [[2, 3]] * 13 + [[3, 5]] * 4, device=DEVICE)
    w = torch.rand(NUM_TOKENS, 2, dtype=torch.float64, device=DEVICE) + 0.5
    got = _compare(cfg, torch.float64, params, x, upstream, topk_ids=ids, topk_weights=w)
    assert got.stats.tokens_per_expert.tolist() == [20, 0, 33, 17, 0, 4]

    def weight_grad(backend, train_experts):
        p = {n: t.detach().clone().requires_grad_(train_experts) for n, t in params.items()}
        leaf = w.detach().clone().requires_grad_()
        out = fm.moe(x, p, cfg, backend=backend, topk_ids=ids, topk_weights=leaf).out
        (out.double() * upstream).sum().backward()
        return leaf.grad

    for train_experts in (True, False):  # with and without the expert gradients (h * weight written or not)
        assert_close(weight_grad("triton", train_experts), weight_grad("reference", train_experts), torch.float64,
                     "grad topk_weights")


@triton.jit
def _grouped_tile_probe(out_ptr, tiles_m, tiles_n, GROUP_M: tl.constexpr, BLOCK: tl.constexpr):
    """out [2 * BLOCK] int32: (pid_m, pid_n) of programs 0 .. tiles_m * tiles_n - 1 in the kernels' grouped order."""
    pid = tl.arange(0, BLOCK)
    live = pid < tiles_m * tiles_n
    pid_m, pid_n = grouped_tile(tl.where(live, pid, 0), tiles_m, tiles_n, GROUP_M)
    tl.store(out_ptr + 2 * pid, pid_m, mask=live)
    tl.store(out_ptr + 2 * pid + 1, pid_n, mask=live)


@pytest.mark.interpreter
def test_grouped_tile_order_is_a_bijection():
    # The decode itself, for grids that end in a partial group: every (row tile, column tile) exactly once, and
    # consecutive programs of a group on one column tile.
    for tiles_m, tiles_n, group_m in ((8, 5, 3), (1, 4, 8), (7, 1, 2), (16, 22, 8), (5, 3, 1)):
        n = tiles_m * tiles_n
        out = torch.full((2 * triton.next_power_of_2(n),), -1, dtype=torch.int32, device=DEVICE)
        _grouped_tile_probe[(1,)](out, tiles_m, tiles_n, GROUP_M=group_m, BLOCK=triton.next_power_of_2(n))
        seen = [tuple(p) for p in out[:2 * n].view(n, 2).tolist()]
        assert sorted(seen) == [(m, c) for m in range(tiles_m) for c in range(tiles_n)], (tiles_m, tiles_n, group_m)
        g = min(group_m, tiles_m)
        assert seen[:g] == [(m, 0) for m in range(g)], (tiles_m, tiles_n, group_m)


def test_weight_grad_order_shares_the_wider_operand():
    # dW programs stream whole expert row ranges; consecutive ones share a block of the wider operand. Mixtral's
    # shape: dW_up's B (dpre, 28672 columns) is wider than its A (x, 4096): column-major, GROUP_M = dW's row tiles;
    # dW_down's A (h * weight, 14336 columns) is wider than its B (the output gradient, 4096): row-major.
    cfg = fm.MoEConfig(hidden_size=4096, ffn_hidden_size=14336, num_experts=8, top_k=2)
    dw = {launch.name: launch for launch in triton_backend.plan_launches(cfg, torch.bfloat16, 16384, "sm_90")
          if launch.kernel.fn.__name__ == "weight_grad_kernel"}
    up, down = dw["dw[up]"].constexprs, dw["dw[down]"].constexprs
    assert up["GROUP_M"] == -(-4096 // up["BLOCK_M"]) and down["GROUP_M"] == 1
    assert dw["dw[up]"].tags["config"].endswith(f"g{up['GROUP_M']}")
