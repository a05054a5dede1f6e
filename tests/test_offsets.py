"""Element offsets of the Triton kernels at production sizes, checked without allocating them (issue 11).

Triton types a Python int argument below 2^31 as i32, and program ids, tl.arange and loaded int32 indices
are i32 too, so the product of a row index and a row length wraps once it passes 2^31 even though each
factor fits. The kernels form every such product through the helpers `row_offset` and `expert_offset`
(kernels/experts.py), which cast to int64 first. Each test here runs a tiny probe kernel under the
interpreter that derives its indices the way the kernel does (from i32 program ids passed as arguments,
the counts, loaded int32 indices) with production-scale sizes as i32 arguments, calls the helpers, stores
the int64 offsets and compares them with Python integers. The interpreter does i32 arithmetic in numpy
int32, which wraps as the GPU does, so each test fails if a cast before a product is removed.

Sections: shared sizes and probes; the grouped expert GEMMs (experts.py); the combine (combine.py); the
fused kernel (fused_moe.py), for tests appended later. routing.py needs none: its largest product is
T * E = 6.7e7 and its flat indices stay below T * k = 2^21.
"""

import os
import sys

import pytest
import torch

# Before flashmoe_py.kernels is imported (see tests/test_triton_backend.py): the probes need the interpreter.
if "flashmoe_py.kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("flashmoe_py.kernels was imported compiled before the offset tests could set "
                       "TRITON_INTERPRET=1; run them in a fresh process")
os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from flashmoe_py.kernels.common import expert_rows, expert_tile  # noqa: E402
from flashmoe_py.kernels.configs import AUX, GEMM  # noqa: E402
from flashmoe_py.kernels.experts import expert_offset, row_offset  # noqa: E402
from flashmoe_py.kernels.fused_moe import row_start, slab_start  # noqa: E402

pytestmark = pytest.mark.interpreter

I32 = 2**31

# ----------------------------------------------------------------------------------------------------------
# Production sizes and shared helpers
# ----------------------------------------------------------------------------------------------------------

# T tokens, top-k, hidden H, expert inner width I (N_up = 2 * I, gated), E experts. R = T * k = 2^21 sorted
# rows; every size is an i32 argument, while R * H, R * I, R * N_up and E * H * N_up all pass 2^31.
SHAPES = {
    "deepseek_v3": dict(T=262144, k=8, H=7168, I=2048, E=256),
    "widest": dict(T=262144, k=8, H=7168, I=18432, E=256),
}
BLOCK_M = GEMM[("sm_90", "prefill", "up")][2][0]  # the row tile the GEMMs launch with on sm_90
BLOCK_K_DW = GEMM[("sm_90", "prefill", "dw")][2][2]  # weight_grad_kernel's chunk of rows


def _shape(name):
    s = dict(SHAPES[name])
    s["N_up"] = 2 * s["I"]
    s["R"] = s["T"] * s["k"]
    for size in ("T", "H", "I", "N_up", "E", "R"):
        assert s[size] < I32, f"{size} would be passed as i64, not the i32 these tests are about"
    return s


def _random_counts(s) -> torch.Tensor:
    """Rows per expert [E] int32 of one uneven dropless routing of all R assignments."""
    return torch.randint(0, s["E"], (s["R"],)).bincount(minlength=s["E"]).to(torch.int32)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check(got: torch.Tensor, want: list, what: str):
    want_t = torch.tensor(want, dtype=torch.int64).reshape(got.shape)
    bad = (got != want_t).nonzero()
    if bad.shape[0]:
        first = tuple(bad[0].tolist())
        pytest.fail(f"{what}: {bad.shape[0]} of {got.numel()} offsets differ, first at {list(first)}: "
                    f"kernel {got[first].item()}, exact {want_t[first].item()}", pytrace=False)


