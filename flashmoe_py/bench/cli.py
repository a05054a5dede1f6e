"""`flashmoe-bench`: every backend and transport against the alternatives, in one run.

Times the full MoE layer forward (and backward with --mode) of each candidate on the same weights and
inputs: our backends from the registry (`reference` and whatever else can run on the device), the naive
per-expert loop, transformers' experts implementations, torch grouped_mm; with --world-size, each
backend over each expert-parallel transport (`alltoall` is the baseline). Every candidate's output is
checked against the reference once per case before it is timed. Reports latency quantiles, tokens/s,
TFLOP/s, roofline efficiency against the ceilings measured in the same run, launches, syncs, peak memory
and, distributed, bytes on the wire; appends rows to bench/results/<device>.jsonl.

  flashmoe-bench                                   # the default sweep on this device
  flashmoe-bench --preset qwen3-30b-a3b --scale 4 --tokens 128 1024 --dtype bfloat16
  flashmoe-bench --world-size 2 --tokens 256 --hidden 256 --ffn 128 --experts 16 --top-k 4
  flashmoe-bench compare old.json new.json         # row-by-row ratios of two result files
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .. import backends
from . import candidates, distributed
from .counting import MODES
from .report import RichProgress, markdown_table, plot, print_table
from .report import console as report_console
from .runner import Plan, apply_ceilings, run_case
from .schema import append_jsonl, run_header, write_json_csv
from .shapes import DEFAULT_SWEEP, DTYPES, FINE_GRAINED, PRESETS, Case, Shape, scaled
from .timing import Ceilings, measure_ceilings

# Token counts for a preset when --tokens is not given: a decode-sized and a prefill-sized batch.
PRESET_TOKENS = {"cpu": [64, 512], "cuda": [256, 4096]}


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{s!r}: must be a positive int")
    return v


def _scale(s: str) -> float:
    v = float(s)
    if not v >= 1:
        raise argparse.ArgumentTypeError(f"{s!r}: must be >= 1 (it divides H and I)")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flashmoe-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = ap.add_argument_group("shapes (default: the sweep of shapes.DEFAULT_SWEEP for the device)")
    shape.add_argument("--preset", nargs="+", choices=sorted(PRESETS) + ["all"],
                       help="real model MoE layers (see flashmoe_py/bench/shapes.py)")
    shape.add_argument("--scale", type=_scale, default=1.0, help="divide H, I (and shared width) by this")
    shape.add_argument("--tokens", type=_positive_int, nargs="+", help="tokens per rank (several: a sweep)")
    shape.add_argument("--hidden", type=_positive_int, help="H (a custom shape; unset sizes from fine-grained)")
    shape.add_argument("--ffn", type=_positive_int, help="I, each expert's inner width")
    shape.add_argument("--experts", type=_positive_int, help="E, routed experts")
    shape.add_argument("--top-k", type=_positive_int, help="k, experts per token")
    shape.add_argument("--activation", choices=["swiglu", "geglu", "gelu", "relu", "silu"],
                       help="expert activation (default: the shape's, swiglu)")
    shape.add_argument("--shared-experts", type=int, help="shared experts (default: the shape's)")
    what = ap.add_argument_group("what runs")
    what.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32"])
    what.add_argument("--mode", nargs="+", choices=MODES, default=["fwd"],
                      help="fwd: forward (no autograd); bwd: backward of a forward done untimed; fwdbwd: both")
    what.add_argument("--backend", nargs="+", default=["all"], metavar="NAME",
                      help=f"candidates: all (default), baselines, ours, or names from {candidates.all_names()}")
    what.add_argument("--transport", nargs="+", metavar="NAME",
                      help="expert-parallel transports (default: alltoall shm mpi on CPU, alltoall nvshmem on GPU)")
    what.add_argument("--world-size", type=_positive_int, default=1,
                      help="spawn this many CPU ranks (gloo); under torchrun or mpirun the launched ranks are used")
    what.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    what.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice); on a "
                      "machine shared with other work, fewer threads than cores avoids waits for descheduled ones")
    how = ap.add_argument_group("timing")
    how.add_argument("--repeats", type=_positive_int, help="timed rounds at least (default: 5 on CPU, 30 on GPU)")
    how.add_argument("--warmup", type=int, help="untimed rounds first (default: 1 on CPU, 5 on GPU)")
    how.add_argument("--min-time", type=float, help="seconds of timed calls to aim for per candidate; fast "
                     "cases get more rounds, up to 10x --repeats (default: 1 on CPU, 0.2 on GPU)")
    how.add_argument("--input-sets", type=_positive_int, default=3, help="inputs rotated between rounds")
    how.add_argument("--seed", type=int, default=0)
    how.add_argument("--ceilings", choices=["full", "quick"], default="full",
                     help="quick: a small GEMM and copy for smoke tests (efficiency then only indicative)")
    out = ap.add_argument_group("output ({device} in a path becomes the device's file name, e.g. cpu-amd-epyc)")
    out.add_argument("--out", metavar="STEM", help="write STEM.json and STEM.csv")
    out.add_argument("--plot", metavar="PNG", help="draw latency and efficiency against tokens")
    out.add_argument("--markdown", metavar="MD", help="write the table as Markdown (title, table, ceilings)")
    out.add_argument("--results-dir", default="bench/results", help="where <device>.jsonl gets the rows")
    out.add_argument("--no-record", action="store_true", help="do not append to the results .jsonl")
    out.add_argument("--no-progress", action="store_true")
    return ap


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("flashmoe-bench: --device cuda but torch sees no CUDA device")
    return torch.device(choice)


def shapes_and_tokens(args, device: torch.device) -> list[tuple[Shape, list[int], str | None]]:
    """(shape, token counts, preset name) to run, from the shape options."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    if args.preset:
        names = sorted(PRESETS) if "all" in args.preset else list(dict.fromkeys(args.preset))
        picked = [(PRESETS[n], args.tokens or PRESET_TOKENS[kind], n) for n in names]
    elif any(v is not None for v in (args.hidden, args.ffn, args.experts, args.top_k)):
        f = FINE_GRAINED
        custom = Shape("custom", args.hidden or f.hidden, args.ffn or f.ffn, args.experts or f.experts,
                       args.top_k or f.top_k)
        picked = [(custom, args.tokens or [1024], None)]
    else:
        picked = [(s, args.tokens or toks, None) for s, toks in DEFAULT_SWEEP[kind]]
    result = []
    for s, toks, preset in picked:
        extra = dict(s.extra)
        if args.activation:
            extra["activation"] = args.activation
        if args.shared_experts is not None:
            extra["num_shared_experts"] = args.shared_experts
        s = scaled(Shape(s.name, s.hidden, s.ffn, s.experts, s.top_k, extra), args.scale)
        result.append((s, toks, preset))
    return result


