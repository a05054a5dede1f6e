"""transformers integration: run transformers MoE models on flashmoe_py.

Two ways in, both without downloads or changes to the model's code:

- `register()` adds "flashmoe" to transformers' experts registry; then
  `model.set_experts_implementation("flashmoe")` (or `from_pretrained(..., experts_implementation="flashmoe")`)
  runs the experts modules of any family whose layout and activation we support through
  `flashmoe_py.ops.moe`, with the model's own routing.
- `patch(model)` replaces whole sparse-MoE blocks (router + experts + shared expert) of the supported
  families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, gpt-oss) by one FusedMoE each, with our fused routing;
  `from_hf(block)` converts a single block.

transformers is imported only when one of these functions runs: importing flashmoe_py (or this package)
never imports it.
"""

from __future__ import annotations

from .blocks import FlashMoEBlock, PatchResult, from_hf, patch, supported_blocks
from .experts import UnsupportedHFModule, clear_cache, make_experts_forward

REGISTRY_NAME = "flashmoe"


def register(name: str = REGISTRY_NAME, *, backend: str = "auto") -> str:
    """Register the flashmoe experts implementation in transformers under `name`, running `backend`; returns
    `name`. Calling it again replaces the entry (e.g. to change the backend)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(name, make_experts_forward(backend))
    return name


__all__ = ["REGISTRY_NAME", "FlashMoEBlock", "PatchResult", "UnsupportedHFModule", "clear_cache", "from_hf", "patch",
           "register", "supported_blocks"]
