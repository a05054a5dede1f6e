"""Triton device code of flashmoe_py, installed as `flashmoe_py.kernels` (never as a top-level package).

Only `flashmoe_py.triton_backend` imports this package (and fused_moe.py and exchange.py, below, have one
importer each); they launch the kernels and own all host logic.
Whether the kernels run compiled or in Triton's CPU interpreter is fixed when this package is first
imported (Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function).

  routing.py   route_kernel, hist_kernel, scatter_kernel, capacity_kernel
  experts.py   up_kernel, rows_gemm_kernel, act_grad_kernel, weight_grad_kernel
  combine.py   combine_kernel
  common.py    helpers called from the kernels (tile lookup, activations, the dot)
  configs.py   launch-configuration tables per target and regime
  fused_moe.py the persistent fused kernel (DESIGN §6); not imported here: flashmoe_py.fused_backend is its
               only importer, so the Triton backend never compiles or loads it
  exchange.py  the device-initiated expert-parallel exchanges (puts, collects); not imported here: its only
               importer is flashmoe_py.parallel.device_exchange
  signals.py   the waits on signal words and the abort path, shared by fused_moe.py and exchange.py
  nvshmem.py, nvshmem_shim.ll  NVSHMEM device calls for Triton (extern wrappers over the device bitcode)
"""

from . import configs
from .combine import combine_kernel
from .experts import act_grad_kernel, rows_gemm_kernel, up_kernel, weight_grad_kernel
from .routing import capacity_kernel, hist_kernel, route_kernel, scatter_kernel

__all__ = ["act_grad_kernel", "capacity_kernel", "combine_kernel", "configs", "hist_kernel", "route_kernel",
           "rows_gemm_kernel", "scatter_kernel", "up_kernel", "weight_grad_kernel"]
