"""`make compile-check`: every Triton kernel compiled ahead of time for sm_90 and sm_80, no GPU needed
(DESIGN §7.3). Run as `python -m flashmoe_py.triton_compile_check [--jobs N]`.

What gets compiled is what the backend would launch: for each target and dtype (fp32, bf16, fp16) the
host code of `flashmoe_py.triton_backend` runs on meta tensors (`plan_launches`) for the cases in CASES,
which together reach every kernel and both regimes' launch configs. Each distinct launch (kernel,
argument types, constexprs, warps, stages) goes through `triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`; ptxas -v on the resulting PTX gives registers and spills.

The persistent fused kernel (fused_backend.plan_launches) is compiled for the cases in FUSED_CASES: world
size 1 (the benchmark's shape, inference and training variants, the training one with capacity) and an 8-rank
expert-parallel launch whose remote writes are NVSHMEM device calls, linked against the NVSHMEM device bitcode
(kernels/nvshmem.py).

One row per kernel x case x arch x dtype: registers, shared memory, spill bytes, CTAs per SM (and the limit that
binds: regs, smem, threads, blocks; compile_structure.LIMITS), the MMA instruction of the main loop and its width
(`wgmma n=128`: Hopper warpgroup MMA, m64n128; `mma m16n8k16`: mma.sync), the main loop's pipeline (`cp.async 3 |
wg 1`: operand copies of 3 iterations in flight, 1 wgmma group left in flight by its wait; `tma N` for TMA copies,
`sync` for plain loads; compile_structure reads it from the PTX), and whether control flow is uniform (no branch
depends on a value that can differ between the program's warps: `uniform_control_flow`, DESIGN §6); the
offending branches follow the table, each with its chain of registers back to the per-thread load or timer
read. Kernels linked with the NVSHMEM shim also get `thread0_only`: flashmoe_signal_set writes from thread 0
alone. Exit status 1 when a kernel does not compile, spills, needs more shared memory than the target has
(sm_90: 227 KiB, sm_80: 163 KiB), a bf16/fp16 GEMM on sm_90 does not use wgmma, a branch depends on a
per-thread value, or the signal is not one thread's. A GEMM whose main loop is not pipelined (fewer than 2 copy
stages in flight: plain loads, or cp.async.wait_group 0 every iteration) is marked NOT PIPELINED, listed after the
table, and fails the gate (NOT_PIPELINED_FAILS).

After the tables, an estimate (traffic_model: launch order, resident programs, an LRU model of L2) of the HBM bytes
each GEMM of the triton backend moves at traffic_model.SHAPES (the benchmark's shape T=16384, decode T=256 of it,
Mixtral at T=16384; bf16) on H100 and A100, as launched and in row-major and column-major order, beside the bytes of
reading A and B and writing C once; it never fails the gate. Tolerates Triton 3.6 through 3.9.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

from .compile_structure import ctas_per_sm, main_loops
from .compile_structure import summary as structure_summary

# Triton 3.9 warns on every compile that its fp-fusion default will change; the gate compiles with the
# default the runtime uses, so the warning is only noise here.
warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

ARCHS = {"sm_90": 90, "sm_80": 80}
SHARED_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}
# A GEMM row whose main loop is not pipelined (compile_structure: fewer than 2 copy stages in flight) fails the gate.
# False would only mark such rows NOT PIPELINED and list them (how the check landed while the weight-gradient loops
# still waited for every load); there is deliberately no command-line switch.
NOT_PIPELINED_FAILS = True
DTYPES = ("fp32", "bf16", "fp16")
BENCH_SHAPE = dict(hidden_size=2048, ffn_hidden_size=1408, num_experts=64, top_k=6)  # DESIGN §8's target
# The parameterised activations, with the values of the families that use them (gpt-oss, DeepSeek-V4, Inkling2).
ACTIVATION_VALUES = {"swiglu_oai": dict(swiglu_alpha=1.702, swiglu_limit=7.0),
                     "swiglu_clamped": dict(swiglu_limit=10.0),
                     "swiglu_softcap": dict(swiglu_gate_softcap=4.0, swiglu_up_softcap=25.0)}
# (case, config overrides, tokens, backward, rows mode, caller routing): together they reach every kernel,
# every activation's epilogues (forward and backward), both combines, both regimes' configs. A tuple of activations
# plans the case once per activation: the first in every dtype, the others in EXTRA_ACTIVATION_DTYPES only (fp16 gets
# bf16's tiles and code); launches that do not depend on the activation are compiled once.
EXTRA_ACTIVATION_DTYPES = ("fp32", "bf16")
CASES = (
    ("train", dict(activation=("swiglu", "swiglu_oai"), bias=True, capacity_factor=1.25), 16384, True, False, False),
    ("train-nd", dict(activation=("gelu", "relu2", "gelu_tanh"), bias=True, score_func="sigmoid", expert_bias=True,
                      num_expert_groups=8, topk_groups=4, deterministic=False, num_shared_experts=1), 16384, True,
     False, False),
    ("ep-rows", dict(activation=("geglu", "swiglu_clamped", "swiglu_softcap", "geglu_tanh")), 16384, True, True,
     False),
    ("decode", dict(activation="swiglu"), 16, False, False, True),
    ("infer", dict(activation="swiglu", router_bias=True, capacity_factor=1.0), 16384, False, False, False),
)
# Fused kernel: (case, config overrides, tokens per rank, world size, puts, routing mode, save for backward,
# dtypes, archs). "compute": router logits in the kernel (inference); "logits": given, pre-activations saved.
FUSED_CASES = (
    ("fused-w1", dict(activation=("swiglu", "swiglu_oai", "swiglu_clamped", "swiglu_softcap", "gelu_tanh")), 16384, 1,
     "ptr", "compute", False, DTYPES, ("sm_90", "sm_80")),
    ("fused-w1t", dict(activation=("gelu", "relu2", "swiglu_oai", "geglu_tanh", "swiglu"), bias=True,
                       num_shared_experts=1, capacity_factor=1.25), 16384, 1, "ptr", "logits", True, ("bf16", "fp32"),
     ("sm_90", "sm_80")),
    ("fused-ep8", dict(activation="swiglu"), 2048, 8, "nvshmem", "compute", False, ("bf16",), ("sm_90",)),
    # expert parallelism with peer-pointer puts (shm; NVLink peers of an NVSHMEM heap): the reduce task's stores
    ("fused-ep8p", dict(activation="swiglu"), 2048, 8, "ptr", "compute", False, ("bf16",), ("sm_90", "sm_80")),
)

# The device-initiated exchanges of the triton backend's expert parallelism (parallel/device_exchange.py): one forward
# and backward's put and collect launches at (case, world size, tokens per rank, hidden size, top_k), DeepSeek-V3's
# layer over 8 ranks.
EXCHANGE_CASES = (("ep-exchange", 8, 4096, 7168, 8),)


def case_configs(overrides: dict) -> list:
    """The MoEConfigs of one case: BENCH_SHAPE with the overrides, once per activation it lists (in that order)."""
    from .config import MoEConfig

    acts = overrides.get("activation", "swiglu")
    acts = (acts,) if isinstance(acts, str) else acts
    return [MoEConfig(**BENCH_SHAPE, **{**overrides, "activation": a}, **ACTIVATION_VALUES.get(a, {})) for a in acts]


def _plan(target: str):
    """[(case, dtype name, Launch)] for one target, distinct launches only."""
    os.environ.pop("TRITON_INTERPRET", None)  # the gate compiles; the interpreter's kernels cannot be
    import torch

    from .triton_backend import plan_launches

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    from .fused_backend import plan_launches as plan_fused

    seen, jobs = set(), []
    for case, overrides, tokens, world, puts, mode, save, dtypes, archs in FUSED_CASES:
        if target not in archs:
            continue
        for dtype in dtypes:
            for i, cfg in enumerate(case_configs(overrides)):
                if i and dtype not in EXTRA_ACTIVATION_DTYPES:
                    continue
                for launch in plan_fused(cfg, torch_dtype[dtype], tokens, target, world, puts, mode, save):
                    name = f"{launch.name}:{cfg.activation}"  # one launch per activation: say which
                    jobs.append((case, dtype, name, launch.tags, _job(launch, target)))
    from .parallel.device_exchange import plan_launches as plan_exchange

    for case, world, tokens, hidden, top_k in EXCHANGE_CASES:
        for dtype in DTYPES:
            for launch in plan_exchange(torch_dtype[dtype], world, tokens, hidden, top_k):
                job = _job(launch, target)
                key = (job["kernel"], repr(job["signature"]), repr(job["constexprs"]))
                if key not in seen:
                    seen.add(key)
                    jobs.append((case, dtype, launch.name, launch.tags, job))
    for dtype in DTYPES:
        for case, overrides, tokens, backward, rows_mode, given in CASES:
            for i, cfg in enumerate(case_configs(overrides)):
                if i and dtype not in EXTRA_ACTIVATION_DTYPES:
                    continue
                for launch in plan_launches(cfg, torch_dtype[dtype], tokens, target, backward, rows_mode, given):
                    job = _job(launch, target)
                    key = (job["kernel"], repr(job["signature"]), repr(job["constexprs"]),
                           job["options"]["num_warps"], job["options"]["num_stages"])
                    if key not in seen:
                        seen.add(key)
                        jobs.append((case, dtype, launch.name, launch.tags, job))
    return jobs


def _job(launch, target: str) -> dict:
    """A picklable description of a launch: argument types as Triton's JIT would specialise them."""
    from .triton_backend import triton_type

    fn = launch.kernel
    names = list(fn.arg_names)
    plain = {names[i] if isinstance(i, int) else i for i in (getattr(fn, "do_not_specialize", None) or ())}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in launch.constexprs:
            signature[name], constexprs[name] = "constexpr", launch.constexprs[name]
            continue
        value = launch.args[name]
        if name in plain and value is not None:  # do_not_specialize: the type only, never a value
            signature[name] = "i64" if isinstance(value, int) and not -2**31 <= value < 2**31 else triton_type(value)
            continue
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name], constexprs[name] = "constexpr", value  # the JIT specialises None and 1
            continue
        signature[name] = triton_type(value)
        aligned = signature[name].startswith("*") or (isinstance(value, int) and value % 16 == 0)
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    if "extern_libs" in launch.tags:
        options["extern_libs"] = launch.tags["extern_libs"]
    return {"module": fn.fn.__module__, "kernel": fn.fn.__name__, "signature": signature, "constexprs": constexprs,
            "attrs": attrs, "options": options, "target": target}


