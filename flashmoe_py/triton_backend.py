"""The `triton` backend: DESIGN §2 on one device with the kernels of `flashmoe_py.kernels` (its only importer).

Pipeline: router logits (one torch matmul) -> route kernel (scores, top-k, weights, counts) -> sort by expert
(+ capacity) -> up GEMM gathering token rows, bias + activation in its epilogue -> down GEMM, bias + routing
weight in its epilogue -> combine (each token's k rows summed in slot order, + the shared expert), or, with
deterministic=False, atomic adds into the output from the down GEMM's epilogue.

Routing metadata, all on the device; the host never reads it (grids are sized from upper bounds):
  topk_ids   [T, k]  int64    chosen experts, best first
  weights    [T, k]  fp32     routing weights (fp64 for fp64 layers)
  counts_all [E]     int32    assignments per expert before capacity (the load-balancing loss uses it)
  counts     [E]     int32    rows per expert after capacity; A = counts.sum() <= T*k
  order      [T*k]   int32    flat assignment t*k + j of each sorted row; rows >= A are never written
  slot_of    [T*k]   int32    sorted row of each assignment, -1 where capacity dropped it
Rows of one expert are contiguous, in token order (what a stable sort by expert gives). Buffers indexed by
sorted row (h, pre, the output rows) have the upper bound T*k rows.

Autograd: one thin Function (`_ExpertsFunction`) over two torch.library custom ops (`experts_fwd`,
`experts_bwd`, with fake implementations for torch.compile); routing and ordering are custom ops too. The
router's gradient goes through PyTorch: the kernel's scores and weights are the forward values, and an
identical PyTorch expression of the logits supplies their gradient (`_value_with_grad_of`).
"""

import contextlib
import functools
import importlib.util
import struct
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import env
from .activations import parse_activation
from .config import GATED_ACTIVATIONS, MoEConfig
from .records import MoEOutput, MoEParams, MoEStats, Routing
from .routing import router_logits, routing_losses, scores_from_logits, weights_from_scores

# act(gate) * up: the gate's function
_GATE_ACT = {"swiglu": ("silu", True), "geglu": ("gelu", True), "geglu_tanh": ("gelu_tanh", True)}
_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
                 torch.int32: "i32", torch.int64: "i64", torch.bool: "i1", torch.int8: "i8"}


def kernel_activation(activation: str) -> tuple[str, bool]:
    """`MoEConfig.activation_key` -> the kernels' (ACT, GATED) constexprs (kernels/common.py): swiglu/geglu ->
    their gate function; parameterised gated activations -> their key (parameters included); plain -> the name."""
    name, _ = parse_activation(activation)  # a name without its parameters is refused here
    if name in _GATE_ACT:
        return _GATE_ACT[name]
    return (activation, True) if name in GATED_ACTIVATIONS else (name, False)


# ----------------------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------------------

def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the Triton kernels can run on `device`, else why not."""
    return device_reason(device, "the Triton kernels", "flashmoe_py.kernels", "route_kernel")


def device_reason(device: torch.device, what: str, module: str, kernel: str, cpu_note: str = "") -> Optional[str]:
    """Why Triton kernels (`what`, for the message) cannot run on `device`, or None; shared with the fused backend.
    `module`.`kernel` is a kernel whose loaded form shows whether this process already fixed compiled vs
    interpreted (Triton decides when the kernels are decorated)."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"{what} run on CUDA devices (or on CPU under TRITON_INTERPRET=1), not on {device.type}"
    if not env.triton_interpret():
        return ("on CPU it runs only under the Triton interpreter: set TRITON_INTERPRET=1 before flashmoe_py is "
                "imported" + cpu_note)
    loaded = sys.modules.get(module)
    if loaded is not None and type(getattr(loaded, kernel)).__name__ != "InterpretedFunction":
        return (f"{what} were compiled for the GPU before TRITON_INTERPRET=1 was set; set it before they are first "
                "imported")
    return None


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import kernels  # deferred: importing triton fixes compiled vs interpreted for the process

    return kernels


def launch_configs():
    """The launch-config table module (kernels/configs.py), for the tuner."""
    return _kernels().configs


# ----------------------------------------------------------------------------------------------------------
# Launch plumbing: configs, allocation, launches (or recording them, for the compile gate)
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Launch:
    """One kernel launch: what `make compile-check` compiles and what `_run` launches."""

    name: str
    kernel: object
    grid: tuple
    args: dict  # runtime arguments by parameter name (tensors, ints, floats, None)
    constexprs: dict
    num_warps: int
    num_stages: int = 1
    tags: dict = field(default_factory=dict)  # regime, config: for the compile gate's table


@dataclass
class _Recorder:
    target: str
    launches: list


_RECORDER: Optional[_Recorder] = None


@contextlib.contextmanager
def recording(target: str):
    """Within this block launches are recorded, not run, and configs come from `target`'s table. The
    compile gate runs the host code on meta tensors inside it to learn exactly what would be launched."""
    global _RECORDER
    saved, _RECORDER = _RECORDER, _Recorder(target, [])
    try:
        yield _RECORDER.launches
    finally:
        _RECORDER = saved


def _run(launch: Launch) -> None:
    if _RECORDER is not None:
        _RECORDER.launches.append(launch)
        return
    device = next(v.device for v in launch.args.values() if isinstance(v, torch.Tensor))
    # Triton launches on the current CUDA device; make it the tensors' one (a no-op on one GPU).
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        launch.kernel[launch.grid](**launch.args, **launch.constexprs, num_warps=launch.num_warps,
                                   num_stages=launch.num_stages)


@functools.lru_cache(maxsize=None)
def _capability_target(index: int) -> str:
    major, _ = torch.cuda.get_device_capability(index)
    return "sm_90" if major >= 9 else "sm_80"


def _target(device: torch.device) -> str:
    if _RECORDER is not None:
        return _RECORDER.target
    if device.type == "cpu":
        return "interpreter"
    return env.triton_target() or _capability_target(device.index if device.index is not None else 0)


