"""Launch configurations: block sizes, warps and pipeline stages per target, regime and kernel.

Targets
  sm_90        Hopper (H100/H200). GEMM tiles keep BLOCK_M a multiple of 64 and 4 or 8 warps, which is
               what Triton needs to emit wgmma; `make compile-check` fails if a 16-bit GEMM does not.
  sm_80        Ampere and Ada (also the table for any other CUDA part below sm_90): mma.sync tiles,
               163 KiB of shared memory at most.
  interpreter  TRITON_INTERPRET=1 on CPU: the smallest tiles tl.dot takes, so small test shapes still
               span several row, column and reduction tiles (partial tiles included).
Regimes
  decode       few rows per expert (mean rows per expert below DECODE_ROWS_PER_EXPERT): narrow column
               tiles and deep reductions, so many programs stream the expert weights at once.
  prefill      prefill and training: large tiles for tensor-core throughput.

GEMM entries are (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, GROUP_M]), keyed by the element size of
the operands (2: bf16/fp16, 4: fp32 through tf32 or fp32 FMA, 8: fp64); `gemm_config` returns them as a
GemmConfig, GROUP_M defaulting to 8. GROUP_M is the launch order (experts.grouped_tile): programs with
consecutive ids cover GROUP_M row tiles x every column tile, so A and B tiles are re-read from L2 rather than
HBM; 1 is row-major order (every column tile of one row tile, then the next). dW programs stream whole
expert row ranges of both operands, so there the order that matters is which operand's blocks consecutive
programs share: GROUP_M 0 (its rows' default) shares the wider one's (triton_backend._weight_grad). Kernels:
  up   grouped up projection (gated: BLOCK_N gate and BLOCK_N up columns in one dot of 2 * BLOCK_N)
  down grouped down projection          dx  input gradient (same kernel, transposed weights)
  dh   gradient through down projection + activation       dw  weight gradients (BLOCK_K = rows)

How to regenerate on a GPU (no edits needed elsewhere): `python -m flashmoe_py.triton_tune` times every
candidate of CANDIDATES on the benchmark shapes of both regimes with the target's current table as the
baseline, and prints replacement rows for this file; `make compile-check` then confirms they compile
without spills and within shared memory for both targets.
"""

from typing import NamedTuple

DECODE_ROWS_PER_EXPERT = 16


