"""Expert activations in PyTorch (DESIGN §2.5), shared by the reference path and the shared expert.

An activation travels as its key (`MoEConfig.activation_key`): the name, then its parameters as exact float
reprs, ":"-separated ("swiglu", "swiglu_oai:1.702:7.0"). `apply_activation` takes either form of the
unparameterised ones; a parameterised name without its parameters is an error, never a default.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .config import ACTIVATION_FIELDS, ACTIVATIONS

_PLAIN = {
    "gelu": lambda t: F.gelu(t, approximate="none"),
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "relu2": lambda t: torch.square(F.relu(t)),
}
# Gated activations: act(gate) * up with the gate in the first half of the columns.
_GATE_OF = {"swiglu": F.silu, "geglu": _PLAIN["gelu"], "geglu_tanh": _PLAIN["gelu_tanh"]}


@functools.lru_cache(maxsize=None)
def parse_activation(key: str) -> tuple[str, tuple[float, ...]]:
    """"swiglu_oai:1.702:7.0" -> ("swiglu_oai", (1.702, 7.0)); raises ValueError for an unknown name or a
    wrong number of parameters."""
    name, *params = key.split(":")
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {key!r}: unknown; expected one of {ACTIVATIONS}")
    want = ACTIVATION_FIELDS.get(name, ())
    if len(params) != len(want):
        raise ValueError(f"activation {key!r}: {name} takes {len(want)} parameter(s) {want}; pass "
                         f"MoEConfig.activation_key, which carries them")
    return name, tuple(float(p) for p in params)


def _parameterised(name: str, params: tuple[float, ...], gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if name == "swiglu_oai":  # gpt-oss: transformers' GptOssExperts._apply_gate on the de-interleaved columns
        alpha, limit = params
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    if name == "swiglu_clamped":  # DeepSeek-V4, GLM-5-next, HY-V4
        (limit,) = params
        return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)
    cap_g, cap_u = params  # swiglu_softcap, Inkling2
    return (torch.tanh(gate / cap_g) * cap_g) * torch.sigmoid(gate) * (torch.tanh(up / cap_u) * cap_u)


def apply_activation(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """pre [..., N_up] -> h [..., I]; N_up = 2I for gated activations, I otherwise. Same dtype as pre.

    activation: a name or `MoEConfig.activation_key`. The parameterised gated activations are computed in fp32
    (fp64 stays fp64) and rounded once, as the Triton kernels do from their fp32 accumulators."""
    name, params = parse_activation(activation)
    if name in _GATE_OF:
        gate, up = pre.chunk(2, dim=-1)
        return _GATE_OF[name](gate) * up
    if name in ACTIVATION_FIELDS:
        wide = pre if pre.dtype == torch.float64 else pre.float()
        gate, up = wide.chunk(2, dim=-1)
        return _parameterised(name, params, gate, up).to(pre.dtype)
    return _PLAIN[name](pre)
