"""Every environment variable flashmoe_py reads at run time, read here and nowhere else.

| variable | default | meaning |
|---|---|---|
| `TRITON_INTERPRET` | unset | Triton's own switch: "1" runs `@triton.jit` kernels on CPU tensors (tests); read |
| | | when kernels are decorated, so set it before `flashmoe_py.kernels` is first imported |
| `FLASHMOE_DEBUG_POISON` | off | "1": Triton launchers fill every output buffer with NaN (ints: -2**30) first |
| `FLASHMOE_TRITON_TARGET` | unset | launch-config table ("sm_90", "sm_80") instead of the device's own |
| `FLASHMOE_EP_TIMEOUT_S` | 60 | seconds an expert-parallel exchange waits for a peer before raising `ExchangeTimeout` |
| `FLASHMOE_EP_MAX_TOKENS` | 4096 | tokens one rank may pass to one expert-parallel forward; sizes the symmetric heap |
| `FLASHMOE_EP_DEVICE_EXCHANGE` | 1 | "0": the `triton` backend's expert-parallel exchanges over shm / nvshmem are |
| | | host-driven (protocol.py, one host sync per exchange on GPUs) instead of device-initiated |
| `FLASHMOE_FUSED_PUTS` | auto | how the fused kernel writes to peers: "ptr" (stores through peer-mapped |
| | | addresses), "nvshmem" (device NVSHMEM put-with-signal calls; GPU only), "auto" (ptr where every peer is |
| | | mapped, which the shm heap and a one-node NVSHMEM heap guarantee) |
| `FLASHMOE_FUSED_SMS` | all | SMs (programs) the fused kernel's persistent grid takes; fewer leaves SMs free for |
| | | NCCL kernels, another rank's kernel on the same GPU, or other MPS clients (ExpertParallel's `fused_sms=` |
| | | overrides it per layer) |
| `RANK`, `WORLD_SIZE`, `LOCAL_RANK` | - | set by torchrun; read by `flashmoe_py.parallel.launch.init_process_group` |
| | | when no MPI launcher variable below is set (an mpirun job that also exports them is an mpirun job) |
| `MASTER_ADDR`, `MASTER_PORT` | - | torchrun's rendezvous; under mpirun, used when set (multi-node) |
| `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`, `OMPI_COMM_WORLD_LOCAL_RANK` | - | set by Open MPI's mpirun |
| `PMI_RANK`, `PMI_SIZE` | - | set by MPICH / Intel MPI launchers (Hydra) |
| `PMIX_RANK` | - | set by PMIx launchers (Open MPI 5's prterun, `srun --mpi=pmix`); the size then comes from MPI |

Build-time switches (`FLASHMOE_SKIP_EXT`, `FLASHMOE_SKIP_CUDA`, `FLASHMOE_CUDA_ARCHS`, `MAX_JOBS`) are read by
setup.py, which runs before this package exists. Values are read on every call, never cached, so tests may
change them with monkeypatch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def debug_poison() -> bool:
    return os.environ.get("FLASHMOE_DEBUG_POISON", "0") == "1"


def triton_target() -> str | None:
    return os.environ.get("FLASHMOE_TRITON_TARGET") or None


def _positive(name: str, default: float, kind=float):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected a {kind.__name__}") from None
    if value <= 0:
        raise ValueError(f"environment variable {name}={raw!r}: must be > 0")
    return value


def ep_timeout_s() -> float:
    """Default wait timeout of one-sided exchanges (seconds)."""
    return _positive("FLASHMOE_EP_TIMEOUT_S", 60.0)


def ep_max_tokens() -> int:
    """Default `max_tokens_per_rank` of an expert-parallel layer."""
    return _positive("FLASHMOE_EP_MAX_TOKENS", 4096, int)


def ep_device_exchange() -> bool:
    """Whether the `triton` backend's one-sided exchanges are device-initiated where the heap allows it."""
    value = os.environ.get("FLASHMOE_EP_DEVICE_EXCHANGE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"environment variable FLASHMOE_EP_DEVICE_EXCHANGE={value!r}: expected 0 or 1")
    return value == "1"


def fused_puts() -> str:
    """FLASHMOE_FUSED_PUTS: "auto", "ptr" or "nvshmem"."""
    value = os.environ.get("FLASHMOE_FUSED_PUTS", "auto") or "auto"
    if value not in ("auto", "ptr", "nvshmem"):
        raise ValueError(f"environment variable FLASHMOE_FUSED_PUTS={value!r}: expected auto, ptr or nvshmem")
    return value


def fused_sms() -> int | None:
    """FLASHMOE_FUSED_SMS: programs of the fused kernel's persistent grid (None: one per SM)."""
    return _positive("FLASHMOE_FUSED_SMS", None, int) if os.environ.get("FLASHMOE_FUSED_SMS") else None


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in a torchrun or mpirun job (all None outside one)."""

    launcher: str | None  # "torchrun" | "mpirun" | None
    rank: int | None
    world_size: int | None  # None under a PMIx launcher that exports no size: ask MPI (parallel/launch.py)
    local_rank: int | None
    master_addr: str | None
    master_port: str | None


MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def launch_env() -> LaunchEnv:
    """MPI's own variables first: a process started by mpirun is an mpirun rank even when it also has RANK and
    WORLD_SIZE (the usual recipe for torch.distributed's env:// rendezvous under mpirun exports them)."""
    get = os.environ.get

    def num(name: str, default: str | None = None) -> int | None:
        raw = get(name, default)
        return None if raw is None or raw == "" else int(raw)

    addr, port = get("MASTER_ADDR"), get("MASTER_PORT")
    if get("OMPI_COMM_WORLD_RANK") is not None:
        return LaunchEnv("mpirun", num("OMPI_COMM_WORLD_RANK"), num("OMPI_COMM_WORLD_SIZE"),
                         num("OMPI_COMM_WORLD_LOCAL_RANK", "0"), addr, port)
    if get("PMI_RANK") is not None:
        return LaunchEnv("mpirun", num("PMI_RANK"), num("PMI_SIZE"), None, addr, port)
    if get("PMIX_RANK") is not None:
        return LaunchEnv("mpirun", num("PMIX_RANK"), num("PMI_SIZE"), None, addr, port)
    if get("RANK") is not None and get("WORLD_SIZE") is not None:
        return LaunchEnv("torchrun", num("RANK"), num("WORLD_SIZE"), num("LOCAL_RANK", "0"), addr, port)
    return LaunchEnv(None, None, None, None, addr, port)
