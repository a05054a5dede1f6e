"""transformers integration: tiny models built from configs (no downloads), fp32, against transformers' own code.

- from_hf: block outputs and every gradient equal the original block's, per supported family.
- patch and register(): whole-model logits (and, through the registry, parameter gradients) equal "eager".
- experts layouts (interleaved, transposed, biased, plain) against transformers' own batched_mm implementation,
  which honours the same flags; the weight cache is reused and follows in-place parameter updates.
- unsupported variants raise errors that name the flag or activation; patch lists what it left alone.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency: pip install -e .[test]")

import flashmoe_py.hf as fh  # noqa: E402
from tests.tolerances import RTOL, assert_close  # noqa: E402

F32 = torch.float32
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _config(family: str, **extra):
    t = transformers
    if family == "mixtral":
        return t.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, **extra)
    if family == "qwen2_moe":
        return t.Qwen2MoeConfig(**COMMON, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
                                num_experts_per_tok=2, norm_topk_prob=True, **extra)
    if family == "olmoe":  # norm_topk_prob=False: raw softmax weights
        return t.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                             norm_topk_prob=False, pad_token_id=0, eos_token_id=1, **extra)
    if family == "deepseek_v3":  # layer 0 dense, layer 1 MoE: 8 experts in 4 groups, best 2 groups, 2 shared
        return t.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, moe_intermediate_size=16,
                                  intermediate_size=48, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                                  topk_group=2, n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                                  q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=8, **extra)
    if family == "gpt_oss":  # swiglu_limit 1 (not 7) so that the clamps bite at these weights
        return t.GptOssConfig(**COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                              swiglu_limit=1.0, **extra)
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(**COMMON, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                                norm_topk_prob=True, head_dim=8, **extra)
    raise AssertionError(family)


_MODEL = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
          "deepseek_v3": "DeepseekV3ForCausalLM", "gpt_oss": "GptOssForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}

# MoEConfig fields each family must map to (the tests below also compare outputs, but a field whose effect a
# tiny input happens not to show would slip through without this).
_EXPECTED_FIELDS = {
    "mixtral": dict(score_func="softmax", renormalize=True, top_k=2, num_shared_experts=0),
    "qwen2_moe": dict(score_func="softmax", renormalize=True, shared_expert_gate=True, shared_hidden_size=40),
    "olmoe": dict(score_func="softmax", renormalize=False, num_shared_experts=0),
    "deepseek_v3": dict(score_func="sigmoid", renormalize=True, expert_bias=True, num_expert_groups=4, topk_groups=2,
                        routed_scaling_factor=2.5, top_k=3, shared_hidden_size=32, shared_expert_gate=False),
    "qwen3_moe": dict(score_func="softmax", renormalize=True, top_k=2, num_shared_experts=0, activation="swiglu"),
    "gpt_oss": dict(score_func="softmax", renormalize=True, router_bias=True, bias=True, activation="swiglu_oai",
                    swiglu_alpha=1.702, swiglu_limit=1.0, num_shared_experts=0),
}
FAMILIES = tuple(_EXPECTED_FIELDS)


def _tiny_model(family: str, **extra):
    """A 2-layer model with weights large enough for well-separated routing (transformers' 0.02 init routes
    almost uniformly) and a non-zero DeepSeek-V3 selection bias."""
    model = getattr(transformers, _MODEL[family])(_config(family, **extra)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.25)
            elif "mlp" in name and "bias" in name:  # gpt-oss' router and expert biases (zero at init)
                p.normal_(0.0, 0.5)
        for m in model.modules():
            if isinstance(getattr(m, "e_score_correction_bias", None), torch.Tensor):
                m.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def _moe_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    supported = set(fh.supported_blocks())
    return [(n, m) for n, m in model.named_modules() if f"{type(m).__module__}.{type(m).__qualname__}" in supported]


def _routing_counterparts(block, ours) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(name, our tensor, the same quantity from the transformers block in our layout)."""
    moe, ex = ours.moe, block.experts

    def t(x):
        return None if x is None else x.transpose(-2, -1)

    if ours.family == "gpt_oss":  # input-major already; gate/up columns interleaved
        def de(x):
            return None if x is None else torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)

        return [("router_weight", moe.router_weight.grad, block.router.weight.grad),
                ("router_bias", moe.router_bias.grad, block.router.bias.grad),
                ("w_up", moe.w_up.grad, de(ex.gate_up_proj.grad)),
                ("b_up", moe.b_up.grad, de(ex.gate_up_proj_bias.grad)),
                ("w_down", moe.w_down.grad, ex.down_proj.grad), ("b_down", moe.b_down.grad, ex.down_proj_bias.grad)]

    pairs = [("router_weight", moe.router_weight.grad, block.gate.weight.grad),
             ("w_up", moe.w_up.grad, t(ex.gate_up_proj.grad)), ("w_down", moe.w_down.grad, t(ex.down_proj.grad))]
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if shared is not None:
        up = torch.cat((shared.gate_proj.weight.grad.t(), shared.up_proj.weight.grad.t()), dim=1)
        pairs += [("shared_w_up", moe.shared_w_up.grad, up), ("shared_w_down", moe.shared_w_down.grad,
                                                                shared.down_proj.weight.grad.t())]
    if getattr(block, "shared_expert_gate", None) is not None:
        pairs.append(("shared_gate_weight", moe.shared_gate_weight.grad, block.shared_expert_gate.weight.grad))
    return pairs


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_block_outputs_and_gradients_equal_the_original(family, seed):
    model = _tiny_model(family)
    _, block = _moe_blocks(model)[0]
    ours = fh.from_hf(block, backend="reference")
    cfg = ours.moe.config
    for name, value in _EXPECTED_FIELDS[family].items():
        assert getattr(cfg, name) == value, f"{family}: MoEConfig.{name}={getattr(cfg, name)!r}, expected {value!r}"
    if family == "deepseek_v3":
        assert torch.equal(ours.moe.expert_bias, block.gate.e_score_correction_bias)

    x = torch.randn(2, 5, COMMON["hidden_size"])
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf, y_ours = block(x_hf), ours(x_ours)
    if family == "gpt_oss":  # the block also returns its routing weights
        (y_hf, w_hf), (y_ours, w_ours) = y_hf, y_ours
        assert_close(w_ours, w_hf, F32, f"{family} routing weights")
    assert_close(y_ours, y_hf, F32, f"{family} block output")
    cotangent = torch.randn_like(y_hf)
    y_hf.backward(cotangent)
    y_ours.backward(cotangent)
    assert_close(x_ours.grad, x_hf.grad, F32, f"{family} d hidden_states")
    for name, got, want in _routing_counterparts(block, ours):
        assert want is not None and want.abs().sum() > 0, f"{family}: transformers left no gradient on {name}"
        assert_close(got, want, F32, f"{family} d {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_model_logits_after_patch_and_through_the_experts_registry(family, seed):
    model = _tiny_model(family)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 7))
    model.set_experts_implementation("eager")
    ref = model(ids).logits
    cotangent = torch.randn_like(ref)
    ref.backward(cotangent)
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    patched = copy.deepcopy(model)
    result = fh.patch(patched, backend="reference")
    moe_names = [n for n, _ in _moe_blocks(model)]
    assert result.count == len(moe_names) and result.replaced == moe_names and result.skipped == {}
    assert_close(patched(ids).logits, ref, F32, f"{family} logits after patch")

    fh.register(backend="reference")
    model.set_experts_implementation("flashmoe")
    out = model(ids).logits
    assert_close(out, ref, F32, f"{family} logits with experts_implementation='flashmoe'")
    out.backward(cotangent)
    experts_grads = [n for n in ref_grads if ".experts." in n]
    assert experts_grads, "the model has no experts parameters with gradients"
    for name, want in ref_grads.items():
        assert_close(dict(model.named_parameters())[name].grad, want, F32, f"{family} d {name} (registry)")


