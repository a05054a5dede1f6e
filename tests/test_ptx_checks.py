"""The compile gate's PTX checks (`make compile-check`, flashmoe_py.triton_compile_check): branches on per-thread
values (uniform_control_flow), the NVSHMEM signal written by one thread (thread0_only) and the structure of GEMM
main loops (flashmoe_py.compile_structure: MMA shape, pipeline stages, CTAs per SM), on hand-written PTX and on
tiny kernels compiled for sm_90 and sm_80 without a GPU (tests/ptx_probe.py, in a process of its own: this one
imports Triton in interpreter mode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flashmoe_py.compile_structure import ctas_per_sm, main_loops, summary
from flashmoe_py.triton_compile_check import thread0_only, uniform_control_flow

REPO = Path(__file__).resolve().parent.parent
_probe: dict = {}


def _entry(body: str) -> str:
    return (".version 8.0\n.target sm_90a\n.address_size 64\n.extern .shared .align 16 .b8 global_smem[];\n"
            ".visible .entry probe(\n\t.param .u64 probe_param_0\n)\n{\n\t.reg .pred %p<4>;\n\t.reg .b32 %r<8>;\n"
            "\t.reg .b64 %rd<4>;\n\tld.param.u64 %rd1, [probe_param_0];\n" + body + "\tret;\n}\n")


# Every thread loads the flag itself; the loop's exit depends on what each thread saw.
_SPIN_VOLATILE = _entry("""\
$L__BB0_1:
\tbar.sync 0;
\t// begin inline asm
\t{
\t.reg .pred %q;
\tmov.u32 %r1, 0x0;
\tld.volatile.global.b32 { %r1 }, [ %rd1 + 0 ];
\t}
\t// end inline asm
\tadd.s32 %r2, %r1, 1;
\tsetp.eq.s32 %p1, %r2, 1;
\t@%p1 bra $L__BB0_1;
""")
# What Triton makes of a scalar atomic: thread 0 reads, the value comes back to all through shared memory.
_SPIN_BROADCAST = _entry("""\
\tmov.u32 %r3, %tid.x;
\tsetp.eq.s32 %p2, %r3, 0;
$L__BB0_1:
\tbar.sync 0;
\tmov.u32 %r1, 0x0;
\t@%p2 ld.global.gpu.acquire.b32 %r1, [ %rd1 + 0 ];
\t@%p2 st.shared.b32 [ global_smem ], %r1;
\tbar.sync 0;
\tld.shared.b32 %r2, [global_smem];
\tsetp.eq.s32 %p1, %r2, 0;
\t@%p1 bra $L__BB0_1;
""")
# A timer read by every thread, through a warp shuffle (stays within the warp) and local memory.
_SPIN_TIMER = _entry("""\
\tmov.u64 %rd2, %globaltimer;
$L__BB0_1:
\tmov.u64 %rd3, %globaltimer;
\tsub.s64 %rd3, %rd3, %rd2;
\tcvt.u32.u64 %r1, %rd3;
\tshfl.sync.bfly.b32 %r2, %r1, 1, 31, -1;
\tst.local.b32 [%rd1], %r2;
\tld.local.b32 %r4, [%rd1];
\tsetp.lt.u32 %p1, %r4, 1000;
\t@!%p1 bra $L__BB0_1;
""")


def test_uniform_control_flow_flags_a_branch_on_a_volatile_load():
    found = uniform_control_flow(_SPIN_VOLATILE)
    assert len(found) == 1, found
    text = str(found[0])
    assert "`@%p1 bra $L__BB0_1`" in text and "<- per-thread volatile load" in text, text
    # the chain goes register by register from the branch back to the load
    assert [c.split(" <- ")[0] for c in found[0].chain] == ["%p1", "%r2", "%r1"], found[0].chain


def test_uniform_control_flow_accepts_a_value_broadcast_through_shared_memory():
    assert uniform_control_flow(_SPIN_BROADCAST) == []


def test_uniform_control_flow_follows_a_timer_through_shuffles_and_local_memory():
    found = uniform_control_flow(_SPIN_TIMER)
    assert len(found) == 1 and "`@!%p1 bra $L__BB0_1`" in str(found[0]), found
    assert "%globaltimer read" in str(found[0]) and "through local memory" in str(found[0]), str(found[0])


_SIGNAL_FUNC = """\
.version 8.0
.target sm_90a
.address_size 64
.func flashmoe_signal_set(
\t.param .b64 flashmoe_signal_set_param_0,
\t.param .b64 flashmoe_signal_set_param_1
)
{
\t.reg .pred %p<2>;
\t.reg .b32 %r<6>;
\t.reg .b64 %rd<3>;
\tld.param.b64 %rd1, [flashmoe_signal_set_param_0];
\tld.param.b64 %rd2, [flashmoe_signal_set_param_1];
GUARD\tst.volatile.b64 [%rd1], %rd2;
$L__BB1_2:
\tret;
}
"""
_TID_GUARD = """\tmov.u32 %r1, %tid.x;
\tmov.u32 %r2, %tid.y;
\tor.b32 %r3, %r1, %r2;
\tmov.u32 %r4, %tid.z;
\tor.b32 %r5, %r3, %r4;
\tsetp.ne.s32 %p1, %r5, 0;
\t@%p1 bra $L__BB1_2;
"""


def test_thread0_only_wants_a_guard_on_all_three_thread_indices():
    assert thread0_only(_SIGNAL_FUNC.replace("GUARD", _TID_GUARD)) is None
    unguarded = thread0_only(_SIGNAL_FUNC.replace("GUARD", ""))
    assert unguarded is not None and "x=1 reaches `st.volatile.b64" in unguarded, unguarded
    x_only = _TID_GUARD.replace("%tid.y", "0").replace("%tid.z", "0")
    assert "y=1 reaches" in (thread0_only(_SIGNAL_FUNC.replace("GUARD", x_only)) or ""), "tid.y not checked"


def _probe_results() -> dict:
    """What tests/ptx_probe.py reports, run once for every test below (compiling the probes takes seconds)."""
    if not _probe:
        pytest.importorskip("triton")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = str(REPO)
        done = subprocess.run([sys.executable, "-m", "tests.ptx_probe"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"tests/ptx_probe.py failed:\n{done.stderr[-3000:]}"
        _probe.update(json.loads(done.stdout))
    return _probe


@pytest.mark.parametrize("name, uniform", [("volatile-load", False), ("scalar-atomic", True),
                                           ("sum-across-warps", True), ("sum-within-warps", False)])
def test_uniform_control_flow_on_compiled_kernels(name, uniform):
    found = _probe_results()[name]
    assert (found == []) == uniform, "\n".join(found) or "no branch flagged"


def test_signal_set_is_one_threads_in_the_compiled_kernel():
    verdict = _probe_results()["signal"]
    if verdict is None:
        pytest.skip("the NVSHMEM device bitcode is not installed: pip install nvidia-nvshmem-cu13")
    assert verdict == "ok", verdict


# A K loop nested in an outer loop, as Triton lays it out: waits for the oldest copy stage, issues the MMAs, keeps
# one wgmma group in flight, then copies the next stage (two commit groups: A and B). WAIT is the wait_group count.
# The mbarrier spins are inline asm blocks that each define the same local label, one of them inside the K loop.
_SPIN = """\t{
\t.reg .pred complete;
\twaitLoop:
\tmbarrier.try_wait.parity.shared::cta.b64 complete, [%r1], %r2;
\t@!complete bra.uni waitLoop;
\t}
"""
_K_LOOP = _entry("""\
$L__BB0_1:
""" + _SPIN + """\
\tcp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, %r3;
\tcp.async.commit_group;
$L__BB0_2:
\tcp.async.wait_group WAIT;
\tbar.sync 0;
""" + _SPIN + """\
\twgmma.fence.sync.aligned;
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r4,%r5}, %rd2, %rd3, %p3, 1, 1, 0, 0;
\twgmma.commit_group.sync.aligned;
\twgmma.wait_group.sync.aligned 1;
\tcp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, %r3;
\tcp.async.commit_group;
\tcp.async.cg.shared.global [ %r2 + 0 ], [ %rd1 + 64 ], 0x10, %r3;
\tcp.async.commit_group;
\tsetp.lt.s32 %p1, %r3, 8;
\t@%p1 bra $L__BB0_2;
\twgmma.wait_group.sync.aligned 0;
\tcp.async.wait_group 0;
\tsetp.lt.s32 %p2, %r4, 8;
\t@%p2 bra $L__BB0_1;
""")


def test_main_loop_is_the_innermost_loop_with_mmas_and_counts_its_stages():
    loops = main_loops(_K_LOOP.replace("WAIT", "2"))
    assert len(loops) == 1, loops  # not the outer loop, not the spins
    loop = loops[0]
    assert (loop.mma, loop.copy, loop.commits, loop.mma_in_flight) == ("wgmma n=128", "cp.async", 2, 1), loop
    assert loop.stages == 2 and loop.pipelined, loop  # wait_group 2 with 2 commits per iteration: 1 more stage
    assert main_loops(_K_LOOP.replace("WAIT", "4"))[0].stages == 3
    assert summary(loops)["pipeline"] == "cp.async 2 | wg 1"


def test_a_main_loop_that_drains_its_copies_every_iteration_is_not_pipelined():
    loops = main_loops(_K_LOOP.replace("WAIT", "0"))
    assert len(loops) == 1 and loops[0].stages == 1 and not loops[0].pipelined, loops
    found = summary(loops)
    assert found["pipelined"] is False and "wait_group 0" in found["why"][0], found


def test_synchronous_loads_are_not_pipelined_and_a_kernel_without_mma_loop_has_no_verdict():
    sync = _K_LOOP.replace("WAIT", "0").replace("cp.async.cg.shared.global", "ld.global.b32 %r7,")
    sync = "\n".join(line for line in sync.splitlines() if "cp.async" not in line)
    loops = main_loops(sync)
    assert len(loops) == 1 and loops[0].copy is None and loops[0].stages == 0 and not loops[0].pipelined, loops
    no_mma = "\n".join(line for line in _K_LOOP.splitlines() if "wgmma" not in line)
    assert main_loops(no_mma) == [] and summary([])["pipelined"] is None


def test_ctas_per_sm_takes_the_binding_limit():
    assert ctas_per_sm("sm_90", 128, 8, 128 * 1024) == (1, "smem")  # 129 KiB of 228
    assert ctas_per_sm("sm_90", 128, 8, 64 * 1024) == (2, "regs")  # 3 x 65 KiB would fit; 2 x 32768 registers
    assert ctas_per_sm("sm_90", 243, 8, 0) == (1, "regs")  # 248 x 32 x 8 = 63488 of 65536
    assert ctas_per_sm("sm_90", 16, 4, 0) == (16, "threads")
    assert ctas_per_sm("sm_80", 64, 4, 80 * 1024) == (2, "smem")  # 81 KiB x 2 of 164
    assert ctas_per_sm("sm_80", 16, 1, 0) == (32, "blocks")


@pytest.mark.parametrize("arch, mma", [(90, "wgmma n=128"), (80, "mma m16n8k16")])
def test_compiled_dot_loop_structure(arch, mma):
    staged, single = (_probe_results()["structure"][f"sm_{arch}-s{s}"] for s in (3, 1))
    for found in (staged, single):
        assert found["mma_shape"] == mma and len(found["loops"]) == 1, found
    loop = staged["loops"][0]
    assert staged["pipelined"] and loop["copy"] == "cp.async" and loop["stages"] >= 2, staged
    if arch == 90:
        assert loop["mma_in_flight"] >= 1, staged
    assert single["pipelined"] is False and single["loops"][0]["stages"] < 2, single


def test_the_gate_fails_a_gemm_row_whose_main_loop_is_not_pipelined(capsys):
    from flashmoe_py import triton_compile_check as gate

    def row(pipelined: bool) -> tuple:
        found = summary(main_loops(_K_LOOP.replace("WAIT", "2" if pipelined else "0")))
        res = {"regs": 128, "spills": 0, "shared": 64 * 1024, "mma": "wgmma", "uniform": [], **found}
        return ("sm_90", "probe", "bf16", "dw[probe]", {"config": "probe"}, {"options": {"num_warps": 8}}), res

    rows, results = zip(row(True), row(False))
    failures, unpipelined = gate._rows_table(list(rows), list(results))
    table = capsys.readouterr().out
    assert [r[3] for r in unpipelined] == ["dw[probe]"] and "NOT PIPELINED" in table, table
    assert "wgmma n=128" in table and "cp.async 1 | wg 1" in table and "2 regs" in table, table
    assert failures == (1 if gate.NOT_PIPELINED_FAILS else 0), table
