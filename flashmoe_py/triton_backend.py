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


def _gemm(kernel: str, dtype: torch.dtype, device: torch.device, rows: int, num_experts: int):
    cfgs = _kernels().configs
    regime = cfgs.regime(rows, num_experts)
    bm, bn, bk, warps, stages = cfgs.gemm_config(_target(device), regime, kernel, dtype.itemsize)
    tags = {"regime": regime, "config": f"{bm}x{bn}x{bk} w{warps} s{stages}"}
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, warps, stages, tags


def _m_tiles(rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the row tiles of a grouped GEMM over `rows` rows split among experts: each non-empty
    expert wastes less than one tile, and no tile is empty."""
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

def route_impl(logits: torch.Tensor, expert_bias: Optional[torch.Tensor], top_k: int, score_func: str,
               renormalize: bool, scaling: float, num_groups: int, topk_groups: int):
    """logits [T, E] fp32/fp64 -> (topk_ids [T, k] int64, weights [T, k], scores [T, E], counts_all [E] int32)."""
    t, e = logits.shape
    dev = logits.device
    ids = _empty((t, top_k), torch.int64, dev)
    weights = _empty((t, top_k), logits.dtype, dev)
    scores = _empty((t, e), logits.dtype, dev)
    counts = torch.zeros(e, dtype=torch.int32, device=dev)
    e_pad = _pow2(e)
    block_t = _kernels().configs.route_block_t(_target(dev), e_pad)
    # fp32 cannot hold every scaling factor: hi + lo carries it to fp64 layers exactly enough.
    hi = struct.unpack("f", struct.pack("f", scaling))[0]
    _run(Launch("route", _kernels().route_kernel, (_cdiv(t, block_t),),
                dict(ids_ptr=ids, weights_ptr=weights, scores_ptr=scores, counts_ptr=counts, logits_ptr=logits,
                     bias_ptr=expert_bias, T=t, scale_hi=hi, scale_lo=scaling - hi),
                dict(E=e, TOPK=top_k, GROUPS=num_groups, TOPK_GROUPS=topk_groups, SIGMOID=score_func == "sigmoid",
                     HAS_BIAS=expert_bias is not None, RENORM=renormalize, E_PAD=e_pad, K_PAD=_pow2(top_k),
                     G_PAD=_pow2(num_groups), BLOCK_T=block_t),
                _kernels().configs.AUX_WARPS))
    return ids, weights, scores, counts


def count_impl(ids: torch.Tensor, kept: Optional[torch.Tensor], num_experts: int) -> torch.Tensor:
    """ids [T, k] int64, kept [T, k] bool or None -> assignments per expert [E] int32 (kept ones only)."""
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    n = ids.numel()
    block = _kernels().configs.AUX[_target(ids.device)]["count"]
    _run(Launch("count", _kernels().count_kernel, (_cdiv(n, block),),
                dict(counts_ptr=counts, ids_ptr=ids, kept_ptr=kept, N=n),
                dict(HAS_KEPT=kept is not None, BLOCK=block), _kernels().configs.AUX_WARPS))
    return counts


def _sort(ids, kept, counts, num_experts):
    n = ids.numel()
    dev = ids.device
    order = _empty((n,), torch.int32, dev)
    slot_of = _empty((n,), torch.int32, dev)
    block = _kernels().configs.AUX[_target(dev)]["sort"]
    _run(Launch("sort", _kernels().sort_kernel, (num_experts,),
                dict(order_ptr=order, slot_ptr=slot_of, ids_ptr=ids, kept_ptr=kept, counts_ptr=counts, N=n,
                     E=num_experts),
                dict(HAS_KEPT=kept is not None, E_PAD=_pow2(num_experts), BLOCK=block),
                _kernels().configs.AUX_WARPS))
    return order, slot_of


def order_impl(ids: torch.Tensor, weights: torch.Tensor, kept: Optional[torch.Tensor],
               counts_all: Optional[torch.Tensor], capacity: int, num_experts: int):
    """Sort assignments by expert -> (order [T*k] int32, counts [E] int32, slot_of [T*k] int32).

    kept given (caller routing): those assignments are sorted. Otherwise counts_all (from routing) gives
    the dropless order; capacity >= 0 then keeps each expert's `capacity` best (DESIGN §2.4) and re-sorts.
    """
    if kept is not None:
        counts = count_impl(ids, kept, num_experts)
        order, slot_of = _sort(ids, kept, counts, num_experts)
        return order, counts, slot_of
    order, slot_of = _sort(ids, None, counts_all, num_experts)
    if capacity < 0:
        return order, counts_all.clone(), slot_of
    n = ids.numel()
    flags = _empty((n,), torch.bool, ids.device)
    block_r, block_c = _kernels().configs.AUX[_target(ids.device)]["capacity"]
    _run(Launch("capacity", _kernels().capacity_kernel, (_cdiv(n, block_r),),
                dict(kept_ptr=flags, order_ptr=order, ids_ptr=ids, weights_ptr=weights, counts_ptr=counts_all, N=n,
                     E=num_experts, cap=capacity),
                dict(E_PAD=_pow2(num_experts), BLOCK_R=block_r, BLOCK_C=block_c), _kernels().configs.AUX_WARPS))
    # Capacity ranks are a total order, so an expert keeps exactly min(count, capacity) rows.
    counts = torch.clamp(counts_all, max=capacity)
    order, slot_of = _sort(ids, flags, counts, num_experts)
    return order, counts, slot_of


def _up(x, order, counts, w_up, b_up, h, pre, activation, top_k, rows):
    act, gated = kernel_activation(activation)
    e, hidden, _ = w_up.shape
    inner = h.shape[1]
    blocks, warps, stages, tags = _gemm("up", x.dtype, x.device, rows, e)
    _run(Launch(f"up[{activation.split(':')[0]}]", _kernels().up_kernel,
                (_m_tiles(rows, e, blocks["BLOCK_M"]), _cdiv(inner, blocks["BLOCK_N"])),
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
                (_m_tiles(rows, e, blocks["BLOCK_M"]), _cdiv(n_dim, blocks["BLOCK_N"])),
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
    e, m, n = dw.shape
    blocks, warps, stages, tags = _gemm("dw", a.dtype, a.device, rows, e)
    _run(Launch(name, _kernels().weight_grad_kernel,
                (_cdiv(m, blocks["BLOCK_M"]) * _cdiv(n, blocks["BLOCK_N"]), e),
                dict(dw_ptr=dw, db_ptr=db, a_ptr=a, b_ptr=b, order_ptr=order, counts_ptr=counts, weight_ptr=weights,
                     M=m, N=n, E=e),
                dict(TOPK=top_k, A_GATHER=a_gather, B_GATHER=b_gather, B_SCALE=weights is not None,
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
    Also returns h [R, I] and pre [R, N_up] for the backward (empty unless `save`).
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
    return out, (h if save else x.new_empty(0)), pre


def experts_bwd_impl(grad_out: torch.Tensor, x: torch.Tensor, weights: Optional[torch.Tensor],
                     order: Optional[torch.Tensor], counts: torch.Tensor, slot_of: Optional[torch.Tensor],
                     w_up: torch.Tensor, w_down: torch.Tensor, b_up: Optional[torch.Tensor],
                     b_down: Optional[torch.Tensor], h: torch.Tensor, pre: torch.Tensor, activation: str,
                     top_k: int, deterministic: bool, need_dx: bool, need_dweights: bool, need_dparams: bool):
    """Gradients of experts_fwd_impl's out: (dx, dweights [T, k], dw_up, dw_down, db_up, db_down); tensors
    not asked for (or without a parameter) come back empty."""
    moe_mode = order is not None
    g = grad_out.contiguous()
    t, hidden = x.shape
    rows, inner = h.shape
    e, _, n_up = w_up.shape
    dev = x.device
    act, gated = kernel_activation(activation)
    dw_rows = moe_mode and need_dweights
    blocks, warps, stages, tags = _gemm("dh", x.dtype, dev, rows, e)
    n_tiles = _cdiv(inner, blocks["BLOCK_N"])
    dpre = _empty((rows, n_up), x.dtype, dev)
    partial = torch.zeros(t * top_k, n_tiles, dtype=_acc_dtype(x.dtype), device=dev) if dw_rows else None
    _run(Launch(f"dh[{activation.split(':')[0]}]", _kernels().act_grad_kernel,
                (_m_tiles(rows, e, blocks["BLOCK_M"]), n_tiles),
                dict(dpre_ptr=dpre, dw_ptr=partial, g_ptr=g, order_ptr=order, counts_ptr=counts,
                     weight_ptr=weights if moe_mode else None, wd_ptr=w_down, pre_ptr=pre, bd_ptr=b_down,
                     H=hidden, INNER=inner, E=e, NT=n_tiles),
                dict(TOPK=top_k, GATHER=moe_mode, SCALE=moe_mode, DW=dw_rows, ACT=act, GATED=gated,
                     HAS_BIAS=b_down is not None, EVEN_K=hidden % blocks["BLOCK_K"] == 0, E_PAD=_pow2(e),
                     **blocks, **_dot_flags(x.dtype)),
                warps, stages, tags))

    def empty():  # a fresh placeholder for each output not computed: custom-op outputs may not alias
        return x.new_empty(0)

    dw_up, dw_down, db_up, db_down = empty(), empty(), empty(), empty()
    if need_dparams:
        dw_down = _empty(w_down.shape, w_down.dtype, dev)
        db_down = _empty(b_down.shape, b_down.dtype, dev) if b_down is not None else None
        _weight_grad("dw[down]", dw_down, db_down, h, g, order, counts, weights if moe_mode else None, top_k,
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
def _route_op(logits: torch.Tensor, expert_bias: Optional[torch.Tensor], top_k: int, score_func: str,
              renormalize: bool, scaling: float, num_groups: int,
              topk_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return route_impl(logits, expert_bias, top_k, score_func, renormalize, scaling, num_groups, topk_groups)


@_route_op.register_fake
def _(logits, expert_bias, top_k, score_func, renormalize, scaling, num_groups, topk_groups):
    t, e = logits.shape
    return (logits.new_empty(t, top_k, dtype=torch.int64), logits.new_empty(t, top_k), logits.new_empty(t, e),
            logits.new_empty(e, dtype=torch.int32))


@torch.library.custom_op("flashmoe_triton::count", mutates_args=())
def _count_op(ids: torch.Tensor, kept: Optional[torch.Tensor], num_experts: int) -> torch.Tensor:
    return count_impl(ids, kept, num_experts)


@_count_op.register_fake
def _(ids, kept, num_experts):
    return ids.new_empty(num_experts, dtype=torch.int32)


@torch.library.custom_op("flashmoe_triton::order", mutates_args=())
def _order_op(ids: torch.Tensor, weights: torch.Tensor, kept: Optional[torch.Tensor],
              counts_all: Optional[torch.Tensor], capacity: int,
              num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return order_impl(ids, weights, kept, counts_all, capacity, num_experts)


@_order_op.register_fake
def _(ids, weights, kept, counts_all, capacity, num_experts):
    n = ids.numel()
    return (ids.new_empty(n, dtype=torch.int32), ids.new_empty(num_experts, dtype=torch.int32),
            ids.new_empty(n, dtype=torch.int32))


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
    if not save:
        return x.new_empty(t if order is not None else rows, hidden), x.new_empty(0), x.new_empty(0)
    return (x.new_empty(t if order is not None else rows, hidden), x.new_empty(rows, w_down.shape[1]),
            x.new_empty(rows, w_up.shape[2]))


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
    counts_all = None
    if routing is None:
        logits = router_logits(x2d, params.router_weight, params.router_bias)
        bias = params.expert_bias.contiguous() if cfg.expert_bias and params.expert_bias is not None else None
        ids, w_kernel, s_kernel, counts_all = _route_op(
            logits.detach().contiguous(), bias, k, cfg.score_func, cfg.renormalize, float(cfg.routed_scaling_factor),
            cfg.num_expert_groups, cfg.topk_groups)
        scores, weights = s_kernel, w_kernel
        if _wants_grad(logits):
            scores_pt = scores_from_logits(logits, cfg.score_func)
            scores = _value_with_grad_of(s_kernel, scores_pt)
            weights = _value_with_grad_of(w_kernel, weights_from_scores(scores_pt, ids, cfg))
        capacity = cfg.capacity(t)
        order, counts, slot_of = _order_op(ids, w_kernel, None, counts_all, -1 if capacity is None else capacity, e)
        routing = Routing(ids, weights, (slot_of >= 0).view(t, k), logits, scores)
    else:
        ids = routing.topk_ids.contiguous()
        order, counts, slot_of = _order_op(ids, routing.topk_weights.detach().contiguous(),
                                           routing.kept.contiguous(), None, -1, e)
        if routing.scores is not None:
            counts_all = _count_op(ids, None, e)
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
    lb, z = routing_losses(routing, e, counts_all)
    stats = MoEStats(tokens_per_expert=counts.long(), dropped=t * k - counts.sum(), host_syncs=0)
    return MoEOutput(out=out, routing=routing, aux_loss=cfg.aux_loss_coef * lb + cfg.z_loss_coef * z, lb_loss=lb,
                     z_loss=z, stats=stats, backend="triton")


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
                order, counts, slot_of = order_impl(ids, weights, kept, None, -1, e)
            else:
                ids, weights, _, counts_all = route_impl(logits, bias, k, cfg.score_func, cfg.renormalize,
                                                         cfg.routed_scaling_factor, cfg.num_expert_groups,
                                                         cfg.topk_groups)
                cap = cfg.capacity(t)
                order, counts, slot_of = order_impl(ids, weights, None, counts_all, -1 if cap is None else cap, e)
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

