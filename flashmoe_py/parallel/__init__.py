"""Expert parallelism (DESIGN §5): placement, symmetric heaps, the one-sided protocol and its transports.

Modules: `expert_parallel` (ExpertParallel: placement + transport state of a layer), `forward` (the
expert-parallel forward and its autograd Function), `layout` (the heap layouts), `heap` (the heap
interface and errors), `protocol` (one-sided dispatch/return), `shm`, `mpi`, `nvshmem` (heaps),
`alltoall` (the bulk-synchronous baseline), `transports` (registry), `launch` (torchrun/mpirun start-up).
Nothing here imports mpi4py, nvshmem4py or CUDA until a transport that needs it is used.
"""

from .expert_parallel import ExpertParallel
from .heap import ExchangeTimeout, HeapOverflow, SymmetricHeap, TransportUnavailable
from .launch import init_process_group
from .layout import HeapLayout, TokenLayout
from .transports import TRANSPORT_NAMES

__all__ = ["ExchangeTimeout", "ExpertParallel", "HeapLayout", "HeapOverflow", "SymmetricHeap", "TRANSPORT_NAMES",
           "TokenLayout", "TransportUnavailable", "init_process_group"]