def test_patched_mixtral_reports_router_logits_and_draws_the_same_jitter(seed):
    """output_router_logits (the auxiliary loss) and Mixtral's router jitter survive patching, including
    patching after transformers has installed its output-recording hooks (they move to the replacements)."""
    model = _tiny_model("mixtral", router_jitter_noise=0.1, output_router_logits=True, router_aux_loss_coef=0.05)
    model.set_experts_implementation("eager")
    model.train()
    ids = torch.randint(0, COMMON["vocab_size"], (2, 7))

    torch.manual_seed(seed)
    ref = model(ids, labels=ids)  # installs transformers' recording hooks on the routers
    twin = copy.deepcopy(model)
    assert fh.patch(twin, backend="reference").count == 2
    torch.manual_seed(seed)
    out = twin(ids, labels=ids)
    assert len(out.router_logits) == len(ref.router_logits) == 2
    for got, want in zip(out.router_logits, ref.router_logits):
        assert_close(got, want, F32, "router logits")
    assert_close(out.aux_loss, ref.aux_loss, F32, "aux loss")
    assert_close(out.loss, ref.loss, F32, "loss (cross entropy + aux)")
    torch.manual_seed(seed + 1)
    other = twin(ids, labels=ids)
    assert not torch.equal(other.logits, out.logits), "jitter had no effect in training mode"


# --- experts layouts through the registry, against transformers' own batched_mm (which honours the flags) ---