def _ptxas() -> str:
    try:
        from triton import knobs

        for tool in ("ptxas_blackwell", "ptxas"):
            found = getattr(knobs.nvidia, tool, None)
            if found is not None and getattr(found, "path", None):
                return found.path
    except (ImportError, AttributeError):
        pass
    path = shutil.which("ptxas")
    if path is None:
        raise RuntimeError("ptxas not found (it ships with the triton wheel)")
    return path


def _resources(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ptxas -v on the PTX Triton produced."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        done = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    regs = max((int(m) for m in re.findall(r"Used (\d+) registers", log)), default=-1)
    spills = sum(int(m) for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


# ----------------------------------------------------------------------------------------------------------
# Uniform control flow (DESIGN §6): no branch of a kernel may depend on a per-thread value
# ----------------------------------------------------------------------------------------------------------
# A Triton program is several warps that must meet the same barriers. A scalar atomic is done by one thread and
# its result reaches every thread through shared memory, and so does a reduction across warps. But a scalar
# volatile (relaxed, acquire) load or a timer read is done by every thread, and a tensor smaller than the
# program is replicated in every warp, which reduces its own copy of its own loads (shfl, redux.sync). Such
# values can differ between warps: a loop or branch on one lets a warp leave a wait while another stays, and
# they then meet different barriers (a hang) or act on stale values. The check reads the PTX because Triton's
# lowering, not the source, decides which values come back broadcast.
#
# Sources: ld with .volatile / .relaxed / .acquire outside shared memory, atom results (a vector atomic's per
# thread result; a scalar atomic's result is only used through the st.shared / ld.shared broadcast), reads of
# %globaltimer / %clock. Taint follows register operands (guard predicates included) into every result, and
# through local memory (a dynamically indexed array); it ends at a store to shared memory, because what comes
# back with ld.shared is the broadcast or reduced value (an ld.shared at a tainted address stays tainted).
# Flow-insensitive over each kernel entry: a register is tainted if any of its definitions is. Bodies of
# called .func (the NVSHMEM library, whose calls are per-thread by design) are not checked; the call itself is.

_PTX_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]*)"', re.M)
_PTX_FUNC = re.compile(r"^(?:\.(?:visible|weak|extern)\s+)*\.(entry|func)\b")
_PTX_NAME = re.compile(r"\.(?:entry|func)\s+(?:\([^)]*\)\s*)?([\w$]+)")
_PTX_LOC = re.compile(r"^\.loc\s+(\d+)\s+(\d+)\s+(\d+)(?:.*?inlined_at\s+(\d+)\s+(\d+)\s+(\d+))?")
_PTX_LEAD = re.compile(r"\s*(\{|\}|[$\w]+:(?!:))")  # not ld.shared::cta
_PTX_GUARD = re.compile(r"@(!?)(%[\w$]+)\s+")
_PTX_REG = re.compile(r"%[A-Za-z_$][\w$]*(?:\.[xyz]\b)?")
_PTX_TIMERS = {"%globaltimer", "%globaltimer_lo", "%globaltimer_hi", "%clock", "%clock64", "%clock_hi"}
# Opcodes (up to the first dot) whose first operand is not a destination.
_PTX_NO_DEST = {"st", "red", "bar", "barrier", "membar", "fence", "bra", "brx", "ret", "exit", "trap", "brkpt", "cp",
                "prefetch", "prefetchu", "stmatrix", "nanosleep", "pmevent", "setmaxnreg", "griddepcontrol",
                "discard", "applypriority", "sust", "sured", "call"}
