"""The benchmark's result row: one fixed schema for `bench/results/<device>.jsonl`, `--out` JSON and CSV.

Every row has every key below (None where a value does not apply or could not be measured), so rows from
different runs, devices and versions line up. Bump SCHEMA_VERSION when a key changes meaning.

row:
  schema_version  int
  device          {name: str, type: "cpu"|"cuda", slug: str (file name), threads: int,
                   load_avg_1m: float or None (the machine's load when the run started: noise context)}
  versions        {flashmoe_py, torch, triton, transformers, python: str or None}
  commit          str: `git rev-parse --short HEAD` of the working tree, "+dirty" when its code has changes
                  (bench/results/ itself is not code: appending results there does not make a tree dirty)
  date            str: ISO 8601 UTC time of the run's start
  config          CONFIG_KEYS: the layer, the tokens per rank, dtype, mode, ranks, transport, timing plan
  candidate       str: what ran ("reference", "naive_loop", "hf_eager", "reference/alltoall", ...)
  kind            "ours" | "baseline"
  status          "ok" (timed) | "failed" (output differs from the reference: not timed) |
                  "unavailable" (cannot run here; reason says why) | "error" (raised; reason says what)
  reason          str or None
  metrics         METRIC_KEYS (see their comments)
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

SCHEMA_VERSION = 2  # 2: triton_launches

STATUSES = ("ok", "failed", "unavailable", "error")
KINDS = ("ours", "baseline")

CONFIG_KEYS = {
    "shape": str, "preset": (str, type(None)), "scale": float, "tokens": int, "hidden_size": int,
    "ffn_hidden_size": int, "num_experts": int, "top_k": int, "activation": str, "score_func": str,
    "num_shared_experts": int, "num_expert_groups": int, "topk_groups": int,
    "capacity_factor": (float, type(None)), "dtype": str, "mode": str, "world_size": int,
    "transport": (str, type(None)), "repeats": int, "warmup": int, "input_sets": int,
}

_num = (int, float, type(None))
METRIC_KEYS = {
    "latency_ms_median": _num,        # median of the timed calls (per-call max over ranks when distributed)
    "latency_ms_p20": _num,           # 20% and 80% quantiles of the same samples
    "latency_ms_p80": _num,
    "samples": _num,                  # timed calls behind the quantiles
    "tokens_per_s": _num,             # tokens over all ranks / median latency
    "flops": _num,                    # counted FLOPs of one call (counting.py), all ranks
    "tflops": _num,                   # flops / median latency / 1e12
    "min_bytes": _num,                # counted minimum bytes through memory of one call, all ranks
    "matmul_tflops_ceiling": _num,    # measured in this run: best of a large GEMM in this dtype (sum over ranks)
    "copy_gbps_ceiling": _num,        # measured in this run: best large copy, read + write bytes (sum over ranks)
    "roofline_efficiency": _num,      # max(flops / matmul ceiling, min_bytes / copy ceiling) / latency
    "bound": (str, type(None)),       # "compute" | "memory": which ceiling binds
    "speedup_vs_best_baseline": _num,  # best ok baseline's median / this row's median (> 1: faster)
    "best_baseline": (str, type(None)),
    "max_rel_err": _num,              # worst ||out - ref|| / ||ref|| over output (and gradients in bwd modes)
    "tolerance": _num,                # what max_rel_err had to stay under
    "kernel_launches": _num,          # per call, from torch.profiler (GPU kernels); None on CPU
    "host_syncs": _num,               # per call, from torch.profiler (*Synchronize runtime calls); None on CPU
    "aten_ops": _num,                 # top-level aten operator calls per call (torch.profiler, any device)
    "triton_launches": _num,          # Triton kernel launches per call (counted at Triton's launch entry, any device)
    "peak_mem_bytes": _num,           # extra memory at the call's peak over what was live before it
    "wire_bytes": _num,               # distributed: sum over ranks of layer.stats.bytes_sent for one forward
    "wire_min_bytes": _num,           # distributed: the least any transport must move (counting.py)
}

ROW_KEYS = {
    "schema_version": int, "device": dict, "versions": dict, "commit": str, "date": str, "config": dict,
    "candidate": str, "kind": str, "status": str, "reason": (str, type(None)), "metrics": dict,
}
DEVICE_KEYS = {"name": str, "type": str, "slug": str, "threads": int, "load_avg_1m": (float, type(None))}
VERSION_KEYS = ("flashmoe_py", "torch", "triton", "transformers", "python")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    # Ours from the imported package, not from distribution metadata: "flashmoe_py" normalises to "flashmoe-py",
    # FlashMoE's own distribution, whose version a metadata lookup would report when that is installed.
    from .. import __version__
    return {"flashmoe_py": __version__, "torch": torch.__version__, "triton": _version("triton"),
            "transformers": _version("transformers"), "python": platform.python_version()}


def git_commit(cwd: str | Path | None = None) -> str:
    """Short hash of HEAD, with "+dirty" when tracked files outside bench/results/ differ from it;
    "unknown" outside a checkout."""
    try:
        run = dict(cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        code = ["--", ":/", ":(top,exclude)bench/results"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", *code], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _load_avg() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def device_info(device: torch.device) -> dict:
    """Name, type, file-name slug, CPU threads and current load of the device the run measures."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        sl = slug(name)
    else:
        name = _cpu_name()
        sl = f"{device.type}-{slug(name)}"
    return {"name": name, "type": device.type, "slug": sl, "threads": torch.get_num_threads(),
            "load_avg_1m": _load_avg()}


