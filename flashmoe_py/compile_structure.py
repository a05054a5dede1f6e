"""The structure of a compiled GEMM, read from its PTX (no GPU): which MMA instruction its main loop issues,
how deep that loop's pipeline is, and how many of its CTAs fit on one SM. Used by the compile gate
(`flashmoe_py.triton_compile_check`, `make compile-check`) and by the traffic estimate (`traffic_model`).

Main loops. The PTX of each kernel entry is cut into basic blocks (at labels and after branches); a branch to a
block at or before its own is a back edge, and its natural loop is the header plus every block that reaches the
branch without passing the header. The main loops are the innermost loops that contain an MMA instruction
(`wgmma.mma_async`, `mma.sync`); MMAs peeled out of the loop (Triton's prologue and epilogue) are not counted.
For each main loop:
  mma          the MMA shape: `wgmma n=64` (Hopper warpgroup MMA, m64nNk16 for 16-bit operands: N is the width one
               instruction covers), `mma m16n8k16` (mma.sync).
  copy stages  how many iterations of operand loads the loop keeps in flight while it computes one:
               cp.async: the loop commits c groups per iteration and waits with cp.async.wait_group N, which leaves
               N groups (N / c later iterations) in flight: N // c + 1 stages, 1 when it waits for everything
               (wait_group 0) every iteration; TMA (cp.async.bulk.tensor with mbarrier waits): Triton's pipeliner
               initialises one mbarrier per stage before the loop, so the mbarrier.init count there (1 when the
               loop initialises its barrier itself); 0: synchronous loads (ld.global to registers, st.shared).
  mma in flight  wgmma.wait_group N in the loop: N MMA groups stay in flight across the wait (0: the MMAs drain
               every iteration); None for mma.sync (synchronous per warp).
A main loop is pipelined when it keeps at least 2 copy stages in flight: the loads of a later iteration are on
their way while the current one's MMAs run. Synchronous loads (0) and a full drain every iteration (1: the next
iteration's loads wait for all outstanding copies) are not.

CTAs per SM (`ctas_per_sm`): the least of the limits by registers, threads, blocks and shared memory, with the
numbers of LIMITS (the CUDA occupancy rules: registers are allocated per warp in units of 256, each block also
takes 1 KiB of shared memory the system reserves).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Per-target SM resources (CUDA C Programming Guide, "Technical Specifications per Compute Capability", and the
# occupancy calculator's allocation rules). sm_90: H100/H200; sm_80: A100 (sm_86/89 parts have less shared memory
# and threads: the gate's sm_80 target is the A100).
LIMITS = {
    "sm_90": dict(regs=65536, reg_unit=256, threads=2048, blocks=32, smem=228 * 1024, smem_reserved=1024),
    "sm_80": dict(regs=65536, reg_unit=256, threads=2048, blocks=32, smem=164 * 1024, smem_reserved=1024),
}

_WGMMA = re.compile(r"^wgmma\.mma_async(?:\.sp)?\.sync\.aligned\.m(\d+)n(\d+)k(\d+)")
_MMA = re.compile(r"^mma\.sync\.aligned\.m(\d+)n(\d+)k(\d+)")
_INT = re.compile(r"^\d+$")


def ctas_per_sm(target: str, regs: int, num_warps: int, shared: int) -> tuple[int, str]:
    """(CTAs of one kernel resident on an SM at once, the limit that binds: regs, smem, threads or blocks)."""
    lim = LIMITS[target]
    per_warp = -(-max(regs, 1) * 32 // lim["reg_unit"]) * lim["reg_unit"]
    bounds = {"regs": lim["regs"] // (per_warp * num_warps),
              "threads": lim["threads"] // (32 * num_warps),
              "blocks": lim["blocks"],
              "smem": lim["smem"] // (shared + lim["smem_reserved"])}
    limiter = min(bounds, key=lambda k: bounds[k])
    return bounds[limiter], limiter


@dataclass
class MainLoop:
    """One innermost loop of a kernel that issues MMAs (see the module docstring)."""

    function: str
    first_line: int  # PTX lines of the loop's first and last instruction
    last_line: int
    mma: str  # e.g. "wgmma n=64", "mma m16n8k16" (several widths: "wgmma n=64/128")
    copy: str | None  # "cp.async", "tma" or None (synchronous loads)
    stages: int | None  # copy stages in flight (None: copies the loop never waits for)
    mma_in_flight: int | None  # wgmma groups left in flight by the loop's wait (None: mma.sync or no wait)
    commits: int  # cp.async.commit_group per iteration
    wgmma_n: tuple = ()  # the wgmma widths
    mma_sync: tuple = ()  # the mma.sync shapes ("mma m16n8k16")

    @property
    def pipelined(self) -> bool:
        return self.stages is None or self.stages >= 2

    @property
    def reason(self) -> str:
        """Why the loop is not pipelined ('' when it is)."""
        if self.pipelined:
            return ""
        if self.copy is None:
            return "synchronous loads (no cp.async or TMA in the main loop)"
        if self.copy == "tma":
            return "one TMA buffer: each iteration waits for its own loads"
        return "cp.async.wait_group 0 in the main loop: every iteration waits for all its copies"

    def describe(self) -> str:
        """Compact: 'cp.async 3 | wg 2' (copy kind and stages, wgmma groups in flight)."""
        copy = "sync" if self.copy is None else f"{self.copy} {'?' if self.stages is None else self.stages}"
        if self.mma.startswith("wgmma"):
            copy += f" | wg {'?' if self.mma_in_flight is None else self.mma_in_flight}"
        return copy


def _blocks(fn) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """Basic blocks of a parsed PTX function as (first, end) instruction ranges, and each block's successors."""
    sites: dict[str, list[int]] = {}
    for name, index in getattr(fn, "label_sites", None) or fn.labels.items():
        sites.setdefault(name, []).append(index)
    starts = {0} | {i for idx in sites.values() for i in idx if i < len(fn.insns)}
    for i, ins in enumerate(fn.insns):
        if ins.opcode.split(".")[0] in ("bra", "brx", "ret", "exit") and i + 1 < len(fn.insns):
            starts.add(i + 1)
    order = sorted(starts)
    ranges = [(s, order[k + 1] if k + 1 < len(order) else len(fn.insns)) for k, s in enumerate(order)]
    block_at = {s: k for k, (s, _) in enumerate(ranges)}
    succs: list[list[int]] = []
    for k, (s, end) in enumerate(ranges):
        last = fn.insns[end - 1] if end > s else None
        base = last.opcode.split(".")[0] if last else ""
        out = []
        if base == "bra" and last.operands:
            target = last.operands[0].strip()
            if target in sites:  # the nearest label of that name: inline asm blocks reuse theirs (waitLoop)
                out.append(block_at.get(min(sites[target], key=lambda i: abs(i - (end - 1))), k))
        elif base == "brx":
            out.extend(block_at[i] for idx in sites.values() for i in idx if i in block_at)
        falls = last is None or base not in ("bra", "brx", "ret", "exit") or last.guard is not None
        if falls and k + 1 < len(ranges):
            out.append(k + 1)
        succs.append(out)
    return ranges, succs


