"""The `fused` backend on one device (DESIGN §6, §7.2): the persistent kernel against the reference path.

Without a CUDA device the kernel runs under TRITON_INTERPRET=1 (set here at import, as tests/test_triton_backend.py
explains), phase by phase: five launches of the same kernel per forward; the PHASE=ALL tests below run the one
launch a GPU makes, its programs as concurrent threads (or one program alone). With a CUDA device the same tests
run compiled, in one launch. Every output buffer and the heap's result slab are poisoned (NaN / -2**30) before each
launch (FLASHMOE_DEBUG_POISON), so an element the kernel forgets to write, or a result it reads before it was
written, shows in the comparisons. Expert parallelism over the shm heap: tests/test_fused_ep.py.
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

import flashmoe_py as fm  # noqa: E402
from flashmoe_py import fused_backend, interpreter_threads  # noqa: E402
from flashmoe_py.routing import route  # noqa: E402
from tests.helpers import ACTIVATION_CONFIGS, compare_to_reference, random_inputs  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
LAUNCHES = 1 if HAS_CUDA else 5  # one per forward on a GPU; one per phase under the interpreter
NUM_TOKENS = 37  # > two 16-row tiles, a multiple of nothing
LOSSES = dict(aux_loss_coef=0.1, z_loss_coef=0.01)

# Each line says what it adds.
CONFIGS = {
    # swiglu, softmax top-2; H=33 leaves a partial reduction tile, I=20 two column tiles (one partial).
    "mixtral": dict(hidden_size=33, ffn_hidden_size=20, num_experts=8, top_k=2),
    # DeepSeek-V3: sigmoid, selection bias, groups 4 pick 2, routed scaling, two shared experts, expert biases.
    "deepseek": dict(hidden_size=24, ffn_hidden_size=16, num_experts=16, top_k=4, score_func="sigmoid",
                     expert_bias=True, num_expert_groups=4, topk_groups=2, routed_scaling_factor=2.5,
                     num_shared_experts=2, bias=True),
    # k=1 (weight exactly 1), prime E, odd H and I below one tile, relu with biases, atomic-free combine anyway.
    "relu_k1_prime": dict(hidden_size=9, ffn_hidden_size=7, num_experts=7, top_k=1, activation="relu", bias=True,
                          deterministic=False),
    # The parameterised gated activations and relu2 in the up GEMM's epilogue (gpt-oss with its router bias,
    # DeepSeek-V4 with a shared expert, Inkling2), dropless.
    **{name: {**c, "capacity_factor": None} for name, c in ACTIVATION_CONFIGS.items()},
}

pytestmark = pytest.mark.usefixtures("poison")



def _inputs(cfg, dtype, num_tokens=NUM_TOKENS):
    return random_inputs(cfg, dtype, num_tokens, DEVICE)


def _compare(cfg, dtype, params, x, upstream, tol=None, **routing):
    got = compare_to_reference("fused", cfg, dtype, params, x, upstream, tol, **routing)
    assert int(got.stats.dropped) == 0 and got.stats.host_syncs == 0 and got.stats.kernel_launches == LAUNCHES
    return got


@pytest.mark.interpreter
@pytest.mark.parametrize("name", CONFIGS)
def test_forward_backward_fp64_match_reference(name, seed):
    # Training mode: router logits in PyTorch (for the router's gradient), routing, GEMMs and combine in the
    # kernel, backward on the Triton backend's kernels from what the kernel saved (pre-activations, h, order).
    cfg = fm.MoEConfig(**CONFIGS[name], **LOSSES)
    _compare(cfg, torch.float64, *_inputs(cfg, torch.float64))


@pytest.mark.interpreter
def test_training_keeps_pre_activations_not_h(seed):
    # What a training forward saves for backward: the pre-activations [T*k, 2I], never h [T*k, I] (the backward
    # recomputes it from them), so h is freed once the kernel has read it. Saving h too fails this.
    cfg = fm.MoEConfig(**CONFIGS["mixtral"])
    params, x, _ = _inputs(cfg, torch.float64)
    params = {n: t.requires_grad_() for n, t in params.items()}
    x.requires_grad_()
    rows = x.shape[0] * cfg.top_k
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fm.moe(x, params, cfg, backend="fused")
    assert (rows, 2 * cfg.ffn_hidden_size) in saved, f"the pre-activations were not saved: {saved}"
    assert (rows, cfg.ffn_hidden_size) not in saved, f"h [T*k, I] is kept for backward: {saved}"


@pytest.mark.interpreter
def test_inference_routes_in_the_kernel(seed):
    # No gradient wanted: the kernel computes the router logits itself, and the losses and stats too (no
    # PyTorch op at all around the launch without a shared expert).
    cfg = fm.MoEConfig(**CONFIGS["deepseek"], **LOSSES).replace(num_shared_experts=0)
    params, x, _ = _inputs(cfg, torch.float64)
    with torch.no_grad():
        got = fm.moe(x, params, cfg, backend="fused")
    ref = fm.moe(x, params, cfg, backend="reference")
    assert torch.equal(got.routing.topk_ids, ref.routing.topk_ids)
    assert got.routing.kept.all() and got.routing.kept.shape == ref.routing.kept.shape
    for what in ("out", "aux_loss", "lb_loss", "z_loss"):
        assert_close(getattr(got, what), getattr(ref, what), torch.float64, what)
    assert_close(got.routing.logits, ref.routing.logits, torch.float64, "logits")
    assert_close(got.routing.scores, ref.routing.scores, torch.float64, "scores")
    assert_close(got.routing.topk_weights, ref.routing.topk_weights, torch.float64, "weights")


@pytest.mark.interpreter
def test_inference_with_a_router_bias(seed):
    # gpt-oss' router bias: without a gradient the logits (with the bias) come from PyTorch, the rest from the kernel.
    cfg = fm.MoEConfig(**ACTIVATION_CONFIGS["swiglu_oai_router_bias"], **LOSSES)
    params, x, _ = _inputs(cfg, torch.float64)
    with torch.no_grad():
        got = fm.moe(x, params, cfg, backend="fused")
    ref = fm.moe(x, params, cfg, backend="reference")
    assert torch.equal(got.routing.topk_ids, ref.routing.topk_ids)
    for what in ("out", "aux_loss"):
        assert_close(getattr(got, what), getattr(ref, what), torch.float64, what)
    assert got.stats.kernel_launches == LAUNCHES and got.stats.host_syncs == 0


@pytest.mark.interpreter
def test_caller_routing_with_a_repeated_expert(seed):
    # topk_ids / topk_weights from the caller, one token naming the same expert twice (a router never does, a
    # caller may): both rows go to that expert, at consecutive sorted positions; weight gradients flow back.
    cfg = fm.MoEConfig(hidden_size=20, ffn_hidden_size=12, num_experts=6, top_k=3, bias=True)
    params, x, upstream = _inputs(cfg, torch.float64, num_tokens=19)
    ids = torch.stack([torch.randperm(6)[:3] for _ in range(19)]).to(DEVICE)
    ids[5, 2] = ids[5, 0]
    w = torch.rand(19, 3, dtype=torch.float64, device=DEVICE) + 0.1
    _compare(cfg, torch.float64, params, x, upstream, topk_ids=ids, topk_weights=w)
    got = fm.moe(x, params, cfg, backend="fused", topk_ids=ids, topk_weights=w.requires_grad_())
    ref = fm.moe(x, params, cfg, backend="reference", topk_ids=ids, topk_weights=w)
    g_got, = torch.autograd.grad((got.out * upstream).sum(), w)
    g_ref, = torch.autograd.grad((ref.out * upstream).sum(), w)
    assert_close(g_got, g_ref, torch.float64, "grad topk_weights")
    assert float(got.aux_loss) == 0.0


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["mixtral", "swiglu_softcap_capacity"])
def test_bf16_matches_reference(name, seed):
    # bf16 through the interpreter's fp32 upcast of dot operands; h and the results are stored in bf16.
    # Caller routing keeps a near-tie in low-precision scores from choosing different experts in the two paths.
    # (fp32 runs in tests/test_fused_ep.py.) The softcapped swiglu is smooth: no clamp whose derivative jumps.
    cfg = fm.MoEConfig(**CONFIGS[name])
    params, x, upstream = _inputs(cfg, torch.bfloat16)
    r = route(x.double(), params["router_weight"].double(), None, cfg)
    _compare(cfg, torch.bfloat16, params, x, upstream, topk_ids=r.topk_ids, topk_weights=r.topk_weights.float())


@pytest.mark.interpreter
def test_all_tokens_to_one_expert_and_repeated_forwards(seed):
    # Every token prefers expert 3: one expert owns all rows (several tiles), the others are empty packets.
    # Then forwards of other sizes on the same persistent state (it grows once, for 45 tokens): the epoch
    # counts the launches and nothing is reset in between.
    cfg = fm.MoEConfig(hidden_size=8, ffn_hidden_size=6, num_experts=6, top_k=1, bias=True)
    params, _, _ = _inputs(cfg, torch.float64)
    params["router_weight"] = torch.full_like(params["router_weight"], -1.0)
    params["router_weight"][3] = 1.0
    for i, t in enumerate([NUM_TOKENS, 3, 45, 1, 45, 20]):
        x = (torch.rand(t, cfg.hidden_size, dtype=torch.float64) + 0.1).to(DEVICE)
        got = fm.moe(x, params, cfg, backend="fused")
        assert_close(got.out, fm.moe(x, params, cfg, backend="reference").out, torch.float64, f"forward {i} T={t}")
        assert got.stats.tokens_per_expert.tolist() == [0, 0, 0, t, 0, 0]
    state, = [s for k, s in fused_backend._LOCAL_STATES.items() if k[1:6] == (torch.float64, 6, 1, 8, 6)]
    assert state.tokens_cap >= 45 and int(state.sync[0]) == 4, "epoch should count the 4 launches since the growth"


@pytest.mark.interpreter
def test_layer_and_stats(seed):
    # FusedMoE(backend="fused") end to end: leading dims restored, loss and stats recorded, gradients flow.
    cfg = fm.MoEConfig(**CONFIGS["mixtral"], **LOSSES, num_shared_experts=1, shared_expert_gate=True)
    layer = fm.FusedMoE(cfg, backend="fused", device=DEVICE, dtype=torch.float64)
    x = torch.randn(2, 9, cfg.hidden_size, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and layer.last_output.backend == "fused"
    ref = fm.moe(x.detach(), layer, cfg, backend="reference")
    assert_close(y, ref.out, torch.float64, "out")
    assert_close(layer.aux_loss, ref.aux_loss, torch.float64, "aux_loss")
    assert layer.stats.kernel_launches == LAUNCHES and layer.stats.host_syncs == 0
    assert int(layer.stats.tokens_per_expert.sum()) == 18 * cfg.top_k and layer.stats.bytes_sent == 0
    (y.square().sum() + layer.aux_loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.interpreter
def test_nan_token_stays_in_its_row(seed):
    # A NaN token routes somewhere (NaN ranks first, as in torch.sort), gives a NaN output row and leaves every
    # other token's row correct; nothing waits forever on it. Then the state is released and rebuilt.
    cfg = fm.MoEConfig(**CONFIGS["mixtral"])
    params, x, _ = _inputs(cfg, torch.float64, num_tokens=9)
    x[4, 2] = float("nan")
    with torch.no_grad():
        out = fm.moe(x, params, cfg, backend="fused").out
    assert torch.isnan(out[4]).all()
    clean = torch.cat([x[:4], x[5:]])
    assert_close(torch.cat([out[:4], out[5:]]), fm.moe(clean, params, cfg, backend="reference").out,
                 torch.float64, "clean tokens")
    assert fused_backend.release_states() >= 1 and not fused_backend._LOCAL_STATES
    with torch.no_grad():
        again = fm.moe(clean, params, cfg, backend="fused").out
    assert_close(again, fm.moe(clean, params, cfg, backend="reference").out, torch.float64, "after release")


@pytest.mark.interpreter
def test_layers_of_one_shape_share_the_state_not_the_config(seed):
    # One persistent state serves every layer of a shape (E, k, H, I), but each launch takes its own layer's
    # activation, score function, scaling and loss coefficients (a state once carried its first layer's).
    shape = dict(hidden_size=16, ffn_hidden_size=12, num_experts=6, top_k=2)
    first = fm.MoEConfig(**shape)
    second = fm.MoEConfig(**shape, activation="geglu", score_func="sigmoid", routed_scaling_factor=1.5,
                          aux_loss_coef=0.1, z_loss_coef=0.01)
    for cfg in (first, second, first):
        params, x, _ = _inputs(cfg, torch.float64, num_tokens=11)
        with torch.no_grad():
            got = fm.moe(x, params, cfg, backend="fused")
        ref = fm.moe(x, params, cfg, backend="reference")
        assert_close(got.out, ref.out, torch.float64, f"{cfg.activation} out")
        assert_close(got.aux_loss, ref.aux_loss, torch.float64, f"{cfg.activation} aux_loss")
    assert len([k for k in fused_backend._LOCAL_STATES if k[1:6] == (torch.float64, 6, 2, 16, 12)]) == 1


@pytest.mark.interpreter
def test_zero_tokens(seed):
    cfg = fm.MoEConfig(**CONFIGS["mixtral"])
    params, _, _ = _inputs(cfg, torch.float32)
    x = torch.randn(0, cfg.hidden_size, device=DEVICE, requires_grad=True)
    r = fm.moe(x, params, cfg, backend="fused")
    assert r.out.shape == (0, cfg.hidden_size) and r.backend == "fused"
    r.out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.interpreter
@pytest.mark.parametrize("routing", ["kernel", "caller"])
def test_capacity_ranked_in_the_kernel(routing, seed):
    # capacity_factor: each expert keeps its C best assignments (weight descending, then token), ranked on the
    # device after routing; the rest contribute nothing. cf=0.4 of 8 experts, k=2: C = ceil(0.4 * T * 2 / 8) is
    # below T * 2 / 8 rows per expert on average, so drops are certain (pigeonhole). Training (logits given,
    # backward from the kernel's compacted order) and inference (routing in the kernel) or caller routing.
    cfg = fm.MoEConfig(**CONFIGS["mixtral"], **LOSSES, capacity_factor=0.4)
    params, x, upstream = _inputs(cfg, torch.float64)
    extra = {}
    if routing == "caller":
        r = route(x.double(), params["router_weight"].double(), None, cfg)
        extra = dict(topk_ids=r.topk_ids, topk_weights=r.topk_weights)
    got = compare_to_reference("fused", cfg, torch.float64, params, x, upstream, **extra)
    assert int(got.stats.dropped) > 0 and got.stats.host_syncs == 0
    with torch.no_grad():
        inf = fm.moe(x, params, cfg, backend="fused", **extra)
    ref = fm.moe(x, params, cfg, backend="reference", **extra)
    assert torch.equal(inf.routing.kept, ref.routing.kept), "kept flags differ"
    assert torch.equal(inf.stats.tokens_per_expert, ref.stats.tokens_per_expert)
    assert int(inf.stats.dropped) == int(ref.stats.dropped)
    assert_close(inf.out, ref.out, torch.float64, "inference out")
    assert_close(inf.aux_loss, ref.aux_loss, torch.float64, "inference aux_loss (counts before capacity)")


# ----- PHASE=ALL under the interpreter: the one launch a GPU makes -----

@pytest.mark.interpreter
@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's concurrent programs; on a GPU every test above is PHASE=ALL")
@pytest.mark.parametrize("programs", [4, 6])
def test_phase_all_with_concurrent_programs(programs, monkeypatch, seed):
    # The programs of one PHASE=ALL launch run as threads at once (flashmoe_py.interpreter_threads), claiming
    # route, dispatch, GEMM and combine tasks from the shared counters and waiting on each other's flags, as on a
    # GPU. Token counts: 0, 1 (most experts empty), a few (some experts empty), several tiles; inference (routing
    # in the kernel) and training (logits given, pre-activations saved, backward from them).
    monkeypatch.setenv("FLASHMOE_FUSED_SMS", str(programs))
    cfg = fm.MoEConfig(**CONFIGS["mixtral"], **LOSSES, bias=True)
    busy = []
    with interpreter_threads.concurrent_programs():
        for t in (0, 1, 5, NUM_TOKENS):
            params, x, upstream = _inputs(cfg, torch.float64, num_tokens=t)
            with torch.no_grad():
                got = fm.moe(x, params, cfg, backend="fused")
            ref = fm.moe(x, params, cfg, backend="reference")
            assert got.stats.kernel_launches == 1 and got.stats.tasks_per_program.shape == (programs,)
            assert_close(got.out, ref.out, torch.float64, f"T={t} out")
            assert_close(got.aux_loss, ref.aux_loss, torch.float64, f"T={t} aux_loss")
            assert torch.equal(got.stats.tokens_per_expert, ref.stats.tokens_per_expert)
            if 0 < t < cfg.num_experts // cfg.top_k:
                assert int((got.stats.tokens_per_expert == 0).sum()) > 0  # empty experts were exercised
            busy.append(int((got.stats.tasks_per_program > 0).sum()))
        trained = compare_to_reference("fused", cfg, torch.float64, *_inputs(cfg, torch.float64), None)
        assert trained.stats.kernel_launches == 1
        busy.append(int((trained.stats.tasks_per_program > 0).sum()))
        capped = cfg.replace(capacity_factor=0.4)  # order tasks, then stage tasks waiting on all of them
        dropped = compare_to_reference("fused", capped, torch.float64, *_inputs(capped, torch.float64), None)
        assert dropped.stats.kernel_launches == 1 and int(dropped.stats.dropped) > 0
        busy.append(int((dropped.stats.tasks_per_program > 0).sum()))
    # Each launch had more than one program taking tasks: no program did everything alone.
    assert min(busy) > 1, f"programs that claimed tasks per launch: {busy}"


@pytest.mark.interpreter
@pytest.mark.skipif(HAS_CUDA, reason="the sequential interpreter; on a GPU every test above is PHASE=ALL")
def test_phase_all_single_program_finishes_alone(monkeypatch, seed):
    # The kernel's own claim: program 0 of a PHASE=ALL launch can do every task by itself, in task order, waiting
    # only on flags it has set already. One program on the plain (sequential) interpreter shows it.
    monkeypatch.setenv("FLASHMOE_FUSED_SMS", "1")
    cfg = fm.MoEConfig(**CONFIGS["deepseek"], **LOSSES)
    params, x, _ = _inputs(cfg, torch.float64)
    with torch.no_grad():
        got = fm.moe(x, params, cfg, backend="fused")
    assert got.stats.kernel_launches == 1 and got.stats.tasks_per_program.tolist()[0] > 0
    assert_close(got.out, fm.moe(x, params, cfg, backend="reference").out, torch.float64, "out")


# ----- no kernel launches below: what the backend refuses, and why -----

def test_unavailable_reason_on_cpu_names_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = fused_backend.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    assert "not on mps" in fused_backend.unavailable_reason(torch.device("mps"))


def test_auto_keeps_triton_on_one_device():
    cfg = fm.MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2)
    assert fused_backend.auto_reason(cfg, None) is not None
    assert fm.backends.resolve("auto", "cpu", cfg) == "reference"


def test_unreadable_nvshmem_bitcode_says_which_versions():
    # Triton 3.6 cannot parse nvidia-nvshmem-cu13 3.8's clang-22 bitcode: the first compile of the NVSHMEM-puts
    # kernel then fails inside Triton; the user gets the versions to change instead of an LLVM parse error.
    class Kernel:
        def warmup(self, **kwargs):
            raise ValueError("Failed to parse library at /x/libnvshmem_device_sm_90.bc")

    with pytest.raises(fm.BackendUnavailable, match=r"nvidia-nvshmem-cu13<3\.8.*FLASHMOE_FUSED_PUTS"):
        fused_backend._init_nvshmem_module(Kernel(), 1, {}, {}, {})

    class Other:
        def warmup(self, **kwargs):
            raise ValueError("some other compile error")

    with pytest.raises(ValueError, match="some other"):
        fused_backend._init_nvshmem_module(Other(), 1, {}, {}, {})
