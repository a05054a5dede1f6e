"""`make gpu-check`: everything a lent GPU machine should run, in one command, within 8 minutes.

    python -m flashmoe_py.gpu_check [--dry-run] [--results DIR] [--only NAME ...]

The steps are data (`plan()`): name, command, time budget, whether it needs a GPU. Each runs as a subprocess
in its own process group, killed when its budget (or the 8-minute deadline counted from `--started-at`, the
start of `make gpu-check`, venv set-up included) runs out. Its output goes straight into a record file,
`<results>/gpu-check-<YYYYmmdd-HHMMSS>-<step>.txt`, so a killed step still leaves what it printed; the
summary `...-summary.json` is rewritten before and after every step, so a killed run leaves it too. When
`$OUT` is set (the device machine's folder that comes back), the records are copied there after every step,
at most 8 files (small text records are concatenated into one when there would be more).

`--dry-run` (any machine): lists the steps, runs those that need no GPU, and for the others runs only what
needs no GPU (collecting the tests, finding compute-sanitizer, parsing the benchmark's options, printing the
GPU measurements' plan: flashmoe_py/bench/kernel_perf.py), each marked
"skipped (no GPU)"; it still writes every record and exits 0 when all that ran passed.

Internal modes, run by the steps: `--device-info` (step 1), `--sanitize` (step 5: a warm-up run, then the
target under compute-sanitizer memcheck and synccheck) and `--sanitize-target` (one small fused forward on
CUDA checked against the reference). This module imports nothing outside the standard library at the top,
so that `python flashmoe_py/gpu_check.py` still records the device when installing the package failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
if not __package__:
    # Run as a script: its own folder is sys.path[0], where env.py, records.py, ... would shadow other modules.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]

LIMIT_S = 480            # the whole `make gpu-check`, venv set-up included: 8 minutes
INSTALL_BUDGET_S = 60    # venv + editable install with _C (nvcc for sm_90a only); timed by the Makefile
OUT_MAX_FILES = 8        # what the device machine sends back from $OUT
DEVICE_JSON = "device-json: "
PYTEST_FLAGS = ("-q", "--durations=10", "-o", "faulthandler_timeout=60")  # a hung test dumps its stack
BENCH_ARGS = ("--tokens", "64", "4096", "--dtype", "bfloat16", "--no-progress")


@dataclass(frozen=True)
class Step:
    """One check. `command` may hold "{timeout}" (seconds it gets), "{deadline}" (epoch seconds when it is killed)
    and "{stem}" (the records' path prefix)."""

    name: str                        # record file suffix: letters, digits and '-' only
    title: str
    command: tuple[str, ...]
    budget_s: int
    needs_gpu: bool
    requires: tuple[str, ...] = ()   # repository paths without which the step is "missing", not run
    dry_command: tuple[str, ...] = ()  # what `--dry-run` runs instead when the step needs a GPU
    needs_install: bool = True       # needs the installed package (not run when the install failed)
    env: dict = field(default_factory=dict)


def plan(python: str = sys.executable) -> list[Step]:
    """The steps of `make gpu-check`, in order. Budgets are upper bounds; their sum and INSTALL_BUDGET_S fit
    LIMIT_S (tests/test_gpu_check.py)."""
    me = (python, "-m", "flashmoe_py.gpu_check")
    pytest = (python, "-m", "pytest")
    bench = (python, "-m", "flashmoe_py.bench.cli", *BENCH_ARGS)
    perf = (python, "-m", "flashmoe_py.bench.kernel_perf")
    return [
        Step("device", "device and versions", (python, str(HERE), "--device-info"), 15, False,
             needs_install=False),
        # `gpu` tests skip without CUDA (tests/conftest.py); here they run.
        Step("gpu-tests", "gpu tests (pytest -m gpu)", (*pytest, *PYTEST_FLAGS, "-m", "gpu"), 120, True,
             dry_command=(*pytest, "-q", "--collect-only", "-m", "gpu")),
        # With CUDA, tests/test_fused.py runs compiled: one PHASE=ALL launch per forward (its docstring).
        Step("fused-all", "fused PHASE=ALL, world size 1", (*pytest, *PYTEST_FLAGS, "tests/test_fused.py"), 70, True,
             requires=("tests/test_fused.py",), dry_command=(*pytest, "-q", "--collect-only", "tests/test_fused.py")),
        Step("local-ranks", "two in-process ranks, one GPU", (*pytest, *PYTEST_FLAGS, "tests/test_local_ranks.py"),
             40, True, requires=("tests/test_local_ranks.py",),
             dry_command=(*pytest, "-q", "--collect-only", "tests/test_local_ranks.py")),
        Step("sanitizer", "compute-sanitizer memcheck + synccheck", (*me, "--sanitize", "--timeout", "{timeout}"),
             65, True, dry_command=(*me, "--sanitize", "--locate")),
        Step("bench", "benchmark, GPU shapes", (*bench, "--out", "{stem}-bench"), 50, True,
             dry_command=(python, "-c", "import sys; from flashmoe_py.bench.cli import build_parser; "
                                        "a = build_parser().parse_args(sys.argv[1:]); "
                                        "print(f'bench options parse: tokens {a.tokens}, dtype {a.dtype}')",
                          *BENCH_ARGS)),
        # Kernel TFLOP/s against cuBLAS, decode against the copy bandwidth, baselines, launch orders (issue 12.7):
        # its own deadline from "{deadline}", so it ends its cases and writes its record before the kill.
        Step("kernel-perf", "GPU measurements (kernels, decode, baselines)",
             (*perf, "--deadline", "{deadline}", "--out", "{stem}-perf.json"), 60, True,
             dry_command=(*perf, "--dry-run")),
    ]


# ---------------------------------------------------------------------------------------------- running


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the orchestrator (e.g. the device tool's own time limit)."""


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def _kill_group(proc: subprocess.Popen, graces=(3.0, 2.0)) -> None:
    """SIGINT first (pytest then prints where it was), SIGTERM, then SIGKILL for what ignores both (a process stuck
    in a driver call); each to the whole process group."""
    for sig, grace in zip((signal.SIGINT, signal.SIGTERM), graces):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # the leader may be gone while others of its group live on
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_bounded(argv, timeout_s: float, record: Path, env: dict | None = None, cwd: Path = ROOT) -> tuple:
    """Run `argv` with stdout+stderr appended to `record`, in its own process group, killed (the whole group)
    after `timeout_s`. Returns (rc, seconds, timed_out); rc is None when the command could not start."""
    t0 = time.monotonic()
    with record.open("ab") as f:
        try:
            proc = subprocess.Popen(list(argv), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=cwd, env=env, start_new_session=True)
        except OSError as e:
            f.write(f"could not start {argv[0]}: {e}\n".encode())
            return None, time.monotonic() - t0, False
        try:
            rc = proc.wait(max(timeout_s, 0.1))
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, timed_out = proc.returncode, True
        except BaseException:
            # Interrupted ourselves: whoever interrupts may follow up with SIGKILL, which would orphan the group.
            _kill_group(proc, graces=(1.0,))
            raise
        # A finished leader can leave children behind in its group (a daemonised helper): never keep them.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return rc, time.monotonic() - t0, timed_out


def _tail(path: Path, lines: int) -> list[str]:
    """The last non-empty lines of a record that are not our own "# " notes."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("# ")][-lines:]


def _fmt_cmd(argv) -> str:
    return shlex.join(str(a) for a in argv)


def _line(i: int, n: int, title: str, seconds: float | None, budget: int | None, status: str) -> str:
    left = f"[{i}/{n}] {title} "
    parts = [left + "." * max(3, 46 - len(left))]
    if seconds is not None:
        parts.append(f"{seconds:.0f} s")
    if budget is not None:
        parts.append(f"(budget {budget} s)")
    return " ".join(parts + [status])


def _has_gpu_fallback() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def _device_json(record: Path) -> dict | None:
    try:
        lines = record.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for ln in reversed(lines):
        if ln.startswith(DEVICE_JSON):
            try:
                return json.loads(ln[len(DEVICE_JSON):])
            except ValueError:
                return None
    return None


# ---------------------------------------------------------------------------------------------- $OUT


def select_out_files(paths: list[Path], stem_name: str, limit: int = OUT_MAX_FILES) -> list[tuple[str, list[Path]]]:
    """(name in $OUT, source files) for at most `limit` files: each file as it is while they fit; else the JSON
    files as they are and the smallest text records concatenated, in their order, into `<stem>-records.txt`."""
    paths = [p for p in paths if p.is_file()]
    if len(paths) <= limit:
        return [(p.name, [p]) for p in paths]
    keep = [p for p in paths if p.suffix == ".json"][:limit - 1]
    texts = [p for p in paths if p not in keep]
    # (len(texts) - m) single records + 1 combined one must fit beside the kept JSON files.
    m = len(texts) - (limit - len(keep)) + 1
    merged = set(sorted(texts, key=lambda p: (p.stat().st_size, texts.index(p)))[:m])
    out, slot = [], None
    for p in paths:
        if p not in merged:
            out.append((p.name, [p]))
        elif slot is None:
            slot = (f"{stem_name}-records.txt", [p])
            out.append(slot)
        else:
            slot[1].append(p)
    return out


def sync_out(out_dir: Path, selection: list[tuple[str, list[Path]]], written: set[str]) -> set[str]:
    """Write the selection into `out_dir`, remove what an earlier sync wrote that is no longer selected."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = set()
    for name, sources in selection:
        dest = out_dir / name
        if len(sources) == 1 and sources[0].name == name:
            shutil.copyfile(sources[0], dest)
        else:
            with dest.open("wb") as f:
                for src in sources:
                    f.write(f"===== {src.name} =====\n".encode())
                    f.write(src.read_bytes())
                    f.write(b"\n")
        names.add(name)
    for stale in written - names:
        (out_dir / stale).unlink(missing_ok=True)
    return names


# ---------------------------------------------------------------------------------------------- the check


class Check:
    """One run of the plan: records, summary, $OUT."""

    def __init__(self, steps: list[Step], results: Path, stamp: str, *, dry_run: bool = False,
                 started_at: float | None = None, install_rc: int | None = None, install_log: Path | None = None,
                 out_dir: Path | None = None, has_gpu: bool | None = None, limit_s: float = LIMIT_S,
                 print_fn=print):
        self.steps, self.results, self.stamp, self.dry_run = steps, results, stamp, dry_run
        self.stem = results / f"gpu-check-{stamp}"
        self.t_start = time.time()
        self.started_at = started_at if started_at is not None else self.t_start
        self.deadline = self.started_at + limit_s
        self.install_rc, self.install_log = install_rc, install_log
        self.out_dir, self.out_written = out_dir, set()
        self.has_gpu, self.limit_s, self.print = has_gpu, limit_s, print_fn
        self.device: dict | None = None
        self.rows = [dict(name=s.name, title=s.title, command=_fmt_cmd(s.command), budget_s=s.budget_s,
                          needs_gpu=s.needs_gpu, status="pending", detail="", rc=None, seconds=None,
                          record=None) for s in steps]
        self.install_row = None
        if install_rc is not None:
            self.install_row = dict(name="install", title="venv + install", budget_s=INSTALL_BUDGET_S,
                                    status="ok" if install_rc == 0 else "failed", rc=install_rc,
                                    seconds=round(self.t_start - self.started_at, 1),
                                    record=str(install_log) if install_log else None)

    # -- records

    def record_path(self, step: Step) -> Path:
        return Path(f"{self.stem}-{step.name}.txt")

    def summary_path(self) -> Path:
        return Path(f"{self.stem}-summary.json")

    def write_summary(self, finished: bool, ok: bool | None = None, out_files: list[str] | None = None) -> None:
        data = dict(stamp=self.stamp, dry_run=self.dry_run, results=str(self.results),
                    started_at=datetime.fromtimestamp(self.started_at).isoformat(timespec="seconds"),
                    limit_s=self.limit_s, budget_s=dict(install=INSTALL_BUDGET_S,
                                                        steps=sum(s.budget_s for s in self.steps)),
                    install=self.install_row, device=self.device, steps=self.rows,
                    elapsed_s=round(time.time() - self.started_at, 1), finished=finished, ok=ok,
                    out=str(self.out_dir) if self.out_dir else None, out_files=out_files)
        tmp = self.summary_path().with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(self.summary_path())  # a reader (or a kill) never sees half a file

    def all_records(self) -> list[Path]:
        paths = [self.summary_path()]
        if self.install_log:
            paths.append(Path(self.install_log))
        for step in self.steps:
            paths.append(self.record_path(step))
        for kind in ("bench", "perf"):
            paths += sorted(Path(p) for p in self.results.glob(f"gpu-check-{self.stamp}-{kind}*.json"))
        return paths

    def checkpoint(self, finished: bool = False, ok: bool | None = None) -> None:
        if self.out_dir is None:
            self.write_summary(finished, ok)
            return
        # The summary names the files it is sent with, so select first (the summary is one of them).
        self.write_summary(finished, ok, [n for n, _ in select_out_files(self.all_records(), self.stem.name)])
        self.out_written = sync_out(self.out_dir, select_out_files(self.all_records(), self.stem.name),
                                    self.out_written)

    # -- steps

    def _env(self, step: Step) -> dict:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # a killed step's record then holds all it printed
        # One Triton cache for every step: the sanitizer runs reuse what the warm-up (and the tests) compiled.
        env.setdefault("TRITON_CACHE_DIR", str(Path.home() / ".triton" / "cache"))
        env.update(step.env)
        return env

    def _start_record(self, step: Step, argv, timeout: float | None, note: str = "") -> Path:
        rec = self.record_path(step)
        head = [f"# gpu-check {self.stamp} step {step.name}: {step.title}", f"# command: {_fmt_cmd(argv)}",
                f"# budget {step.budget_s} s" + (f", timeout {timeout:.0f} s" if timeout is not None else "")]
        if note:
            head.append(f"# {note}")
        rec.write_text("\n".join(head) + "\n")
        return rec

    def _finish_record(self, rec: Path, text: str) -> None:
        with rec.open("a") as f:
            f.write(f"\n# {text}\n")

    def run_step(self, i: int, step: Step, row: dict) -> None:
        n = len(self.steps)
        missing = [p for p in step.requires if not (ROOT / p).exists()]
        if step.needs_gpu and self.has_gpu is None:  # no device step ran before (--only)
            self.has_gpu = _has_gpu_fallback()
        gpu_skip = step.needs_gpu and (self.dry_run or not self.has_gpu)
        if step.needs_install and self.install_rc not in (None, 0):
            row.update(status="skipped", detail="install failed")
            rec = self._start_record(step, step.command, None, "not run: the install failed")
            row["record"] = str(rec)
            self.print(_line(i, n, step.title, None, step.budget_s, "skipped (install failed)"))
            return
        if missing and not gpu_skip:
            row.update(status="missing", detail=f"{', '.join(missing)} missing")
            rec = self._start_record(step, step.command, None, f"not run: {row['detail']}")
            row["record"] = str(rec)
            self.print(_line(i, n, step.title, None, step.budget_s, f"MISSING {', '.join(missing)}"))
            return
        if gpu_skip:
            why = "dry run" if self.has_gpu else "no GPU"
            rec = self._start_record(step, step.command, None, f"skipped ({why})")
            row.update(status="skipped", detail=why, record=str(rec))
            extra = ""
            if missing:
                extra = f"; {', '.join(missing)} missing"
                row["detail"] += extra
            elif step.dry_command:
                self._finish_record(rec, f"dry run instead: {_fmt_cmd(step.dry_command)}")
                rc, secs, timed_out = run_bounded(step.dry_command, 60, rec, self._env(step))
                ok = rc == 0 and not timed_out
                last = _tail(rec, 1)
                extra = f"; dry check {'ok' if ok else 'FAILED'}: {last[0][:90] if last else ''}"
                row.update(dry_check=dict(ok=ok, rc=rc, seconds=round(secs, 1)))
                row["detail"] += extra
            self.print(_line(i, n, step.title, None, step.budget_s, f"skipped ({why}){extra}"))
            return
        left = self.deadline - time.time() - 2
        timeout = min(step.budget_s, left)
        if left < min(5, step.budget_s):
            row.update(status="skipped", detail="out of time")
            row["record"] = str(self._start_record(step, step.command, None, "not run: out of time"))
            self.print(_line(i, n, step.title, None, step.budget_s, "skipped (out of time)"))
            return
        killed_at = f"{time.time() + timeout:.1f}"  # run_bounded starts its clock after this: never later
        argv = [a.format(timeout=int(timeout), stem=self.stem, deadline=killed_at) for a in step.command]
        rec = self._start_record(step, argv, timeout)
        row.update(status="running", record=str(rec), command=_fmt_cmd(argv))
        self.checkpoint()
        rc, secs, timed_out = run_bounded(argv, timeout, rec, self._env(step))
        row.update(rc=rc, seconds=round(secs, 1))
        if timed_out:
            row.update(status="timeout", detail=f"killed after {secs:.0f} s")
            status = f"TIMEOUT (killed after {secs:.0f} s)"
        elif rc == 0:
            row.update(status="ok")
            status = "ok"
        else:
            row.update(status="failed", detail=f"rc={rc}")
            status = f"FAILED rc={rc}"
        self._finish_record(rec, f"{row['status']} rc={rc} in {secs:.1f} s (timeout {timeout:.0f} s)")
        self.print(_line(i, n, step.title, secs, step.budget_s, status))
        for ln in _tail(rec, 1 if row["status"] == "ok" else 15):  # pytest's summary line, or what went wrong
            self.print(f"      {ln[:160]}")

    def run(self) -> int:
        n = len(self.steps)
        budget = sum(s.budget_s for s in self.steps)
        self.print(f"gpu-check {self.stamp}{' (dry run)' if self.dry_run else ''}: {n} steps; budgets: install "
                   f"{INSTALL_BUDGET_S} s + steps {budget} s = {INSTALL_BUDGET_S + budget} s (limit {self.limit_s} s)")
        for i, s in enumerate(self.steps, 1):
            need = "GPU" if s.needs_gpu else "no GPU"
            req = [p for p in s.requires if not (ROOT / p).exists()]
            self.print(f"  {i}. {s.name:<12} {s.budget_s:>4} s  {need:<6}  {_fmt_cmd(s.command)}"
                       + (f"   [{', '.join(req)} missing]" if req else ""))
        self.results.mkdir(parents=True, exist_ok=True)
        if self.install_row is not None:
            r = self.install_row
            status = "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']}"
            self.print(_line(0, n, "venv + install", r["seconds"], INSTALL_BUDGET_S, status))
            if r["rc"] != 0 and self.install_log:
                for ln in _tail(Path(self.install_log), 15):
                    self.print(f"      {ln[:160]}")
        self.checkpoint()
        old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for i, (step, row) in enumerate(zip(self.steps, self.rows), 1):
                self.run_step(i, step, row)
                if step.name == "device" and row["record"]:
                    self.device = _device_json(Path(row["record"]))
                    if self.has_gpu is None and self.device is not None:
                        self.has_gpu = bool(self.device.get("cuda_available"))
                self.checkpoint()
        except Interrupted as e:
            for row in self.rows:
                if row["status"] in ("running", "pending"):
                    row.update(status="interrupted", detail=str(e))
            self.checkpoint(finished=True, ok=False)
            self.print(f"gpu-check interrupted ({e}); records in {self.results}")
            return 130
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        ran = [r for r in self.rows if r["status"] not in ("skipped",)]
        bad = [r for r in self.rows if r["status"] in ("failed", "timeout", "missing")]
        bad += [r for r in self.rows if r.get("dry_check") and not r["dry_check"]["ok"]]
        install_bad = self.install_rc not in (None, 0)
        if self.dry_run:
            ok = not bad and not install_bad
        else:
            ok = not bad and not install_bad and bool(self.has_gpu) and all(r["status"] == "ok" for r in self.rows)
        self.checkpoint(finished=True, ok=ok)
        total = time.time() - self.started_at
        steps_s = sum(r["seconds"] or 0 for r in self.rows)
        inst = f"install {self.install_row['seconds']:.0f} s + " if self.install_row else ""
        self.print(f"total {total:.0f} s of {self.limit_s} s ({inst}steps {steps_s:.0f} s); "
                   f"{len(ran)} run, {len(bad)} bad; {'OK' if ok else 'NOT OK'}"
                   + ("" if self.has_gpu or self.dry_run else " (no GPU: nothing was checked on a device)"))
        self.print(f"records: {self.stem}-*" + (f"; copied to {self.out_dir}: {', '.join(sorted(self.out_written))}"
                                                 if self.out_dir else ""))
        return 0 if ok else 1


# ---------------------------------------------------------------------------------------------- step 1


def _version(dist: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _tool_version(name: str, *args: str, pick: str = "") -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/local/cuda/bin/{name}",) if os.path.isfile(p)), None)
    if path is None:
        return "absent"
    try:
        out = subprocess.run([path, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{path}: {e}"
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    chosen = [ln for ln in lines if pick.lower() in ln.lower()] if pick else lines
    return f"{(chosen or lines or ['?'])[-1]} ({path})"


def _git_commit() -> str:
    if os.environ.get("FLASHMOE_COMMIT"):
        return os.environ["FLASHMOE_COMMIT"] + " (FLASHMOE_COMMIT)"
    try:
        run = dict(cwd=ROOT, capture_output=True, text=True, timeout=10, check=True)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "absent (no git checkout here: set FLASHMOE_COMMIT)"
    return head + ("+dirty" if dirty else "")


def device_info() -> dict:
    """What ran where: Python, torch, Triton, CUDA, driver, GPU, the NVSHMEM packages, tools, _C, commit."""
    import platform

    info: dict = {"python": f"{platform.python_version()} ({sys.executable})", "cuda_available": False}
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda or "none (CPU build)",
                    cudnn=str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "absent",
                    cuda_available=torch.cuda.is_available(), device_count=torch.cuda.device_count())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                        memory_gib=round(p.total_memory / 2**30, 1),
                        l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
        else:
            info["gpu"] = "absent (torch sees no CUDA device)"
    except Exception as e:  # any failure to import is what this step reports
        info["torch"] = f"absent ({type(e).__name__}: {e})"
    for dist in ("triton", "nvidia-nvshmem-cu13", "nvshmem4py-cu13", "cuda-core", "cuda-bindings", "mpi4py",
                 "numpy", "transformers", "pytest", "setuptools", "ninja", "flashmoe-triton"):
        info[dist] = _version(dist)
    info["driver"] = _tool_version("nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                                   "--format=csv,noheader")
    info["nvcc"] = _tool_version("nvcc", "--version", pick="release")
    info["compute-sanitizer"] = _tool_version("compute-sanitizer", "--version", pick="version")
    info["ncu"] = _tool_version("ncu", "--version", pick="version")
    try:
        from flashmoe_py import _C

        info["flashmoe_py._C"] = "built, with CUDA" if getattr(_C, "with_cuda", False) else "built, CPU only"
    except Exception as e:
        info["flashmoe_py._C"] = f"absent ({type(e).__name__}: {e})"
    info["commit"] = _git_commit()
    info["host"] = platform.node()
    info["date"] = datetime.now().astimezone().isoformat(timespec="seconds")
    return info


def print_device_info() -> int:
    info = device_info()
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    print(DEVICE_JSON + json.dumps(info))
    gpu = (f"{info['gpu']} ({info['sm_count']} SMs, sm_{info['capability'].replace('.', '')})"
           if info["cuda_available"] else "no GPU")
    # Last, because the orchestrator shows a step's last line.
    print(f"{gpu}; torch {info.get('torch')}, CUDA {info.get('torch_cuda')}, triton {info['triton']}, "
          f"nvshmem {info['nvidia-nvshmem-cu13']}, nvshmem4py {info['nvshmem4py-cu13']}, commit {info['commit']}")
    return 0 if not str(info.get("torch", "")).startswith("absent") else 1


# ---------------------------------------------------------------------------------------------- step 5

SANITIZER_TOOLS = ("memcheck", "synccheck")
_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+error")


def error_summary(text: str) -> int | None:
    """Errors from compute-sanitizer's last "ERROR SUMMARY: N errors" line; None when there is none."""
    found = _SUMMARY.findall(text)
    return int(found[-1]) if found else None


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        for rel in ("bin/compute-sanitizer", "compute-sanitizer/compute-sanitizer"):
            if root and os.path.isfile(os.path.join(root, rel)):
                return os.path.join(root, rel)
    return None


def sanitize(timeout_s: float, locate_only: bool = False, target: list[str] | None = None) -> int:
    """The target once without a sanitizer (compiles the kernels into the Triton cache), then under memcheck and
    synccheck; every run must exit 0 and each tool must report 0 errors."""
    tool = find_sanitizer()
    target = target or [sys.executable, "-m", "flashmoe_py.gpu_check", "--sanitize-target"]
    runs = [("warm-up (no sanitizer)", target, 0.25)]
    # --error-exitcode: a report that scrolled past still fails the run; one allocation per tensor lets
    # memcheck see each tensor's bounds (the caching allocator hands out slices of one large block).
    runs += [(t, [tool or "compute-sanitizer", "--tool", t, "--error-exitcode", "99", "--print-limit", "20", *target],
              w) for t, w in zip(SANITIZER_TOOLS, (0.4, 0.35))]
    where = f"compute-sanitizer: {tool or 'not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)'}"
    if locate_only:
        for label, argv, _ in runs:
            print(f"{label}: {_fmt_cmd(argv)}")
        print(where)
        return 0
    print(where)
    deadline = time.monotonic() + timeout_s - 1
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Each run has its own process group, which the step's kill does not reach: SIGTERM must unwind to run_bounded.
    signal.signal(signal.SIGTERM, _raise_interrupted)
    failures = []
    for i, (label, argv, weight) in enumerate(runs):
        if i > 0 and tool is None:
            failures.append(f"{label}: compute-sanitizer not found")
            continue
        left = deadline - time.monotonic()
        share = left * weight / sum(w for _, _, w in runs[i:])
        if share < 3:
            failures.append(f"{label}: no time left")
            continue
        rec = Path(os.environ.get("TMPDIR", "/tmp")) / f"flashmoe-sanitize-{os.getpid()}-{i}.txt"
        rec.write_text("")
        run_env = env if i == 0 else dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        print(f"## {label}: {_fmt_cmd(argv)} (timeout {share:.0f} s)", flush=True)
        try:
            rc, secs, timed_out = run_bounded(argv, share, rec, run_env)
        finally:  # killed from outside too: what the run printed goes into the step's record
            text = rec.read_text(errors="replace")
            rec.unlink(missing_ok=True)
            print(text, end="" if text.endswith("\n") else "\n", flush=True)
        errors = None if i == 0 else error_summary(text)
        verdict = (f"TIMEOUT after {secs:.0f} s" if timed_out else f"rc {rc}") + f", {secs:.1f} s"
        if i > 0:
            verdict = f"ERROR SUMMARY {'absent' if errors is None else errors} errors, " + verdict
        print(f"## {label}: {verdict}", flush=True)
        if timed_out or rc != 0 or (i > 0 and errors != 0):
            failures.append(f"{label}: {verdict}")
    for f in failures:
        print(f"FAILED {f}")
    print("sanitizer: " + ("ok, 0 errors from memcheck and synccheck" if not failures else f"{len(failures)} failed"))
    return 1 if failures else 0


def sanitize_target(tokens: int = 64) -> int:
    """One small fused forward on CUDA in bf16, twice (a relaunch reuses the persistent state), each against the
    reference computed in float64 on the CPU from the same bf16 weights (so the sanitizer sees only our path)."""
    os.environ["FLASHMOE_DEBUG_POISON"] = "1"  # an element the kernel forgets to write shows as NaN
    import torch

    import flashmoe_py as fm
    from flashmoe_py.tolerances import RTOL, rel_err

    if not torch.cuda.is_available():
        print("sanitize-target: no CUDA device")
        return 2
    cfg = fm.MoEConfig(hidden_size=256, ffn_hidden_size=128, num_experts=8, top_k=2)
    h, i, e = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    # Never zeros; the router scaled up so that scores are well separated (no near-ties between fp32 and fp64).
    exact = {"router_weight": rnd(e, h, scale=2.0 / h ** 0.5), "w_up": rnd(e, h, cfg.up_size, scale=1.0 / h ** 0.5),
             "w_down": rnd(e, i, h, scale=1.0 / i ** 0.5)}
    params = {n: t.to(torch.bfloat16).cuda() for n, t in exact.items()}
    truth_params = {n: t.double().cpu() for n, t in params.items()}
    bad = 0
    for run in range(2):
        x = rnd(tokens, h).to(torch.bfloat16).cuda()
        with torch.no_grad():
            got = fm.moe(x, params, cfg, backend="fused")
            torch.cuda.synchronize()
            ref = fm.moe(x.double().cpu(), truth_params, cfg, backend="reference")
        err = rel_err(got.out, ref.out)
        same = int((got.routing.topk_ids.cpu() == ref.routing.topk_ids).all(dim=-1).sum())
        ok = err <= RTOL[torch.bfloat16] and same == tokens
        bad += not ok
        print(f"sanitize-target run {run}: fused vs float64 reference rel err {err:.2e} (bf16 tolerance "
              f"{RTOL[torch.bfloat16]:.0e}), {same}/{tokens} tokens routed alike, kernel launches "
              f"{got.stats.kernel_launches}, host syncs {got.stats.host_syncs}: {'ok' if ok else 'FAILED'}")
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m flashmoe_py.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="run only what needs no GPU; exit 0 if that passed")
    ap.add_argument("--results", type=Path, help="records folder (default bench/results; build/gpu-check dry)")
    ap.add_argument("--stamp", help="the records' date stamp (default: now, YYYYmmdd-HHMMSS)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these steps (names as listed)")
    ap.add_argument("--out", type=Path, default=os.environ.get("OUT") or None,
                    help=f"copy at most {OUT_MAX_FILES} record files here (default: $OUT when set)")
    ap.add_argument("--started-at", type=float, help="epoch seconds when `make gpu-check` started (the deadline)")
    ap.add_argument("--install-rc", type=int, help="exit status of the venv + install part (from the Makefile)")
    ap.add_argument("--install-log", type=Path, help="its record")
    internal = ap.add_argument_group("internal modes (the steps run these)")
    internal.add_argument("--device-info", action="store_true")
    internal.add_argument("--sanitize", action="store_true")
    internal.add_argument("--locate", action="store_true", help="with --sanitize: only say what would run")
    internal.add_argument("--timeout", type=float, default=75.0, help="with --sanitize: seconds for all runs")
    internal.add_argument("--sanitize-target", action="store_true")
    return ap


def main(argv=None, steps: list[Step] | None = None, has_gpu: bool | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device_info:
        return print_device_info()
    if args.sanitize:
        return sanitize(args.timeout, locate_only=args.locate)
    if args.sanitize_target:
        return sanitize_target()
    steps = plan() if steps is None else steps
    if args.only:
        unknown = set(args.only) - {s.name for s in steps}
        if unknown:
            raise SystemExit(f"gpu-check: --only {sorted(unknown)}: choose from {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in args.only]
    # Absolute: the steps run in the repository root, wherever this was started.
    results = (args.results or ROOT / ("build/gpu-check" if args.dry_run else "bench/results")).resolve()
    stamp = args.stamp or datetime.now().strftime("%Y%m%d-%H%M%S")
    check = Check(steps, results, stamp, dry_run=args.dry_run, started_at=args.started_at,
                  install_rc=args.install_rc, install_log=args.install_log and args.install_log.resolve(),
                  out_dir=args.out, has_gpu=has_gpu,
                  print_fn=lambda s: print(s, flush=True))
    return check.run()


if __name__ == "__main__":
    raise SystemExit(main())