def _natural_loops(ranges, succs) -> list[set[int]]:
    """Blocks of each natural loop (loops sharing a header merged), from layout back edges."""
    preds: list[list[int]] = [[] for _ in ranges]
    for u, out in enumerate(succs):
        for v in out:
            preds[v].append(u)
    loops: dict[int, set[int]] = {}
    for u, out in enumerate(succs):
        for h in out:
            if h > u:
                continue
            body, work = loops.setdefault(h, {h}), [u]
            while work:
                b = work.pop()
                if b in body:
                    continue
                body.add(b)
                work.extend(preds[b])
    return list(loops.values())


def _mma_shape(opcode: str) -> str | None:
    m = _WGMMA.match(opcode)
    if m:
        return f"wgmma n={m.group(2)}"
    m = _MMA.match(opcode)
    return f"mma m{m.group(1)}n{m.group(2)}k{m.group(3)}" if m else None


def _mma_text(widths, syncs) -> str:
    return ", ".join((["wgmma n=" + "/".join(map(str, widths))] if widths else []) + list(syncs))


def _wait_count(ins) -> int | None:
    op = ins.operands[0].strip() if ins.operands else ""
    return int(op) if _INT.match(op) else None


def main_loops(ptx: str) -> list[MainLoop]:
    """The main loops of every kernel entry of a PTX module (see the module docstring), in PTX order."""
    from .triton_compile_check import parse_ptx

    found = []
    for fn in parse_ptx(ptx):
        if fn.kind != "entry":
            continue
        ranges, succs = _blocks(fn)
        loops = [sorted(i for b in body for i in range(*ranges[b])) for body in _natural_loops(ranges, succs)]
        with_mma = [set(idx) for idx in loops if any(_mma_shape(fn.insns[i].opcode) for i in idx)]
        inner = [s for s in with_mma if not any(o < s for o in with_mma)]
        in_any_loop = set().union(*(set(idx) for idx in loops)) if loops else set()
        for body in inner:
            insns = [fn.insns[i] for i in sorted(body)]
            ops = [ins.opcode for ins in insns]
            widths = tuple(sorted({int(m.group(2)) for m in map(_WGMMA.match, ops) if m}))
            syncs = tuple(sorted({s for op in ops if not _WGMMA.match(op) for s in [_mma_shape(op)] if s}))
            commits = sum(op.startswith("cp.async.commit_group") for op in ops)
            waits = [0 if op.startswith("cp.async.wait_all") else _wait_count(ins) for op, ins in zip(ops, insns)
                     if op.startswith("cp.async.wait_group") or op.startswith("cp.async.wait_all")]
            waits = [w for w in waits if w is not None]
            copies = any(re.match(r"cp\.async\.c[ag]\b", op) for op in ops)
            bulk = any(op.startswith("cp.async.bulk") for op in ops)
            if copies:
                copy = "cp.async"
                stages = None if not waits else min(waits) // max(commits, 1) + 1
            elif bulk:
                copy = "tma"
                if any(op.startswith("mbarrier.init") for op in ops):
                    stages = 1
                else:
                    head = min(body)
                    stages = max(1, sum(1 for i, ins in enumerate(fn.insns[:head])
                                        if ins.opcode.startswith("mbarrier.init") and i not in in_any_loop))
            else:
                copy, stages = None, 0
            wg = [_wait_count(ins) for op, ins in zip(ops, insns) if op.startswith("wgmma.wait_group")]
            wg = [w for w in wg if w is not None]
            in_flight = min(wg) if wg and widths else None
            found.append(MainLoop(fn.name, insns[0].line, insns[-1].line, _mma_text(widths, syncs), copy, stages,
                                  in_flight, commits, widths, syncs))
    return sorted(found, key=lambda loop: loop.first_line)


def summary(loops: list[MainLoop]) -> dict:
    """The gate row's view of a kernel's main loops: mma shapes, the least pipelined loop's description, whether
    all are pipelined (None without a main loop) and the reasons of those that are not."""
    if not loops:
        return {"mma_shape": "-", "pipeline": "no loop", "pipelined": None, "why": []}
    widths = sorted({n for loop in loops for n in loop.wgmma_n})
    syncs = sorted({s for loop in loops for s in loop.mma_sync})
    worst = min(loops, key=lambda loop: (loop.pipelined, loop.stages if loop.stages is not None else 99,
                                         loop.mma_in_flight if loop.mma_in_flight is not None else 99))
    text = worst.describe() + (f" ({len(loops)} loops)" if len(loops) > 1 else "")
    why = sorted({f"{loop.reason} [ptx:{loop.first_line}-{loop.last_line}]" for loop in loops if not loop.pipelined})
    return {"mma_shape": _mma_text(widths, syncs), "pipeline": text, "pipelined": all(loop.pipelined for loop in loops),
            "why": why}