class GemmConfig(NamedTuple):
    """One GEMM launch's blocks, warps, pipeline stages and launch-order group (see the module docstring)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8  # 0 ("dw" only): chosen per launch from the operand widths (triton_backend._weight_grad)


GEMM = {
    # ---- Hopper ----
    # 16-bit prefill (not timed on a GPU yet; `make compile-check` numbers in docs/DECISIONS.md, "GEMM launch
    # order, tiles and pipelining"): one wgmma of n = 256 per k-step everywhere but dh (n = 128: its epilogue
    # recomputes the activation and its derivatives), 4 stages (192 KiB of 227 at 128 x 256 x 64).
    # GROUP_M 16: the traffic model's pick for Mixtral's shape (up, dh: 1.4x, 1.2x the bytes of one pass over A, B
    # and C, against 2.3x, 1.6x at 8), equal to 8 for DESIGN §8's.
    ("sm_90", "prefill", "up"): {2: (128, 128, 64, 8, 4, 16), 4: (128, 64, 32, 8, 3)},
    ("sm_90", "prefill", "down"): {2: (128, 256, 64, 8, 4, 16), 4: (128, 64, 32, 8, 3)},
    ("sm_90", "prefill", "dx"): {2: (128, 256, 64, 8, 4, 16), 4: (128, 64, 32, 8, 3)},
    ("sm_90", "prefill", "dh"): {2: (128, 128, 64, 8, 4, 16), 4: (128, 64, 32, 8, 3)},
    ("sm_90", "prefill", "dw"): {2: (128, 256, 64, 8, 4, 0), 4: (128, 64, 32, 8, 3, 0)},
    ("sm_90", "decode", "up"): {2: (64, 64, 128, 4, 3), 4: (64, 32, 64, 4, 3)},
    ("sm_90", "decode", "down"): {2: (64, 64, 128, 4, 4), 4: (64, 64, 64, 4, 3)},
    ("sm_90", "decode", "dx"): {2: (64, 64, 128, 4, 4), 4: (64, 64, 64, 4, 3)},
    ("sm_90", "decode", "dh"): {2: (64, 64, 128, 4, 3), 4: (64, 32, 64, 4, 3)},
    ("sm_90", "decode", "dw"): {2: (64, 64, 64, 4, 3, 0), 4: (64, 64, 32, 4, 3, 0)},
    # ---- Ampere / Ada ----
    # 16-bit prefill: 128 x 128 tiles (at 128 x 256 the atomic combine's epilogue spilled 412 B, Triton 3.9), 4 stages;
    # up 64 inner columns, one dot of 128 (at 128 its epilogue took all 255 registers, Triton 3.6).
    ("sm_80", "prefill", "up"): {2: (128, 64, 32, 8, 4, 8), 4: (64, 64, 32, 4, 3)},
    ("sm_80", "prefill", "down"): {2: (128, 128, 32, 8, 4, 8), 4: (64, 64, 32, 4, 3)},
    ("sm_80", "prefill", "dx"): {2: (128, 128, 32, 8, 4, 8), 4: (64, 64, 32, 4, 3)},
    ("sm_80", "prefill", "dh"): {2: (128, 128, 32, 8, 4, 8), 4: (64, 64, 32, 8, 3)},
    ("sm_80", "prefill", "dw"): {2: (128, 128, 32, 8, 4, 0), 4: (64, 64, 32, 4, 3, 0)},
    ("sm_80", "decode", "up"): {2: (16, 64, 128, 4, 3), 4: (16, 64, 64, 4, 3)},
    ("sm_80", "decode", "down"): {2: (16, 64, 128, 4, 3), 4: (16, 64, 64, 4, 3)},
    ("sm_80", "decode", "dx"): {2: (16, 64, 128, 4, 3), 4: (16, 64, 64, 4, 3)},
    ("sm_80", "decode", "dh"): {2: (16, 64, 128, 4, 3), 4: (16, 64, 64, 4, 3)},
    ("sm_80", "decode", "dw"): {2: (64, 64, 64, 4, 3, 0), 4: (64, 64, 32, 4, 3, 0)},
}
# fp64 (tests and fp64 layers): modest tiles on every target, mma.sync's f64 shape.
GEMM_FP64 = (32, 32, 16, 4, 2)
# GROUP_M 3 under the interpreter: small test shapes then end in a partial group of row tiles.
GEMM_INTERPRETER = (16, 16, 16, 1, 1, 3)

# The other kernels: block sizes by target. The routing kernels share one BLOCK_T per call (route_block_t: it shrinks
# as E grows); "route_bk" is the router dot's BLOCK_K for 16-bit x when the route kernel computes the logits (fp32
# halves it: at 64, sm_80 spilled 20 B), "scan" the blocks of the block table the last program scans per step,
# "capacity" (BLOCK_R, BLOCK_C) the capacity kernel's ranking tile.
AUX = {
    "sm_90": {"capacity": (64, 64), "combine": (16, 128), "route_elems": 2048, "route_bk": 64, "scan": 32},
    "sm_80": {"capacity": (64, 64), "combine": (16, 128), "route_elems": 1024, "route_bk": 64, "scan": 32},
    "interpreter": {"capacity": (16, 16), "combine": (16, 16), "route_elems": 128, "route_bk": 16, "scan": 2},
}
AUX_WARPS = 4

# The persistent fused kernel (fused_moe.py): one program per SM runs every task, so one config covers
# both GEMMs: (BLOCK_M, BLOCK_N0, BLOCK_K0, BLOCK_N1, BLOCK_K1, num_warps, num_stages), where 0 is the up
# projection (BLOCK_N0 inner columns, two accumulators when gated) and 1 the down projection (BLOCK_N1
# hidden columns). BLOCK_M is shared: a GEMM1 tile waits for all GEMM0 column tiles of the same row tile.
# On sm_90 16-bit tiles keep BLOCK_M a multiple of 64 and 4 or 8 warps, for wgmma. Not tuned on a GPU yet:
# derived from the unfused up/down entries above.
FUSED = {
    ("sm_90", "prefill"): {2: (128, 64, 64, 64, 64, 8, 3), 4: (128, 32, 32, 64, 32, 8, 3)},
    ("sm_90", "nvshmem"): {2: (128, 32, 64, 64, 64, 8, 3), 4: (128, 32, 32, 64, 32, 8, 3)},
    ("sm_90", "decode"): {2: (64, 64, 128, 64, 128, 4, 3), 4: (64, 32, 64, 64, 64, 4, 3)},
    ("sm_80", "prefill"): {2: (128, 64, 32, 64, 32, 8, 3), 4: (64, 32, 32, 64, 32, 4, 3)},
    ("sm_80", "decode"): {2: (16, 64, 128, 64, 128, 4, 3), 4: (16, 64, 64, 64, 64, 4, 3)},
}
# With a parameterised gated activation (swiglu_oai, swiglu_clamped, swiglu_softcap), or any gated one whose
# pre-activations are saved for backward, the up-GEMM epilogue needs a few registers more than sm_90's 16-bit prefill
# tile leaves (Triton 3.6 spilled 16-64 B, 3.9 24 B with biases): half as many up columns per tile there. Since the
# kernel returns one row per (token, rank) (its y buffer, reduce and rank-order combine), plain swiglu on sm_90 16-bit
# spills 12 B at 255 registers too (Triton 3.9; at 255 with none before): FUSED_NARROW_UP_ALWAYS.
FUSED_NARROW_UP = {("sm_90", "prefill"): {2: (128, 32, 64, 64, 64, 8, 3)},
                   ("sm_80", "prefill"): {2: (128, 32, 32, 64, 32, 8, 3)}}
FUSED_NARROW_UP_ALWAYS = {("sm_90", "prefill")}  # every gated activation takes FUSED_NARROW_UP there
# A plain activation on sm_80 fp32: at 4 warps ptxas spills 148 B at 255 registers (the router's in-kernel logits
# and the single accumulator's epilogue); 8 warps halve each thread's share (184 registers, no spills). The gated
# ones stay at 4 warps: at 8 ptxas caps them at 128 registers and spills 436 B.
FUSED_PLAIN = {("sm_80", "prefill"): {4: (64, 32, 32, 64, 32, 8, 3)}}
FUSED_FP64 = (32, 32, 16, 32, 16, 4, 2)
FUSED_INTERPRETER = (16, 16, 16, 16, 16, 1, 1)
# Its other blocks: BT tokens per route/dispatch task (at least 16, the router dot's M; fewer as E grows),
# BTC tokens per combine task, BR x BH element blocks of packet copies and of the combine, CB rows of the
# block table per step of the routing barrier's scan, TN0 / TN1 column tiles per GEMM0 / GEMM1 task (a task
# claims, decodes its row tile and signals once for all of them: a 128x64 tile is only microseconds of work),
# BRS sorted rows per capacity stage task ranked BCS rows of their expert at a time.
FUSED_AUX = {
    "sm_90": {"route_elems": 2048, "BTC": 16, "BR": 16, "BH": 128, "CB": 32, "TN0": 4, "TN1": 4, "BRS": 32,
              "BCS": 64},
    "sm_80": {"route_elems": 2048, "BTC": 16, "BR": 16, "BH": 128, "CB": 32, "TN0": 4, "TN1": 4, "BRS": 32,
              "BCS": 64},
    "interpreter": {"route_elems": 128, "BTC": 16, "BR": 16, "BH": 16, "CB": 16, "TN0": 2, "TN1": 2, "BRS": 16,
                    "BCS": 16},
}
FUSED_MIN_BLOCK_M = 16  # the smallest BLOCK_M above: sizes the tile counters of the persistent state
FUSED_MIN_BT = 16


def fused_config(target: str, regime_name: str, itemsize: int, puts: str = "ptr", *, gated: bool = True,
                 param_act: bool = False, save: bool = False) -> tuple[int, int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N0, BLOCK_K0, BLOCK_N1, BLOCK_K1, num_warps, num_stages) of the fused kernel. With NVSHMEM
    puts the library's device code raises register pressure: narrower tiles there (the "nvshmem" row); so does a
    parameterised gated activation (param_act) or a gated one whose pre-activations are saved (save):
    FUSED_NARROW_UP; a plain activation (gated=False) may have its own row (FUSED_PLAIN)."""
    if target == "interpreter":
        return FUSED_INTERPRETER
    if itemsize == 8:
        return FUSED_FP64
    if puts == "nvshmem" and (target, "nvshmem") in FUSED:
        return FUSED[(target, "nvshmem")][itemsize]
    key = (target, regime_name)
    if gated and (param_act or save or key in FUSED_NARROW_UP_ALWAYS) and itemsize in FUSED_NARROW_UP.get(key, {}):
        return FUSED_NARROW_UP[key][itemsize]
    if not gated and itemsize in FUSED_PLAIN.get(key, {}):
        return FUSED_PLAIN[key][itemsize]
    return FUSED[key][itemsize]