_PTX_CONTROL = {"bra", "brx", "ret", "exit", "call", "bar", "barrier"}  # a predicate on these is control flow
_PTX_MEMORY_ORDER = {"volatile", "relaxed", "acquire"}
_PTX_NOT_GLOBAL = {"shared", "shared::cta", "shared::cluster", "local", "param", "const"}


class PtxInsn:
    """One PTX instruction: opcode with its qualifiers, guard predicate, destination and source registers."""

    __slots__ = ("line", "text", "loc", "opcode", "guard", "negated", "dests", "srcs", "operands")

    def __init__(self, line: int, text: str, loc: str):
        self.line, self.text, self.loc = line, text, loc
        m = _PTX_GUARD.match(text)
        self.guard, self.negated = (m.group(2), m.group(1) == "!") if m else (None, False)
        body = text[m.end():] if m else text
        self.opcode, _, rest = body.partition(" ")
        self.opcode = self.opcode.strip()
        self.operands = _split_operands(rest.strip())
        base = self.opcode.split(".")[0]
        if base in _PTX_NO_DEST or not self.operands or self.operands[0].lstrip().startswith("["):
            self.dests = []
            self.srcs = [r for op in self.operands for r in _PTX_REG.findall(op)]
        else:
            self.dests = _PTX_REG.findall(self.operands[0])
            self.srcs = [r for op in self.operands[1:] for r in _PTX_REG.findall(op)]
        if self.guard:
            self.srcs.append(self.guard)

    @property
    def qualifiers(self) -> list[str]:
        return self.opcode.split(".")[1:]

    def source_kind(self) -> str | None:
        """Why this instruction's result differs from thread to thread by itself, if it does."""
        base, quals = self.opcode.split(".")[0], set(self.qualifiers)
        if base == "ld" and quals & _PTX_MEMORY_ORDER and not quals & _PTX_NOT_GLOBAL:
            return f"per-thread {'/'.join(sorted(quals & _PTX_MEMORY_ORDER))} load"
        if base == "atom":
            return "per-thread atomic result"
        timer = next((r for r in self.srcs if r in _PTX_TIMERS), None)
        return f"per-thread {timer} read" if timer else None

    def where(self) -> str:
        return f"ptx:{self.line}" + (f" {self.loc}" if self.loc else "")


