"""flashmoe_py: fused GPU kernels for distributed Mixture-of-Experts, with a PyTorch reference path."""

from . import _dist_alias
from .backends import BackendUnavailable, available_backends
from .config import MoEConfig
from .layer import FusedMoE
from .ops import moe
from .records import MoEOutput, MoEParams, MoEStats, Routing

__version__ = "0.1.0"

_dist_alias.install()  # `flashmoe_py.dist[.X]`, deprecated: flashmoe_py.parallel[.X] (flashmoe_py/_dist_alias.py)


__all__ = ["BackendUnavailable", "FusedMoE", "MoEConfig", "MoEOutput", "MoEParams", "MoEStats", "Routing",
           "available_backends", "moe", "__version__"]


def __getattr__(name: str):
    if name == "dist":  # `import flashmoe_py; flashmoe_py.dist`, as it worked while flashmoe_py/dist/ existed
        import importlib

        return importlib.import_module("flashmoe_py.dist")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