def fused_block_t(target: str, e_pad: int) -> int:
    """Tokens per route/dispatch task of the fused kernel: about route_elems scores, between 16 and 64."""
    return max(FUSED_MIN_BT, min(64, FUSED_AUX[target]["route_elems"] // e_pad))


# Candidates the tuner tries for each GEMM kernel on each target (16-bit operands): tiles (GROUP_M kept), then
# GROUP_M_CANDIDATES on the best tile. Only tiles whose pipeline buffers, stages x (BLOCK_M + BLOCK_N) x BLOCK_K
# 16-bit elements, fit the target's shared memory (the gated up GEMM's B tile is twice as wide: the tuner skips
# what does not compile); on sm_90 only wgmma shapes (a warpgroup of 4 warps per 64 rows).
SHARED_BYTES = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}


def _tiles(target, block_m, block_n, block_k, warps, stages, wgmma):
    return [GemmConfig(bm, bn, bk, w, s) for bm in block_m for bn in block_n for bk in block_k for w in warps
            for s in stages
            if s * (bm + bn) * bk * 2 <= SHARED_BYTES[target] and (not wgmma or (bm % 64 == 0 and bm // 64 >= w // 4))]


CANDIDATES = {
    "sm_90": _tiles("sm_90", (64, 128), (64, 128, 256), (64, 128), (4, 8), (3, 4, 5), wgmma=True),
    "sm_80": _tiles("sm_80", (16, 64, 128), (64, 128, 256), (32, 64), (4, 8), (3, 4, 5), wgmma=False),
}
GROUP_M_CANDIDATES = (1, 8, 16, 32)  # and 0 for dw


def regime(rows: int, num_experts: int) -> str:
    """'decode' when the mean rows per expert is small, else 'prefill'. rows = T * k (an upper bound)."""
    return "decode" if rows < DECODE_ROWS_PER_EXPERT * num_experts else "prefill"


def gemm_config(target: str, regime_name: str, kernel: str, itemsize: int) -> GemmConfig:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, GROUP_M) for one GEMM launch."""
    if target == "interpreter":
        return GemmConfig(*GEMM_INTERPRETER)
    if itemsize == 8:
        return GemmConfig(*GEMM_FP64)
    return GemmConfig(*GEMM[(target, regime_name, kernel)][itemsize])


def route_block_t(target: str, e_pad: int) -> int:
    """Tokens per routing program: about AUX[target]['route_elems'] scores per program, between 16 (the router
    dot's smallest M) and 64."""
    return max(16, min(64, AUX[target]["route_elems"] // e_pad))