class PtxFunction:
    def __init__(self, name: str, kind: str):
        self.name, self.kind = name, kind
        self.insns: list[PtxInsn] = []
        self.labels: dict[str, int] = {}  # label -> index of the instruction it precedes
        self.label_sites: list[tuple[str, int]] = []  # every label, also those inline asm blocks repeat


def _split_operands(text: str) -> list[str]:
    """Operands at nesting depth 0 ((), [], {} nest)."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def parse_ptx(ptx: str) -> list[PtxFunction]:
    """The functions defined in a PTX module (prototypes skipped), each as its instruction list with the
    source position (`.loc`, and where it was inlined) of every instruction."""
    files = {int(k): os.path.basename(v) for k, v in _PTX_FILE.findall(ptx)}
    funcs: list[PtxFunction] = []
    fn, header, depth, buf, buf_line, loc = None, None, 0, "", 0, ""
    asm = None  # inside an inline asm block: whether its first .loc was seen
    for lineno, raw in enumerate(ptx.splitlines(), 1):
        s = raw.split("//", 1)[0].strip()
        comment = raw.strip()
        if comment.startswith("// begin inline asm"):
            asm = False
        elif comment.startswith("// end inline asm"):
            asm = None
        if fn is None:
            if header is None:
                if not _PTX_FUNC.match(s):
                    continue
                header = ""
            header += " " + s
            paren = 0
            for pos, ch in enumerate(header):
                paren += (ch == "(") - (ch == ")")
                if paren == 0 and ch in ";{":
                    break
            else:
                continue
            if ch == "{":
                fn = PtxFunction(_PTX_NAME.search(header).group(1), _PTX_FUNC.match(header.strip()).group(1))
                funcs.append(fn)
                depth, buf = 1, ""
                s = header[pos + 1:].strip()
            header = None
            if fn is None:
                continue
        m = _PTX_LOC.match(s)
        if m and asm:  # the later .loc lines of an inline asm block name the next statement's source
            continue
        if m:
            if asm is False:
                asm = True
            f, ln, col = int(m.group(1)), m.group(2), m.group(3)
            loc = f"{files.get(f, f)}:{ln}:{col}"
            if m.group(4):
                loc += f" (inlined at {files.get(int(m.group(4)), m.group(4))}:{m.group(5)})"
            continue
        pos = 0
        while fn is not None and pos < len(s):
            if not buf.strip():
                lead = _PTX_LEAD.match(s, pos)
                if lead:
                    tok = lead.group(1)
                    if tok == "{":
                        depth += 1
                    elif tok == "}":
                        depth -= 1
                        if depth == 0:
                            fn = None
                    else:
                        fn.labels[tok[:-1]] = len(fn.insns)
                        fn.label_sites.append((tok[:-1], len(fn.insns)))
                    pos = lead.end()
                    continue
                buf_line = lineno
            end = s.find(";", pos)
            if end < 0:
                buf += " " + s[pos:]
                break
            text = " ".join((buf + " " + s[pos:end]).split())
            buf, pos = "", end + 1
            if text and not text.startswith("."):
                fn.insns.append(PtxInsn(buf_line, text, loc))
    return funcs


def _taint(fn: PtxFunction) -> dict:
    """register -> (index of the instruction that made it per-thread, the tainted operand it came from or None
    for a source), to a fixpoint over the function."""
    tainted: dict = {}
    local = None  # (store index, tainted register stored) once local memory holds a per-thread value
    changed = True
    while changed:
        changed = False
        for i, ins in enumerate(fn.insns):
            quals = set(ins.qualifiers)
            if ins.opcode.startswith("st.") and "local" in quals and local is None:
                via = next((r for r in ins.srcs if r in tainted), None)
                if via is not None:
                    local, changed = (i, via), True
            if not ins.dests:
                continue
            reason = None
            if ins.source_kind():
                reason = (i, None)
            elif ins.opcode.startswith("ld.") and "local" in quals and local is not None:
                reason = (i, local[1])
            else:
                via = next((r for r in ins.srcs if r in tainted), None)
                if via is not None:
                    reason = (i, via)
            if reason is not None:
                for d in ins.dests:
                    if d not in tainted:
                        tainted[d] = reason
                        changed = True
    return tainted


def _sources(fn: PtxFunction, tainted: dict, reg: str) -> list[PtxInsn]:
    """Every per-thread source that reaches `reg` through the definitions of tainted registers."""
    defs: dict = {}
    for i, ins in enumerate(fn.insns):
        for d in ins.dests:
            defs.setdefault(d, []).append(i)
    found, seen, work = {}, set(), [reg]
    while work:
        r = work.pop()
        if r in seen or r not in tainted:
            continue
        seen.add(r)
        for i in defs.get(r, ()):
            ins = fn.insns[i]
            if ins.source_kind():
                found[i] = ins
            elif ins.opcode.startswith("ld.") and "local" in ins.qualifiers:
                work.append(tainted[r][1])
            else:
                work.extend(s for s in ins.srcs if s in tainted)
    return [found[i] for i in sorted(found)]


class Violation:
    """A control-flow instruction of a kernel that depends on a per-thread value."""

    def __init__(self, fn: PtxFunction, ins: PtxInsn, tainted: dict, reg: str):
        self.function, self.branch, self.where = fn.name, ins.text, ins.where()
        self.chain, r, seen = [], reg, set()  # one path back to a source, register by register
        while r in tainted and r not in seen:
            seen.add(r)
            i, via = tainted[r]
            step = fn.insns[i]
            kind = step.source_kind()
            note = f"  <- {kind}" if kind else "  (through local memory)" if step.opcode.startswith("ld.") else ""
            self.chain.append(f"{r} <- {step.text}   [{step.where()}]{note}")
            if via is None:
                break
            r = via
        self.sources = [f"{s.source_kind()} [{s.where()}]" for s in _sources(fn, tainted, reg)]
        # Unrolled copies, and the same kernel for another dtype or target, differ only in PTX lines.
        self.key = (ins.loc, tuple(sorted(s.loc for s in _sources(fn, tainted, reg))))

    def __str__(self) -> str:
        lines = [f"{self.function}: `{self.branch}` [{self.where}] depends on a per-thread value:"]
        lines += ["    " + c for c in self.chain]
        if len(self.sources) > 1:
            lines.append("    all sources: " + "; ".join(self.sources))
        return "\n".join(lines)


def uniform_control_flow(ptx: str) -> list[Violation]:
    """Every branch (or other control-flow predicate) of the module's kernel entries that depends on a
    per-thread value; [] when control flow is uniform."""
    found = []
    for fn in parse_ptx(ptx):
        if fn.kind != "entry":
            continue
        tainted = _taint(fn)
        for ins in fn.insns:
            base = ins.opcode.split(".")[0]
            if base not in _PTX_CONTROL:
                continue
            bad = [ins.guard] if ins.guard in tainted else []
            if base == "brx":  # the index picks the target
                bad += [r for r in ins.srcs if r in tainted and r != ins.guard]
            found += [Violation(fn, ins, tainted, reg) for reg in bad]
    return found


def format_violations(violations: list[Violation]) -> list[str]:
    """One report per distinct branch of the source; copies (unrolled loops) named by their PTX lines."""
    groups: dict = {}
    for v in violations:
        groups.setdefault(v.key, []).append(v)
    out = []
    for group in groups.values():
        out.append(str(group[0]))
        if len(group) > 1:
            more = "1 more copy" if len(group) == 2 else f"{len(group) - 1} more copies"
            out.append(f"    and {more} of this branch at " + ", ".join(v.where.split()[0] for v in group[1:]))
    return out


# ----------------------------------------------------------------------------------------------------------
# One thread's signal (kernels/nvshmem_shim.ll): flashmoe_signal_set must write from thread 0 only
# ----------------------------------------------------------------------------------------------------------
# Scalar Triton code calls the shim from every thread; a signal by each would be 256 remote writes. The shim
# branches on the thread index, and that branch has to survive into the PTX (inlining the NVSHMEM code into it
# leaves stores, atomics and calls). Checked by evaluating the function with the thread index known:
# constants propagated from %tid.x/y/z, branches on known predicates followed one way only.

_PTX_EFFECTS = {"st", "red", "atom", "call", "multimem", "cp"}
_PTX_INT = re.compile(r"^-?(?:0[xX][0-9a-fA-F]+|\d+)$")
_VARYING = object()


def _ptx_value(op: str, values: dict, tid: dict, defined: set):
    """An operand's value: an int, _VARYING, or None while its register has no value yet."""
    op = op.strip()
    if op in tid:
        return tid[op]
    if _PTX_INT.match(op):
        return int(op, 0)
    if op not in defined:  # an address, a label, a special register other than %tid
        return _VARYING
    return values.get(op)


