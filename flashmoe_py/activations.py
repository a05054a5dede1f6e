"""Expert activations in PyTorch (DESIGN §2.5), shared by the reference path and the shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_PLAIN = {
    "gelu": lambda t: F.gelu(t, approximate="none"),
    "relu": F.relu,
    "silu": F.silu,
}
# Gated activations: act(gate) * up with the gate in the first half of the columns.
_GATE_OF = {"swiglu": F.silu, "geglu": lambda t: F.gelu(t, approximate="none")}


def apply_activation(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """pre [..., N_up] -> h [..., I]; N_up = 2I for gated activations, I otherwise. Same dtype as pre."""
    if activation in _GATE_OF:
        gate, up = pre.chunk(2, dim=-1)
        return _GATE_OF[activation](gate) * up
    return _PLAIN[activation](pre)
