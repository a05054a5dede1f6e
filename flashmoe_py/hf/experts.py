"""transformers experts modules -> our layout, and the "flashmoe" entry of transformers' experts registry.

transformers 5 stores a model's routed experts as one module of 3-D parameters and lets a registry
(`transformers.integrations.moe.ExpertsInterface`) pick the function that runs them. The module carries
layout flags, set by `@use_experts_implementation`:

  has_gate        gate_up_proj (gated) or up_proj (plain)
  is_transposed   False: [E, out, in] (nn.Linear-style) ; True: [E, in, out] (input-major, like ours)
  is_concatenated True: gate rows/columns [0, I) then up [I, 2I) ; False: interleaved gate0, up0, gate1, ...
  has_bias        gate_up_proj_bias / up_proj_bias [E, N_up] and down_proj_bias [E, H]
  has_post_expert_norm  the module's post_expert_norm on each expert's output row, before the routing weight
  _is_expert_parallel   (not supported: an error names it)

The activation is read from the module: `act_fn` (an ACT2FN module, or F.silu / F.gelu / F.relu given as
functions) with transformers' default gate, or, for a module with its own `_apply_gate`, the one of our gated
activations that the gate computes on probe inputs, with its parameters taken from the module (gpt-oss' alpha and
limit, DeepSeek-V4's swiglu_limit, Inkling2's softcaps). Anything else is refused, naming what cannot be expressed.

Our layout (DESIGN §2.5) is input-major: w_up [E, H, N_up] with gate columns first, w_down [E, I, H].
`expert_params` maps one onto the other without copying where a view does it (transposes); the interleaved
layout needs a column permutation, which is computed once, cached on the module and recomputed only when
the parameter changes (its identity, storage or `_version` counter), with gradients mapped back to the
module's own parameters by `_CachedRelayout`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import MoEConfig
from ..ops import moe


class UnsupportedHFModule(ValueError):
    """A transformers module (or one of its flags) that flashmoe_py cannot run exactly; the message says which."""


@dataclass(frozen=True)
class ExpertsLayout:
    """What an experts module holds, read once from its flags and parameter shapes.

    num_experts E, hidden_size H, intermediate_size I; activation is ours (DESIGN §2.5), activation_fields the
    MoEConfig fields of its parameters (e.g. swiglu_alpha, swiglu_limit). post_expert_norm: the module's
    `post_expert_norm` runs on each expert's output row before the routing weight (MuseSpark).
    """

    num_experts: int
    hidden_size: int
    intermediate_size: int
    activation: str
    gated: bool
    transposed: bool
    concatenated: bool
    has_bias: bool
    activation_fields: dict = field(default_factory=dict)
    post_expert_norm: bool = False

    def config(self, top_k: int) -> MoEConfig:
        return MoEConfig(hidden_size=self.hidden_size, ffn_hidden_size=self.intermediate_size,
                         num_experts=self.num_experts, top_k=top_k, activation=self.activation, bias=self.has_bias,
                         **self.activation_fields)


# Activation functions some families store as plain functions (LFM2-MoE: act_fn = F.silu): the same as their
# module forms. F.gelu's default is the exact erf form.
_FUNCTIONS = {torch.nn.functional.silu: "silu", torch.nn.functional.gelu: "gelu", torch.nn.functional.relu: "relu",
              torch.relu: "relu"}


_GATED_OF = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}  # act(gate) * up


def activation_name(act_fn, *, gated: bool, where: str) -> str:
    """Our activation for a transformers activation module (`ACT2FN[...]` instance) or function.

    Matched on the module's class (or the function itself), which is what the eager forward runs: SiLU / F.silu ->
    silu or swiglu, exact GELU / F.gelu -> gelu or geglu, the tanh GELUs (GELUTanh, NewGELU, FastGELU) -> gelu_tanh or
    geglu_tanh, ReLU / F.relu -> relu, ReLUSquared -> relu2 (plain only).
    Anything else raises, naming the activation.
    """
    from transformers import activations as hf_act

    plain = None
    if callable(act_fn) and not isinstance(act_fn, torch.nn.Module):
        try:
            plain = _FUNCTIONS.get(act_fn)
        except TypeError:  # an unhashable callable is none of them
            pass
    if plain is None:
        if isinstance(act_fn, (hf_act.SiLUActivation, torch.nn.SiLU)):
            plain = "silu"
        elif type(act_fn) is hf_act.GELUActivation:  # both of its forms (F.gelu, the python erf) are exact
            plain = "gelu"
        elif type(act_fn) in (hf_act.GELUTanh, hf_act.NewGELUActivation, hf_act.FastGELUActivation):
            # The tanh approximation, in C (GELUTanh, gelu_pytorch_tanh) or written out (its python form, gelu_new,
            # gelu_fast): one formula, rounded differently.
            plain = "gelu_tanh"
        elif isinstance(act_fn, torch.nn.ReLU):
            plain = "relu"
        elif type(act_fn) is hf_act.ReLUSquaredActivation:
            plain = "relu2"
    if gated and plain in _GATED_OF:
        return _GATED_OF[plain]
    if not gated and plain is not None:
        return plain
    kind = "gated" if gated else "plain"
    name = getattr(act_fn, "__name__", None) if not isinstance(act_fn, torch.nn.Module) else None
    raise UnsupportedHFModule(
        f"{where}: activation {name or type(act_fn).__name__} ({kind}) is not one of flashmoe_py's activations "
        f"(gated: silu -> swiglu, exact gelu -> geglu, tanh gelu -> geglu_tanh; plain: silu, exact gelu, tanh "
        f"gelu, relu, relu2; functions F.silu, "
        f"F.gelu, F.relu count as their modules)")


def _flag(module, name: str, default):
    return getattr(module, name, default)


# Probe magnitudes for a custom gate: a clamp anywhere below ~1e18 changes some output (gate * up stays
# finite in fp32 up to there), so a clamped gate cannot pass for a plain one, nor one clamp for another.
_PROBE_SCALES = (1.0, 10.0, 1e3, 1e6, 1e12, 1e18)
_KNOBS = ("alpha", "limit", "swiglu_alpha", "swiglu_limit")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _softcaps(module) -> list[tuple[float, float]]:
    """(gate cap, up cap) pairs a softcapped gate may use: Inkling2's act_fn.gate_softcap.softcap / up_softcap."""
    act = getattr(module, "act_fn", None)
    caps = []
    for holder in (act, module):
        g, u = getattr(holder, "gate_softcap", None), getattr(holder, "up_softcap", None)
        g, u = getattr(g, "softcap", g), getattr(u, "softcap", u)
        if _number(g) and _number(u):
            caps.append((float(g), float(u)))
    return caps


