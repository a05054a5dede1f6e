"""Backend registry and selection (DESIGN §3, §4).

A backend is a function `forward(x2d, params, cfg, routing) -> MoEOutput` plus a check that says why it
cannot run on a device. Backends are imported lazily, so importing flashmoe_py touches neither Triton
nor CUDA. `auto` takes the first backend in the device's preference list that can run; a backend named
explicitly that cannot run raises `BackendUnavailable` with the reason, never falls back silently.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

# A `cuda` backend (CUDA C++ from csrc/) gets a name here only once it exists (DESIGN §1); today csrc/ holds the
# signal words of the expert-parallel heaps, not an MoE backend.
BACKEND_NAMES = ("reference", "triton", "fused")


class BackendUnavailable(RuntimeError):
    """The named backend cannot run here; the message says why."""


@dataclass(frozen=True)
class _Entry:
    module: str  # module under flashmoe_py holding `forward` and `unavailable_reason`
    description: str


_REGISTRY: dict[str, _Entry] = {
    "reference": _Entry("reference", "pure PyTorch, any device"),
    "triton": _Entry("triton_backend", "Triton kernels; CUDA, or CPU under TRITON_INTERPRET=1"),
    "fused": _Entry("fused_backend", "one persistent Triton kernel per forward; CUDA, or CPU under TRITON_INTERPRET=1"),
}

# Which backends `auto` tries, fastest first, by device type.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("fused", "triton", "reference"), "cpu": ("reference",)}


def _module(name: str):
    return importlib.import_module(f"flashmoe_py.{_REGISTRY[name].module}")


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on `device`, else a sentence saying why not."""
    if name not in BACKEND_NAMES:
        return f"unknown backend; choose one of {('auto',) + BACKEND_NAMES}"
    check = getattr(_module(name), "unavailable_reason", None)
    return check(device) if check is not None else None


def built_backends() -> tuple[str, ...]:
    """The backends this build of flashmoe_py includes, whether or not they can run on this machine."""
    return tuple(n for n in BACKEND_NAMES if n in _REGISTRY)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    return [n for n in BACKEND_NAMES if unavailable_reason(n, device) is None]


def _layer_reason(name: str, cfg, expert_parallel, auto: bool) -> str | None:
    """Why backend `name` does not take this layer (a module's optional `unsupported_reason(cfg, ep)`, and for
    `auto` its optional `auto_reason(cfg, ep)`), or None."""
    if cfg is None:
        return None
    module = _module(name)
    check = getattr(module, "auto_reason" if auto else "unsupported_reason", None)
    if check is None and auto:
        check = getattr(module, "unsupported_reason", None)
    return check(cfg, expert_parallel) if check is not None else None


def resolve(name: str, device: torch.device | str, cfg=None, expert_parallel=None) -> str:
    """The concrete backend `name` stands for on `device` (`auto` resolved); raises if it cannot run.
    With the layer's cfg (and expert_parallel), backends that cannot take that layer are skipped / refused."""
    device = torch.device(device)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device) is None and \
                    _layer_reason(candidate, cfg, expert_parallel, auto=True) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(name, device) or _layer_reason(name, cfg, expert_parallel, auto=False)
    if reason is not None:
        raise BackendUnavailable(f"backend={name!r} cannot run on {device}: {reason}")
    return name


def handles_expert_parallel(name: str) -> bool:
    """True when the backend's forward takes `expert_parallel=` itself (it moves rows between ranks inside its
    kernel) instead of running under the transport's host-driven dispatch/return."""
    return getattr(_module(name), "HANDLES_EXPERT_PARALLEL", False)


def forward_fn(name: str) -> Callable:
    return _module(name).moe_forward


def expert_ffn_fn(name: str) -> Callable:
    """The backend's `expert_ffn(rows, counts, params, activation)`: local experts on rows grouped by
    expert (what expert parallelism runs on the rows it receives)."""
    return _module(name).expert_ffn