# ----------------------------------------------------------------------------------------------------------
# Grouped expert GEMMs (kernels/experts.py)
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _tile_probe(out_ptr, counts_ptr, pid_m, E, H, INNER, N_UP, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """The offsets of row tile pid_m of up_kernel / rows_gemm_kernel / act_grad_kernel.

    out [3 * BLOCK_M + 3] int64: row starts in rows of H (down output y, dx rows), of INNER (h) and of N_UP
    (pre, dpre), then the offsets of expert e's w_up [H, N_UP] and w_down [INNER, H], then e.
    """
    e, row0, rows_left = expert_tile(pid_m, counts_ptr, E, E_PAD, BLOCK_M)
    m = tl.arange(0, BLOCK_M)
    rows = row0 + m  # i32, as the kernels form them
    tl.store(out_ptr + m, row_offset(rows, H))
    tl.store(out_ptr + BLOCK_M + m, row_offset(rows, INNER))
    tl.store(out_ptr + 2 * BLOCK_M + m, row_offset(rows, N_UP))
    tl.store(out_ptr + 3 * BLOCK_M, expert_offset(e, H, N_UP))
    tl.store(out_ptr + 3 * BLOCK_M + 1, expert_offset(e, INNER, H))
    tl.store(out_ptr + 3 * BLOCK_M + 2, e.to(tl.int64))


def _tile_of_row(counts: list, row: int, block_m: int) -> int:
    """The grouped-GEMM tile holding sorted row `row` (expert e owns cdiv(counts[e], block_m) tiles)."""
    tile = start = 0
    for n in counts:
        if row < start + n:
            return tile + (row - start) // block_m
        tile += -(-n // block_m)
        start += n
    raise ValueError(f"row {row} is past the {start} rows")


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_gemm_tile_row_offsets(shape, seed):
    """Row tiles whose rows pass 2^31 / N_up (the first that wraps), 2^31 / H, and the last tile: every row
    start and both weight slabs of the tile's expert equal the exact products."""
    s = _shape(shape)
    counts = _random_counts(s)
    cl = counts.tolist()
    starts = [sum(cl[:e]) for e in range(s["E"])]
    probe_rows = (-(-I32 // s["N_up"]), -(-I32 // s["H"]), s["R"] - 1)
    for row in probe_rows:
        pid_m = _tile_of_row(cl, row, BLOCK_M)
        out = torch.full((3 * BLOCK_M + 3,), -1, dtype=torch.int64)
        _tile_probe[(1,)](out, counts, pid_m, s["E"], s["H"], s["I"], s["N_up"], E_PAD=_pow2(s["E"]),
                          BLOCK_M=BLOCK_M)
        e = int(out[-1])
        first = starts[e] + (pid_m - sum(-(-n // BLOCK_M) for n in cl[:e])) * BLOCK_M
        assert starts[e] <= row < starts[e] + cl[e] and first <= row < first + BLOCK_M, (row, e, first)
        rows = [first + m for m in range(BLOCK_M)]
        want = ([r * s["H"] for r in rows] + [r * s["I"] for r in rows] + [r * s["N_up"] for r in rows]
                + [e * s["H"] * s["N_up"], e * s["I"] * s["H"], e])
        _check(out, want, f"{shape} tile {pid_m} (row {row}, expert {e})")


@triton.jit
def _weight_grad_probe(out_ptr, counts_ptr, e, r0, E, M, N, E_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """weight_grad_kernel's offsets for expert e (program id 1) at its chunk of rows starting r0 rows in.

    out [2 * BLOCK_K + 2] int64: row starts in A's rows of M and B's rows of N, then dW[e] [M, N] and db[e] [N].
    """
    row0, n_e = expert_rows(e, counts_ptr, E, E_PAD)
    k = tl.arange(0, BLOCK_K)
    rows = row0 + r0 + k
    tl.store(out_ptr + k, row_offset(rows, M))
    tl.store(out_ptr + BLOCK_K + k, row_offset(rows, N))
    tl.store(out_ptr + 2 * BLOCK_K, expert_offset(e, M, N))
    tl.store(out_ptr + 2 * BLOCK_K + 1, row_offset(e, N))


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("grad", ["dw_down", "dw_up"])
def test_weight_grad_row_offsets(shape, grad, seed):
    """The last chunk of rows of the last expert (A = h [R, I], B = g by token for dw[down]; A = x by token,
    B = dpre [R, N_up] for dw[up]) and the expert's dW slab, against the exact products."""
    s = _shape(shape)
    m, n = (s["I"], s["H"]) if grad == "dw_down" else (s["H"], s["N_up"])
    counts = _random_counts(s)
    e = s["E"] - 1
    n_e = int(counts[e])
    r0 = (n_e - 1) // BLOCK_K_DW * BLOCK_K_DW
    row0 = int(counts[:e].sum())
    out = torch.full((2 * BLOCK_K_DW + 2,), -1, dtype=torch.int64)
    _weight_grad_probe[(1,)](out, counts, e, r0, s["E"], m, n, E_PAD=_pow2(s["E"]), BLOCK_K=BLOCK_K_DW)
    rows = [row0 + r0 + k for k in range(BLOCK_K_DW)]
    _check(out, [r * m for r in rows] + [r * n for r in rows] + [e * m * n, e * n], f"{shape} {grad} expert {e}")


# ----------------------------------------------------------------------------------------------------------
# Combine (kernels/combine.py)
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _combine_probe(out_ptr, slot_ptr, pid_t, H, TOPK: tl.constexpr, BLOCK_T: tl.constexpr):
    """combine_kernel's offsets for token tile pid_t: out [TOPK + 1, BLOCK_T] int64, the start of the sorted
    row of each of the tile's slots (read from slot_of [T * TOPK] int32 as the kernel reads it), then the
    start of each token's output row."""
    toks = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # as combine_kernel forms them
    t = tl.arange(0, BLOCK_T)
    for j in tl.static_range(TOPK):
        slot = tl.load(slot_ptr + row_offset(toks, TOPK) + j)
        tl.store(out_ptr + j * BLOCK_T + t, row_offset(slot, H))
    tl.store(out_ptr + TOPK * BLOCK_T + t, row_offset(toks, H))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_combine_row_offsets(shape, seed):
    """A real slot_of [T * k] int32 (8 MiB): the last token tile and a middle one read sorted rows up to R - 1,
    whose starts in rows of H pass 2^31; every offset equals the exact product."""
    s = _shape(shape)
    block_t = AUX["sm_90"]["combine"][0]
    slot_of = torch.randperm(s["R"], dtype=torch.int32)
    slot_of[torch.randint(0, s["R"], (s["R"] // 16,))] = -1  # dropped assignments, as with a capacity
    for pid_t in (s["T"] // block_t // 2, s["T"] // block_t - 1):
        out = torch.full((s["k"] + 1, block_t), -1, dtype=torch.int64)
        _combine_probe[(1,)](out, slot_of, pid_t, s["H"], TOPK=s["k"], BLOCK_T=block_t)
        toks = range(pid_t * block_t, (pid_t + 1) * block_t)
        want = [[int(slot_of[t * s["k"] + j]) * s["H"] for t in toks] for j in range(s["k"])]
        want.append([t * s["H"] for t in toks])
        _check(out, want, f"{shape} token tile {pid_t}")


# ----------------------------------------------------------------------------------------------------------
# Fused kernel (kernels/fused_moe.py)
# ----------------------------------------------------------------------------------------------------------

# The expert-parallel heap of DeepSeek-V3 on 8 ranks: 256 experts (32 per rank), k=8, H=7168, bf16, 32768
# tokens per rank (a training micro-batch of 8 x 4096). One slab holds a row per token, 32768 rows of H: 2.3e8
# elements; the RETURN region starts past 1.9e9 elements, and its slab of rank 2 onwards lies past 2^31 elements
# (issue 11's example, at the per-(token, expert) heap's 4096 tokens then).
EP_SHAPE = dict(world=8, num_experts=256, top_k=8, tokens=32768, hidden=7168, ffn=2048, dtype=torch.bfloat16)


def _ep_state():
    """The fused backend's own persistent state for that layer, built on meta tensors (nothing allocated), with
    its layout and the element offsets it passes to the kernel."""
    import flashmoe_py as fm
    from flashmoe_py.fused_backend import FusedState
    from flashmoe_py.parallel.layout import HeapLayout

    s = EP_SHAPE
    cfg = fm.MoEConfig(hidden_size=s["hidden"], ffn_hidden_size=s["ffn"], num_experts=s["num_experts"],
                       top_k=s["top_k"])
    el = s["num_experts"] // s["world"]
    layout = HeapLayout.for_layer(s["world"], el, s["top_k"], s["tokens"], s["hidden"], s["dtype"].itemsize)
    return FusedState(cfg, s["dtype"], torch.device("meta"), s["tokens"], 60.0, None, layout, s["world"], 0,
                      meta=True), layout


@triton.jit
def _heap_probe(out_ptr, data0, data1, slab_elems, last_row, H, W: tl.constexpr):
    """The heap offsets rank `me` (program id: an i32 as the kernel's `me` argument) forms, per peer s (i32):
    out [W, 4, W] int64: the DISPATCH slab of source s, the RETURN slab of owner s, the last row of each, as
    fused_moe_kernel forms them through slab_start and row_start."""
    me = tl.program_id(0)
    s = tl.arange(0, W)
    base = out_ptr + me * 4 * W
    tl.store(base + s, slab_start(data0, s, slab_elems))
    tl.store(base + W + s, slab_start(data1, s, slab_elems))
    tl.store(base + 2 * W + s, row_start(slab_start(data0, s, slab_elems), last_row, H))
    tl.store(base + 3 * W + s, row_start(slab_start(data1, me + s * 0, slab_elems), last_row - s, H))


def test_fused_heap_offsets_at_deepseek_v3_scale(seed):
    """The fused kernel's heap offsets for every rank of the 8-rank DeepSeek-V3 heap equal the layout's own byte
    offsets (in elements) and the exact products, and stay inside the segment; several pass 2^31."""
    state, layout = _ep_state()
    s, item = EP_SHAPE, EP_SHAPE["dtype"].itemsize
    data0, data1 = state.data
    args = dict(data0=data0, data1=data1, slab_elems=state.slab_elems, last_row=layout.slab_rows - 1, H=s["hidden"])
    for name, value in args.items():
        assert value < I32, f"{name} would be an i64 argument, not the i32 this test is about"
    w = s["world"]
    out = torch.full((w, 4, w), -1, dtype=torch.int64)
    _heap_probe[(w,)](out, **args, W=w)
    want = []
    for me in range(w):
        last = layout.slab_rows - 1
        want.append([[layout.data_offset(0, p) // item for p in range(w)],
                     [layout.data_offset(1, p) // item for p in range(w)],
                     [layout.data_offset(0, p) // item + last * s["hidden"] for p in range(w)],
                     [layout.data_offset(1, me) // item + (last - p) * s["hidden"] for p in range(w)]])
    _check(out, want, "8-rank DeepSeek-V3 heap")
    assert int(out.max()) < layout.size // item, "an offset past the end of the segment"
    assert int((out >= I32).sum()) > w, "the heap is too small to pass 2^31 elements: the test would prove nothing"
    assert data1 + 2 * state.slab_elems >= I32  # issue 11's example: the RETURN slab of rank 2