def _ptx_eval(ins: PtxInsn, args: list) -> int | None:
    base, quals = ins.opcode.split(".")[0], ins.qualifiers
    ops = {"or": lambda a, b: a | b, "and": lambda a, b: a & b, "xor": lambda a, b: a ^ b,
           "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
           "shl": lambda a, b: a << b, "shr": lambda a, b: a >> b}
    cmps = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
            "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
            "lo": lambda a, b: a < b, "ls": lambda a, b: a <= b, "hi": lambda a, b: a > b, "hs": lambda a, b: a >= b}
    if base in ("mov", "cvt") and len(args) == 1:
        return args[0]
    if base in ops and len(args) == 2:
        return ops[base](*args)
    if base == "not" and len(args) == 1:
        return 1 - args[0] if "pred" in quals else ~args[0]
    if base == "setp" and len(args) == 2 and quals and quals[0] in cmps:
        return int(cmps[quals[0]](*args))
    if base == "selp" and len(args) == 3:
        return args[0] if args[2] else args[1]
    return None


def _ptx_constants(fn: PtxFunction, tid: dict) -> dict:
    """register -> its value, for the registers that have one value (flow-insensitively) given %tid."""
    values: dict = {}
    defined = {d for ins in fn.insns for d in ins.dests}
    changed = True
    while changed:
        changed = False
        for ins in fn.insns:
            if not ins.dests:
                continue
            guard = values.get(ins.guard) if ins.guard else 1
            if guard is not _VARYING and guard is not None and bool(guard) == ins.negated:
                continue  # never executes
            args = [_ptx_value(op, values, tid, defined) for op in ins.operands[1:]]
            if any(a is None for a in args):
                continue  # an operand without a value yet
            result = _VARYING if any(a is _VARYING for a in args) else _ptx_eval(ins, args)
            result = _VARYING if result is None else result
            if ins.opcode.startswith("setp") and len(ins.dests) == 2:
                results = [result, result if result is _VARYING else 1 - result]  # setp p|q: q is the complement
            else:  # one destination, or an unpacking mov this evaluator does not split
                results = [result if len(ins.dests) == 1 else _VARYING] * len(ins.dests)
            for d, r in zip(ins.dests, results):
                old = values.get(d)
                new = r if old is None or old == r else _VARYING
                if new is not old and new != old:
                    values[d] = new
                    changed = True
    return values