def run_header(device: torch.device) -> dict:
    """The part of every row that describes the run, not the measurement."""
    return {"device": device_info(device), "versions": versions(), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def config_dict(case, transport: str | None, repeats: int, warmup: int, input_sets: int) -> dict:
    c = case.cfg
    return {"shape": case.shape, "preset": case.preset, "scale": float(case.scale), "tokens": case.tokens,
            "hidden_size": c.hidden_size, "ffn_hidden_size": c.ffn_hidden_size, "num_experts": c.num_experts,
            "top_k": c.top_k, "activation": c.activation, "score_func": c.score_func,
            "num_shared_experts": c.num_shared_experts, "num_expert_groups": c.num_expert_groups,
            "topk_groups": c.topk_groups,
            "capacity_factor": None if c.capacity_factor is None else float(c.capacity_factor),
            "dtype": case.dtype_name, "mode": case.mode, "world_size": case.world_size, "transport": transport,
            "repeats": repeats, "warmup": warmup, "input_sets": input_sets}


def new_row(header: dict, config: dict, candidate: str, kind: str, status: str, reason: str | None = None,
            **metrics) -> dict:
    """A complete row: every metric key present (None unless given). Unknown metric names are an error."""
    unknown = set(metrics) - set(METRIC_KEYS)
    if unknown:
        raise KeyError(f"unknown metric keys {sorted(unknown)}; the schema has {sorted(METRIC_KEYS)}")
    row = {"schema_version": SCHEMA_VERSION, **header, "config": dict(config), "candidate": candidate,
           "kind": kind, "status": status, "reason": reason,
           "metrics": {k: metrics.get(k) for k in METRIC_KEYS}}
    validate_row(row)
    return row


def _check_keys(where: str, got: dict, spec: dict) -> None:
    missing, extra = set(spec) - set(got), set(got) - set(spec)
    if missing or extra:
        raise ValueError(f"{where}: missing keys {sorted(missing)}, unexpected keys {sorted(extra)}")
    for k, t in spec.items():
        v = got[k]
        if t is float and isinstance(v, int) and not isinstance(v, bool):
            continue
        if isinstance(v, bool) or not isinstance(v, t):
            raise ValueError(f"{where}.{k}={v!r}: expected {t}")


def validate_row(row: dict) -> None:
    """Raise ValueError naming the first key that is missing, unexpected or of the wrong type."""
    _check_keys("row", row, ROW_KEYS)
    if row["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"row.schema_version={row['schema_version']}: this code reads {SCHEMA_VERSION}")
    _check_keys("row.device", row["device"], DEVICE_KEYS)
    if set(row["versions"]) != set(VERSION_KEYS):
        raise ValueError(f"row.versions: keys {sorted(row['versions'])}, expected {sorted(VERSION_KEYS)}")
    _check_keys("row.config", row["config"], CONFIG_KEYS)
    _check_keys("row.metrics", row["metrics"], METRIC_KEYS)
    if row["status"] not in STATUSES:
        raise ValueError(f"row.status={row['status']!r}: expected one of {STATUSES}")
    if row["kind"] not in KINDS:
        raise ValueError(f"row.kind={row['kind']!r}: expected one of {KINDS}")
    timed = row["metrics"]["latency_ms_median"] is not None
    if timed != (row["status"] == "ok"):
        raise ValueError(f"row.status={row['status']!r} but latency_ms_median={row['metrics']['latency_ms_median']}"
                         ": exactly the ok rows are timed")
    if row["status"] != "ok" and not row["reason"]:
        raise ValueError(f"row.status={row['status']!r} needs a reason")


# ---- files -------------------------------------------------------------------------------------------

def append_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            validate_row(r)
            f.write(json.dumps(r, sort_keys=True) + "\n")
    return path


def flatten(row: dict) -> dict:
    """One CSV record: nested dicts become dotted columns (device.name, config.tokens, metrics.tflops)."""
    flat = {}
    for k, v in row.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                flat[f"{k}.{k2}"] = v2
        else:
            flat[k] = v
    return flat


def csv_columns() -> list[str]:
    top = [k for k in ROW_KEYS if ROW_KEYS[k] is not dict]
    return (top + [f"device.{k}" for k in DEVICE_KEYS] + [f"versions.{k}" for k in VERSION_KEYS]
            + [f"config.{k}" for k in CONFIG_KEYS] + [f"metrics.{k}" for k in METRIC_KEYS])


def write_json_csv(rows: list[dict], stem: str | Path) -> tuple[Path, Path]:
    """Write `stem`.json (a list of rows) and `stem`.csv (flattened, fixed column order)."""
    stem = Path(stem)
    if stem.suffix in (".json", ".csv"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    for r in rows:
        validate_row(r)
    jpath, cpath = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".csv")
    jpath.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    with cpath.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_columns())
        w.writeheader()
        for r in rows:
            w.writerow(flatten(r))
    return jpath, cpath


def read_rows(path: str | Path) -> list[dict]:
    """Rows from a `--out` JSON file (a list) or a results .jsonl file (one row per line)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of result rows")
    for r in rows:
        if r.get("schema_version") == 1:  # before triton_launches: the same row, that count unknown
            r["schema_version"] = SCHEMA_VERSION
            r.get("metrics", {}).setdefault("triton_launches", None)
        validate_row(r)
    return rows