def _dot_flags(dtype: torch.dtype) -> dict:
    """UPCAST: interpreter only (Triton issue 11584, bf16 dot). PRECISION: fp32 operands use tf32 exactly
    when PyTorch's own fp32 matmuls may (torch.backends.cuda.matmul.allow_tf32); the compile gate builds
    the tf32 variant, the fast one."""
    interpreting = _RECORDER is None and env.triton_interpret()
    tf32 = _RECORDER is not None or torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if dtype == torch.float32 and tf32 and not interpreting else "ieee"
    return {"UPCAST": interpreting and dtype == torch.bfloat16, "PRECISION": precision}


def _gemm(kernel: str, dtype: torch.dtype, device: torch.device, rows: int, num_experts: int, auto_group=None):
    """(block constexprs BLOCK_M/N/K and GROUP_M, warps, stages, tags) of one GEMM launch. auto_group(config) gives
    GROUP_M where the config's is 0 ("dw": chosen per launch, see _weight_grad)."""
    cfgs = _kernels().configs
    regime = cfgs.regime(rows, num_experts)
    c = cfgs.gemm_config(_target(device), regime, kernel, dtype.itemsize)
    if c.group_m == 0:
        c = c._replace(group_m=auto_group(c))
    tags = {"regime": regime,
            "config": f"{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages} g{c.group_m}"}
    blocks = {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "GROUP_M": c.group_m}
    return blocks, c.num_warps, c.num_stages, tags