def _ptx_effects_reached(fn: PtxFunction, tid: dict) -> list[PtxInsn]:
    """The stores, atomics and calls a thread with this %tid can execute."""
    values = _ptx_constants(fn, tid)
    reached, work, seen = [], [0], set()
    while work:
        i = work.pop()
        if i in seen or i >= len(fn.insns):
            continue
        seen.add(i)
        ins = fn.insns[i]
        guard = values.get(ins.guard, _VARYING) if ins.guard else True
        maybe = guard is _VARYING or bool(guard) != ins.negated
        always = ins.guard is None or (guard is not _VARYING and bool(guard) != ins.negated)
        base, quals = ins.opcode.split(".")[0], set(ins.qualifiers)
        if maybe and base in _PTX_EFFECTS and not quals & {"param", "local"}:
            reached.append(ins)
        if base == "bra":
            if maybe:
                target = ins.operands[0] if ins.operands else ""
                work.extend([fn.labels[target]] if target in fn.labels else fn.labels.values())
            if not always:
                work.append(i + 1)
        elif base == "brx":
            work.extend(fn.labels.values())
        elif base in ("ret", "exit"):
            if not always:
                work.append(i + 1)
        else:
            work.append(i + 1)
    return reached


def thread0_only(ptx: str, name: str = "flashmoe_signal_set") -> str | None:
    """None when function `name` of the PTX writes (stores, atomics, calls) from thread (0, 0, 0) of the block
    and from no other thread; else what is wrong."""
    fn = next((f for f in parse_ptx(ptx) if f.name == name), None)
    if fn is None:
        return f"no function {name} in the PTX"
    at = {"%tid.x": 0, "%tid.y": 0, "%tid.z": 0}
    if not _ptx_effects_reached(fn, at):
        return f"{name}: thread 0 writes nothing"
    for axis, t in (("x", 1), ("x", 32), ("y", 1), ("z", 1)):
        effects = _ptx_effects_reached(fn, {**at, f"%tid.{axis}": t})
        if effects:
            return f"{name}: thread {axis}={t} reaches `{effects[0].text}` [{effects[0].where()}]"
    return None


def _compile(job: dict) -> dict:
    """Worker: compile one launch; returns its resources or the error."""
    os.environ.pop("TRITON_INTERPRET", None)
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    arch = ARCHS[job["target"]]
    start = time.perf_counter()
    try:
        src = ASTSource(kernel, job["signature"], constexprs=job["constexprs"], attrs=job["attrs"])
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=job["options"])
        ptx = compiled.asm["ptx"]
        regs, spills = _resources(ptx, arch)
    except Exception as e:  # reported as a failed row, never hidden
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "-"
    res = {"regs": regs, "spills": spills, "shared": compiled.metadata.shared, "mma": mma, "uniform": []}
    try:
        res.update(structure_summary(main_loops(ptx)))
        res["uniform"] = uniform_control_flow(ptx)
        if "flashmoe_signal_set" in ptx:  # linked with the NVSHMEM shim
            res["signal"] = thread0_only(ptx, "flashmoe_signal_set") or "ok"
    except Exception as e:  # PTX this reader cannot follow: a failing row, not a crashed gate
        res["ptx_check"] = f"{type(e).__name__}: {e}"
    res["seconds"] = time.perf_counter() - start
    return res