def _gate_candidates(module, where: str) -> list[tuple[str, dict]]:
    """(activation, its MoEConfig fields) that a custom `_apply_gate` may compute, from the module's act_fn and its
    parameters: plain swiglu/geglu, then gpt-oss' swiglu_oai for every (alpha, limit) the module holds, the clamped
    swiglu for every limit, the softcapped swiglu for every pair of caps. The probe decides which, if any."""
    names = []
    if hasattr(module, "act_fn"):
        try:
            names.append(activation_name(module.act_fn, gated=True, where=where))
        except UnsupportedHFModule:
            pass
    else:
        names = ["swiglu", "geglu", "geglu_tanh"]
    out = [(n, {}) for n in names]
    alphas = sorted({float(getattr(module, n)) for n in ("alpha", "swiglu_alpha") if _number(getattr(module, n, None))})
    limits = sorted({float(getattr(module, n)) for n in ("limit", "swiglu_limit") if _number(getattr(module, n, None))})
    out += [("swiglu_oai", dict(swiglu_alpha=a, swiglu_limit=lim)) for a in alphas for lim in limits]
    out += [("swiglu_clamped", dict(swiglu_limit=lim)) for lim in limits]
    out += [("swiglu_softcap", dict(swiglu_gate_softcap=g, swiglu_up_softcap=u)) for g, u in _softcaps(module)]
    return out


def _gate_knobs(module) -> tuple:
    """The values a custom gate's mapping depends on (for the layout cache)."""
    return tuple(getattr(module, n, None) for n in _KNOBS) + tuple(_softcaps(module))


