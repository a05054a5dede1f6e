"""Benchmark shapes: the default sweep, real-model presets, and the `Case` one measurement runs on.

Presets are the MoE layers of released models, from their published `config.json` (routed experts only
are scaled; routing structure -- E, k, groups, shared experts, score function -- is kept as is):

| preset        | H    | I     | E   | k | shared        | routing                                                  |
|---------------|------|-------|-----|---|---------------|----------------------------------------------------------|
| mixtral-8x7b  | 4096 | 14336 | 8   | 2 | none          | softmax, top-2 renormalised                              |
| qwen3-30b-a3b | 2048 | 768   | 128 | 8 | none          | softmax, top-8 renormalised (norm_topk_prob)             |
| deepseek-v3   | 7168 | 2048  | 256 | 8 | 1, width 2048 | sigmoid + selection bias, 8 groups pick 4, renorm., x2.5 |
| olmoe-1b-7b   | 2048 | 1024  | 64  | 8 | none          | softmax, top-8 not renormalised                          |

All use SwiGLU experts. `--scale s` divides H, I and the shared width by s (rounded to a multiple of 16,
so torch grouped_mm's 16-byte alignment still holds) so a preset fits a small machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import MoEConfig
from .counting import MODES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Shape:
    """One MoE layer shape with a name; `extra` holds MoEConfig fields beyond the four sizes."""

    name: str
    hidden: int
    ffn: int
    experts: int
    top_k: int
    extra: dict = field(default_factory=dict)

    def config(self) -> MoEConfig:
        return MoEConfig(hidden_size=self.hidden, ffn_hidden_size=self.ffn, num_experts=self.experts,
                         top_k=self.top_k, **self.extra)


PRESETS: dict[str, Shape] = {
    "mixtral-8x7b": Shape("mixtral-8x7b", 4096, 14336, 8, 2),
    "qwen3-30b-a3b": Shape("qwen3-30b-a3b", 2048, 768, 128, 8),
    "deepseek-v3": Shape("deepseek-v3", 7168, 2048, 256, 8, dict(
        score_func="sigmoid", expert_bias=True, num_expert_groups=8, topk_groups=4, routed_scaling_factor=2.5,
        num_shared_experts=1)),
    "olmoe-1b-7b": Shape("olmoe-1b-7b", 2048, 1024, 64, 8, dict(renormalize=False)),
}

# The two shapes the project's acceptance is judged on, each with a token sweep for the plot.
FINE_GRAINED = Shape("fine-grained", 512, 256, 128, 8)  # many small experts (DeepSeek/Qwen3 style)
DECODE = Shape("decode", 1024, 512, 64, 8)              # decode steps: few tokens per expert, weight-bound

# Token counts per rank of the default sweep, by device type. The CPU lists keep `make bench` under
# five minutes on two cores; the acceptance points are T=4096 (fine-grained) and T=64 (decode).
DEFAULT_SWEEP: dict[str, list[tuple[Shape, list[int]]]] = {
    "cpu": [(FINE_GRAINED, [256, 1024, 4096]), (DECODE, [16, 64, 256])],
    "cuda": [(FINE_GRAINED, [1024, 4096, 16384]), (DECODE, [16, 64, 256, 1024])],
}


def _round16(v: float) -> int:
    return max(16, int(round(v / 16)) * 16)


def scaled(shape: Shape, scale: float) -> Shape:
    """`shape` with H, I and the shared width divided by `scale` (>= 1), each a multiple of 16."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 1):
        raise ValueError(f"scale={scale!r}: must be a number >= 1 (it divides H and I)")
    if scale == 1:
        return shape
    extra = dict(shape.extra)
    if extra.get("shared_ffn_hidden_size"):
        extra["shared_ffn_hidden_size"] = _round16(extra["shared_ffn_hidden_size"] / scale)
    return Shape(f"{shape.name}/{scale:g}", _round16(shape.hidden / scale), _round16(shape.ffn / scale),
                 shape.experts, shape.top_k, extra)


@dataclass(frozen=True)
class Case:
    """One configuration to measure: a shape at `tokens` tokens per rank, in `dtype`, timing `mode`."""

    shape: str
    tokens: int
    cfg: MoEConfig
    dtype: torch.dtype
    mode: str = "fwd"
    world_size: int = 1
    preset: str | None = None
    scale: float = 1.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {MODES}")
        if not (isinstance(self.tokens, int) and self.tokens > 0):
            raise ValueError(f"tokens={self.tokens!r}: must be a positive int")

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")