def _report_control_flow(rows, results) -> None:
    """The branches behind each `uniform` verdict that is not ok (a kernel compiled again for another dtype or
    target with the same branches refers to the first), and the thread-0 signal check of NVSHMEM kernels."""
    printed = {}
    for (target, case, dtype, name, tags, job), res in zip(rows, results):
        row = f"{name} {case} {target} {dtype}"
        if res.get("uniform"):
            print(f"\nuniform control flow: {row}: {len(res['uniform'])} branches on per-thread values")
            key = (name, tuple(v.key for v in res["uniform"]))
            if key in printed:
                print(f"  the same branches as {printed[key]}")
            else:
                printed[key] = row
                for text in format_violations(res["uniform"]):
                    print("  " + text.replace("\n", "\n  "))
        if "signal" in res:
            print(f"\nthread-0 signal: {row}: {res['signal']}")


def _rows_table(rows, results) -> tuple[int, list]:
    """Print the table; (failing rows, the GEMM rows whose main loop is not pipelined)."""
    for res in results:
        res.setdefault("mma_shape", "-")
        res.setdefault("pipeline", "-")
    for (target, _, _, _, _, job), res in zip(rows, results):
        if "error" not in res:
            res["ctas"] = ctas_per_sm(target, res["regs"], job["options"]["num_warps"], res["shared"])
    mma_w = max([len("mma")] + [len(r["mma_shape"]) for r in results])
    pipe_w = max([len("main loop")] + [len(r["pipeline"]) for r in results])
    header = f"{'kernel':<26} {'case':<9} {'arch':<6} {'dtype':<5} {'regime':<8} {'config':<20} " \
             f"{'regs':>4} {'smem KiB':>8} {'spills':>6} {'CTA/SM':<7} {'mma':<{mma_w}} {'main loop':<{pipe_w}} " \
             f"{'uniform':<7} verdict"
    print(header)
    print("-" * len(header))
    failures, unpipelined = 0, []
    for (target, case, dtype, name, tags, job), res in zip(rows, results):
        problems, notes = [], []
        if "error" in res:
            problems.append("does not compile: " + res["error"])
        else:
            if res["spills"] > 0:
                problems.append(f"spills {res['spills']} B")
            if res["shared"] > SHARED_LIMIT[target]:
                problems.append(f"shared memory {res['shared']} B > {SHARED_LIMIT[target]} B")
            if target == "sm_90" and dtype in ("bf16", "fp16") and "config" in tags and res["mma"] != "wgmma":
                problems.append("16-bit GEMM without wgmma")
            if "config" in tags and res.get("pipelined") is False:
                unpipelined.append((target, case, dtype, name, res))
                (problems if NOT_PIPELINED_FAILS else notes).append("NOT PIPELINED")
            if res["uniform"]:
                problems.append(f"{len(res['uniform'])} branches on per-thread values")
            if res.get("signal", "ok") != "ok":
                problems.append("signal not from thread 0 alone")
            if "ptx_check" in res:
                problems.append("PTX checks failed: " + res["ptx_check"])
        failures += bool(problems)
        if "error" in res:
            regs = smem = spills = ctas = "-"
        else:
            regs, smem, spills = res["regs"], f"{res['shared'] / 1024:.1f}", res["spills"]
            ctas = f"{res['ctas'][0]} {res['ctas'][1]}"
        uniform = "-" if "error" in res or "ptx_check" in res else f"{len(res['uniform'])} bad" if res["uniform"] \
            else "ok"
        verdict = "; ".join(problems + notes) if problems else "ok" + "".join(f" ({n})" for n in notes)
        print(f"{name:<26} {case:<9} {target:<6} {dtype:<5} {tags.get('regime', '-'):<8} {tags.get('config', '-'):<20} "
              f"{regs:>4} {smem:>8} {spills:>6} {ctas:<7} {res['mma_shape']:<{mma_w}} {res['pipeline']:<{pipe_w}} "
              f"{uniform:<7} {verdict}")
    return failures, unpipelined


def _report_pipelining(unpipelined) -> None:
    """The GEMM rows whose main loop is not pipelined, by kernel, with the reasons (once per kernel and target)."""
    if not unpipelined:
        return
    by_kernel: dict = {}
    for target, case, dtype, name, res in unpipelined:
        by_kernel.setdefault(name.split(":")[0], []).append((target, case, dtype, res))
    state = "failing" if NOT_PIPELINED_FAILS else "not failing while NOT_PIPELINED_FAILS is False"
    print(f"\nmain loop NOT PIPELINED ({state}): {len(unpipelined)} rows: "
          + ", ".join(f"{k} x{len(v)}" for k, v in by_kernel.items()))
    for kernel, found in by_kernel.items():
        seen = set()
        for target, case, dtype, res in found:
            if target in seen:
                continue
            seen.add(target)
            print(f"  {kernel} {case} {target} {dtype}: {res['pipeline']}: " + "; ".join(res.get("why", [])))


