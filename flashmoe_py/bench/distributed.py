"""Expert-parallel runs: `--world-size N` spawns N CPU ranks (torch.multiprocessing, gloo); under torchrun
the launched ranks are used (NCCL on GPUs, gloo on CPUs).

Each rank builds the same weights (same seed), draws its own tokens, and for every transport constructs
`FusedMoE(cfg, backend=b, process_group=pg, transport=t)` holding its slice of the experts. A backend that
cannot run here or a construction that raises on any rank makes that row `unavailable`, a forward that raises
makes it `error`, with the reason -- never a silent drop. The gate compares each rank's output with the
single-process reference on that rank's tokens (and in the bwd modes dx and the local experts' weight
gradients, summed over ranks); the worst rank decides. Timing: each round, for each transport, barrier ->
timed call -> the per-call time is the slowest rank's. Wire bytes: `layer.stats.bytes_sent` summed over ranks,
against the least any transport must move (counting.py). Ceilings are measured on all ranks at once and
summed. Rows are built on rank 0.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import backends as registry
from ..layer import FusedMoE
from ..routing import route
from . import counting
from .candidates import Problem, builder, make_problem
from .runner import (
    Plan,
    Progress,
    add_speedups,
    ceiling_metrics,
    make_step,
    max_error,
    outputs,
    timed_metrics,
    tolerance,
)
from .schema import config_dict, new_row
from .shapes import Case
from .timing import Ceilings, Step, measure_ceilings, synchronize

TIMEOUT = datetime.timedelta(seconds=300)
_EXPERT_PARAMS = ("w_up", "w_down", "b_up", "b_down")


def default_transports(device: torch.device) -> list[str]:
    return ["alltoall", "nvshmem"] if device.type == "cuda" else ["alltoall", "shm", "mpi"]


class _LayerImpl:
    """A FusedMoE on this rank, in the shape runner.make_step/outputs expect."""

    def __init__(self, layer: FusedMoE, pb: Problem, rank: int, world: int):
        self.layer = layer
        self.forward = layer
        self.leaves = [p for p in layer.parameters() if p.requires_grad]
        e_local = pb.case.cfg.num_experts // world
        self._slice = slice(rank * e_local, (rank + 1) * e_local)

    def grads(self) -> dict[str, torch.Tensor]:
        # Only the local experts' weight gradients: the router's is per-rank data-parallel (no agreed sum).
        return {n: p.grad for n, p in self.layer.named_parameters() if n in _EXPERT_PARAMS and p.grad is not None}


def _build_layer(pb: Problem, backend: str, transport: str, pg, rank: int, world: int, factory) -> _LayerImpl:
    cfg = pb.case.cfg
    layer = factory(cfg, backend=backend, process_group=pg, transport=transport, device=pb.device,
                     dtype=pb.case.dtype)
    e_local = cfg.num_experts // world
    local = slice(rank * e_local, (rank + 1) * e_local)
    with torch.no_grad():
        for name, full in pb.params.tensors().items():
            mine = getattr(layer, name)
            mine.copy_(full[local] if name in _EXPERT_PARAMS else full)
    layer.requires_grad_(pb.needs_grad)
    return _LayerImpl(layer, pb, rank, world)


def _expected(pb: Problem, rank: int, world: int) -> dict[str, torch.Tensor]:
    """The reference on this rank's tokens with all experts; expert gradients summed over ranks, sliced."""
    want = outputs(builder("reference")(pb), pb)
    e_local = pb.case.cfg.num_experts // world
    for name in list(want):
        param = name.removeprefix("grad ")
        if name.startswith("grad ") and param != "x":
            full = want.pop(name)
            if param in _EXPERT_PARAMS:
                dist.all_reduce(full)
                want[name] = full[rank * e_local:(rank + 1) * e_local]
    return want


def _agree(status: str | None, reason: str | None, rank: int, world: int) -> tuple[str | None, str | None]:
    """Every rank's (status, reason); the first rank that did not succeed speaks for all."""
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (status, reason))
    for r, (s, why) in enumerate(gathered):
        if s is not None:
            return s, f"rank {r}: {why}"
    return None, None