def _experts_class(*, concatenated: bool, transposed: bool, bias: bool, gated: bool, act: str):
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import use_experts_implementation

    class TinyExperts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
            n_up = 2 * i if gated else i
            self.num_experts = e
            self.act_fn = ACT2FN[act]
            up = torch.nn.Parameter(torch.randn(*((e, h, n_up) if transposed else (e, n_up, h))) / h ** 0.5)
            setattr(self, "gate_up_proj" if gated else "up_proj", up)
            self.down_proj = torch.nn.Parameter(torch.randn(*((e, i, h) if transposed else (e, h, i))) / i ** 0.5)
            if bias:
                setattr(self, "gate_up_proj_bias" if gated else "up_proj_bias",
                        torch.nn.Parameter(torch.randn(e, n_up) * 0.1))
                self.down_proj_bias = torch.nn.Parameter(torch.randn(e, h) * 0.1)

        def forward(self, hidden_states, top_k_index, top_k_weights):  # "eager": never used by these tests
            raise AssertionError("the tests compare with batched_mm")

    if not concatenated:
        def _apply_gate(self, gate_up):  # interleaved columns: gate0, up0, gate1, up1, ...
            return self.act_fn(gate_up[..., 0::2]) * gate_up[..., 1::2]
        TinyExperts._apply_gate = _apply_gate
    return use_experts_implementation(TinyExperts, is_concatenated=concatenated, is_transposed=transposed,
                                      has_bias=bias, has_gate=gated)


def _run_experts(module, impl: str, x, ids, w):
    module.config._experts_implementation = impl
    return module(x, ids, w)


def _assert_same_outputs_and_grads(module, ref_impl: str, x, ids, w, upstream, where: str) -> torch.Tensor:
    """The "flashmoe" entry and `ref_impl` give the same output and the same gradients of x, the routing weights and
    every parameter (each reached), for the output gradient upstream(y); returns the flashmoe output."""
    results = {}
    for impl in (ref_impl, "flashmoe"):
        module.zero_grad(set_to_none=True)
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = _run_experts(module, impl, xi, ids, wi)
        y.backward(upstream(y))
        results[impl] = (y.detach(), xi.grad, wi.grad, {n: p.grad for n, p in module.named_parameters()})
    (y_ref, dx_ref, dw_ref, dp_ref), (y, dx, dw, dp) = results[ref_impl], results["flashmoe"]
    assert_close(y, y_ref, F32, f"{where} output")
    assert_close(dx, dx_ref, F32, f"{where} d hidden_states")
    assert_close(dw, dw_ref, F32, f"{where} d top_k_weights")
    for name, g in dp_ref.items():
        assert dp[name] is not None, f"{where}: no gradient reached {name}"
        assert_close(dp[name], g, F32, f"{where} d {name}")
    return y


LAYOUTS = {
    # gpt-oss' layout (interleaved, transposed, biased) with a plain silu gate
    "interleaved-transposed-bias": dict(concatenated=False, transposed=True, bias=True, gated=True, act="silu"),
    # interleaved nn.Linear-style weights: the relayout also transposes
    "interleaved-linear": dict(concatenated=False, transposed=False, bias=False, gated=True, act="gelu"),
    # ungated experts (up_proj) with biases, Linear-style
    "plain-linear-bias": dict(concatenated=True, transposed=False, bias=True, gated=False, act="relu"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_registered_experts_honour_layout_flags_and_track_parameter_updates(layout, seed):
    fh.register(backend="reference")
    config = types.SimpleNamespace(num_experts=5, hidden_size=16, intermediate_size=12, _experts_implementation=None)
    module = _experts_class(**LAYOUTS[layout])(config)
    t, k = 9, 2
    x = torch.randn(t, 16)
    ids = torch.stack([torch.randperm(5)[:k] for _ in range(t)])
    w = torch.rand(t, k) + 0.1

    y = _assert_same_outputs_and_grads(module, "batched_mm", x, ids, w, lambda y: torch.ones_like(y) + x, layout)

    cache = module.__dict__.get("_flashmoe_cache", {})
    relaid = {n: v[1][0] for n, v in cache.items() if n != "layout"}
    assert bool(relaid) == (not LAYOUTS[layout]["concatenated"]), "only the interleaved layout needs a copy"
    _run_experts(module, "flashmoe", x, ids, w)
    assert all(cache[n][1][0] is v for n, v in relaid.items()), "the cached relayout was rebuilt without a change"

    with torch.no_grad():  # an optimizer step: in place, bumps the parameters' version counters
        for p in module.parameters():
            p.mul_(1.5).add_(0.01)
    after = _run_experts(module, "flashmoe", x, ids, w)
    assert_close(after, _run_experts(module, "batched_mm", x, ids, w), F32, f"{layout} output after an update")
    assert (after - y).abs().max() > 1e3 * RTOL[F32], "the update did not change the output"

    for p in module.parameters():  # writes through .data bypass the version counter: clear_cache is the remedy
        p.data.mul_(0.5)
    assert fh.clear_cache(module) == 1
    assert_close(_run_experts(module, "flashmoe", x, ids, w), _run_experts(module, "batched_mm", x, ids, w), F32,
                 f"{layout} output after .data writes and clear_cache")


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["reference", "triton", "fused"])
def test_post_expert_norm_runs_each_slot_through_the_family_norm(backend, seed):
    # MuseSpark: an input-scaled RMS norm on every (token, expert) output row, before the routing weight. The
    # kernels see one row per (token, slot) with weight 1; a path that normed the weighted sum, or skipped the norm,
    # differs by O(1) here (the norm rescales rows of norm ~0.3 to ~1, times 1 + weight of std 0.5).
    from transformers.models.muse_spark import configuration_muse_spark as cfg_mod
    from transformers.models.muse_spark import modeling_muse_spark as mod

    config = cfg_mod.MuseSparkTextConfig(num_local_experts=6, moe_hidden_size=16, moe_intermediate_size=12)
    experts = mod.MuseSparkExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0.0, 16 ** -0.5)
        experts.down_proj.normal_(0.0, 12 ** -0.5)
        experts.post_expert_norm.weight.normal_(0.0, 0.5)
    fh.register(backend=backend)
    t, k = 7, 3
    x = torch.randn(t, 16)
    ids = torch.stack([torch.randperm(6)[:k] for _ in range(t)])
    w = torch.rand(t, k) + 0.1
    experts.config = types.SimpleNamespace(_experts_implementation=None)
    _assert_same_outputs_and_grads(experts, "eager", x, ids, w,
                                   lambda y: torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y), backend)