def _m_tiles(rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the row tiles of a grouped GEMM over `rows` rows split among experts: each non-empty
    expert wastes less than one tile, and no tile is empty. The GEMM grids are 1-D, this bound times the column
    tiles; the kernels count the real row tiles and decode their grouped order (experts.grouped_row_tile)."""
    return min(rows, (rows + num_experts * (block_m - 1)) // block_m)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _empty(shape, dtype, device) -> torch.Tensor:
    """A buffer for a kernel to write; poisoned first under FLASHMOE_DEBUG_POISON=1 (tests)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if env.debug_poison() and _RECORDER is None and t.numel():
        t.fill_(float("nan") if dtype.is_floating_point else (True if dtype == torch.bool else -2**30))
    return t


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

def _routing_blocks(t: int, e: int, device) -> tuple[int, int, int]:
    """(E_PAD, BLOCK_T, NB) shared by every routing launch of one call (the block table's rows are BLOCK_T tokens)."""
    e_pad = max(16, _pow2(e))  # the router dot's smallest N
    block_t = _kernels().configs.route_block_t(_target(device), e_pad)
    return e_pad, block_t, max(1, _cdiv(t, block_t))


def route_impl(logits: Optional[torch.Tensor], x: Optional[torch.Tensor], router_weight: Optional[torch.Tensor],
               router_bias: Optional[torch.Tensor], expert_bias: Optional[torch.Tensor], top_k: int, score_func: str,
               renormalize: bool, scaling: float, num_groups: int, topk_groups: int, dropless: bool):
    """Route T tokens in one launch (route_kernel) -> (topk_ids [T, k] int64, weights [T, k], scores [T, E],
    logits [T, E], table [NB, E] int32, counts_all [E] int32, stats [E + 1] int64, kept [T, k] bool), before
    capacity. kept: all True when `dropless` (capacity then writes its own flags), else an empty placeholder.

    logits [T, E] fp32/fp64 given (training: the router's autograd graph is PyTorch's), or None: then computed in
    the kernel from x [T, H] and router_weight [E, H] (+ router_bias [E]) in their own dtypes, fp32 accumulation
    (fp64 when x is fp64); the returned logits are then the kernel's. Otherwise the returned logits are an empty
    placeholder (an op's output may not alias its input)."""
    compute = logits is None
    src = x if compute else logits
    t = src.shape[0]
    e = router_weight.shape[0] if compute else logits.shape[1]
    dev = src.device
    acc = _acc_dtype(x.dtype) if compute else logits.dtype
    if compute and router_weight.dtype == torch.float64:
        acc = torch.float64
    out_logits = _empty((t, e), acc, dev) if compute else _empty((0,), acc, dev)
    ids = _empty((t, top_k), torch.int64, dev)
    weights = _empty((t, top_k), acc, dev)
    scores = _empty((t, e), acc, dev)
    e_pad, block_t, nb = _routing_blocks(t, e, dev)
    table = _empty((nb, e), torch.int32, dev)
    counts = _empty((e,), torch.int32, dev)
    stats = _empty((e + 1,), torch.int64, dev)
    ticket = torch.zeros(1, dtype=torch.int32, device=dev)
    kept = _empty((t, top_k) if dropless else (0,), torch.bool, dev)
    aux = _kernels().configs.AUX[_target(dev)]
    # 16-bit x and router of one dtype: the MMA on them (exact products, fp32 sums). Not under the interpreter,
    # whose 16-bit dot with an fp32 accumulator returns garbage (as the fused kernel's route task, which does the same).
    native = compute and x.dtype in (torch.bfloat16, torch.float16) and router_weight.dtype == x.dtype and \
        _target(dev) != "interpreter"
    # fp32 cannot hold every scaling factor: hi + lo carries it to fp64 layers exactly enough.
    hi = struct.unpack("f", struct.pack("f", scaling))[0]
    _run(Launch("route" + ("[logits]" if compute else ""), _kernels().route_kernel, (nb,),
                dict(ids_ptr=ids, weights_ptr=weights, scores_ptr=scores, table_ptr=table, counts_ptr=counts,
                     stats_ptr=stats, kept_ptr=kept if dropless else None,
                     logits_ptr=out_logits if compute else logits, ticket_ptr=ticket,
                     x_ptr=x if compute else None, router_ptr=router_weight if compute else None,
                     rbias_ptr=router_bias if compute else None, bias_ptr=expert_bias, T=t,
                     H=x.shape[1] if compute else 0, NB=nb, scale_hi=hi, scale_lo=scaling - hi),
                dict(E=e, TOPK=top_k, GROUPS=num_groups, TOPK_GROUPS=topk_groups, SIGMOID=score_func == "sigmoid",
                     HAS_BIAS=expert_bias is not None, RENORM=renormalize, COMPUTE=compute,
                     HAS_RBIAS=compute and router_bias is not None, NATIVE_DOT=native, WRITE_KEPT=dropless,
                     E_PAD=e_pad,
                     K_PAD=_pow2(top_k), G_PAD=_pow2(num_groups), BLOCK_T=block_t,
                     BLOCK_K=max(16, aux["route_bk"] * 2 // (x.element_size() if compute else 2)),
                     CB=aux["scan"]),
                _kernels().configs.AUX_WARPS))
    return ids, weights, scores, out_logits, table, counts, stats, kept


def _scatter(ids, kept, table, counts, num_experts):
    """(order [T*k] int32, slot_of [T*k] int32) from a scanned table."""
    t, k = ids.shape
    dev = ids.device
    e_pad, block_t, nb = _routing_blocks(t, num_experts, dev)
    order = _empty((t * k,), torch.int32, dev)
    slot_of = _empty((t * k,), torch.int32, dev)
    _run(Launch("scatter", _kernels().scatter_kernel, (nb,),
                dict(order_ptr=order, slot_ptr=slot_of, ids_ptr=ids, kept_ptr=kept, table_ptr=table,
                     counts_ptr=counts, T=t, E=num_experts),
                dict(TOPK=k, HAS_KEPT=kept is not None, E_PAD=e_pad, K_PAD=_pow2(k), BLOCK_T=block_t),
                _kernels().configs.AUX_WARPS))
    return order, slot_of


def hist_impl(ids: torch.Tensor, kept: Optional[torch.Tensor], num_experts: int):
    """ids [T, k] int64, kept [T, k] bool or None (all count) -> (table [NB, E] int32 scanned, counts [E] int32,
    stats [E + 1] int64: tokens per expert, then the assignments not counted)."""
    t, k = ids.shape
    dev = ids.device
    e_pad, block_t, nb = _routing_blocks(t, num_experts, dev)
    table = _empty((nb, num_experts), torch.int32, dev)
    counts = _empty((num_experts,), torch.int32, dev)
    stats = _empty((num_experts + 1,), torch.int64, dev)
    ticket = torch.zeros(1, dtype=torch.int32, device=dev)
    _run(Launch("hist", _kernels().hist_kernel, (nb,),
                dict(table_ptr=table, counts_ptr=counts, stats_ptr=stats, ticket_ptr=ticket, ids_ptr=ids,
                     kept_ptr=kept, T=t, NB=nb, E=num_experts),
                dict(TOPK=k, HAS_KEPT=kept is not None, E_PAD=e_pad, K_PAD=_pow2(k), BLOCK_T=block_t,
                     CB=_kernels().configs.AUX[_target(dev)]["scan"]),
                _kernels().configs.AUX_WARPS))
    return table, counts, stats


def given_order_impl(ids: torch.Tensor, kept: torch.Tensor, num_experts: int):
    """Routing the caller supplied: ids [T, k] int64, kept [T, k] bool -> (order [T*k] int32, slot_of [T*k] int32,
    counts [E] int32, stats [E + 1] int64). Two launches (hist, scatter)."""
    table, counts, stats = hist_impl(ids, kept, num_experts)
    order, slot_of = _scatter(ids, kept, table, counts, num_experts)
    return order, slot_of, counts, stats


def order_impl(ids: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, counts_all: torch.Tensor,
               capacity: int, num_experts: int):
    """Sort routed assignments by expert -> (order [T*k] int32, slot_of [T*k] int32, kept [T*k] bool, counts [E]
    int32, stats [E + 1] int64), from the route kernel's scanned table and counts_all.

    capacity < 0 (dropless): one launch (scatter); kept, counts and stats are then the route kernel's, so empty
    placeholders come back in their place. capacity >= 0: the dropless order, then each expert's `capacity` best
    (DESIGN §2.4: capacity_kernel, which also counts the kept into a fresh block table), then their order."""
    t, k = ids.shape
    dev = ids.device
    order, slot_of = _scatter(ids, None, table, counts_all, num_experts)
    if capacity < 0:
        return (order, slot_of, _empty((0,), torch.bool, dev), _empty((0,), torch.int32, dev),
                _empty((0,), torch.int64, dev))
    n = ids.numel()
    e_pad, block_t, nb = _routing_blocks(t, num_experts, dev)
    flags = _empty((n,), torch.bool, dev)
    work = torch.zeros(nb * num_experts + 1, dtype=torch.int32, device=dev)  # the kept's block table, a ticket
    counts = _empty((num_experts,), torch.int32, dev)
    stats = _empty((num_experts + 1,), torch.int64, dev)
    aux = _kernels().configs.AUX[_target(dev)]
    block_r, block_c = aux["capacity"]
    table_kept = work[:-1].view(nb, num_experts)
    _run(Launch("capacity", _kernels().capacity_kernel, (_cdiv(n, block_r),),
                dict(kept_ptr=flags, table_ptr=table_kept, counts_out_ptr=counts, stats_ptr=stats,
                     ticket_ptr=work[-1:], order_ptr=order, ids_ptr=ids, weights_ptr=weights, counts_ptr=counts_all,
                     N=n, E=num_experts, cap=capacity, NB=nb),
                dict(TOPK=k, E_PAD=e_pad, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_T=block_t, CB=aux["scan"]),
                _kernels().configs.AUX_WARPS))
    kept_ids = flags.view(t, k)
    order, slot_of = _scatter(ids, kept_ids, table_kept, counts, num_experts)
    return order, slot_of, flags, counts, stats


def _up(x, order, counts, w_up, b_up, h, pre, activation, top_k, rows):
    act, gated = kernel_activation(activation)
    e, hidden, _ = w_up.shape
    inner = h.shape[1]
    blocks, warps, stages, tags = _gemm("up", x.dtype, x.device, rows, e)
    _run(Launch(f"up[{activation.split(':')[0]}]", _kernels().up_kernel,
                (_m_tiles(rows, e, blocks["BLOCK_M"]) * _cdiv(inner, blocks["BLOCK_N"]),),
                dict(h_ptr=h, pre_ptr=pre if pre.numel() else None, x_ptr=x, order_ptr=order, counts_ptr=counts,
                     w_ptr=w_up, b_ptr=b_up, H=hidden, INNER=inner, E=e),
                dict(TOPK=top_k, GATHER=order is not None, ACT=act, GATED=gated, HAS_BIAS=b_up is not None,
                     STORE_PRE=pre.numel() > 0, EVEN_K=hidden % blocks["BLOCK_K"] == 0, E_PAD=_pow2(e),
                     **blocks, **_dot_flags(x.dtype)),
                warps, stages, tags))


def _rows_gemm(kind, out, a, b, strides, bias, weights, order, counts, top_k, atomic, rows):
    """kind 'down': out = (a @ w_down[e] + b_down[e]) * weight; kind 'dx': out = a @ w_up[e]^T."""
    e = counts.shape[0]
    k_dim, n_dim = a.shape[1], out.shape[1]
    blocks, warps, stages, tags = _gemm(kind, a.dtype, a.device, rows, e)
    scale = weights is not None
    name = kind + ("[atomic]" if atomic else "[scaled]" if scale else "")
    _run(Launch(name, _kernels().rows_gemm_kernel,
                (_m_tiles(rows, e, blocks["BLOCK_M"]) * _cdiv(n_dim, blocks["BLOCK_N"]),),
                dict(out_ptr=out, a_ptr=a, b_ptr=b, bias_ptr=bias, weight_ptr=weights, order_ptr=order,
                     counts_ptr=counts, K=k_dim, N=n_dim, E=e, stride_be=strides[0], stride_bk=strides[1],
                     stride_bn=strides[2]),
                dict(TOPK=top_k, HAS_BIAS=bias is not None, SCALE=scale, ATOMIC=atomic,
                     EVEN_K=k_dim % blocks["BLOCK_K"] == 0, E_PAD=_pow2(e), **blocks, **_dot_flags(a.dtype)),
                warps, stages, tags))


def _combine(out, rows, slot_of, addend, top_k):
    t, hidden = out.shape
    block_t, block_h = _kernels().configs.AUX[_target(out.device)]["combine"]
    _run(Launch("combine", _kernels().combine_kernel, (_cdiv(t, block_t), _cdiv(hidden, block_h)),
                dict(out_ptr=out, rows_ptr=rows, slot_ptr=slot_of, addend_ptr=addend, T=t, H=hidden),
                dict(TOPK=top_k, HAS_ADDEND=addend is not None, BLOCK_T=block_t, BLOCK_H=block_h),
                _kernels().configs.AUX_WARPS))


def _weight_grad(name, dw, db, a, b, order, counts, weights, top_k, a_gather, b_gather, rows):
    """dw [E, M, N] = per expert a[rows]^T @ b[rows]; db [E, N] (or None) = per expert column sums of b, each row
    times its routing weight when `weights` is given (dW_down: b = the output gradient, a = h * weight).

    Launch order, unless the config fixes GROUP_M: every program of an expert streams all of its rows of one
    column block of A (M columns) and one of B (N columns), so consecutive programs share a block of the wider
    operand, read from HBM once, and walk every block of the narrower one, which is re-read from L2: column-major
    (GROUP_M = row tiles of dW) when B is the wider, row-major (GROUP_M = 1) when A is (dW_down of Mixtral's
    I = 14336 > H)."""
    e, m, n = dw.shape
    blocks, warps, stages, tags = _gemm("dw", a.dtype, a.device, rows, e,
                                        lambda c: _cdiv(m, c.block_m) if n > m else 1)
    tiles_n = _cdiv(n, blocks["BLOCK_N"])
    per_expert = _cdiv(m, blocks["BLOCK_M"]) * tiles_n + (tiles_n if db is not None else 0)
    _run(Launch(name, _kernels().weight_grad_kernel, (e * per_expert,),
                dict(dw_ptr=dw, db_ptr=db, a_ptr=a, b_ptr=b, order_ptr=order, counts_ptr=counts, weight_ptr=weights,
                     M=m, N=n, E=e),
                dict(TOPK=top_k, A_GATHER=a_gather, B_GATHER=b_gather, DB_SCALE=weights is not None,
                     HAS_BIAS=db is not None, E_PAD=_pow2(e), **blocks, **_dot_flags(a.dtype)),
                warps, stages, tags))


def experts_fwd_impl(x: torch.Tensor, weights: Optional[torch.Tensor], addend: Optional[torch.Tensor],
                     order: Optional[torch.Tensor], counts: torch.Tensor, slot_of: Optional[torch.Tensor],
                     w_up: torch.Tensor, w_down: torch.Tensor, b_up: Optional[torch.Tensor],
                     b_down: Optional[torch.Tensor], activation: str, top_k: int, deterministic: bool, save: bool):
    """The expert FFNs and the combine.

    MoE mode (order given): x [T, H] tokens; weights [T, k]; addend [T, H] fp32/fp64 or None (shared expert)
      -> out [T, H] x.dtype = sum_j weight * expert(x_t) + addend.
    Rows mode (order None): x [R, H] rows already grouped by expert (counts [E]) -> out [R, H] = expert(row).
    Also returns pre [R, N_up] for the backward (empty unless `save`), after an always empty h: the backward
    recomputes h from pre (act_grad_kernel), so h [R, I] lives only until the down projection has read it.
    """
    moe_mode = order is not None
    t, hidden = x.shape
    rows = t * top_k if moe_mode else t
    inner = w_down.shape[1]
    dev = x.device
    h = _empty((rows, inner), x.dtype, dev)
    pre = _empty((rows, w_up.shape[2]), x.dtype, dev) if save else x.new_empty(0)
    _up(x, order, counts, w_up, b_up, h, pre, activation, top_k, rows)
    down_strides = (inner * hidden, hidden, 1)
    if not moe_mode:
        out = _empty((rows, hidden), x.dtype, dev)
        _rows_gemm("down", out, h, w_down, down_strides, b_down, None, None, counts, top_k, False, rows)
    elif deterministic:
        y = _empty((rows, hidden), x.dtype, dev)
        _rows_gemm("down", y, h, w_down, down_strides, b_down, weights, order, counts, top_k, False, rows)
        out = _empty((t, hidden), x.dtype, dev)
        _combine(out, y, slot_of, addend, top_k)
    else:
        acc = addend.clone() if addend is not None else torch.zeros(t, hidden, dtype=_acc_dtype(x.dtype), device=dev)
        _rows_gemm("down", acc, h, w_down, down_strides, b_down, weights, order, counts, top_k, True, rows)
        out = acc.to(x.dtype)
    return out, x.new_empty(0), pre


def experts_bwd_impl(grad_out: torch.Tensor, x: torch.Tensor, weights: Optional[torch.Tensor],
                     order: Optional[torch.Tensor], counts: torch.Tensor, slot_of: Optional[torch.Tensor],
                     w_up: torch.Tensor, w_down: torch.Tensor, b_up: Optional[torch.Tensor],
                     b_down: Optional[torch.Tensor], h: torch.Tensor, pre: torch.Tensor, activation: str,
                     top_k: int, deterministic: bool, need_dx: bool, need_dweights: bool, need_dparams: bool):
    """Gradients of experts_fwd_impl's out: (dx, dweights [T, k], dw_up, dw_down, db_up, db_down); tensors
    not asked for (or without a parameter) come back empty. pre [R, N_up] is the saved pre-activation; h is not
    read (the act-grad kernel recomputes it from pre), any tensor may be passed."""
    moe_mode = order is not None
    g = grad_out.contiguous()
    t, hidden = x.shape
    rows, inner = pre.shape[0], w_down.shape[1]
    e, _, n_up = w_up.shape
    dev = x.device
    act, gated = kernel_activation(activation)
    dw_rows = moe_mode and need_dweights
    blocks, warps, stages, tags = _gemm("dh", x.dtype, dev, rows, e)
    n_tiles = _cdiv(inner, blocks["BLOCK_N"])
    dpre = _empty((rows, n_up), x.dtype, dev)
    # dW_down's A operand, h * weight by sorted row, written by the act-grad kernel (which recomputes h anyway).
    hw = _empty((rows, inner), x.dtype, dev) if need_dparams else None
    partial = torch.zeros(t * top_k, n_tiles, dtype=_acc_dtype(x.dtype), device=dev) if dw_rows else None
    _run(Launch(f"dh[{activation.split(':')[0]}]", _kernels().act_grad_kernel,
                (_m_tiles(rows, e, blocks["BLOCK_M"]) * n_tiles,),
                dict(dpre_ptr=dpre, hw_ptr=hw, dw_ptr=partial, g_ptr=g, order_ptr=order, counts_ptr=counts,
                     weight_ptr=weights if moe_mode else None, wd_ptr=w_down, pre_ptr=pre, bd_ptr=b_down,
                     H=hidden, INNER=inner, E=e, NT=n_tiles),
                dict(TOPK=top_k, GATHER=moe_mode, SCALE=moe_mode, DW=dw_rows, HW=need_dparams, ACT=act, GATED=gated,
                     HAS_BIAS=b_down is not None, EVEN_K=hidden % blocks["BLOCK_K"] == 0, E_PAD=_pow2(e),
                     **blocks, **_dot_flags(x.dtype)),
                warps, stages, tags))

    def empty():  # a fresh placeholder for each output not computed: custom-op outputs may not alias
        return x.new_empty(0)

    dw_up, dw_down, db_up, db_down = empty(), empty(), empty(), empty()
    if need_dparams:
        dw_down = _empty(w_down.shape, w_down.dtype, dev)
        db_down = _empty(b_down.shape, b_down.dtype, dev) if b_down is not None else None
        _weight_grad("dw[down]", dw_down, db_down, hw, g, order, counts, weights if moe_mode else None, top_k,
                     False, moe_mode, rows)
        dw_up = _empty(w_up.shape, w_up.dtype, dev)
        db_up = _empty(b_up.shape, b_up.dtype, dev) if b_up is not None else None
        _weight_grad("dw[up]", dw_up, db_up, x, dpre, order, counts, None, top_k, moe_mode, False, rows)
        db_down = empty() if db_down is None else db_down
        db_up = empty() if db_up is None else db_up

    dx = empty()
    if need_dx:
        up_t_strides = (hidden * n_up, 1, n_up)  # w_up[e]^T read in place
        if not moe_mode:
            dx = _empty((rows, hidden), x.dtype, dev)
            _rows_gemm("dx", dx, dpre, w_up, up_t_strides, None, None, None, counts, top_k, False, rows)
        elif deterministic:
            dx_rows = _empty((rows, hidden), x.dtype, dev)
            _rows_gemm("dx", dx_rows, dpre, w_up, up_t_strides, None, None, None, counts, top_k, False, rows)
            dx = _empty((t, hidden), x.dtype, dev)
            _combine(dx, dx_rows, slot_of, None, top_k)
        else:
            acc = torch.zeros(t, hidden, dtype=_acc_dtype(x.dtype), device=dev)
            _rows_gemm("dx", acc, dpre, w_up, up_t_strides, None, None, order, counts, top_k, True, rows)
            dx = acc.to(x.dtype)
    dweights = partial.sum(1).reshape(t, top_k).to(weights.dtype) if dw_rows else empty()
    return dx, dweights, dw_up, dw_down, db_up, db_down


# ----------------------------------------------------------------------------------------------------------
# torch.library custom ops (schema inferred from the annotations; fake implementations for torch.compile)
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("flashmoe_triton::route", mutates_args=())
def _route_op(logits: Optional[torch.Tensor], x: Optional[torch.Tensor], router_weight: Optional[torch.Tensor],
              router_bias: Optional[torch.Tensor], expert_bias: Optional[torch.Tensor], top_k: int, score_func: str,
              renormalize: bool, scaling: float, num_groups: int, topk_groups: int,
              dropless: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor, torch.Tensor, torch.Tensor]:
    return route_impl(logits, x, router_weight, router_bias, expert_bias, top_k, score_func, renormalize, scaling,
                      num_groups, topk_groups, dropless)


@_route_op.register_fake
def _(logits, x, router_weight, router_bias, expert_bias, top_k, score_func, renormalize, scaling, num_groups,
      topk_groups, dropless):
    src = x if logits is None else logits
    t = src.shape[0]
    e = router_weight.shape[0] if logits is None else logits.shape[1]
    acc = _acc_dtype(x.dtype) if logits is None else logits.dtype
    if logits is None and router_weight.dtype == torch.float64:
        acc = torch.float64
    nb = max(1, _cdiv(t, _kernels().configs.route_block_t(_target(src.device), max(16, _pow2(e)))))
    return (src.new_empty(t, top_k, dtype=torch.int64), src.new_empty(t, top_k, dtype=acc),
            src.new_empty(t, e, dtype=acc), src.new_empty((t, e) if logits is None else (0,), dtype=acc),
            src.new_empty(nb, e, dtype=torch.int32), src.new_empty(e, dtype=torch.int32),
            src.new_empty(e + 1, dtype=torch.int64),
            src.new_empty((t, top_k) if dropless else (0,), dtype=torch.bool))


@torch.library.custom_op("flashmoe_triton::given_order", mutates_args=())
def _given_order_op(ids: torch.Tensor, kept: torch.Tensor,
                    num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return given_order_impl(ids, kept, num_experts)


@_given_order_op.register_fake
def _(ids, kept, num_experts):
    n = ids.numel()
    return (ids.new_empty(n, dtype=torch.int32), ids.new_empty(n, dtype=torch.int32),
            ids.new_empty(num_experts, dtype=torch.int32), ids.new_empty(num_experts + 1, dtype=torch.int64))


@torch.library.custom_op("flashmoe_triton::counts", mutates_args=())
def _counts_op(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    return hist_impl(ids, None, num_experts)[1]


@_counts_op.register_fake
def _(ids, num_experts):
    return ids.new_empty(num_experts, dtype=torch.int32)


@torch.library.custom_op("flashmoe_triton::order", mutates_args=())
def _order_op(ids: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, counts_all: torch.Tensor,
              capacity: int,
              num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return order_impl(ids, weights, table, counts_all, capacity, num_experts)


@_order_op.register_fake
def _(ids, weights, table, counts_all, capacity, num_experts):
    n = ids.numel()
    dropless = capacity < 0
    return (ids.new_empty(n, dtype=torch.int32), ids.new_empty(n, dtype=torch.int32),
            ids.new_empty(0 if dropless else n, dtype=torch.bool),
            ids.new_empty(0 if dropless else num_experts, dtype=torch.int32),
            ids.new_empty(0 if dropless else num_experts + 1, dtype=torch.int64))


@torch.library.custom_op("flashmoe_triton::experts_fwd", mutates_args=())
def _experts_fwd_op(x: torch.Tensor, weights: Optional[torch.Tensor], addend: Optional[torch.Tensor],
                    order: Optional[torch.Tensor], counts: torch.Tensor, slot_of: Optional[torch.Tensor],
                    w_up: torch.Tensor, w_down: torch.Tensor, b_up: Optional[torch.Tensor],
                    b_down: Optional[torch.Tensor], activation: str, top_k: int, deterministic: bool,
                    save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return experts_fwd_impl(x, weights, addend, order, counts, slot_of, w_up, w_down, b_up, b_down, activation,
                            top_k, deterministic, save)


@_experts_fwd_op.register_fake
def _(x, weights, addend, order, counts, slot_of, w_up, w_down, b_up, b_down, activation, top_k, deterministic, save):
    t, hidden = x.shape
    rows = t * top_k if order is not None else t
    out = x.new_empty(t if order is not None else rows, hidden)
    return out, x.new_empty(0), x.new_empty(rows, w_up.shape[2]) if save else x.new_empty(0)


@torch.library.custom_op("flashmoe_triton::experts_bwd", mutates_args=())
def _experts_bwd_op(grad_out: torch.Tensor, x: torch.Tensor, weights: Optional[torch.Tensor],
                    order: Optional[torch.Tensor], counts: torch.Tensor, slot_of: Optional[torch.Tensor],
                    w_up: torch.Tensor, w_down: torch.Tensor, b_up: Optional[torch.Tensor],
                    b_down: Optional[torch.Tensor], h: torch.Tensor, pre: torch.Tensor, activation: str, top_k: int,
                    deterministic: bool, need_dx: bool, need_dweights: bool,
                    need_dparams: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
    return experts_bwd_impl(grad_out, x, weights, order, counts, slot_of, w_up, w_down, b_up, b_down, h, pre,
                            activation, top_k, deterministic, need_dx, need_dweights, need_dparams)


@_experts_bwd_op.register_fake
def _(grad_out, x, weights, order, counts, slot_of, w_up, w_down, b_up, b_down, h, pre, activation, top_k,
      deterministic, need_dx, need_dweights, need_dparams):
    empty = x.new_empty(0)
    dx = x.new_empty(x.shape) if need_dx else empty
    dweights = weights.new_empty(x.shape[0], top_k) if order is not None and need_dweights else empty.new_empty(0)
    if not need_dparams:
        return dx, dweights, empty.new_empty(0), empty.new_empty(0), empty.new_empty(0), empty.new_empty(0)
    return (dx, dweights, w_up.new_empty(w_up.shape), w_down.new_empty(w_down.shape),
            b_up.new_empty(b_up.shape) if b_up is not None else empty.new_empty(0),
            b_down.new_empty(b_down.shape) if b_down is not None else empty.new_empty(0))


# ----------------------------------------------------------------------------------------------------------
# Autograd and the backend entry points
# ----------------------------------------------------------------------------------------------------------

class _ExpertsFunction(torch.autograd.Function):
    """Differentiable w.r.t. x, weights, addend and the expert parameters; no math of its own."""

    @staticmethod
    def forward(ctx, x, weights, addend, w_up, w_down, b_up, b_down, order, counts, slot_of, activation, top_k,
                deterministic, save):
        out, h, pre = _experts_fwd_op(x, weights, addend, order, counts, slot_of, w_up, w_down, b_up, b_down,
                                      activation, top_k, deterministic, save)
        if save:
            ctx.save_for_backward(x, weights, order, counts, slot_of, w_up, w_down, b_up, b_down, h, pre)
        ctx.meta = (activation, top_k, deterministic, None if addend is None else addend.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weights, order, counts, slot_of, w_up, w_down, b_up, b_down, h, pre = ctx.saved_tensors
        activation, top_k, deterministic, addend_dtype = ctx.meta
        need = ctx.needs_input_grad
        dx, dweights, dw_up, dw_down, db_up, db_down = _experts_bwd_op(
            grad_out, x, weights, order, counts, slot_of, w_up, w_down, b_up, b_down, h, pre, activation, top_k,
            deterministic, need[0], need[1], any(need[3:7]))
        return (dx if need[0] else None, dweights if need[1] else None,
                grad_out.to(addend_dtype) if need[2] else None,
                dw_up if need[3] else None, dw_down if need[4] else None,
                db_up if need[5] else None, db_down if need[6] else None,
                None, None, None, None, None, None, None)


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _contig(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _value_with_grad_of(value: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
    """`value` exactly (the kernel's result), with the gradient of `expr` (the same quantity in PyTorch)."""
    return value + (expr - expr.detach())


def route_on_device(x2d: torch.Tensor, params: MoEParams, cfg: MoEConfig, routing: Optional[Routing] = None):
    """Routing with the route kernel (or the caller's), ordered by expert, all on the device: x2d [T, H] contiguous
    (T > 0) -> (Routing, order [T*k] int32, slot_of [T*k] int32, counts [E] int32, stats [E + 1] int64, counts_all
    [E] int32 before capacity or None for caller routing). No host synchronisation."""
    t, k, e = x2d.shape[0], cfg.top_k, cfg.num_experts
    counts_all = None
    if routing is None:
        bias = params.expert_bias.contiguous() if cfg.expert_bias and params.expert_bias is not None else None
        router_bias = _contig(params.router_bias) if cfg.router_bias else None
        capacity = cfg.capacity(t)
        if _wants_grad(x2d, params.router_weight, router_bias):
            # Training: the router's graph is PyTorch's (logits -> scores -> weights), the kernel routes its values.
            logits = router_logits(x2d, params.router_weight, router_bias)
            ids, w_kernel, s_kernel, _, table, counts_all, stats_all, kept = _route_op(
                logits.detach().contiguous(), None, None, None, bias, k, cfg.score_func, cfg.renormalize,
                float(cfg.routed_scaling_factor), cfg.num_expert_groups, cfg.topk_groups, capacity is None)
            scores_pt = scores_from_logits(logits, cfg.score_func)
            scores = _value_with_grad_of(s_kernel, scores_pt)
            weights = _value_with_grad_of(w_kernel, weights_from_scores(scores_pt, ids, cfg))
        else:
            # Inference: the logits come from the route kernel, from x and the router in their own dtypes.
            ids, w_kernel, s_kernel, logits, table, counts_all, stats_all, kept = _route_op(
                None, x2d, params.router_weight.contiguous(), router_bias, bias, k, cfg.score_func, cfg.renormalize,
                float(cfg.routed_scaling_factor), cfg.num_expert_groups, cfg.topk_groups, capacity is None)
            scores, weights = s_kernel, w_kernel
        order, slot_of, kept_cap, counts, stats = _order_op(ids, w_kernel, table, counts_all,
                                                            -1 if capacity is None else capacity, e)
        if capacity is None:
            counts, stats = counts_all, stats_all
        else:
            kept = kept_cap
        routing = Routing(ids, weights, kept.view(t, k), logits, scores)
    else:
        ids = routing.topk_ids.contiguous()
        order, slot_of, counts, stats = _given_order_op(ids, routing.kept.contiguous(), e)
    return routing, order, slot_of, counts, stats, counts_all


def moe_forward(x2d: torch.Tensor, params: MoEParams, cfg: MoEConfig,
                routing: Optional[Routing] = None) -> MoEOutput:
    """x2d [T, H] (validated, flattened) -> MoEOutput with out [T, H] in x.dtype. No host synchronisation."""
    t, k, e = x2d.shape[0], cfg.top_k, cfg.num_experts
    if t == 0:
        from . import reference  # nothing to launch; the reference handles the empty shapes

        result = reference.moe_forward(x2d, params, cfg, routing)
        # Keep x in the graph even when nothing in the (empty) output depends on it, so backward works.
        result.out = result.out + x2d * 0
        result.backend = "triton"
        return result
    x2d = x2d.contiguous()
    routing, order, slot_of, counts, stats, counts_all = route_on_device(x2d, params, cfg, routing)
    ids = routing.topk_ids.contiguous()
    weights = routing.topk_weights.contiguous()
    addend = None
    if cfg.num_shared_experts > 0:
        from .reference import shared_expert  # plain PyTorch matmuls (DESIGN §4 allows it)

        addend = shared_expert(x2d, params, cfg)
    w_up, w_down, b_up, b_down = (_contig(params.w_up), _contig(params.w_down), _contig(params.b_up),
                                  _contig(params.b_down))
    save = _wants_grad(x2d, weights, addend, w_up, w_down, b_up, b_down)
    out = _ExpertsFunction.apply(x2d, weights, addend, w_up, w_down, b_up, b_down, order, counts, slot_of,
                                 cfg.activation_key, k, cfg.deterministic, save)
    def losses():  # on first read (MoEOutput): a dozen small kernels that most calls never need
        all_counts = counts_all
        if all_counts is None and routing.scores is not None:
            all_counts = _counts_op(ids, e)
        return routing_losses(routing, e, all_counts)

    stats = MoEStats(tokens_per_expert=stats[:e], dropped=stats[e], host_syncs=0)
    anchor = routing.logits if routing.logits is not None and routing.logits.requires_grad else None
    return MoEOutput(out=out, routing=routing, stats=stats, backend="triton", losses=losses,
                     loss_coefs=(cfg.aux_loss_coef, cfg.z_loss_coef), anchor=anchor)


def expert_ffn(rows: torch.Tensor, counts: torch.Tensor, params: MoEParams, activation: str) -> torch.Tensor:
    """Same contract as `flashmoe_py.reference.expert_ffn`: rows [A, H] grouped by local expert, counts
    [E_local] integer summing to A -> y [A, H] in rows.dtype, differentiable w.r.t. rows and the parameters."""
    if rows.shape[0] == 0:
        return rows.new_empty(0, params.w_down.shape[-1])
    w_up, w_down, b_up, b_down = (_contig(params.w_up), _contig(params.w_down), _contig(params.b_up),
                                  _contig(params.b_down))
    rows = rows.contiguous()
    save = _wants_grad(rows, w_up, w_down, b_up, b_down)
    return _ExpertsFunction.apply(rows, None, None, w_up, w_down, b_up, b_down, None,
                                  counts.to(torch.int32).contiguous(), None, activation, 1, True, save)


def token_rows_moe(rows: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, params: MoEParams,
                   activation: str) -> torch.Tensor:
    """What an expert's rank computes for the rows it received (parallel/device_forward.py), with no host
    synchronisation: rows [R, H]; ids [R, k] int32, each slot's local expert (-1: none); weights [R, k] fp32/fp64
    -> [R, H] in rows.dtype: per row, the sum over its slots with an expert, in slot order, of weight * y_e(row), in
    fp32 (fp64), rounded once (0 for a row without one). Differentiable w.r.t. rows, weights and the parameters."""
    k, e = ids.shape[1], params.w_up.shape[0]
    kept = (ids >= 0).contiguous()
    local = torch.where(kept, ids, 0).to(torch.int64).contiguous()
    order, slot_of, counts, _ = _given_order_op(local, kept, e)
    w_up, w_down, b_up, b_down = (_contig(params.w_up), _contig(params.w_down), _contig(params.b_up),
                                  _contig(params.b_down))
    rows, weights = rows.contiguous(), weights.contiguous()
    save = _wants_grad(rows, weights, w_up, w_down, b_up, b_down)
    return _ExpertsFunction.apply(rows, weights, None, w_up, w_down, b_up, b_down, order, counts, slot_of,
                                  activation, k, True, save)


# ----------------------------------------------------------------------------------------------------------
# For the compile gate and the tuner: the launches of one layer call, without running them
# ----------------------------------------------------------------------------------------------------------

def plan_launches(cfg: MoEConfig, dtype: torch.dtype, num_tokens: int, target: str, backward: bool = True,
                  rows_mode: bool = False, given_routing: bool = False) -> list:
    """Every Launch a forward (and backward) of `cfg` on `num_tokens` tokens of `dtype` makes on `target`,
    found by running this module's host code on meta tensors (so the gate compiles what really runs).
    rows_mode: the expert_ffn path (rows already grouped, num_tokens * top_k rows).
    given_routing: the caller supplied topk_ids / topk_weights (no route kernel; kept flags counted)."""
    meta = torch.device("meta")
    t, k, e, hidden = num_tokens, cfg.top_k, cfg.num_experts, cfg.hidden_size
    w_up = torch.empty(e, hidden, cfg.up_size, dtype=dtype, device=meta)
    w_down = torch.empty(e, cfg.ffn_hidden_size, hidden, dtype=dtype, device=meta)
    b_up = torch.empty(e, cfg.up_size, dtype=dtype, device=meta) if cfg.bias else None
    b_down = torch.empty(e, hidden, dtype=dtype, device=meta) if cfg.bias else None
    acc = _acc_dtype(dtype)
    with recording(target) as launches:
        counts = torch.empty(e, dtype=torch.int32, device=meta)
        if rows_mode:
            x = torch.empty(t * k, hidden, dtype=dtype, device=meta)
            order = weights = slot_of = addend = None
            top_k = 1
        else:
            x = torch.empty(t, hidden, dtype=dtype, device=meta)
            logits = torch.empty(t, e, dtype=acc, device=meta)
            bias = torch.empty(e, dtype=torch.float32, device=meta) if cfg.expert_bias else None
            if given_routing:
                ids = torch.empty(t, k, dtype=torch.int64, device=meta)
                weights = torch.empty(t, k, dtype=acc, device=meta)
                kept = torch.empty(t, k, dtype=torch.bool, device=meta)
                order, slot_of, counts, _ = given_order_impl(ids, kept, e)
            else:
                # Training routes given logits; inference computes them in the route kernel.
                router = torch.empty(e, hidden, dtype=dtype, device=meta)
                router_bias = torch.empty(e, dtype=dtype, device=meta) if cfg.router_bias else None
                cap = cfg.capacity(t)
                ids, weights, _, _, table, counts_all, _, _ = route_impl(
                    logits if backward else None, x, router, router_bias, bias, k, cfg.score_func, cfg.renormalize,
                    cfg.routed_scaling_factor, cfg.num_expert_groups, cfg.topk_groups, cap is None)
                order, slot_of, _, counts, _ = order_impl(ids, weights, table, counts_all, -1 if cap is None else cap,
                                                          e)
                if cap is None:
                    counts = counts_all
            addend = torch.empty(t, hidden, dtype=acc, device=meta) if cfg.num_shared_experts else None
            top_k = k
        out, h, pre = experts_fwd_impl(x, weights, addend, order, counts, slot_of, w_up, w_down, b_up, b_down,
                                       cfg.activation_key, top_k, cfg.deterministic, backward)
        if backward:
            experts_bwd_impl(torch.empty_like(out), x, weights, order, counts, slot_of, w_up, w_down, b_up, b_down,
                             h, pre, cfg.activation_key, top_k, cfg.deterministic, True, not rows_mode, True)
    return launches


def triton_type(value) -> str:
    """Triton signature type of a launch argument (what the JIT would infer)."""
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_DTYPE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")