def _ceilings(device: torch.device, dtype: torch.dtype, quick: bool) -> Ceilings:
    dist.barrier()
    c = measure_ceilings(device, dtype, quick)
    t = torch.tensor([c.matmul_flops_per_s, c.copy_bytes_per_s], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return Ceilings(float(t[0]), float(t[1]))


def _time_ranks(steps: dict[str, Step], device: torch.device, plan: Plan, progress: Progress) -> dict:
    """Interleaved rounds; a call's time is the slowest rank's (barrier before each call)."""
    names = list(steps)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(plan.warmup + plan.repeats):
        shift = r % len(names) if names else 0
        for n in names[shift:] + names[:shift]:
            i = r % plan.input_sets
            steps[n].before(i)
            synchronize(device)
            dist.barrier()
            t0 = time.perf_counter()
            steps[n].timed(i)
            synchronize(device)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if r >= plan.warmup:
                samples[n].append(float(dt))
            progress.advance()
    return samples


def _sum(v: float, device: torch.device) -> float:
    t = torch.tensor([float(v)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def run_cases(cases: list[Case], backends: list[str], transports: list[str], device: torch.device, plan: Plan,
              header: dict | None, progress: Progress | None = None, pg=None, layer_factory=None) -> list[dict]:
    """Rows (on rank 0; [] elsewhere) for each case x backend x transport, over the ranks of `pg` (default
    group). Rows are named "backend/transport"; `alltoall` rows are the baselines. `layer_factory` (default
    FusedMoE) is called like FusedMoE(cfg, backend=, process_group=, transport=, device=, dtype=)."""
    factory = FusedMoE if layer_factory is None else layer_factory
    progress = progress or Progress()
    pg = dist.group.WORLD if pg is None else pg  # the layer must see a group: None means one rank to it
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    rows: list[dict] = []
    ceilings: dict[torch.dtype, Ceilings] = {}
    for case in cases:
        cfg = case.cfg
        if case.dtype not in ceilings:
            ceilings[case.dtype] = _ceilings(device, case.dtype, plan.quick_ceilings)
        ceil = ceilings[case.dtype]
        per = plan.warmup + plan.repeats + 1
        progress.add(per * len(backends) * len(transports))
        pb = make_problem(case, device, plan.input_sets, plan.seed, input_seed=plan.seed + 1000 * (rank + 1))
        want = _expected(pb, rank, world)
        tol = tolerance(case.dtype, device)

        # Work over all ranks: matmul FLOPs and activations per rank, each hit expert's weights once.
        with torch.no_grad():
            r0 = route(pb.inputs[0], pb.params.router_weight, pb.params.expert_bias, cfg)
        a, _ = counting.routing_counts(r0.topk_ids, r0.kept, cfg.num_experts)
        hits = torch.bincount(r0.topk_ids[r0.kept], minlength=cfg.num_experts).to(torch.float64)
        dist.all_reduce(hits)
        hit_global = int((hits > 0).sum())
        itemsize, ritem = pb.inputs[0].element_size(), pb.params.router_weight.element_size()
        per_rank = counting.work(cfg, case.tokens, a, 0, itemsize, case.mode, router_itemsize=ritem)
        expert_bytes = (counting.weight_bytes(cfg, hit_global, itemsize, ritem)
                        - counting.weight_bytes(cfg, 0, itemsize, ritem))
        passes = {"fwd": 1, "bwd": 2, "fwdbwd": 3}[case.mode]
        work = counting.Work(_sum(per_rank.flops, device),
                             _sum(per_rank.min_bytes, device) + passes * expert_bytes)
        pairs = counting.remote_pairs(r0.topk_ids, r0.kept, cfg.num_experts, world, rank)
        remote = counting.remote_assignments(r0.topk_ids, r0.kept, cfg.num_experts, world, rank)
        wire_min = counting.wire_min_bytes(int(_sum(pairs, device)), cfg.hidden_size, itemsize,
                                           int(_sum(remote, device)), 8 if itemsize == 8 else 4)

        impls, results = {}, {}
        pairs_run = [(b, t) for b in backends for t in transports]
        for b, t in pairs_run:
            name = f"{b}/{t}"
            progress.describe(f"{case.shape} T={case.tokens} x{world} ranks: checking {name}")
            status, reason, err, wire = None, None, None, None
            backend_reason = registry.unavailable_reason(b, pb.device)
            try:
                if backend_reason is not None:  # the layer would only find out at its first forward
                    raise registry.BackendUnavailable(f"backend={b!r} cannot run on {pb.device}: {backend_reason}")
                impl = _build_layer(pb, b, t, pg, rank, world, factory)
            except Exception as e:  # the layer cannot run this backend or transport here
                status, reason = "unavailable", f"{type(e).__name__}: {e}"
            status, reason = _agree(status, reason, rank, world)
            if status is None:
                sent = None
                try:
                    err, where = max_error(outputs(impl, pb), want)
                    if not err <= tol:
                        status, reason = "failed", f"{where}: relative error {err:.3g} > tolerance {tol:.0e}"
                    sent = getattr(impl.layer.stats, "bytes_sent", None)
                    sent = None if sent is None else int(sent)  # a device tensor on the device-initiated path
                except Exception as e:
                    status, reason = "error", f"{type(e).__name__}: {e}"
                status, reason = _agree(status, reason, rank, world)
                gathered: list = [None] * world
                dist.all_gather_object(gathered, (err, sent))
                if all(e is not None for e, _ in gathered):
                    err = max(e for e, _ in gathered)
                if all(s is not None for _, s in gathered):
                    wire = float(sum(s for _, s in gathered))
            progress.advance(1)
            if status is None:
                impls[name] = impl
            else:
                progress.advance(per - 1)
            results[name] = (t, status, reason, err, wire)

        steps = {n: make_step(impl, pb) for n, impl in impls.items()}
        samples = _time_ranks(steps, device, plan, progress)
        if rank != 0:
            continue
        common = {"flops": work.flops, "min_bytes": work.min_bytes, "tolerance": tol, **ceiling_metrics(ceil)}
        case_rows = []
        for name, (t, status, reason, err, wire) in results.items():
            config = config_dict(case, t, plan.repeats, plan.warmup, plan.input_sets)
            kind = "baseline" if t == "alltoall" else "ours"
            if status is not None:
                case_rows.append(new_row(header, config, name, kind, status, reason, max_rel_err=err, **common))
                continue
            case_rows.append(new_row(header, config, name, kind, "ok", None, max_rel_err=err, wire_bytes=wire,
                                     wire_min_bytes=wire_min,
                                     **timed_metrics(samples[name], work, world * case.tokens, ceil), **common))
        add_speedups(case_rows)
        rows.extend(case_rows)
    return rows


# ---- launching -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_rank(rank: int, world: int, init_method: str, spec: dict, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=TIMEOUT)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        progress = None
        if rank == 0 and spec["show_progress"]:
            from .report import RichProgress
            progress = RichProgress()
            progress.__enter__()
        try:
            rows = run_cases(spec["cases"], spec["backends"], spec["transports"], torch.device("cpu"), spec["plan"],
                             spec["header"], progress, layer_factory=spec.get("layer_factory"))
        finally:
            if progress is not None:
                progress.__exit__(None, None, None)
        if rank == 0:
            Path(out_path).write_text(json.dumps(rows))
        dist.barrier()  # leave together: tearing gloo down while a peer still works was seen to abort at exit
    finally:
        dist.destroy_process_group()


def spawn(world: int, cases: list[Case], backends: list[str], transports: list[str], plan: Plan, header: dict,
          show_progress: bool = True, layer_factory=None) -> list[dict]:
    """Run the cases on `world` fresh CPU processes joined by gloo; returns rank 0's rows. `layer_factory`
    must be picklable (a module-level class or function)."""
    import torch.multiprocessing as mp

    spec = {"cases": cases, "backends": backends, "transports": transports, "plan": plan, "header": header,
            "show_progress": show_progress, "layer_factory": layer_factory}
    with tempfile.TemporaryDirectory() as tmp:
        out_path = str(Path(tmp) / "rows.json")
        mp.spawn(_spawned_rank, args=(world, f"tcp://127.0.0.1:{_free_port()}", spec, out_path), nprocs=world,
                 join=True)
        return json.loads(Path(out_path).read_text())


def launched() -> bool:
    """True when this process is one of the ranks torchrun or mpirun started (MPI's own variables first, as the
    `mpi` transport reads them); spawning more ranks from such a process would start ranks nobody joins."""
    from .. import env

    return dist.is_available() and (dist.is_torchelastic_launched() or env.launch_env().launcher is not None)


def init_launched() -> torch.device:
    """Join the launcher's process group (NCCL on GPUs, gloo on CPUs); returns this rank's device."""
    from ..parallel.launch import init_process_group

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    init_process_group(backend, timeout_s=TIMEOUT.total_seconds())
    if torch.cuda.is_available():
        device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")