def test_unsupported_variants_raise_errors_naming_the_flag(seed):
    from transformers.activations import ACT2FN

    fh.register(backend="reference")
    mixtral = _tiny_model("mixtral")  # quick gelu (z sigmoid(1.702 z)) experts: no activation of ours
    for name, block in _moe_blocks(mixtral):
        block.experts.act_fn = ACT2FN["quick_gelu"]
    ids = torch.randint(0, COMMON["vocab_size"], (1, 4))
    mixtral.set_experts_implementation("flashmoe")
    with pytest.raises(fh.UnsupportedHFModule, match=r"MixtralExperts: activation QuickGELUActivation \(gated\)"):
        mixtral(ids)
    result = fh.patch(mixtral)
    assert result.count == 0 and sorted(result.skipped) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert "QuickGELUActivation" in result.skipped["model.layers.0.mlp"]

    config = types.SimpleNamespace(num_experts=3, hidden_size=8, intermediate_size=4, _experts_implementation=None)
    x, top, w = torch.randn(2, 8), torch.tensor([[0, 1], [2, 0]]), torch.rand(2, 2)
    cases = [
        (dict(concatenated=True, transposed=False, bias=False, gated=True, act="relu"), {}, "ReLU"),
        (dict(concatenated=True, transposed=False, bias=False, gated=False, act="gelu_10"), {}, "ClippedGELU"),
        (dict(concatenated=True, transposed=True, bias=False, gated=True, act="silu"),
         {"has_post_expert_norm": True}, "has_post_expert_norm=True but no post_expert_norm module"),
        (dict(concatenated=True, transposed=True, bias=False, gated=True, act="silu"),
         {"_is_expert_parallel": True}, "_is_expert_parallel"),
    ]
    for flags, overrides, needle in cases:
        module = _experts_class(**flags)(config)
        for name, value in overrides.items():
            setattr(module, name, value)
        with pytest.raises(fh.UnsupportedHFModule, match=needle):
            _run_experts(module, "flashmoe", x, top, w)

    # Custom gates close to ours but not equal: gpt-oss' without the (up + 1), a clamped gate whose limit the module
    # does not hold, a scaled sigmoid without clamps. The probe sees each difference.
    def no_plus_one(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return up * gate * torch.sigmoid(gate * self.alpha)

    def hidden_limit(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate.clamp(max=3.0)) * up.clamp(-3.0, 3.0)

    def scaled_sigmoid(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return gate * torch.sigmoid(1.702 * gate) * up

    for gate_fn in (no_plus_one, hidden_limit, scaled_sigmoid):
        cls = _experts_class(concatenated=True, transposed=True, bias=False, gated=True, act="silu")
        cls._apply_gate = gate_fn
        module = cls(config)
        module.alpha, module.limit = 1.702, 7.0
        with pytest.raises(fh.UnsupportedHFModule, match=r"_apply_gate \(alpha=1\.702, limit=7\.0\) computes none"):
            _run_experts(module, "flashmoe", x, top, w)


def test_importing_flashmoe_py_does_not_import_transformers():
    code = "import sys, flashmoe_py, flashmoe_py.hf; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
