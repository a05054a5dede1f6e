"""kernels/nvshmem_shim.ll: which threads of a program make each NVSHMEM call (issue 11).

Scalar Triton code calls the shim from every thread of the program. nvshmemx_signal_op is one remote write per
calling thread, so flashmoe_signal_set must call it from thread (0, 0, 0) alone; the _block put is collective
and nvshmem_quiet covers the calling thread's own operations, so those two are called by every thread.

The shim is read as text: each function's blocks and branches, with a small evaluator that runs its integer
instructions for a given thread index (llvm.nvvm.read.ptx.sreg.tid.x/y/z) and follows a conditional branch one
way where the condition is known, both ways where it is not. A call is reached by a thread when some path
from the entry to it is open for that thread's index. The compile gate checks the same of the PTX
(triton_compile_check.thread0_only); this test needs no Triton.
"""

from __future__ import annotations

import os
import re

SHIM = os.path.join(os.path.dirname(__file__), os.pardir, "kernels", "nvshmem_shim.ll")

# Thread indices of a 1-D block of 256 threads and a few outside it (y, z, which the kernels never use but a
# guard must not assume away).
THREAD0 = (0, 0, 0)
OTHERS = ((1, 0, 0), (31, 0, 0), (32, 0, 0), (255, 0, 0), (0, 1, 0), (0, 0, 1))

_DEFINE = re.compile(r"^define\b[^@]*@([\w.$]+)\(.*\{\s*$")
_LABEL = re.compile(r"^([\w.$-]+):")
_ASSIGN = re.compile(r"^(%[\w.$]+)\s*=\s*(.*)$")
_BINOPS = {"or": lambda a, b: a | b, "and": lambda a, b: a & b, "xor": lambda a, b: a ^ b,
           "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}
_ICMP = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "ult": lambda a, b: a < b, "slt": lambda a, b: a < b,
         "ule": lambda a, b: a <= b, "sle": lambda a, b: a <= b, "ugt": lambda a, b: a > b, "sgt": lambda a, b: a > b,
         "uge": lambda a, b: a >= b, "sge": lambda a, b: a >= b}


def functions(ir: str) -> dict[str, dict[str, list[str]]]:
    """name -> {block label -> its instructions}, in order (the entry block first)."""
    funcs, blocks, label = {}, None, None
    for raw in ir.splitlines():
        line = raw.split(";", 1)[0].strip()
        if blocks is None:
            m = _DEFINE.match(line)
            if m:
                blocks, label = funcs.setdefault(m.group(1), {}), "entry"
                blocks[label] = []
            continue
        if line == "}":
            blocks = None
        elif _LABEL.match(line):
            label = _LABEL.match(line).group(1)
            blocks[label] = []
        elif line:
            blocks[label].append(line)
    return funcs


def _value(op: str, values: dict):
    op = op.strip()
    if op in ("true", "false"):
        return int(op == "true")
    if re.fullmatch(r"-?\d+", op):
        return int(op)
    return values.get(op)


def _evaluate(insn: str, values: dict, tid: tuple):
    """The integer value of an instruction's result for this thread, or None if it depends on anything else."""
    m = re.match(r"call i32 @llvm\.nvvm\.read\.ptx\.sreg\.tid\.([xyz])\(\)", insn)
    if m:
        return tid["xyz".index(m.group(1))]
    m = re.match(r"(\w+)\s+(?:(?:nuw|nsw|disjoint)\s+)*i\d+\s+([^,]+),\s*(.+)$", insn)
    if m and m.group(1) in _BINOPS:
        a, b = _value(m.group(2), values), _value(m.group(3), values)
        return None if a is None or b is None else _BINOPS[m.group(1)](a, b)
    m = re.match(r"icmp\s+(\w+)\s+i\d+\s+([^,]+),\s*(.+)$", insn)
    if m:
        a, b = _value(m.group(2), values), _value(m.group(3), values)
        return None if a is None or b is None else int(_ICMP[m.group(1)](a, b))
    m = re.match(r"select\s+i1\s+([^,]+),\s*\S+\s+([^,]+),\s*\S+\s+(.+)$", insn)
    if m:
        c = _value(m.group(1), values)
        return None if c is None else _value(m.group(2) if c else m.group(3), values)
    m = re.match(r"(?:zext|sext|trunc)\s+\S+\s+(\S+)\s+to\s+\S+$", insn)
    return _value(m.group(1), values) if m else None


