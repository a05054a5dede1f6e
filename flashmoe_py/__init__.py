"""flashmoe_py: fused GPU kernels for distributed Mixture-of-Experts, with a PyTorch reference path."""

from .backends import BackendUnavailable, available_backends
from .config import MoEConfig
from .layer import FusedMoE
from .ops import moe
from .records import MoEOutput, MoEParams, MoEStats, Routing

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "FusedMoE", "MoEConfig", "MoEOutput", "MoEParams", "MoEStats", "Routing",
           "available_backends", "moe", "__version__"]
