"""Whole sparse-MoE blocks of transformers models -> `FlashMoEBlock` (router + experts + shared expert in one
`FusedMoE`), and `patch(model)`, which swaps every supported block in place.

Each family's routing is mapped onto MoEConfig field by field (transformers 5.x modeling code):

| family | block class | routing | shared expert |
|---|---|---|---|
| mixtral | MixtralSparseMoeBlock | softmax, top-k, renormalised; router jitter in training | none |
| qwen2_moe | Qwen2MoeSparseMoeBlock | softmax, top-k, renormalised iff norm_topk_prob | 1 MLP, sigmoid gate |
| olmoe | OlmoeSparseMoeBlock | softmax, top-k, renormalised iff norm_topk_prob | none |
| deepseek_v3 | DeepseekV3MoE | sigmoid; selection on score + e_score_correction_bias | n_shared_experts * I |
|  |  | within the topk_group best groups (group score: sum of its top-2); |  |
|  |  | renormalised iff norm_topk_prob; times routed_scaling_factor |  |
| qwen3_moe | Qwen3MoeSparseMoeBlock | softmax, top-k, renormalised iff norm_topk_prob | none |
| gpt_oss | GptOssMLP | logits with the router's bias (router_bias); top-k of the logits, softmax | none |
|  |  | over the k chosen (= softmax, top-k, renormalised); swiglu_oai experts |  |

Where the families differ from our semantics in a detail, the difference and its size (see docs/DECISIONS.md):
- router logits: we compute them in fp32 from fp32-cast inputs (DeepSeek-V3 does too); Mixtral, Qwen2-MoE and
  OLMoE compute them in the model dtype, so in bf16/fp16 near-ties may pick a different expert. In fp32 they agree
  to matmul rounding.
- DeepSeek-V3 renormalises by (sum + 1e-20); we divide by the sum. In fp32 the epsilon vanishes (it is below half
  an ulp of any sum of at least 2^-42 ~ 2.3e-13, i.e. unless all k chosen logits are below about -29).
- Qwen2-MoE/OLMoE/Qwen3-MoE round the routing weights to the model dtype before weighting; we keep them in fp32.
- gpt-oss takes the softmax of the k chosen logits; we take the softmax over all E and renormalise the k chosen,
  which is the same number (the other experts' terms cancel), to rounding; its router logits and gate are in
  the model dtype, ours in fp32.
- the weighted sum runs in fp32 in slot order; transformers' eager loop adds in expert order in the model dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..config import MoEConfig
from ..layer import FusedMoE
from .experts import UnsupportedHFModule, activation_name, expert_params, inspect_experts

logger = logging.getLogger("flashmoe_py.hf")


@dataclass
class _BlockSpec:
    """The parts of one transformers MoE block and the routing fields of MoEConfig they imply."""

    family: str
    router: nn.Module  # weight [E, H]; DeepSeek-V3 also e_score_correction_bias [E] fp32
    experts: nn.Module  # a @use_experts_implementation module
    top_k: int
    routing: dict  # MoEConfig routing fields
    shared: nn.Module | None = None  # an MLP: gate_proj, up_proj, down_proj (nn.Linear, no bias), act_fn
    shared_gate: nn.Linear | None = None  # Linear(H, 1, bias=False): sigmoid scale of the shared expert
    jitter_noise: float = 0.0  # Mixtral: multiplicative input noise U(1-j, 1+j) while training
    logits_fp32: bool = False  # the dtype the family's router logits come out in (for recorders)
    router_name: str = "gate"  # the block's attribute holding the router
    returns_scores: bool = False  # gpt-oss: the block returns (hidden_states, routing weights [T, k])


def _mixtral(block) -> _BlockSpec:
    return _BlockSpec("mixtral", block.gate, block.experts, int(block.gate.top_k),
                      dict(score_func="softmax", renormalize=True), jitter_noise=float(block.jitter_noise or 0.0))


def _qwen2_moe(block) -> _BlockSpec:
    return _BlockSpec("qwen2_moe", block.gate, block.experts, int(block.gate.top_k),
                      dict(score_func="softmax", renormalize=bool(block.gate.norm_topk_prob)),
                      shared=block.shared_expert, shared_gate=block.shared_expert_gate)


def _olmoe(block) -> _BlockSpec:
    return _BlockSpec("olmoe", block.gate, block.experts, int(block.gate.top_k),
                      dict(score_func="softmax", renormalize=bool(block.gate.norm_topk_prob)))


def _deepseek_v3(block) -> _BlockSpec:
    g = block.gate
    e_per_group = g.num_experts // g.num_group
    if e_per_group < 2:
        # transformers' group score takes the top-2 of each group and fails with one expert per group.
        raise UnsupportedHFModule(f"DeepseekV3MoE: n_group={g.num_group} leaves {e_per_group} expert per group; "
                                  f"its group score (sum of the top-2) needs at least 2")
    return _BlockSpec("deepseek_v3", g, block.experts, int(g.top_k),
                      dict(score_func="sigmoid", renormalize=bool(g.norm_topk_prob), expert_bias=True,
                           routed_scaling_factor=float(g.routed_scaling_factor), num_expert_groups=int(g.num_group),
                           topk_groups=int(g.topk_group)),
                      shared=block.shared_experts, logits_fp32=True)


def _qwen3_moe(block) -> _BlockSpec:
    return _BlockSpec("qwen3_moe", block.gate, block.experts, int(block.gate.top_k),
                      dict(score_func="softmax", renormalize=bool(block.gate.norm_topk_prob)))


def _gpt_oss(block) -> _BlockSpec:
    # softmax over the top-k logits = softmax over all experts, top-k, renormalised; the router has a bias.
    return _BlockSpec("gpt_oss", block.router, block.experts, int(block.router.top_k),
                      dict(score_func="softmax", renormalize=True, router_bias=True), router_name="router",
                      returns_scores=True)


# Exact classes only: a subclass may change the forward.
_CONVERTERS: dict[str, Callable] = {
    "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock": _mixtral,
    "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock": _qwen2_moe,
    "transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock": _olmoe,
    "transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE": _deepseek_v3,
    "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock": _qwen3_moe,
    "transformers.models.gpt_oss.modeling_gpt_oss.GptOssMLP": _gpt_oss,
}


def _qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def supported_blocks() -> tuple[str, ...]:
    """The transformers block classes from_hf converts, by qualified name."""
    return tuple(_CONVERTERS)


class _RouterTap:
    """Stands where the transformers router was, so that whatever listens to the router still hears it.

    transformers collects `router_logits` (for `output_router_logits=True` and the auxiliary loss) with forward
    hooks on instances of the family's router class. The tap is an instance of a subclass of that class whose
    forward only hands back the routing the FusedMoE already computed: (router_logits, weights, ids), the
    router's own output order. It owns no parameters; `weight` (and DeepSeek-V3's `e_score_correction_bias`,
    gpt-oss' `bias`) read through to the FusedMoE's, so transformers' `_init_weights` re-initialises the right
    tensors.
    """

    def __init__(self, layer: FusedMoE):
        nn.Module.__init__(self)
        self.__dict__["_layer"] = layer  # not registered: the layer belongs to the block, beside the tap

    @property
    def weight(self) -> torch.Tensor:
        return self._layer.router_weight

    @property
    def e_score_correction_bias(self) -> torch.Tensor | None:
        return self._layer.expert_bias

    @property
    def bias(self) -> torch.Tensor | None:
        return self._layer.router_bias

    def forward(self, router_logits: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor):
        return router_logits, topk_weights, topk_ids

    def extra_repr(self) -> str:
        return "routing computed by the block's FusedMoE; this module only reports it"


_TAP_CLASSES: dict[type, type] = {}


def _router_tap(router_cls: type, layer: FusedMoE) -> nn.Module:
    tap_cls = _TAP_CLASSES.get(router_cls)
    if tap_cls is None:
        tap_cls = type(f"{router_cls.__name__}Tap", (_RouterTap, router_cls), {"__module__": __name__})
        _TAP_CLASSES[router_cls] = tap_cls
    return tap_cls(layer)


class FlashMoEBlock(nn.Module):
    """A transformers sparse-MoE block run by one FusedMoE: same call, same output as the block it replaces.

    forward(hidden_states [..., H]) -> [..., H] in hidden_states.dtype, or for gpt-oss, whose block also returns
    its routing weights, (that, weights [T, k] in hidden_states.dtype). Children: `moe` (the FusedMoE:
    router_weight, router_bias, expert_bias, w_up, w_down, shared_*) and, under the family's name for its router
    (`gate`, gpt-oss `router`), a router tap that reports the routing to transformers' output recorders.
    """

    def __init__(self, moe: FusedMoE, gate: nn.Module, family: str, jitter_noise: float = 0.0,
                 logits_fp32: bool = False, router_name: str = "gate", returns_scores: bool = False):
        super().__init__()
        self.moe = moe
        self.router_name = router_name
        self.add_module(router_name, gate)
        self.family = family
        self.jitter_noise = jitter_noise
        self.logits_fp32 = logits_fp32
        self.returns_scores = returns_scores

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return self.moe.aux_loss

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        if self.training and self.jitter_noise > 0:
            # Mixtral's router jitter, drawn exactly as transformers draws it (it scales the block's input in place;
            # here out of place, which gives the same outputs).
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        y = self.moe(x)
        routing = self.moe.last_output.routing
        logits = routing.logits if self.logits_fp32 else routing.logits.to(x.dtype)
        getattr(self, self.router_name)(logits, routing.topk_weights, routing.topk_ids)
        return (y, routing.topk_weights.to(x.dtype)) if self.returns_scores else y

    def extra_repr(self) -> str:
        return f"family={self.family}"


def _check_no_bias(linear: nn.Module, where: str) -> None:
    if getattr(linear, "bias", None) is not None:
        raise UnsupportedHFModule(f"{where}: has a bias; flashmoe_py's router and shared expert have none")


def _shared_weights(mlp: nn.Module, activation: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A gated MLP (gate_proj, up_proj, down_proj) -> shared_w_up [H, 2I_s] (gate columns first), shared_w_down
    [I_s, H]; its activation must be the routed experts' (one activation per MoEConfig)."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(mlp, name, None), nn.Linear):
            raise UnsupportedHFModule(f"{where}: shared expert without an nn.Linear {name}")
        _check_no_bias(getattr(mlp, name), f"{where}.{name}")
    act = activation_name(mlp.act_fn, gated=True, where=where)
    if act != activation:
        raise UnsupportedHFModule(f"{where}: shared expert activation {act} differs from the routed experts' "
                                  f"{activation}; one MoEConfig has one activation")
    w_up = torch.cat((mlp.gate_proj.weight.t(), mlp.up_proj.weight.t()), dim=1)
    return w_up, mlp.down_proj.weight.t()


def _carry_hooks(src: nn.Module, dst: nn.Module, *, pre: bool) -> None:
    """Hooks registered on the replaced module keep firing on its replacement (same call contract)."""
    dst._forward_hooks.update(src._forward_hooks)
    dst._forward_hooks_with_kwargs.update(src._forward_hooks_with_kwargs)
    dst._forward_hooks_always_called.update(src._forward_hooks_always_called)
    if pre:
        dst._forward_pre_hooks.update(src._forward_pre_hooks)
        dst._forward_pre_hooks_with_kwargs.update(src._forward_pre_hooks_with_kwargs)


def from_hf(block: nn.Module, *, backend: str = "auto") -> FlashMoEBlock:
    """Convert one transformers sparse-MoE block into a FlashMoEBlock with the same forward contract.

    The weights are copied once into our layout (the block itself is left untouched); requires_grad flags and
    the train/eval mode carry over, and so do forward hooks on the block and on its router. Raises
    UnsupportedHFModule naming the block class, flag or activation it cannot reproduce exactly.
    """
    convert = _CONVERTERS.get(_qualname(block))
    if convert is None:
        raise UnsupportedHFModule(f"{type(block).__name__}: not a supported MoE block; supported: "
                                  f"{', '.join(n.rsplit('.', 1)[-1] for n in _CONVERTERS)}")
    spec = convert(block)
    where = type(block).__name__
    layout = inspect_experts(spec.experts)
    if layout.post_expert_norm:
        raise UnsupportedHFModule(f"{where}: its experts norm each expert's output row (has_post_expert_norm), which "
                                  f"FusedMoE does not; run them through the experts registry (register())")
    if not spec.routing.get("router_bias"):
        _check_no_bias(spec.router, f"{where}.{spec.router_name}")
    e, h = layout.num_experts, layout.hidden_size
    if tuple(spec.router.weight.shape) != (e, h):
        raise UnsupportedHFModule(f"{where}: router weight {tuple(spec.router.weight.shape)} does not match "
                                  f"{e} experts of width {h}")
    shared = None
    if spec.shared is not None:
        shared = _shared_weights(spec.shared, layout.activation, f"{where}.shared expert")
    if spec.shared_gate is not None:
        _check_no_bias(spec.shared_gate, f"{where}.shared_expert_gate")
    cfg = MoEConfig(hidden_size=h, ffn_hidden_size=layout.intermediate_size, num_experts=e, top_k=spec.top_k,
                    activation=layout.activation, **layout.activation_fields, bias=layout.has_bias,
                    num_shared_experts=1 if shared is not None else 0,
                    shared_ffn_hidden_size=shared[1].shape[0] if shared is not None else None,
                    shared_expert_gate=spec.shared_gate is not None, **spec.routing)

    ref = spec.experts.gate_up_proj if layout.gated else spec.experts.up_proj
    layer = FusedMoE(cfg, backend=backend, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        ours = expert_params(spec.experts, layout)
        sources = {"w_up": (ours["w_up"], ref), "w_down": (ours["w_down"], spec.experts.down_proj)}
        if layout.has_bias:
            up_bias = spec.experts.gate_up_proj_bias if layout.gated else spec.experts.up_proj_bias
            sources |= {"b_up": (ours["b_up"], up_bias), "b_down": (ours["b_down"], spec.experts.down_proj_bias)}
        if shared is not None:
            sources |= {"shared_w_up": (shared[0], spec.shared.gate_proj.weight),
                        "shared_w_down": (shared[1], spec.shared.down_proj.weight)}
        for name, (value, origin) in sources.items():
            getattr(layer, name).copy_(value)
            getattr(layer, name).requires_grad_(origin.requires_grad)
        # The router and the shared gate may keep their own dtype (logits are computed in fp32 anyway).
        layer.router_weight = nn.Parameter(spec.router.weight.detach().clone(),
                                           requires_grad=spec.router.weight.requires_grad)
        if cfg.router_bias:
            layer.router_bias = nn.Parameter(spec.router.bias.detach().clone(),
                                             requires_grad=spec.router.bias.requires_grad)
        if spec.shared_gate is not None:
            layer.shared_gate_weight = nn.Parameter(spec.shared_gate.weight.detach().clone(),
                                                    requires_grad=spec.shared_gate.weight.requires_grad)
        if cfg.expert_bias:
            layer.expert_bias.copy_(spec.router.e_score_correction_bias)

    new = FlashMoEBlock(layer, _router_tap(type(spec.router), layer), spec.family, spec.jitter_noise,
                        spec.logits_fp32, spec.router_name, spec.returns_scores)
    # the tap is called with the routing, not the router's input
    _carry_hooks(spec.router, getattr(new, spec.router_name), pre=False)
    _carry_hooks(block, new, pre=True)
    return new.train(block.training)


def _is_experts_module(module: nn.Module) -> bool:
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed")


def _looks_like_moe_block(module: nn.Module) -> bool:
    """A module holding experts: an `experts` child, or a child with transformers' experts layout flags."""
    if _is_experts_module(module) or isinstance(module, FlashMoEBlock):
        return False
    return any(name == "experts" or _is_experts_module(child) for name, child in module.named_children())