def build_cases(args, device: torch.device, world_size: int = 1) -> list[Case]:
    cases = []
    for s, toks, preset in shapes_and_tokens(args, device):
        try:
            cfg = s.config()
        except ValueError as e:
            raise SystemExit(f"flashmoe-bench: shape {s.name}: {e}")
        for dtype in dict.fromkeys(args.dtype):
            for mode in dict.fromkeys(args.mode):
                for t in toks:
                    cases.append(Case(s.name, t, cfg, DTYPES[dtype], mode, world_size, preset, args.scale))
    return cases


def candidate_names(selection: list[str], device: torch.device) -> list[str]:
    """Expand all / baselines / ours; keep named ones (their rows say why when they cannot run)."""
    names: list[str] = []
    for s in selection:
        if s == "all":
            names += candidates.default_names(device)
        elif s == "baselines":
            names += list(candidates.BASELINES)
        elif s == "ours":
            names += [n for n in backends.available_backends(device) if n != "reference"]
        elif s in candidates.all_names():
            names.append(s)
        else:
            raise SystemExit(f"flashmoe-bench: --backend {s!r}: choose all, baselines, ours or one of "
                             f"{candidates.all_names()}")
    return list(dict.fromkeys(names))


def plan_for(args, device: torch.device) -> Plan:
    cuda = device.type == "cuda"
    return Plan(repeats=args.repeats or (30 if cuda else 5), warmup=(5 if cuda else 1) if args.warmup is None
                else args.warmup, input_sets=args.input_sets, seed=args.seed,
                min_time_s=(0.2 if cuda else 0.3) if args.min_time is None else args.min_time,
                quick_ceilings=args.ceilings == "quick")


