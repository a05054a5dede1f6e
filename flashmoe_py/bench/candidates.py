"""What the benchmark can time, by name, and how to build each on one `Problem`.

Every candidate computes the same layer: the full forward of DESIGN §2 (router, experts, combine,
shared expert) on x [T, H]. Our backends go through `flashmoe_py.moe`; the expert-only baselines are
wrapped with the reference router and shared expert. Our backends come from the registry
(`flashmoe_py.backends`), so a backend that registers itself shows up here without changes.

A builder returns an `Impl` or raises `Unavailable` saying why the candidate cannot run here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import backends
from ..config import MoEConfig
from ..ops import moe
from ..records import MoEParams
from ..reference import shared_expert
from ..routing import route
from . import baselines
from .shapes import Case


class Unavailable(RuntimeError):
    """The candidate cannot run on this device/config; the message says why."""


@dataclass
class Problem:
    """The inputs every candidate of one case shares.

    params     MoEParams, leaves in the layer dtype (requires_grad in the bwd modes)
    inputs     input_sets tensors x [T, H] in the layer dtype, random (requires_grad in the bwd modes)
    grad_outs  as many dy [T, H] for the backward
    """

    case: Case
    device: torch.device
    params: MoEParams
    inputs: list[torch.Tensor]
    grad_outs: list[torch.Tensor]

    @property
    def needs_grad(self) -> bool:
        return self.case.mode != "fwd"


@dataclass
class Impl:
    """A built candidate. `forward(x) -> out [T, H]`; after a backward, `grads()` returns the gradients of
    our parameters by name in our layout, and `leaves` are the tensors whose .grad to clear between calls."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    leaves: list[torch.Tensor] = field(default_factory=list)
    grads: Callable[[], dict[str, torch.Tensor]] = dict


# The last weights made, reused while consecutive cases differ only in their tokens (the sweep's order):
# drawing a decode shape's 400 MB of weights costs seconds on a CPU.
_last_weights: dict = {}


def _weights(cfg: MoEConfig, dtype: torch.dtype, device: torch.device, seed: int, grad: bool) -> dict:
    key = (cfg, dtype, device, seed, grad)
    if key in _last_weights:
        return _last_weights[key]
    _last_weights.clear()
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    h, i, e = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts
    p = {"router_weight": rnd(e, h, scale=h ** -0.5), "w_up": rnd(e, h, cfg.up_size, scale=h ** -0.5),
         "w_down": rnd(e, i, h, scale=i ** -0.5)}
    if cfg.expert_bias:
        p["expert_bias"] = (torch.randn(e, generator=g) * 0.01).to(device)
    if cfg.bias:
        p["b_up"], p["b_down"] = rnd(e, cfg.up_size, scale=0.1), rnd(e, h, scale=0.1)
    if cfg.num_shared_experts:
        p["shared_w_up"] = rnd(h, cfg.shared_up_size, scale=h ** -0.5)
        p["shared_w_down"] = rnd(cfg.shared_hidden_size, h, scale=cfg.shared_hidden_size ** -0.5)
    if cfg.shared_expert_gate:
        p["shared_gate_weight"] = rnd(1, h, scale=h ** -0.5)
    for n, t in p.items():
        t.requires_grad_(grad and n != "expert_bias")
    _last_weights[key] = p
    return p


def make_problem(case: Case, device: torch.device, input_sets: int, seed: int, input_seed: int | None = None
                 ) -> Problem:
    """Random weights at nn.Linear scale (never zeros) from `seed`, and `input_sets` random inputs from
    `input_seed` (default seed + 1; expert-parallel ranks share the weights and draw their own tokens)."""
    grad = case.mode != "fwd"
    p = _weights(case.cfg, case.dtype, device, seed, grad)
    for t in p.values():
        t.grad = None
    g = torch.Generator(device="cpu").manual_seed(seed + 1 if input_seed is None else input_seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=case.dtype)

    inputs = [rnd(case.tokens, case.cfg.hidden_size).requires_grad_(grad) for _ in range(input_sets)]
    grad_outs = [rnd(case.tokens, case.cfg.hidden_size) for _ in range(input_sets)] if grad else []
    return Problem(case, device, MoEParams.from_mapping(p), inputs, grad_outs)


def _param_leaves(params: MoEParams) -> list[torch.Tensor]:
    return [t for t in params.tensors().values() if t.requires_grad]


def _param_grads(params: MoEParams) -> dict[str, torch.Tensor]:
    return {n: t.grad for n, t in params.tensors().items() if t.requires_grad and t.grad is not None}