def _report_traffic(targets, rows, results, jobs: int) -> None:
    """The HBM traffic estimate (traffic_model) of the triton backend's GEMMs at traffic_model.SHAPES, bf16: CTAs
    per SM from the compiled row of the same kernel and tile config (the most demanding one; compiled here when
    the gate's cases did not reach it)."""
    import torch

    from . import traffic_model as tm
    from .config import MoEConfig
    from .triton_backend import plan_launches

    def key(target, job):
        c = job["constexprs"]
        return (target, job["kernel"], c.get("BLOCK_M"), c.get("BLOCK_N"), c.get("BLOCK_K"), c.get("GROUP_M"),
                job["options"]["num_warps"], job["options"]["num_stages"])

    candidates: dict = {}
    for (target, case, dtype, name, tags, job), res in zip(rows, results):
        if dtype == "bf16" and "error" not in res:
            candidates.setdefault(key(target, job), []).append((job, res))

    def closest(target, job):
        """The compiled row most like `job`: most constexprs equal, then the most registers and shared memory."""
        found = candidates.get(key(target, job), [])
        same = [(sum(c["constexprs"].get(k) == v for k, v in job["constexprs"].items()), r["regs"], r["shared"], r)
                for c, r in found]
        return max(same, key=lambda s: s[:3])[3] if same else None

    planned = []
    for target in targets:
        for shape, fields, tokens, backward in tm.SHAPES:
            for launch in plan_launches(MoEConfig(**fields), torch.bfloat16, tokens, target, backward):
                if tm.MODELS.get(launch.kernel.fn.__name__):
                    job = _job(launch, target)
                    planned.append((target, shape, launch, job, closest(target, job)))
    missing = {key(t, j): j for t, _, _, j, r in planned if r is None}
    if missing:
        if jobs > 1:
            with ProcessPoolExecutor(jobs) as pool:
                done = dict(zip(missing, pool.map(_compile, missing.values())))
        else:
            done = {k: _compile(j) for k, j in missing.items()}
        planned = [(t, s, la, j, r if r is not None else done[key(t, j)]) for t, s, la, j, r in planned]
    gb = 1e9
    for target in targets:
        part, sms, l2 = tm.DEVICES[target]
        print(f"\nHBM traffic ESTIMATE, {target} ({part}: {sms} SMs, L2 {l2 / 2**20:.0f} MiB), bf16, uniform routing "
              "(a model, not a measurement: flashmoe_py/traffic_model.py)")
        print("  GB = 1e9 bytes, x = / once; row-major = GROUP_M 1; column-major = row tiles fastest (the 2-D grids' "
              "order before grouping); once = read A and B, write C once")
        print(f"{'shape':<10} {'kernel':<14} {'programs':>8} {'order':<6} {'CTA/SM':>6} {'A once':>7} {'B once':>7} "
              f"{'C once':>7} {'once':>7} | {'as launched':>13} | {'row-major':>13} | {'column-major':>13}")
        for t, shape, launch, job, res in planned:
            if t != target:
                continue
            if "error" in res:
                print(f"{shape:<10} {launch.name:<14} does not compile: {res['error']}")
                continue
            ctas = ctas_per_sm(t, res["regs"], job["options"]["num_warps"], res["shared"])[0]
            try:
                est = tm.estimate(launch, t, ctas)
            except ValueError as e:  # the model no longer matches the kernel's grid: say so, do not guess
                print(f"{shape:<10} {launch.name:<14} no estimate: {e}")
                continue
            once = est.once_total
            order = "-" if est.group_m is None else f"g{est.group_m}"

            def cell(b):
                return f"{b / gb:6.2f} {b / once:5.2f}x"
            print(f"{shape:<10} {launch.name:<14} {est.programs:>8} {order:<6} {ctas:>6} {est.once['a'] / gb:7.2f} "
                  f"{est.once['b'] / gb:7.2f} {est.once['c'] / gb:7.2f} {once / gb:7.2f} | {cell(est.launched)} | "
                  f"{cell(est.row_major)} | {cell(est.column_major)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--case", action="append", help="only these cases (repeatable; default: all), e.g. fused-ep8")
    parser.add_argument("--arch", choices=sorted(ARCHS), action="append", help="only these targets (default: both)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    targets = args.arch or list(ARCHS)
    rows = [(target, *job) for target in targets for job in _plan(target) if not args.case or job[0] in args.case]
    if not rows:
        parser.error(f"--case: none of {args.case} is a case; cases: "
                     f"{', '.join(c[0] for c in FUSED_CASES + CASES)}")
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_compile, [r[-1] for r in rows]))
    else:
        results = [_compile(r[-1]) for r in rows]

    failures, unpipelined = _rows_table(rows, results)
    _report_pipelining(unpipelined)
    _report_control_flow(rows, results)
    compiled_at = time.perf_counter()
    _report_traffic(targets, rows, results, args.jobs)
    took = time.perf_counter() - start
    import triton

    print(f"\n{len(rows)} compilations with Triton {triton.__version__} in {took:.0f} s (the estimate "
          f"{time.perf_counter() - compiled_at:.0f} s), {failures} failing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