def _title(header: dict, extra: str = "") -> str:
    d = header["device"]
    load = "" if d["load_avg_1m"] is None else f", load {d['load_avg_1m']:.1f}"
    return (f"flashmoe-bench on {d['name']} ({d['type']}, {d['threads']} threads{load}){extra}, "
            f"commit {header['commit']}, {header['date']}")


def _ceilings_line(rows: list[dict]) -> str:
    seen = {}
    for r in rows:
        m = r["metrics"]
        if m["matmul_tflops_ceiling"] is not None:
            seen[r["config"]["dtype"]] = (m["matmul_tflops_ceiling"], m["copy_gbps_ceiling"])
    return "; ".join(f"{dt}: matmul {mm * 1e3:.1f} GFLOP/s, copy {bw:.1f} GB/s" for dt, (mm, bw) in seen.items())


def run_single(args, device: torch.device, header: dict) -> list[dict]:
    cases = build_cases(args, device)
    names = candidate_names(args.backend, device)
    plan = plan_for(args, device)
    rows: list[dict] = []
    with RichProgress(enabled=not args.no_progress) as progress:
        # Ceilings: a full measurement before a dtype's first case, a short one before each later case; the
        # best of them all is what every row of that dtype is held against (noise only ever lowers them).
        ceilings: dict[str, Ceilings] = {}
        for case in cases:
            progress.describe(f"measuring the matmul and copy ceilings ({case.dtype_name})")
            seen = ceilings.get(case.dtype_name)
            now = measure_ceilings(device, case.dtype, plan.quick_ceilings, repeats=None if seen is None else 2)
            ceilings[case.dtype_name] = now.best(seen)
            rows += run_case(case, names, device, ceilings[case.dtype_name], plan, header, progress)
        apply_ceilings(rows, ceilings)
    return rows


def run_distributed(args, device: torch.device, header: dict, world: int) -> list[dict]:
    selected = candidate_names(args.backend, device)
    ours = [n for n in selected if n in backends.BACKEND_NAMES] or ["reference"]
    transports = args.transport or distributed.default_transports(device)
    plan = plan_for(args, device)
    cases = build_cases(args, device, world)
    if distributed.launched():
        progress = RichProgress(enabled=not args.no_progress and torch.distributed.get_rank() == 0)
        with progress:
            return distributed.run_cases(cases, ours, transports, device, plan, header, progress)
    return distributed.spawn(world, cases, ours, transports, plan, header, show_progress=not args.no_progress)


def _path(template: str, header: dict) -> str:
    return template.replace("{device}", header["device"]["slug"])


def report(rows: list[dict], args, header: dict) -> None:
    console = report_console()
    ws = max((r["config"]["world_size"] for r in rows), default=1)
    title = _title(header, f", {ws} ranks" if ws > 1 else "")
    print_table(rows, title, console)
    console.print(f"ceilings measured in this run: {_ceilings_line(rows)}")
    if not args.no_record:
        console.print(f"appended {len(rows)} rows to "
                      f"{append_jsonl(rows, Path(args.results_dir) / (header['device']['slug'] + '.jsonl'))}")
    if args.out:
        j, c = write_json_csv(rows, _path(args.out, header))
        console.print(f"wrote {j} and {c}")
    if args.markdown:
        md = Path(_path(args.markdown, header))
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(f"{title}\n\n{markdown_table(rows)}\n\nCeilings measured in this run: {_ceilings_line(rows)}.\n")
        console.print(f"wrote {md}")
    if args.plot:
        if any(r["status"] == "ok" for r in rows):
            console.print(f"wrote {plot(rows, _path(args.plot, header), title)}")
        else:
            console.print("no plot: no row was timed")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        from .compare import main as compare_main
        return compare_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if distributed.launched():
        device = distributed.init_launched()
        world = torch.distributed.get_world_size()
        if args.world_size not in (1, world):
            raise SystemExit(f"flashmoe-bench: --world-size {args.world_size} but the launcher started {world} ranks")
    else:
        device, world = pick_device(args.device), args.world_size
    header = run_header(device)
    rows = run_distributed(args, device, header, world) if world > 1 else run_single(args, device, header)
    if distributed.launched() and torch.distributed.get_rank() != 0:
        torch.distributed.destroy_process_group()
        return 0
    report(rows, args, header)
    if distributed.launched():
        torch.distributed.destroy_process_group()
    bad = [r for r in rows if r["status"] == "failed" or (r["status"] == "error" and r["kind"] == "ours")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