def _gate_detail(module) -> str:
    knobs = {n: getattr(module, n) for n in _KNOBS if hasattr(module, n)}
    knobs.update({"softcaps (gate, up)": c for c in _softcaps(module)})
    return f" ({', '.join(f'{k}={v}' for k, v in knobs.items())})" if knobs else ""


def _probe_gate(module, intermediate: int, concatenated: bool, device, where: str) -> tuple[str, dict]:
    """Our gated activation (and its MoEConfig fields) equal to the module's own `_apply_gate`, checked on probe
    inputs, or raise.

    transformers hands `_apply_gate` the up-projection output in the stored column order, so an interleaved
    layout (is_concatenated=False) always comes with its own gate function; we run it only if it computes
    exactly one of our gated activations for that layout. The probe is fp32, where our activations are computed
    (the kernels from fp32 accumulators; the reference in fp32 for the parameterised ones).
    """
    from ..activations import apply_activation

    gen = torch.Generator().manual_seed(0)
    probe = torch.cat([torch.randn(4, 2 * intermediate, generator=gen) * s for s in _PROBE_SCALES]).to(device)
    with torch.no_grad():
        try:
            got = module._apply_gate(probe)
        except Exception as err:  # a gate that cannot run on a probe cannot be verified
            got = err
        ours = probe if concatenated else _deinterleave(probe)
        for name, fields in _gate_candidates(module, where):
            try:
                key = MoEConfig(1, 1, 1, 1, activation=name, **fields).activation_key
            except ValueError:  # a parameter our activation cannot take (e.g. limit <= 0)
                continue
            want = apply_activation(ours, key)
            if isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype and \
                    torch.allclose(got, want, rtol=1e-6, atol=0.0, equal_nan=True):
                return name, fields
    layout = "concatenated" if concatenated else "interleaved"
    raise UnsupportedHFModule(
        f"{where}._apply_gate{_gate_detail(module)} computes none of flashmoe_py's gated activations on the {layout} "
        f"gate/up columns (is_concatenated={concatenated}): act(gate) * up with silu or exact gelu, gpt-oss' "
        f"clamped swiglu (swiglu_oai: alpha, limit), the clamped silu gate (swiglu_clamped: limit) or the softcapped "
        f"swiglu (swiglu_softcap: caps), with the parameters the module holds")


def inspect_experts(module) -> ExpertsLayout:
    """Read an experts module's layout; raise UnsupportedHFModule naming the flag we cannot honour."""
    from transformers.integrations.moe import _default_apply_gate

    where = type(module).__name__
    if not hasattr(module, "has_gate") or not hasattr(module, "is_transposed"):
        raise UnsupportedHFModule(f"{where}: not a transformers experts module (no layout flags; it must be "
                                  f"decorated with @use_experts_implementation)")
    post_norm = bool(_flag(module, "has_post_expert_norm", False))
    if post_norm and not isinstance(getattr(module, "post_expert_norm", None), torch.nn.Module):
        raise UnsupportedHFModule(
            f"{where}: has_post_expert_norm=True but no post_expert_norm module to apply to each expert's output rows")
    gated, transposed = bool(module.has_gate), bool(module.is_transposed)
    concatenated, has_bias = bool(_flag(module, "is_concatenated", True)), bool(_flag(module, "has_bias", False))

    up = module.gate_up_proj if gated else module.up_proj
    down = module.down_proj
    if up.dim() != 3 or down.dim() != 3:
        raise UnsupportedHFModule(f"{where}: expected 3-D expert weights, got up {tuple(up.shape)}, "
                                  f"down {tuple(down.shape)}")
    e = up.shape[0]
    h, n_up = (up.shape[1], up.shape[2]) if transposed else (up.shape[2], up.shape[1])
    i = n_up // 2 if gated else n_up
    want_down = (e, i, h) if transposed else (e, h, i)
    if tuple(down.shape) != want_down or (gated and n_up % 2):
        raise UnsupportedHFModule(f"{where}: inconsistent expert shapes up {tuple(up.shape)}, down "
                                  f"{tuple(down.shape)} for is_transposed={transposed}")

    fields = {}
    if not gated:
        if not hasattr(module, "act_fn"):
            raise UnsupportedHFModule(f"{where}: no act_fn; cannot tell its activation")
        activation = activation_name(module.act_fn, gated=False, where=where)
    elif getattr(type(module), "_apply_gate", _default_apply_gate) is _default_apply_gate and concatenated:
        if not hasattr(module, "act_fn"):
            raise UnsupportedHFModule(f"{where}: no act_fn; cannot tell its activation")
        activation = activation_name(module.act_fn, gated=True, where=where)
    else:
        activation, fields = _probe_gate(module, i, concatenated, up.device, where)
    return ExpertsLayout(e, h, i, activation, gated, transposed, concatenated, has_bias, fields, post_norm)


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """[..., 2I] gate0, up0, gate1, up1, ... -> [..., 2I] gate block then up block (a copy)."""
    return torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)


