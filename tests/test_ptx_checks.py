"""The compile gate's PTX checks (`make compile-check`, flashmoe_py.triton_compile_check): branches on per-thread
values (uniform_control_flow) and the NVSHMEM signal written by one thread (thread0_only), on hand-written PTX
and on tiny kernels compiled for sm_90 without a GPU (tests/ptx_probe.py, in a process of its own: this one
imports Triton in interpreter mode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