def calls_reached(blocks: dict[str, list[str]], tid: tuple) -> set[str]:
    """The functions called on some path a thread with index `tid` can take through the function."""
    values: dict = {}
    for insns in blocks.values():  # SSA, and the shim's blocks define values before later blocks use them
        for insn in insns:
            m = _ASSIGN.match(insn)
            if m:
                v = _evaluate(m.group(2), values, tid)
                if v is not None:
                    values[m.group(1)] = v
    reached, seen, work = set(), set(), [next(iter(blocks))]
    while work:
        label = work.pop()
        if label in seen:
            continue
        seen.add(label)
        for insn in blocks[label]:
            reached.update(re.findall(r"\bcall\b[^@]*@([\w.$]+)\(", insn))
            m = re.match(r"br\s+i1\s+([^,]+),\s*label\s+%([\w.$-]+),\s*label\s+%([\w.$-]+)", insn)
            if m:
                c = _value(m.group(1), values)
                work += [m.group(2)] if c == 1 else [m.group(3)] if c == 0 else [m.group(2), m.group(3)]
            elif insn.startswith(("br ", "switch ", "indirectbr ")):
                work += re.findall(r"label\s+%([\w.$-]+)", insn)
    return reached - {n for n in reached if n.startswith("llvm.")}


def _threads_calling(ir: str, func: str, callee: str) -> list[tuple]:
    blocks = functions(ir)[func]
    return [t for t in (THREAD0, *OTHERS) if callee in calls_reached(blocks, t)]


def _shim() -> str:
    with open(SHIM) as f:
        return f.read()


def test_signal_set_signals_from_thread_0_alone():
    assert _threads_calling(_shim(), "flashmoe_signal_set", "nvshmemx_signal_op") == [THREAD0]


def test_block_put_and_quiet_are_called_by_every_thread():
    everyone = [THREAD0, *OTHERS]
    assert _threads_calling(_shim(), "flashmoe_putmem_signal_block", "nvshmemx_putmem_signal_nbi_block") == everyone
    assert _threads_calling(_shim(), "flashmoe_putmem_block", "nvshmemx_putmem_nbi_block") == everyone
    assert _threads_calling(_shim(), "flashmoe_quiet", "nvshmem_quiet") == everyone


_UNGUARDED = """
define i32 @f(i64 %sig, i64 %value, i32 %pe) noinline {
  %g = inttoptr i64 %sig to ptr
  call void @nvshmemx_signal_op(ptr %g, i64 %value, i32 9, i32 %pe)
  ret i32 0
}
"""
_X_ONLY = """
define i32 @f(i64 %sig, i64 %value, i32 %pe) noinline {
entry:
  %tx = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %first = icmp eq i32 %tx, 0
  br i1 %first, label %signal, label %done
signal:
  %g = inttoptr i64 %sig to ptr
  call void @nvshmemx_signal_op(ptr %g, i64 %value, i32 9, i32 %pe)
  br label %done
done:
  ret i32 0
}
"""


def test_the_reader_sees_a_missing_or_partial_guard():
    assert _threads_calling(_UNGUARDED, "f", "nvshmemx_signal_op") == [THREAD0, *OTHERS]
    assert _threads_calling(_X_ONLY, "f", "nvshmemx_signal_op") == [THREAD0, (0, 1, 0), (0, 0, 1)]
