"""Triton launches and torch kernels of one layer call, per forward and per training step, on any device.

    python -m flashmoe_py.bench.opcount [--backend triton] [--dtype bf16] [--markdown]

Counts what one call issues, which is the same on a CPU (under TRITON_INTERPRET=1, where the timing sweep cannot
run the Triton backends) as on a GPU: the torch operators that run a kernel (views, allocations and
`torch.empty`-like ops are free and not counted; a custom op counts as the torch kernels inside it; Triton's own
interpreter copies around a launch are not counted) and the Triton launches (counted at `triton_backend._run`,
where the Triton backend launches every kernel). Cases: inference forward, the same with capacity, and a
training step (forward + backward of sum(out^2) + aux_loss) with the loss coefficients 0 and non-zero.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FREE_OPS = frozenset({
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "reshape", "alias", "as_strided", "detach",
    "unsqueeze", "squeeze", "select", "slice", "split", "chunk", "unbind", "empty", "empty_strided", "empty_like",
    "new_empty", "new_empty_strided", "lift_fresh", "_reshape_alias", "view_as", "flatten", "unflatten",
    "is_same_size"})


class OpCounter(TorchDispatchMode):
    """Counts torch kernels (`ops`, by operator name) and Triton backend launches (`launches`, by launch name) while
    active. Install with `counting()`."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.launches: collections.Counter = collections.Counter()
        self._inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from .. import triton_backend

        kwargs = kwargs or {}
        if func.namespace == "flashmoe_triton":  # a custom op: its implementation, counted op by op
            impl = getattr(triton_backend, func.overloadpacket.__name__ + "_impl", None)
            if impl is not None:
                with self:
                    return impl(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name not in FREE_OPS and not self._inside:
            self.ops[name] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting():
    """Yields an OpCounter counting everything in the block (the Triton backend's launcher wrapped meanwhile)."""
    from .. import triton_backend

    counter = OpCounter()
    run = triton_backend._run

    def counted(launch):
        counter.launches[launch.name] += 1
        counter._inside += 1
        try:
            return run(launch)
        finally:
            counter._inside -= 1

    triton_backend._run = counted
    try:
        with counter:
            yield counter
    finally:
        triton_backend._run = run


CASES = (
    ("forward", False, {}),
    ("forward, capacity 1.25", False, dict(capacity_factor=1.25)),
    ("training step", True, {}),
    ("training step, loss coefs > 0", True, dict(aux_loss_coef=0.01, z_loss_coef=0.001)),
)


def count_call(backend: str, dtype: torch.dtype, train: bool, device="cpu", **overrides) -> OpCounter:
    """One call of a small layer (H=32, I=16, E=8, k=2, T=40) after a warm-up call, counted."""
    from ..config import MoEConfig
    from ..layer import FusedMoE

    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=8, top_k=2, **overrides)
    torch.manual_seed(0)
    layer = FusedMoE(cfg, backend=backend, dtype=dtype, device=device)
    x = torch.randn(40, 32, dtype=dtype, device=device, requires_grad=train)
    layer(x)
    with counting() as counter:
        if train:
            y = layer(x)
            (y.float().square().sum() + layer.aux_loss).backward()
        else:
            with torch.no_grad():
                layer(x)
    return counter


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table (for the README)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows = []
    for name, train, overrides in CASES:
        c = count_call(args.backend, dtype, train, device, **overrides)
        rows.append((name, sum(c.launches.values()), sum(c.ops.values()), c))
    if args.markdown:
        print(f"| {args.backend} {args.dtype} | Triton launches | torch kernels |\n|---|---|---|")
        for name, n_launch, n_ops, _ in rows:
            print(f"| {name} | {n_launch} | {n_ops} |")
    else:
        for name, n_launch, n_ops, c in rows:
            print(f"{name:32} Triton {n_launch:3d}  torch {n_ops:3d}  {dict(c.launches)}  {dict(c.ops)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
