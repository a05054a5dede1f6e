"""torch.compile(FusedMoE): same outputs, auxiliary loss and gradients as eager.

On CPU the reference backend compiles with graph breaks (fullgraph=False, the default): its expert loop reads
the per-expert counts on the host (DESIGN §4, docs/DECISIONS.md), and dynamo splits the graph there and at
the data-dependent-shape ops around it. The GPU test compiles the Triton backend, which has no host sync.

The last section tests the compile gate's PTX checks (`make compile-check`, flashmoe_py.triton_compile_check):
branches on per-thread values, and the NVSHMEM signal written by one thread.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import flashmoe_py as fm
from flashmoe_py.triton_compile_check import thread0_only, uniform_control_flow
from tests.tolerances import assert_close

try:  # the probe kernels of the compile gate's checks (end of file) need Triton; the tests above do not
    import triton.language as tl
except ImportError:
    tl = None

CFG = dict(hidden_size=32, ffn_hidden_size=16, num_experts=6, top_k=2, num_shared_experts=1, shared_expert_gate=True,
           aux_loss_coef=0.01, z_loss_coef=0.001)


def _compare_compiled_with_eager(layer: fm.FusedMoE, x: torch.Tensor, dtype) -> None:
    compiled = torch.compile(layer)
    x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = layer(x_eager)
    aux_eager = layer.aux_loss
    cotangent = torch.randn_like(y_eager)
    (y_eager * cotangent).sum().add(aux_eager).backward()
    grads_eager = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)

    y_comp = compiled(x_comp)
    aux_comp = layer.aux_loss
    (y_comp * cotangent).sum().add(aux_comp).backward()
    assert_close(y_comp, y_eager, dtype, "compiled output")
    assert_close(aux_comp, aux_eager, dtype, "compiled aux_loss")
    assert_close(x_comp.grad, x_eager.grad, dtype, "compiled d x")
    for name, g in grads_eager.items():
        assert_close(layer.get_parameter(name).grad, g, dtype, f"compiled d {name}")


@pytest.mark.slow  # inductor compiles each of the ~12 graph pieces: about a minute on 2 cores with a cold cache
def test_compiled_reference_layer_matches_eager_on_cpu(seed):
    layer = fm.FusedMoE(**CFG, backend="reference")
    _compare_compiled_with_eager(layer, torch.randn(4, 8, CFG["hidden_size"]), torch.float32)


@pytest.mark.gpu
def test_compiled_triton_layer_matches_eager_on_gpu(seed):
    layer = fm.FusedMoE(**CFG, backend="triton", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 64, CFG["hidden_size"], device="cuda", dtype=torch.bfloat16)
    _compare_compiled_with_eager(layer, x, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# The compile gate's uniform-control-flow check (flashmoe_py.triton_compile_check.uniform_control_flow) and its
# thread-0 signal check (thread0_only), on hand-written PTX and on tiny kernels compiled for sm_90 (no GPU)
# ----------------------------------------------------------------------------------------------------------

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


# Probe kernels, compiled by the test (triton.jit applied there, outside the interpreter).
def _spin_on_volatile_load(flag_ptr, out_ptr):
    v = tl.load(flag_ptr, volatile=True)
    while v == 0:
        v = tl.load(flag_ptr, volatile=True)
    tl.store(out_ptr, v)


def _spin_on_scalar_atomic(flag_ptr, out_ptr):
    v = tl.atomic_add(flag_ptr, 0, sem="acquire")
    while v == 0:
        v = tl.atomic_add(flag_ptr, 0, sem="acquire")
    tl.store(out_ptr, v)


def _spin_on_reduction(flag_ptr, out_ptr, N: tl.constexpr):
    # N = 256 spans the 4 warps: the sum crosses warps through shared memory. N = 8 sits in every warp, each
    # reducing its own loads with shuffles: the warps can disagree.
    offs = tl.arange(0, N)
    v = tl.sum(tl.load(flag_ptr + offs, volatile=True), 0)
    while v == 0:
        v = tl.sum(tl.load(flag_ptr + offs, volatile=True), 0)
    tl.store(out_ptr, v)


def _load_nvshmem():
    """kernels/nvshmem.py loaded by its path: importing the flashmoe_py.kernels package would fix compiled vs
    interpreted kernels for the whole test process (flashmoe_py/kernels/__init__.py)."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "kernels", "nvshmem.py")
    spec = importlib.util.spec_from_file_location("_nvshmem_for_test_compile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nvshmem = _load_nvshmem() if tl is not None else None


def _signal_peer(sig, value, pe):
    nvshmem.signal_set(sig, value, pe)


def _ptx_sm90(monkeypatch, fn, signature, constexprs=None, **options) -> str:
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # other test modules set it at import
    kernel = triton.jit(fn)
    src = ASTSource(kernel, signature, constexprs=constexprs or {})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, **options}).asm["ptx"]


@pytest.mark.parametrize("fn, constexprs, uniform", [
    (_spin_on_volatile_load, {}, False),
    (_spin_on_scalar_atomic, {}, True),
    (_spin_on_reduction, {"N": 256}, True),
    (_spin_on_reduction, {"N": 8}, False),
], ids=["volatile-load", "scalar-atomic", "sum-across-warps", "sum-within-warps"])
def test_uniform_control_flow_on_compiled_kernels(monkeypatch, fn, constexprs, uniform):
    signature = {"flag_ptr": "*i32", "out_ptr": "*i32", **{k: "constexpr" for k in constexprs}}
    found = uniform_control_flow(_ptx_sm90(monkeypatch, fn, signature, constexprs))
    assert (found == []) == uniform, "\n".join(map(str, found)) or "no branch flagged"


def test_signal_set_is_one_threads_in_the_compiled_kernel(monkeypatch):
    pytest.importorskip("nvidia.nvshmem", reason="the NVSHMEM device bitcode: pip install nvidia-nvshmem-cu13")
    ptx = _ptx_sm90(monkeypatch, _signal_peer, {"sig": "i64", "value": "i64", "pe": "i32"},
                    extern_libs=nvshmem.extern_libs(90))
    problem = thread0_only(ptx)
    assert problem is None, problem
