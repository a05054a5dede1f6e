"""`MoEConfig`: every knob of one MoE layer, validated once at construction (DESIGN §2, §3)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "swiglu_oai", "swiglu_clamped", "swiglu_softcap")
PLAIN_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "relu2")
ACTIVATIONS = GATED_ACTIVATIONS + PLAIN_ACTIVATIONS
# The MoEConfig fields each parameterised activation reads, in the order `activation_key` lists them.
ACTIVATION_FIELDS = {
    "swiglu_oai": ("swiglu_alpha", "swiglu_limit"),
    "swiglu_clamped": ("swiglu_limit",),
    "swiglu_softcap": ("swiglu_gate_softcap", "swiglu_up_softcap"),
}
_ALL_ACTIVATION_FIELDS = ("swiglu_alpha", "swiglu_limit", "swiglu_gate_softcap", "swiglu_up_softcap")
SCORE_FUNCS = ("softmax", "sigmoid")


def _check(ok: bool, field: str, value, why: str) -> None:
    if not ok:
        raise ValueError(f"MoEConfig.{field}={value!r}: {why}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class MoEConfig:
    """What one MoE layer computes. Field meanings follow DESIGN §2.

    hidden_size: H, the token width.
    ffn_hidden_size: I, each routed expert's inner width (the gated activations use 2I up-projection columns).
    num_experts: E, the routed experts over all ranks. top_k: k experts per token.
    activation: gated (N_up = 2I, columns [0, I) gate g, [I, 2I) up u): "swiglu" silu(g) * u, "geglu" gelu(g) * u
      (exact erf), "geglu_tanh" gelu_tanh(g) * u (Gemma 4),
      "swiglu_oai" (gpt-oss) (clamp(u, -limit, limit) + 1) * g' * sigmoid(swiglu_alpha * g') with
      g' = min(g, limit), "swiglu_clamped" (DeepSeek-V4) silu(min(g, limit)) * clamp(u, -limit, limit), both with
      limit = swiglu_limit; "swiglu_softcap" (Inkling2) c_g tanh(g / c_g) * sigmoid(g) * c_u tanh(u / c_u) with
      c_g = swiglu_gate_softcap, c_u = swiglu_up_softcap; plain (N_up = I): "gelu" (erf), "gelu_tanh" (the tanh
      approximation 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))), PyTorch's approximate="tanh"), "relu", "silu",
      "relu2" (relu(z)^2, Nemotron-H).
    swiglu_alpha / swiglu_limit / swiglu_gate_softcap / swiglu_up_softcap: the parameters of the activations
      above; required by the activation that reads them and None otherwise.
    router_bias: a learned bias [E] added to the router logits (gpt-oss), for selection and weights alike.
    score_func: "softmax" | "sigmoid". renormalize: divide the k chosen weights by their sum.
    routed_scaling_factor: multiplies the routing weights after renormalisation.
    expert_bias: add a per-expert bias buffer to the scores for selection only (DeepSeek-V3).
    num_expert_groups / topk_groups: group-limited routing (G groups, pick from the best topk_groups).
    capacity_factor: None is dropless; otherwise each expert keeps ceil(cf * T * k / E) assignments.
    num_shared_experts / shared_ffn_hidden_size / shared_expert_gate: the dense shared expert.
    bias: biases on the routed experts' projections.
    aux_loss_coef / z_loss_coef: weights of the load-balancing loss and the router z-loss in `aux_loss`.
    deterministic: combine in a fixed order (bit-identical reruns); False allows atomics.
    """

    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int
    activation: str = "swiglu"
    score_func: str = "softmax"
    renormalize: bool = True
    routed_scaling_factor: float = 1.0
    expert_bias: bool = False
    num_expert_groups: int = 1
    topk_groups: int = 1
    capacity_factor: float | None = None
    num_shared_experts: int = 0
    shared_ffn_hidden_size: int | None = None
    shared_expert_gate: bool = False
    bias: bool = False
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    deterministic: bool = True
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None
    swiglu_gate_softcap: float | None = None
    swiglu_up_softcap: float | None = None
    router_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k"):
            v = getattr(self, name)
            _check(_is_int(v) and v > 0, name, v, "must be a positive int")
        _check(self.top_k <= self.num_experts, "top_k", self.top_k,
               f"must be <= num_experts={self.num_experts}")
        _check(self.activation in ACTIVATIONS, "activation", self.activation, f"must be one of {ACTIVATIONS}")
        _check(self.score_func in SCORE_FUNCS, "score_func", self.score_func, f"must be one of {SCORE_FUNCS}")
        wanted = ACTIVATION_FIELDS.get(self.activation, ())
        for name in _ALL_ACTIVATION_FIELDS:
            v = getattr(self, name)
            if name not in wanted:
                _check(v is None, name, v, f"is set but activation={self.activation!r} does not use it")
                continue
            _check(v is not None, name, v, f"is required by activation={self.activation!r}")
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0, name, v,
                   "must be a finite number > 0")
        for name in ("renormalize", "expert_bias", "shared_expert_gate", "bias", "deterministic", "router_bias"):
            v = getattr(self, name)
            _check(isinstance(v, bool), name, v, "must be a bool")
        for name in ("routed_scaling_factor", "aux_loss_coef", "z_loss_coef"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), name, v,
                   "must be a finite number")
        _check(self.routed_scaling_factor > 0, "routed_scaling_factor", self.routed_scaling_factor, "must be > 0")
        _check(self.aux_loss_coef >= 0, "aux_loss_coef", self.aux_loss_coef, "must be >= 0")
        _check(self.z_loss_coef >= 0, "z_loss_coef", self.z_loss_coef, "must be >= 0")

        g = self.num_expert_groups
        _check(_is_int(g) and g > 0, "num_expert_groups", g, "must be a positive int")
        _check(self.num_experts % g == 0, "num_expert_groups", g,
               f"must divide num_experts={self.num_experts}")
        _check(_is_int(self.topk_groups) and 1 <= self.topk_groups <= g, "topk_groups", self.topk_groups,
               f"must be an int in [1, num_expert_groups={g}]")
        if g > 1:
            reachable = self.topk_groups * (self.num_experts // g)
            _check(self.top_k <= reachable, "top_k", self.top_k,
                   f"must be <= topk_groups * experts per group = {reachable} with group-limited routing")

        cf = self.capacity_factor
        if cf is not None:
            _check(isinstance(cf, (int, float)) and not isinstance(cf, bool) and math.isfinite(cf) and cf > 0,
                   "capacity_factor", cf, "must be None (dropless) or a finite number > 0")

        _check(_is_int(self.num_shared_experts) and self.num_shared_experts >= 0, "num_shared_experts",
               self.num_shared_experts, "must be an int >= 0")
        s = self.shared_ffn_hidden_size
        if s is not None:
            _check(_is_int(s) and s > 0, "shared_ffn_hidden_size", s, "must be None or a positive int")
            _check(self.num_shared_experts > 0, "shared_ffn_hidden_size", s, "is set but num_shared_experts is 0")
        if self.shared_expert_gate:
            _check(self.num_shared_experts > 0, "shared_expert_gate", True, "needs num_shared_experts > 0")

    # Derived sizes, so no caller recomputes them differently.
    @property
    def is_gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def activation_key(self) -> str:
        """The activation with its parameters in one string, e.g. "swiglu_oai:1.702:7.0" (the name alone for the
        unparameterised ones): what the backends pass around and the Triton kernels take as a constexpr.
        Parameters follow ACTIVATION_FIELDS' order as exact float reprs."""
        fields = ACTIVATION_FIELDS.get(self.activation, ())
        return ":".join([self.activation] + [repr(float(getattr(self, f))) for f in fields])

    @property
    def up_size(self) -> int:
        """N_up: columns of one expert's up-projection (2I for gated activations)."""
        return 2 * self.ffn_hidden_size if self.is_gated else self.ffn_hidden_size

    @property
    def shared_hidden_size(self) -> int:
        """I_shared: the shared expert's inner width (0 when there is none)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_ffn_hidden_size or self.num_shared_experts * self.ffn_hidden_size

    @property
    def shared_up_size(self) -> int:
        return 2 * self.shared_hidden_size if self.is_gated else self.shared_hidden_size

    def capacity(self, num_tokens: int) -> int | None:
        """Assignments each expert keeps for `num_tokens` tokens, or None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def replace(self, **changes) -> MoEConfig:
        return dataclasses.replace(self, **changes)