def _with_router_and_shared(experts: Callable, params: MoEParams, cfg: MoEConfig) -> Callable:
    """The full layer around an expert-only baseline: reference router, capacity as zero weights,
    shared expert, output in x.dtype."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        r = route(x, params.router_weight, params.expert_bias, cfg)
        weights = r.topk_weights.masked_fill(~r.kept, 0.0)
        out = experts(x, r.topk_ids, weights)
        if cfg.num_shared_experts:
            out = out.float() + shared_expert(x, params, cfg)
        return out.to(x.dtype)
    return forward


def build_backend(name: str) -> Callable[[Problem], Impl]:
    """Our backend `name` through the functional API."""
    def build(pb: Problem) -> Impl:
        reason = backends.unavailable_reason(name, pb.device)
        if reason is not None:
            raise Unavailable(reason)
        p, cfg = pb.params, pb.case.cfg
        return Impl(lambda x: moe(x, p, cfg, backend=name).out, _param_leaves(p), lambda: _param_grads(p))
    return build


def build_naive_loop(pb: Problem) -> Impl:
    p, cfg = pb.params, pb.case.cfg
    experts = lambda x, ids, w: baselines.naive_loop(x, p, cfg, ids, w)  # noqa: E731
    return Impl(_with_router_and_shared(experts, p, cfg), _param_leaves(p), lambda: _param_grads(p))


def build_torch_grouped_mm(pb: Problem) -> Impl:
    p, cfg = pb.params, pb.case.cfg
    reason = baselines.grouped_mm_unavailable(cfg, pb.case.dtype)
    if reason is not None:
        raise Unavailable(reason)
    if pb.needs_grad and pb.device.type == "cpu":
        with torch.no_grad():
            for x in pb.inputs:
                r = route(x, p.router_weight, p.expert_bias, cfg)
                idle = cfg.num_experts - int(torch.unique(r.topk_ids).numel())
                if idle:
                    raise Unavailable(f"torch grouped_mm's CPU backward rejects empty groups, and {idle} experts "
                                      "get no rows here")
    experts = lambda x, ids, w: baselines.grouped_mm_experts(x, p, cfg, ids, w)  # noqa: E731
    return Impl(_with_router_and_shared(experts, p, cfg), _param_leaves(p), lambda: _param_grads(p))


def _memory_budget(device: torch.device) -> int:
    """Bytes a baseline may allocate for one call: a quarter of free device memory (CUDA); on a CPU a
    quarter of the available memory, at most 1 GiB (touching fresh pages costs more than the math there)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(1 << 30, int(line.split()[1]) * 1024 // 4)
    except OSError:
        pass
    return 1 << 30


def build_hf(impl: str) -> Callable[[Problem], Impl]:
    """transformers' experts implementation `impl` on copies of our expert weights in its layout."""
    def build(pb: Problem) -> Impl:
        cfg = pb.case.cfg
        reason = baselines.hf_unavailable(impl, cfg)
        if reason is not None:
            raise Unavailable(reason)
        if impl == "batched_mm":
            need = baselines.batched_mm_bytes(cfg, pb.case.tokens, pb.inputs[0].element_size())
            budget = _memory_budget(pb.device)
            if need > budget:
                raise Unavailable(f"gathers {need / 2**30:.1f} GiB of weights per call (T*k*(N_up+I)*H), over "
                                  f"the {budget / 2**30:.1f} GiB allowed here")
        experts = baselines.HFExperts(impl, pb.params, cfg, pb.needs_grad)
        p = pb.params
        others = [t for n, t in p.tensors().items() if t.requires_grad and n not in ("w_up", "w_down")]

        def grads() -> dict[str, torch.Tensor]:
            g = {n: v for n, v in _param_grads(p).items() if n not in ("w_up", "w_down")}
            return {**g, **experts.grads()}
        return Impl(_with_router_and_shared(experts, p, cfg), others + experts.leaves(), grads)
    return build


# Baselines by name; `reference` is both our backend and the baseline every other row is checked against.
BASELINES: dict[str, Callable[[Problem], Impl]] = {
    "reference": build_backend("reference"),
    "naive_loop": build_naive_loop,
    "torch_grouped_mm": build_torch_grouped_mm,
    **{f"hf_{impl}": build_hf(impl) for impl in baselines.HF_IMPLEMENTATIONS},
}


def our_backends() -> tuple[str, ...]:
    """Every backend name the package knows, except the reference (listed with the baselines)."""
    return tuple(n for n in backends.BACKEND_NAMES if n != "reference")


def all_names() -> tuple[str, ...]:
    return tuple(BASELINES) + our_backends()


def default_names(device: torch.device) -> list[str]:
    """The baselines plus each of our backends this build includes; those that cannot run on `device`
    (e.g. `triton` on a CPU) get a row saying why, so the table shows what a GPU would add."""
    return list(BASELINES) + [n for n in backends.built_backends() if n != "reference"]


def builder(name: str) -> Callable[[Problem], Impl]:
    if name in BASELINES:
        return BASELINES[name]
    if name in our_backends():
        return build_backend(name)
    raise ValueError(f"backend {name!r}: choose from {all_names()}")


def kind_of(name: str) -> str:
    return "baseline" if name in BASELINES else "ours"