class PatchResult(NamedTuple):
    """What `patch` did. count: blocks replaced; replaced: their qualified names; skipped: qualified name -> why
    (MoE-looking blocks left as they were)."""

    count: int
    replaced: list[str]
    skipped: dict[str, str]


def patch(model: nn.Module, *, backend: str = "auto") -> PatchResult:
    """Replace every supported sparse-MoE block of `model` in place by its FlashMoEBlock.

    Blocks that hold experts but are not supported (another family, or a flag or activation we cannot run
    exactly) are left alone, listed in the result and logged as a warning. Patch before building the
    optimizer: the replaced blocks' parameters are new tensors.
    """
    replaced: list[str] = []
    skipped: dict[str, str] = {}
    targets = []
    for name, module in model.named_modules():
        if _qualname(module) in _CONVERTERS or _looks_like_moe_block(module):
            if not name:
                skipped["<root>"] = "the model itself is a block; use from_hf(block) instead"
            else:
                targets.append((name, module))
    for name, module in targets:
        if any(name.startswith(done + ".") for done in replaced):
            continue  # inside a block replaced already
        try:
            new = from_hf(module, backend=backend)
        except UnsupportedHFModule as err:
            skipped[name] = str(err)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        replaced.append(name)
    if skipped:
        logger.warning("flashmoe_py.hf.patch left %d MoE block(s) unchanged:\n%s", len(skipped),
                       "\n".join(f"  {n}: {why}" for n, why in skipped.items()))
    return PatchResult(len(replaced), replaced, skipped)