def _interleave(t: torch.Tensor) -> torch.Tensor:
    """Inverse of _deinterleave: [..., 2I] gate block, up block -> gate0, up0, gate1, up1, ..."""
    gate, up = t.chunk(2, dim=-1)
    return torch.stack((gate, up), dim=-1).flatten(-2)


class _CachedRelayout(torch.autograd.Function):
    """Returns a cached re-laid-out copy of `param` and maps the gradient back onto `param`'s layout.

    The copy lives outside the autograd graph (so it can be reused by every forward until the parameter
    changes); this Function reattaches it to `param`. `entry` is a one-element list holding the copy, passed
    as a non-tensor so autograd does not treat the cache as an input.
    """

    @staticmethod
    def forward(ctx, param: torch.Tensor, entry: list, grad_to_param: Callable) -> torch.Tensor:
        ctx.grad_to_param = grad_to_param
        return entry[0].view_as(entry[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.grad_to_param(grad), None, None


def _cache_of(module) -> dict:
    cache = module.__dict__.get("_flashmoe_cache")
    if cache is None:
        cache = {}
        module.__dict__["_flashmoe_cache"] = cache  # a plain attribute: not a buffer, never in state_dict
    return cache


def clear_cache(model: torch.nn.Module) -> int:
    """Drop the cached relayouts (and layouts) of every experts module in `model`; returns how many modules
    had one. Needed only after changing parameters in a way that bypasses their version counter
    (`param.data.copy_(...)`); optimizer steps, `load_state_dict` and in-place ops under no_grad are detected."""
    return sum(m.__dict__.pop("_flashmoe_cache", None) is not None for m in model.modules())


def _relaid(module, name: str, param: torch.Tensor, to_ours: Callable, to_param: Callable) -> torch.Tensor:
    """`to_ours(param)` from the module's cache, recomputed only when the parameter has changed."""
    cache = _cache_of(module)
    key = (id(param), param.data_ptr(), param._version, param.dtype, param.device)
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, [to_ours(param.detach()).contiguous()])
        cache[name] = hit
    if not (torch.is_grad_enabled() and param.requires_grad):
        return hit[1][0]
    return _CachedRelayout.apply(param, hit[1], to_param)


def expert_params(module, layout: ExpertsLayout) -> dict:
    """The module's expert tensors in our layout, differentiable w.r.t. the module's parameters.

    returns w_up [E, H, N_up], w_down [E, I, H], and b_up [E, N_up], b_down [E, H] when the module has biases;
    views of the parameters where the layout allows (transposes), cached copies otherwise (interleaved).
    """
    up = module.gate_up_proj if layout.gated else module.up_proj
    down = module.down_proj
    up_bias = (module.gate_up_proj_bias if layout.gated else module.up_proj_bias) if layout.has_bias else None
    interleaved = layout.gated and not layout.concatenated

    if not interleaved:
        w_up = up if layout.transposed else up.transpose(1, 2)
        b_up = up_bias
    elif layout.transposed:
        w_up = _relaid(module, "w_up", up, _deinterleave, _interleave)
        b_up = None if up_bias is None else _relaid(module, "b_up", up_bias, _deinterleave, _interleave)
    else:
        w_up = _relaid(module, "w_up", up, lambda p: _deinterleave(p.transpose(1, 2)),
                       lambda g: _interleave(g).transpose(1, 2))
        b_up = None if up_bias is None else _relaid(module, "b_up", up_bias, _deinterleave, _interleave)
    params = {"w_up": w_up, "w_down": down if layout.transposed else down.transpose(1, 2)}
    if layout.has_bias:
        params["b_up"] = b_up
        params["b_down"] = module.down_proj_bias
    return params


def _layout_of(module) -> ExpertsLayout:
    """inspect_experts, cached on the module and re-read when a flag or a weight's shape changes."""
    up = getattr(module, "gate_up_proj", None) if getattr(module, "has_gate", True) else getattr(module, "up_proj")
    key = tuple(_flag(module, f, None) for f in ("has_gate", "is_transposed", "is_concatenated", "has_bias",
                                                  "has_post_expert_norm")) + (
        None if up is None else tuple(up.shape), type(getattr(module, "act_fn", None)),
        getattr(module, "act_fn", None) if not isinstance(getattr(module, "act_fn", None), torch.nn.Module) else None,
        _gate_knobs(module))
    cache = _cache_of(module)
    hit = cache.get("layout")
    if hit is None or hit[0] != key:
        hit = (key, inspect_experts(module))
        cache["layout"] = hit
    return hit[1]


def experts_forward(module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    *, backend: str = "auto") -> torch.Tensor:
    """The "flashmoe" experts implementation: transformers' experts call contract.

    hidden_states [T, H] float; top_k_index [T, k] integer expert ids; top_k_weights [T, k] float
    returns [T, H] in hidden_states.dtype: sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(hidden_states[t])
    """
    if _flag(module, "_is_expert_parallel", False):
        raise UnsupportedHFModule(
            f"{type(module).__name__}: _is_expert_parallel=True (transformers' own expert sharding, with sentinel "
            f"ids for other ranks' experts) is not supported; use FusedMoE(..., process_group=) for expert "
            f"parallelism")
    layout = _layout_of(module)
    params = expert_params(module, layout)
    w_dtype = params["w_up"].dtype
    x = hidden_states.to(w_dtype)
    # The routing is supplied by the caller, so the router is never evaluated: a zero-stride placeholder
    # satisfies the parameter record without allocating [E, H].
    params["router_weight"] = x.new_zeros(()).expand(layout.num_experts, layout.hidden_size)
    if layout.post_expert_norm:
        return _post_norm_forward(module, layout, x, params, top_k_index, top_k_weights, backend).to(
            hidden_states.dtype)
    cfg = layout.config(top_k_index.shape[-1])
    out = moe(x, params, cfg, backend=backend, topk_ids=top_k_index, topk_weights=top_k_weights).out
    return out.to(hidden_states.dtype)


def _post_norm_forward(module, layout: ExpertsLayout, x: torch.Tensor, params: dict, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor, backend: str) -> torch.Tensor:
    """Experts with a norm on each expert's output row before the routing weight (has_post_expert_norm).

    The norm needs the whole unweighted row of one (token, expert) pair, which our down projection never holds
    (its epilogue weights and combines one column tile at a time). So each (token, slot) pair becomes its own row
    routed to its one expert with weight 1 (exact: the kernels' epilogue multiplies by 1.0, then rounds as the
    eager down projection does); the family's own norm module then runs on those rows, the routing weights
    multiply them, and the k rows of a token are summed in fp32 and rounded once.
    x [T, H] in the weights' dtype; top_k_index / top_k_weights [T, k]; returns [T, H] in x's dtype.
    """
    t, k = top_k_index.shape
    rows = x.repeat_interleave(k, dim=0)  # [T*k, H]: row t*k + j is token t for its j-th expert
    ones = top_k_weights.detach().new_ones(t * k, 1)
    per_slot = moe(rows, params, layout.config(1), backend=backend, topk_ids=top_k_index.reshape(t * k, 1),
                   topk_weights=ones).out
    normed = module.post_expert_norm(per_slot)
    weighted = normed * top_k_weights.reshape(t * k, 1)  # promotes as the eager forward's product does
    return weighted.float().view(t, k, -1).sum(dim=1).to(x.dtype)


def make_experts_forward(backend: str = "auto") -> Callable:
    """An experts function for transformers' registry that runs `backend`."""
    fn = functools.partial(experts_forward, backend=backend)
    functools.update_wrapper(fn, experts_forward)
    return fn
