"""The `fused` backend (DESIGN §4, §6): the whole routed part of a forward in one persistent kernel
(kernels/fused_moe.py, imported only here); the backward on the Triton backend's kernels.

Forward, per rank: [router logits in PyTorch, only when the router needs a gradient] -> fused_moe_kernel:
route, dispatch (one-sided puts + signals on the symmetric heap: one row per (token, rank) and a routing record
per remote assignment), up GEMM + activation, down GEMM, per-source reduce of each token's expert outputs and
its return (one partial-sum row per (token, rank)), rank-order combine (+ the shared expert's output, computed by
PyTorch before the launch). One launch on a GPU (`stats.kernel_launches == 1`); one launch per phase under
TRITON_INTERPRET=1 (the interpreter runs a launch's programs one after another): six with expert parallelism,
five without (no reduce). No host synchronisation: counts, offsets, losses and stats are written by the kernel.

Backward (autograd), reusing what exists:
  world size 1   triton_backend.experts_bwd_impl on what the kernel saved: order/slot_of (the Triton
                 backend's layout) and the pre-activations, so the GEMMs are not recomputed.
  world size W   the forward's expert part is recomputed and differentiated: over shm and nvshmem through the
                 device-initiated per-(token, rank) exchanges (parallel/device_forward.py, no host sync); over
                 the in-process ranks (or with FLASHMOE_EP_DEVICE_EXCHANGE=0) through the host-driven
                 per-(token, expert) `exchange_experts`.
  The router's gradient goes through PyTorch (its logits, scores and weights are re-expressed from the
  logits, as in the Triton backend).

Persistent state (`FusedState`, one per (expert-parallel group or single device, dtype, shape)):
  heap      this rank's segment of the symmetric heap (parallel/layout.py, HeapLayout): W = 1 a plain tensor
            (signal words only), W > 1 the shm heap (CPU) or the NVSHMEM heap (GPU), separate from the heap the
            backward's exchanges use
  sync      [8 + 2 * HALF] int32: epoch, abort flag, two halves of per-launch counters (the kernel zeroes
            the half the next launch uses), so nothing is reset between launches or CUDA-graph replays
  table     [NB_MAX * E + 2E] int32: per-block expert counts -> offsets, counts, first sorted row per expert
  part      [NB_MAX * (E + 1)] fp32/fp64: loss partials
  posmap    [W * max_tokens * k] int64 (W > 1): seq << 32 | record of each received (source, token, slot)
  status    [8] int64 (pinned host memory on GPUs): what a failed wait waited for
  h, y      W > 1: [R, I] and [R, H] in the layer dtype, R = W * max_tokens * k (sized for the worst case: the
            received counts live on the device)
Per forward: out [T, H], ids [T, k] int64, weights [T, k], scores/logits [T, E], order/slot_of [T*k] int32,
stats [E + 2 + W] int64, losses [3] (lb, z, aux); W = 1: h [T*k, I], y [T*k, H] (+ pre [T*k, N_up] when saved for
backward).

Capacity (capacity_factor set): the kernel ranks each expert's assignments on the device after routing
(weight descending, then token: the Triton backend's semantics) and keeps the best cfg.capacity(T) of each (T:
this rank's tokens with expert parallelism, as the unfused path); dropped assignments have slot_of -1.

Limits, all with errors that say so: expert parallelism over the `shm` (CPU, interpreter) or `nvshmem` (GPU)
transport. A wait that times out on a GPU is reported by the next call of the layer (reading the
kernel's status needs no sync then); under the interpreter at once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from . import env, interpreter_threads
from .backends import BackendUnavailable
from .config import MoEConfig
from .parallel.heap import ExchangeTimeout, device_wait_limit
from .parallel.layout import HeapLayout
from .records import MoEOutput, MoEParams, MoEStats, Routing
from .routing import ExpertOrder, router_logits, routing_losses, scores_from_logits, weights_from_scores

ONE_SIDED = ("shm", "nvshmem", "local")  # local: in-process ranks (parallel/local.py)
HANDLES_EXPERT_PARALLEL = True  # moe_forward(..., expert_parallel=ep) moves the rows itself (backends.py)
PROGRAMS_PER_SM = 1
INTERPRETER_PROGRAMS = 2  # per phase launch: program 1 finds the task counters exhausted, as on a GPU
INTERPRETER_CONCURRENT_PROGRAMS = 4  # the PHASE=ALL launch under interpreter_threads.concurrent_programs()


# ----------------------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------------------

def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the fused kernel can run on `device`, else why not."""
    from .triton_backend import device_reason

    return device_reason(device, "the fused kernel's launches", "flashmoe_py.kernels.fused_moe", "fused_moe_kernel",
                         cpu_note=" (for tests; expert parallelism then needs transport='shm')")


def unsupported_reason(cfg: MoEConfig, expert_parallel=None) -> Optional[str]:
    """None when this layer configuration can run fused, else why not (checked before anything runs)."""
    if expert_parallel is not None and expert_parallel.world_size > 1 and expert_parallel.transport not in ONE_SIDED:
        return (f"transport={expert_parallel.transport!r}: the fused kernel puts rows from the device into a "
                f"symmetric heap, so it needs transport='shm' (CPU, under the interpreter) or 'nvshmem' (GPU)")
    return None


def auto_reason(cfg: MoEConfig, expert_parallel=None) -> Optional[str]:
    """Why backend='auto' does not pick `fused` here (None: it does). Auto picks it for expert parallelism over
    a one-sided transport; on one GPU the Triton backend stays the default until the benchmark says otherwise."""
    if expert_parallel is None or expert_parallel.world_size == 1:
        return "on one device auto prefers the Triton backend"
    return unsupported_reason(cfg, expert_parallel)


@functools.lru_cache(maxsize=None)
def _kernels():
    from .kernels import configs, fused_moe  # deferred: importing triton fixes compiled vs interpreted

    return fused_moe, configs


# ----------------------------------------------------------------------------------------------------------
# Persistent state
# ----------------------------------------------------------------------------------------------------------

def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _target(device: torch.device) -> str:
    if device.type != "cuda":
        return "interpreter"
    forced = env.triton_target()
    if forced:
        return forced
    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90" if major >= 9 else "sm_80"


class FusedState:
    """What the fused kernel keeps between forwards for one rank (module docstring). `tokens_cap` bounds the
    tokens per forward (max_tokens_per_rank with expert parallelism)."""

    def __init__(self, cfg: MoEConfig, dtype: torch.dtype, device: torch.device, tokens_cap: int, timeout_s: float,
                 heap=None, layout: HeapLayout | None = None, world: int = 1, rank: int = 0, meta: bool = False,
                 programs: int | None = None):
        _, configs = _kernels()
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.world, self.rank, self.tokens_cap, self.timeout_s = world, rank, tokens_cap, float(timeout_s)
        self.heap, self.failed = heap, None
        self.programs = programs  # persistent grid size (None: one program per SM; the interpreter's default)
        self.captured = False  # used by a CUDA-graph capture: never freed behind its graph's back (_state)
        self.group = None  # the ExpertParallel (W > 1): its first launch waits for every rank (first_launch)
        self.variants: set = set()  # compiled kernel variants launched (and initialised) from this state
        self.stream, self.last_done = None, None  # stream of the last launch, and an event after it (GPU)
        e, k, h = cfg.num_experts, cfg.top_k, cfg.hidden_size
        item = dtype.itemsize
        alloc = torch.device("meta") if meta else self.device

        if heap is None and world == 1:
            # No peers, so no heap: a segment of the same layout for the signal words, with one-row slabs nothing
            # is ever put into (the expert outputs are combined from the y buffer).
            layout = HeapLayout(1, e, 1, h * item, _acc_dtype(dtype).itemsize, 1)
        if heap is None:
            self._segment = torch.zeros(layout.size, dtype=torch.uint8, device=alloc)
            self.rows_delta = torch.zeros(world, dtype=torch.int64, device=alloc)
            self.words_delta = torch.zeros(world, dtype=torch.int64, device=alloc)
            self.heap_addr = 2 ** 40 if meta else self._segment.data_ptr()
        else:
            self._segment = heap.local(0, layout.size)
            own = heap.peer_address(rank)
            addrs = [heap.peer_address(p) for p in range(world)]
            if any(a is None or (a - own) % 128 for a in addrs):
                raise BackendUnavailable("backend='fused': a peer's heap segment is not mapped into this process")
            self.rows_delta = torch.tensor([(a - own) // item for a in addrs], dtype=torch.int64, device=alloc)
            self.words_delta = torch.tensor([(a - own) // 8 for a in addrs], dtype=torch.int64, device=alloc)
            self.heap_addr = own
        self.data = (layout.data_offset(0, 0) // item, layout.data_offset(1, 0) // item)
        self.layout = layout
        self.heap_rows = self._segment.view(dtype)
        self.heap_words = self._segment.view(torch.int64)
        self.heap_recw = self._segment.view(_acc_dtype(dtype))  # routing records: weights, codes
        self.heap_codes = self._segment.view(torch.int32)
        wb = layout.weight_bytes
        self.records = dict(rec0w=layout.record_offset(0, 0) // wb, rec0c=layout.record_offset(0, 1) // 4,
                            rec_stride_w=layout.record_slab_bytes // wb, rec_stride_c=layout.record_slab_bytes // 4)
        self.sig = (layout.signal_offset(0, 0) // 8, layout.signal_offset(1, 0) // 8)
        self.slab_elems = layout.slab_bytes // item

        # assignment rows this rank may receive (h and y rows), row tiles of them (tile counters), token blocks
        self.max_rows = tokens_cap * k if world == 1 else world * layout.slab_records
        self.max_tiles = _cdiv(self.max_rows, configs.FUSED_MIN_BLOCK_M) + e
        self.max_blocks = max(1, _cdiv(tokens_cap, configs.FUSED_MIN_BT))
        fused, _ = _kernels()
        self.half = fused.half_words(world, e, self.max_tiles)
        self.sync = torch.zeros(fused.SYNC_HEADER + 2 * self.half, dtype=torch.int32, device=alloc)
        # table | counts | gstart | (capacity) counts before capacity | their offsets (the dropless order's)
        tab = torch.empty(self.max_blocks * e + 4 * e, dtype=torch.int32, device=alloc)
        self.table = tab[:self.max_blocks * e]
        self.counts = tab[self.max_blocks * e:self.max_blocks * e + e]
        self.gstart = tab[self.max_blocks * e + e:self.max_blocks * e + 2 * e]
        self.counts_all = tab[self.max_blocks * e + 2 * e:self.max_blocks * e + 3 * e]
        self.part = torch.empty(self.max_blocks * (e + 1), dtype=_acc_dtype(dtype), device=alloc)
        pinned = self.device.type == "cuda" and not meta
        self.status = torch.zeros(8, dtype=torch.int64, pin_memory=pinned)
        self.status_addr = 2 ** 40 if meta else self.status.data_ptr()
        self.true = torch.ones((), dtype=torch.bool, device=alloc)  # expanded into Routing.kept: no launch
        self._h = None  # W > 1: the h buffer [max_rows, I], kept (h is not saved for backward there)
        self._y = None  # the expert outputs [max_rows, H] (W = 1: [T * k, H] per call)
        # (seq << 32 | record) per received (source, token, slot); entries of an earlier launch carry an older seq
        self.posmap = torch.zeros(world * layout.slab_rows * k if world > 1 else 1, dtype=torch.int64, device=alloc)

    def poison_results(self) -> None:
        """FLASHMOE_DEBUG_POISON: NaN into this rank's RETURN slabs before a launch, so a result row the combine
        reads before anyone wrote it shows up. (Peers write them only after this rank's dispatch, so this
        never races with a peer; the DISPATCH slabs are left alone: a faster peer may be filling them.)"""
        start = self.data[1]
        self.heap_rows[start:start + self.world * self.slab_elems].fill_(float("nan"))

    def _rows_buffer(self, attr: str, rows: int, width: int) -> torch.Tensor:
        """[rows, width] in the layer dtype: new per call at W = 1 (rows = this call's T * k), else the state's own
        [max_rows, width] (the received rows are counted on the device), kept between calls (`attr` names it)."""
        if self.world == 1:
            return torch.empty(rows, width, dtype=self.dtype, device=self.device)
        if getattr(self, attr) is None:
            setattr(self, attr, torch.empty(self.max_rows, width, dtype=self.dtype, device=self.device))
        return getattr(self, attr)

    def h_buffer(self, rows: int) -> torch.Tensor:
        return self._rows_buffer("_h", rows, self.cfg.ffn_hidden_size)

    def y_buffer(self, rows: int) -> torch.Tensor:
        return self._rows_buffer("_y", rows, self.cfg.hidden_size)

    def check(self) -> None:
        """Raise the error of an earlier launch that gave up waiting (GPU: seen from the next call, no sync)."""
        if self.failed is not None:
            raise RuntimeError(f"rank {self.rank}: an earlier fused forward failed ({self.failed}); the heap's "
                               "sequence numbers no longer agree across ranks: recreate the layer on every rank")
        code = int(self.status[0])
        if code:
            self.failed = self._describe(code, self.status.tolist())
            if code in (1, 2):
                raise ExchangeTimeout(self.failed)
            raise RuntimeError(self.failed)

    def _describe(self, code: int, st: list) -> str:
        _, rank, peer, region, slot, expected, seen = st[:7]
        el = self.cfg.num_experts // self.world
        if code in (1, 2):
            what = (f"dispatch slot (src={peer}, expert {slot} = global expert {rank * el + slot})" if region == 0
                    else f"return slot (src={peer}: its partial sums of this rank's tokens)")
            return (f"rank {rank}: timed out after {self.timeout_s:g} s waiting for peer {peer}: {what} "
                    f"expected sequence {expected}, saw {seen >> 32}. The peer is dead, slow, or skipped a forward "
                    "(every rank must run each forward of the layer)")
        if code == 3:
            return (f"rank {rank}: peer {peer} signalled {seen} routing records in the dispatch region, more than "
                    f"the {expected} its record slab holds")
        what = {0: "the routing barrier", 2: "the tile counters (more row tiles than sized for)",
                3: "the up-projection tiles of a row tile", 4: "the capacity order tasks",
                5: "the capacity stage tasks"}.get(region, "a local counter")
        return f"rank {rank}: the fused kernel timed out waiting for {what} on its own rank (slot {slot}): a bug"


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of `device` is capturing a CUDA graph (tests patch this on CPU)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _stream_key(device: torch.device):
    """The stream forwards on `device` are launched on now (None on CPU; tests patch this)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


_WARM_UP = "run one eager forward of this layer (same shapes and mode) before capturing"


def _state(cfg: MoEConfig, dtype: torch.dtype, device: torch.device, ep, num_tokens: int) -> FusedState:
    """The state for this call.

    Expert parallel: one per ExpertParallel and dtype (collective allocation on first use, which cannot happen
    during CUDA-graph capture).
    One device: one per (device, dtype, shape, stream), shared by the single-device layers of that shape on that
    stream (one stream's kernels run one after another, so they may share counters; two streams' may not), grown
    (re-created) when T outgrows it. A capture uses the capture stream's state, else the newest state of that
    shape (the one the warm-up forward made, on the stream the capture forked from), and marks it captured: a
    captured state is never freed while the process lives (its graph may replay), not by growth and not by
    release_states() unless asked."""
    device = torch.device(device)
    capturing = _capturing(device)
    if ep is not None:
        key = ("fused", dtype, device)
        states = ep.backend_state
        if key not in states:
            if capturing:
                raise RuntimeError("backend='fused' with expert parallelism: the first forward allocates the "
                                   "symmetric heap (collective) and initialises the kernel; that cannot happen "
                                   f"during CUDA-graph capture: {_WARM_UP}")
            layout = ep.layout_for(dtype)
            if ep.world_size == 1 and ep.transport not in ONE_SIDED:
                states[key] = FusedState(cfg, dtype, device, ep.max_tokens_per_rank, ep.timeout_s)
                return states[key]
            if ep.transport == "local":
                heap = ep.heap_view(dtype)
            elif ep.transport == "shm":
                from .parallel.shm import ShmHeap
                heap = ShmHeap(layout, ep.group)
            else:
                from .parallel.nvshmem import NvshmemHeap
                heap = NvshmemHeap(layout, ep.group, device)
            states[key] = FusedState(cfg, dtype, device, ep.max_tokens_per_rank, ep.timeout_s, heap, layout,
                                     ep.world_size, ep.rank, programs=getattr(ep, "fused_sms", None))
            states[key].group = ep
        state = states[key]
        state.captured |= capturing
        return state
    shape = (device, dtype, cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.ffn_hidden_size)
    key = shape + (_stream_key(device),)
    state = _LOCAL_STATES.get(key)
    if capturing and state is None:
        same_shape = [s for k, s in _LOCAL_STATES.items() if k[:len(shape)] == shape]
        state = same_shape[-1] if same_shape else None
    if state is None or state.tokens_cap < num_tokens:
        if capturing:
            raise RuntimeError(f"backend='fused': a forward of {num_tokens} tokens needs a larger persistent state "
                               f"than exists, and it cannot be allocated during CUDA-graph capture: {_WARM_UP}, "
                               "with the largest token count the graph will see")
        if state is not None and state.captured:
            _CAPTURED.append(state)  # its graph may still replay: the new state must not reuse its memory
        cap = max(num_tokens, 2 * state.tokens_cap if state is not None else 1)
        state = FusedState(cfg, dtype, device, cap, env.ep_timeout_s())
        _LOCAL_STATES[key] = state
    state.captured |= capturing
    return state


_LOCAL_STATES: dict = {}
_CAPTURED: list = []  # captured states replaced by a larger one: kept for their graphs' replays


def release_states(include_captured: bool = False) -> int:
    """Free the persistent state of single-device fused layers (heap, counters: about T*k*H elements for the
    largest T seen, per device, dtype, shape and stream); the next forward allocates it again. A state a CUDA
    graph captured stays (a replay would write freed memory) unless `include_captured`, which the caller may
    pass once no such graph will replay. Returns how many states were released. Expert-parallel states belong
    to their ExpertParallel and are freed by its close()."""
    released = 0
    for key, state in list(_LOCAL_STATES.items()):
        if include_captured or not state.captured:
            del _LOCAL_STATES[key]
            released += 1
    if include_captured:
        released += len(_CAPTURED)
        _CAPTURED.clear()
    return released


# ----------------------------------------------------------------------------------------------------------
# One launch (or its record, for the compile gate)
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Call:
    """The tensors and switches of one forward's kernel launch."""

    cfg: MoEConfig  # the calling layer's (the state's own is only its shape's)
    x: torch.Tensor
    route_in: Optional[torch.Tensor]  # logits [T, E] ("logits"), weights [T, k] ("given"), None ("compute")
    ids: Optional[torch.Tensor]  # given routing: [T, k] int64
    addend: Optional[torch.Tensor]
    params: MoEParams
    routing_mode: str  # "compute" | "logits" | "given"
    save: bool


def _dot_flags(dtype: torch.dtype, target: str) -> dict:
    """As the Triton backend: UPCAST bf16 dot operands only under the interpreter (Triton issue 11584); fp32
    operands use tf32 exactly when PyTorch's fp32 matmuls may."""
    interpreting = target == "interpreter"
    tf32 = target != "interpreter" and (_PLANNING or torch.backends.cuda.matmul.allow_tf32)
    precision = "tf32" if dtype == torch.float32 and tf32 else "ieee"
    return {"UPCAST": interpreting and dtype == torch.bfloat16, "PRECISION": precision}


_PLANNING = False


def _puts(state: FusedState) -> str:
    wanted = env.fused_puts()
    if state.world == 1 or wanted == "auto":
        return "ptr"
    if wanted == "nvshmem" and state.device.type != "cuda":
        raise BackendUnavailable("FLASHMOE_FUSED_PUTS=nvshmem needs CUDA tensors (device NVSHMEM calls); the "
                                 "interpreter runs the 'ptr' puts")
    return wanted


def _prepare(state: FusedState, call: _Call, target: str, nprog: int, puts: str):
    """(args, constexprs, num_warps, num_stages, outputs) of the launch for `call`."""
    fused, configs = _kernels()
    # The call's config, not the state's: a state is shared by every layer of its shape, whatever their
    # activation, routing options and loss coefficients.
    cfg, x, p = call.cfg, call.x, call.params
    t, hidden = x.shape
    k, e, inner, w = cfg.top_k, cfg.num_experts, cfg.ffn_hidden_size, state.world
    el = e // w
    dev, acc = x.device, _acc_dtype(x.dtype)
    from .triton_backend import kernel_activation

    act, gated = kernel_activation(cfg.activation_key)
    regime = configs.regime(t * k, e)
    bm, bn0, bk0, bn1, bk1, warps, stages = configs.fused_config(target, regime, x.dtype.itemsize, puts,
                                                                 gated=gated, param_act=":" in act, save=call.save)
    aux = configs.FUSED_AUX[target]
    e_pad = max(16, _pow2(e))
    bt = configs.fused_block_t(target, e_pad)
    nb, nc = max(1, _cdiv(t, bt)), max(1, _cdiv(t, aux["BTC"]))
    rows = t * k if w == 1 else state.max_rows
    if nb > state.max_blocks or t > state.tokens_cap:
        raise ValueError(f"x: {t} tokens exceed the fused state's {state.tokens_cap}")

    poison = env.debug_poison() and not _PLANNING

    def out(shape, dtype):
        t = torch.empty(shape, dtype=dtype, device=dev)
        if poison and t.numel():  # tests: an element the kernel forgets to write shows up
            t.fill_(float("nan") if dtype.is_floating_point else -2**30)
        return t

    given = call.routing_mode == "given"
    ids = call.ids if given else out((t, k), torch.int64)
    wts = call.route_in if given else out((t, k), acc)
    scores = out((t, e), acc) if not given else None
    logits = call.route_in if call.routing_mode == "logits" else (out((t, e), acc) if not given else None)
    order, slot_of = out((t * k,), torch.int32), out((t * k,), torch.int32)
    cap = cfg.capacity(t)  # None: dropless; else rows each expert keeps (of this rank's tokens)
    dl_order = out((t * k,), torch.int32) if cap is not None else order  # the order tasks' dropless order
    h, y = state.h_buffer(rows), state.y_buffer(rows)
    if poison:
        h.fill_(float("nan"))
        y.fill_(float("nan"))
        state.poison_results()
    pre = out((rows, cfg.up_size), x.dtype) if call.save else None
    stats, losses = out((e + 2 + w,), torch.int64), out((3,), acc)
    res = dict(out=out((t, hidden), x.dtype), ids=ids, weights=wts, scores=scores, logits=logits, order=order,
               slot_of=slot_of, h=h, pre=pre, stats=stats, losses=losses, claims=out((nprog,), torch.int32))
    scale = float(cfg.routed_scaling_factor)
    scale_hi = float(torch.tensor(scale, dtype=torch.float32))
    timer = target != "interpreter"
    limit = device_wait_limit(state.timeout_s, timer)
    router = p.router_weight
    native = (not given and router is not None and router.dtype == x.dtype
              and x.dtype in (torch.bfloat16, torch.float16) and target != "interpreter")
    args = dict(
        out_ptr=res["out"], ids_ptr=ids, wts_ptr=wts, scores_ptr=scores, logits_ptr=logits, order_ptr=order,
        slot_ptr=slot_of, h_ptr=h, pre_ptr=pre, stats_ptr=stats, loss_ptr=losses, claims_ptr=res["claims"],
        y_ptr=y, posmap_ptr=state.posmap,
        x_ptr=x, router_ptr=router if call.routing_mode == "compute" else None,
        ebias_ptr=p.expert_bias if (cfg.expert_bias and not given) else None, addend_ptr=call.addend,
        w_up_ptr=p.w_up, b_up_ptr=p.b_up, w_down_ptr=p.w_down, b_down_ptr=p.b_down,
        sync_ptr=state.sync, table_ptr=state.table, part_ptr=state.part, heap_rows=state.heap_rows,
        heap_words=state.heap_words, heap_recw=state.heap_recw, heap_codes=state.heap_codes,
        rows_delta_ptr=state.rows_delta, words_delta_ptr=state.words_delta,
        counts_ptr=state.counts, gstart_ptr=state.gstart, heap_addr=state.heap_addr, status_addr=state.status_addr,
        T=t, H=hidden, INNER=inner, me=state.rank, NB=nb, NC=nc, nprog=nprog, HALF=state.half,
        G_MAX=state.max_tiles, slab_rows=state.layout.slab_rows, slab_records=state.layout.slab_records,
        slab_elems=state.slab_elems, data0=state.data[0], data1=state.data[1], sig0=state.sig[0], sig1=state.sig[1],
        **state.records, limit=limit, scale_hi=scale_hi,
        scale_lo=scale - scale_hi, lb_coef=float(cfg.aux_loss_coef), z_coef=float(cfg.z_loss_coef),
        dl_order_ptr=dl_order, cap=0 if cap is None else cap, NS=max(1, _cdiv(t * k, aux["BRS"])),
        NR=_cdiv(state.layout.slab_rows, aux["BTC"]))
    constexprs = dict(
        ROUTING=call.routing_mode, PUTS=puts, USE_TIMER=timer,
        WAIT_LANES=max(32 * warps, e_pad), E=e, EL=el, W=w, TOPK=k, ACT=act,
        GATED=gated,
        HAS_BIAS=p.b_up is not None, HAS_ADDEND=call.addend is not None, SAVE_PRE=call.save, NATIVE_DOT=native,
        GROUPS=cfg.num_expert_groups, TOPK_GROUPS=cfg.topk_groups, SIGMOID=cfg.score_func == "sigmoid",
        HAS_EBIAS=cfg.expert_bias and not given, RENORM=cfg.renormalize, ITEM=x.dtype.itemsize,
        ROW_BYTES=hidden * x.dtype.itemsize, REC_W=acc.itemsize, E_PAD=e_pad, EL_PAD=max(2, _pow2(el)),
        W_PAD=max(2, _pow2(w)),
        K_PAD=max(2, _pow2(k)), G_PAD=max(2, _pow2(cfg.num_expert_groups)), BT=bt, BTC=aux["BTC"], BR=aux["BR"],
        BH=aux["BH"], CB=aux["CB"], TN0=aux["TN0"], TN1=aux["TN1"], BM=bm, BN0=bn0, BK0=bk0, BN1=bn1, BK1=bk1,
        EVEN_K0=hidden % bk0 == 0,
        EVEN_K1=inner % bk1 == 0, **_dot_flags(x.dtype, target), CAPACITY=cap is not None, BRS=aux["BRS"],
        BCS=aux["BCS"])
    tags = {"regime": regime, "config": f"{bm}x{bn0}x{bk0}/{bn1}x{bk1} w{warps} s{stages}", "puts": puts}
    return args, constexprs, warps, stages, tags, res


_MODULES_READY: set = set()


def _launch(state: FusedState, call: _Call) -> tuple[dict, int, int]:
    """Run the kernel for `call`: one launch (GPU, or the interpreter with concurrent programs) or one per phase
    (plain interpreter). Returns (outputs, launches, host synchronisations)."""
    fused, _ = _kernels()
    target = _target(state.device)
    concurrent = target == "interpreter" and interpreter_threads.active()
    wanted = state.programs or env.fused_sms()
    alone = target == "interpreter" and not concurrent and wanted == 1  # one program, PHASE=ALL: finishes alone
    if target == "interpreter":
        nprog = 1 if alone else (wanted or INTERPRETER_CONCURRENT_PROGRAMS) if concurrent else INTERPRETER_PROGRAMS
    else:
        sms = torch.cuda.get_device_properties(state.device).multi_processor_count
        nprog = min(wanted or sms, sms) * PROGRAMS_PER_SM
    puts = _puts(state)
    args, constexprs, warps, stages, _, res = _prepare(state, call, target, nprog, puts)
    options = dict(num_warps=warps, num_stages=stages)
    if puts == "nvshmem":
        options["extern_libs"] = _nvshmem_libs(target)
    kernel = fused.fused_moe_kernel
    syncs = _first_launch(state, kernel, target, nprog, puts, args, constexprs, options)
    if target == "interpreter":
        phases = ("all",) if concurrent or alone else \
            tuple(p for p in fused.PHASE_ORDER if state.world > 1 or p != "reduce")  # W = 1: nothing to reduce
        for phase in phases:  # concurrent: the programs run at once, as on a GPU, so the one launch a GPU makes
            kernel[(nprog,)](**args, PHASE=fused.PHASES[phase], **constexprs, **options)
        return res, len(phases), syncs
    capturing = _capturing(state.device)
    with torch.cuda.device(state.device):
        stream = torch.cuda.current_stream(state.device)
        if state.last_done is not None and state.stream != stream.cuda_stream and not capturing:
            stream.wait_event(state.last_done)  # the state's counters are in use until that launch finishes
        kernel[(nprog,)](**args, PHASE=fused.PHASES["all"], **constexprs, **options)
        if not capturing:
            state.last_done = state.last_done or torch.cuda.Event()
            state.last_done.record(stream)
            state.stream = stream.cuda_stream
    return res, 1, syncs


def _first_launch(state: FusedState, kernel, target, nprog, puts, args, constexprs, options) -> int:
    """Once per compiled variant of the kernel per state: compile it and initialise its module (NVSHMEM) before
    the launch, and on the state's first launch with peers wait for every rank (a barrier: one host sync, which
    is returned). Ranks compile at different speeds (the NVSHMEM bitcode makes it slow), and a rank more than
    timeout_s behind would make its peers' first launch time out."""
    variant = (puts, nprog, tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
    if variant in state.variants:
        return 0
    if _capturing(state.device):
        raise RuntimeError("backend='fused': this forward needs a kernel variant that was not compiled and "
                           f"initialised yet, which cannot happen during CUDA-graph capture: {_WARM_UP}")
    _compile_variant(state, target, kernel, nprog, puts, args, constexprs, options)
    syncs = 0
    if state.group is not None and not state.variants:
        syncs = int(state.group.barrier())
    state.variants.add(variant)
    return syncs


def _compile_variant(state: FusedState, target: str, kernel, nprog, puts, args, constexprs, options) -> None:
    """GPU: compile the launch's kernel variant without launching it, and initialise its module for NVSHMEM.
    The interpreter compiles nothing."""
    if target == "interpreter":
        return
    with torch.cuda.device(state.device):
        if puts == "nvshmem":
            _init_nvshmem_module(kernel, nprog, args, constexprs, options)
        else:
            kernel.warmup(**args, PHASE=0, **constexprs, **options, grid=(nprog,))


def _nvshmem_libs(target: str) -> tuple:
    from .kernels import nvshmem as nv

    return nv.extern_libs(90 if target == "sm_90" else 80)


def _init_nvshmem_module(kernel, nprog, args, constexprs, options) -> None:
    """NVSHMEM device code needs its CUDA module initialised (nvshmem4py cumodule_init) before the first launch:
    compile without launching, initialise, then launch from the same cache entry."""
    try:
        compiled = kernel.warmup(**args, PHASE=0, **constexprs, **options, grid=(nprog,))
    except ValueError as e:
        if "parse library" not in str(e):
            raise
        import triton

        raise BackendUnavailable(
            f"FLASHMOE_FUSED_PUTS=nvshmem: Triton {triton.__version__} cannot read the NVSHMEM device bitcode "
            f"({e}); it was built by a newer LLVM than Triton's. Install nvidia-nvshmem-cu13<3.8 (clang 21 "
            "bitcode) or a newer Triton, or leave FLASHMOE_FUSED_PUTS unset for the peer-pointer puts") from e
    compiled._init_handles()
    handle = int(compiled.module)
    if handle not in _MODULES_READY:
        import nvshmem.bindings

        status = nvshmem.bindings.cumodule_init(handle)
        if status not in (None, 0):
            raise RuntimeError(f"nvshmem cumodule_init failed with status {status}")
        _MODULES_READY.add(handle)


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------

class _Run:
    """One forward: launches the kernel and holds what backward needs (no math of its own)."""

    def __init__(self, state: FusedState, cfg: MoEConfig, call: _Call, ep):
        self.state, self.cfg, self.call, self.ep = state, cfg, call, ep
        self.res: dict = {}
        self.launches = self.host_syncs = 0

    def forward(self, save: bool) -> torch.Tensor:
        self.call.save = save and self.state.world == 1
        self.state.check()
        self.res, self.launches, self.host_syncs = _launch(self.state, self.call)
        if self.state.device.type != "cuda":
            self.state.check()  # free on CPU: the launch has finished
        return self.res["out"]


class _FusedFunction(torch.autograd.Function):
    """out = the routed experts' combined output (+ addend); differentiable w.r.t. x, route_in (router logits or
    caller weights), addend and the expert parameters."""

    @staticmethod
    def forward(ctx, x, route_in, addend, w_up, w_down, b_up, b_down, run):
        out = run.forward(save=True)
        r = run.res
        ctx.run = run
        ctx.addend_dtype = None if addend is None else addend.dtype
        # h is not kept: the backward recomputes it from pre (experts_bwd_impl's act-grad kernel), so the forward's
        # h [R, I] is freed as soon as the kernel has consumed it
        ctx.save_for_backward(x, route_in, w_up, w_down, b_up, b_down, r["weights"], r["ids"], r["order"],
                              r["slot_of"], r["stats"], r["pre"])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, route_in, w_up, w_down, b_up, b_down, weights, ids, order, slot_of, stats, pre = ctx.saved_tensors
        run = ctx.run
        cfg, need = run.cfg, ctx.needs_input_grad
        e, k = cfg.num_experts, cfg.top_k
        counts = stats[:e]
        need_dparams = any(need[3:7])
        if run.state.world == 1:
            from .triton_backend import experts_bwd_impl

            dx, dweights, dw_up, dw_down, db_up, db_down = experts_bwd_impl(
                grad_out, x, weights, order, counts.to(torch.int32), slot_of, w_up, w_down, b_up, b_down,
                x.new_empty(0), pre,
                cfg.activation_key, k, cfg.deterministic, need[0], need[1], need_dparams)
        else:
            dx, dweights, dw_up, dw_down, db_up, db_down = _ep_backward(run, grad_out, x, weights, ids, order,
                                                                        slot_of, counts, w_up, w_down, b_up, b_down,
                                                                        need)
        d_route = None
        if need[1]:
            if run.call.routing_mode == "given":
                d_route = dweights
            else:  # route_in = logits: weights_from_scores(scores(logits)) re-expressed, as the Triton backend does
                with torch.enable_grad():
                    logits = route_in.detach().requires_grad_()
                    expr = weights_from_scores(scores_from_logits(logits, cfg.score_func), ids, cfg)
                    d_route = torch.autograd.grad(expr, logits, dweights.to(expr.dtype))[0] \
                        if expr.requires_grad else torch.zeros_like(logits)
        return (dx if need[0] else None, d_route, grad_out.to(ctx.addend_dtype) if need[2] else None,
                dw_up if need[3] else None, dw_down if need[4] else None,
                db_up if need[5] and b_up is not None else None, db_down if need[6] and b_down is not None else None,
                None)


def _ep_backward(run: _Run, grad_out, x, weights, ids, order, slot_of, counts, w_up, w_down, b_up, b_down, need):
    """Recompute the routed part through the transport's exchanges and the Triton backend's experts, then
    differentiate it (every rank must run backward: the exchanges are collective). Over shm and nvshmem the
    exchanges are device-initiated, one row per (token, rank) (parallel/device_forward.py: no host
    synchronisation); elsewhere the host-driven per-(token, expert) rows of `exchange_experts`."""
    from . import triton_backend

    cfg, ep = run.cfg, run.ep
    k = cfg.top_k
    dex = ep.device_exchange_for(x.dtype, x.device, "triton")
    with torch.enable_grad():
        x_l = x.detach().requires_grad_(need[0])
        w_l = weights.detach().requires_grad_(need[1])
        leaves = [None if p is None else p.detach().requires_grad_(n) for p, n in zip((w_up, w_down, b_up, b_down),
                                                                                   need[3:7])]
        if dex is not None:
            from .parallel.device_forward import device_token_rank_routed

            routing = Routing(ids, w_l, slot_of.view(ids.shape) >= 0)
            params = MoEParams(router_weight=None, w_up=leaves[0], w_down=leaves[1], b_up=leaves[2],
                               b_down=leaves[3])
            routed, _, _ = device_token_rank_routed(x_l, routing, params, cfg.activation_key, ep, dex,
                                                    triton_backend.token_rows_moe)
        else:
            routed = _ep_routed_host(x_l, w_l, leaves, order, slot_of, counts, k, cfg, ep)
        inputs = [t for t in (x_l, w_l, *leaves) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(routed, inputs, grad_out.to(routed.dtype), allow_unused=True)
    found = iter(grads)

    def take(t):
        if t is None or not t.requires_grad:
            return None
        g = next(found)
        return torch.zeros_like(t) if g is None else g

    dx, dweights = take(x_l), take(w_l)
    dw_up, dw_down, db_up, db_down = (take(t) for t in leaves)
    return dx, dweights, dw_up, dw_down, db_up, db_down


def _ep_routed_host(x_l, w_l, leaves, order, slot_of, counts, k, cfg, ep):
    """The routed part of the fused forward recomputed over the host-driven exchanges (differentiable)."""
    from . import triton_backend
    from .parallel.forward import combine, exchange_experts

    send_counts = counts.view(ep.world_size, ep.num_local_experts).cpu()  # the unfused path's host sync
    order64 = order[:int(send_counts.sum())].long()  # past the kept rows (capacity) order is unwritten
    send_rows = x_l.index_select(0, order64 // k)
    exchange = ep.exchange_for(x_l.dtype, x_l.device)
    y_rows, _ = exchange_experts(send_rows, send_counts, exchange, triton_backend.expert_ffn, cfg.activation_key,
                                 *leaves)
    return combine(y_rows, ExpertOrder(order64, counts, slot_of.long()), w_l, cfg.deterministic)


# ----------------------------------------------------------------------------------------------------------
# The backend entry point
# ----------------------------------------------------------------------------------------------------------

def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _contig(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _value_with_grad_of(value: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
    return value + (expr - expr.detach())


def moe_forward(x2d: torch.Tensor, params: MoEParams, cfg: MoEConfig, routing: Optional[Routing] = None,
                expert_parallel=None) -> MoEOutput:
    """x2d [T, H] (validated, flattened) -> MoEOutput with out [T, H] in x.dtype. With `expert_parallel`
    (collective), x2d holds this rank's tokens and params this rank's experts. No host synchronisation."""
    ep = expert_parallel
    reason = unsupported_reason(cfg, ep)
    if reason is not None:
        raise BackendUnavailable(f"backend='fused' cannot run this layer: {reason}")
    t, k, e = x2d.shape[0], cfg.top_k, cfg.num_experts
    if ep is not None:
        ep.check_tokens(t)
    x2d = x2d.contiguous()
    state = _state(cfg, x2d.dtype, x2d.device, ep, t)
    p = MoEParams(router_weight=_contig(params.router_weight), w_up=_contig(params.w_up),
                  w_down=_contig(params.w_down), expert_bias=_contig(params.expert_bias), b_up=_contig(params.b_up),
                  b_down=_contig(params.b_down))
    expert_tensors = (p.w_up, p.w_down, p.b_up, p.b_down)

    logits_pt = None
    if routing is not None:
        mode, route_in, ids = "given", routing.topk_weights.contiguous(), routing.topk_ids.contiguous()
    elif params.router_bias is not None or _wants_grad(x2d, params.router_weight):
        # The router's gradient goes through PyTorch; a router bias (gpt-oss) too: the kernel's router GEMM has none.
        logits_pt = router_logits(x2d, params.router_weight, params.router_bias)
        mode, route_in, ids = "logits", logits_pt.contiguous(), None
    else:
        mode, route_in, ids = "compute", None, None
    addend = None
    if cfg.num_shared_experts > 0:
        from .reference import shared_expert  # plain PyTorch matmuls (DESIGN §4 allows it)

        addend = shared_expert(x2d, params, cfg)
    call = _Call(cfg, x2d, route_in if mode != "logits" else logits_pt.detach().contiguous(), ids, addend, p, mode,
                 False)
    run = _Run(state, cfg, call, ep)
    if _wants_grad(x2d, route_in, addend, *expert_tensors):
        out = _FusedFunction.apply(x2d, route_in, addend, *expert_tensors, run)
    else:
        out = run.forward(save=False)
    res = run.res

    stats_t = res["stats"]
    w = state.world
    distributed = ep is not None
    stats = MoEStats(tokens_per_expert=stats_t[:e], dropped=stats_t[e],
                     bytes_sent=stats_t[e + 1] if distributed else 0,
                     rows_per_peer=stats_t[e + 2:e + 2 + w] if distributed else None, kernel_launches=run.launches,
                     host_syncs=run.host_syncs, tasks_per_program=res["claims"] if run.launches == 1 else None)
    if mode == "given":
        lb, z, aux = res["losses"][0], res["losses"][1], res["losses"][2]
        routing_out = routing
    else:
        scores, weights = res["scores"], res["weights"]
        logits = res["logits"]
        if logits_pt is not None:
            scores_pt = scores_from_logits(logits_pt, cfg.score_func)
            scores = _value_with_grad_of(scores, scores_pt)
            weights = _value_with_grad_of(weights, weights_from_scores(scores_pt, res["ids"], cfg))
            logits = logits_pt
        kept = state.true.expand(t, k) if cfg.capacity(t) is None else res["slot_of"].view(t, k) >= 0
        routing_out = Routing(res["ids"], weights, kept, logits, scores)
        if logits_pt is not None:  # losses with their gradient, through PyTorch (counts before capacity)
            counts_all = stats_t[:e] if cfg.capacity(t) is None else state.counts_all
            lb, z = routing_losses(routing_out, e, counts_all)
            aux = cfg.aux_loss_coef * lb + cfg.z_loss_coef * z
        else:
            lb, z, aux = res["losses"][0], res["losses"][1], res["losses"][2]
    return MoEOutput(out=out, routing=routing_out, aux_loss=aux, lb_loss=lb, z_loss=z, stats=stats, backend="fused")


# ----------------------------------------------------------------------------------------------------------
# For the compile gate: the launch a forward would make, on meta tensors
# ----------------------------------------------------------------------------------------------------------

def plan_launches(cfg: MoEConfig, dtype: torch.dtype, num_tokens: int, target: str, world: int = 1,
                  puts: str = "ptr", routing_mode: str = "compute", save: bool = False) -> list:
    """The fused kernel launch of a forward of `cfg` on `num_tokens` tokens per rank of `dtype` on `target`
    (a Launch record of triton_backend), built on meta tensors without running anything."""
    global _PLANNING
    from .triton_backend import Launch

    fused, configs = _kernels()
    meta = torch.device("meta")
    e, k, hidden = cfg.num_experts, cfg.top_k, cfg.hidden_size
    el = e // world
    layout = HeapLayout.for_layer(world, el, k, num_tokens, hidden, dtype.itemsize) if world > 1 else None
    state = FusedState(cfg, dtype, meta, num_tokens, 60.0, None, layout, world, 0, meta=True)
    acc = _acc_dtype(dtype)
    x = torch.empty(num_tokens, hidden, dtype=dtype, device=meta)
    p = MoEParams(router_weight=torch.empty(e, hidden, dtype=dtype, device=meta),
                  w_up=torch.empty(el, hidden, cfg.up_size, dtype=dtype, device=meta),
                  w_down=torch.empty(el, cfg.ffn_hidden_size, hidden, dtype=dtype, device=meta),
                  expert_bias=torch.empty(e, dtype=torch.float32, device=meta) if cfg.expert_bias else None,
                  b_up=torch.empty(el, cfg.up_size, dtype=dtype, device=meta) if cfg.bias else None,
                  b_down=torch.empty(el, hidden, dtype=dtype, device=meta) if cfg.bias else None)
    route_in = {"compute": None, "logits": torch.empty(num_tokens, e, dtype=acc, device=meta),
                "given": torch.empty(num_tokens, k, dtype=acc, device=meta)}[routing_mode]
    ids = torch.empty(num_tokens, k, dtype=torch.int64, device=meta) if routing_mode == "given" else None
    addend = torch.empty(num_tokens, hidden, dtype=acc, device=meta) if cfg.num_shared_experts else None
    call = _Call(cfg, x, route_in, ids, addend, p, routing_mode, save and world == 1)
    saved, _PLANNING = _PLANNING, True
    try:
        args, constexprs, warps, stages, tags, _ = _prepare(state, call, target, 132, puts)
    finally:
        _PLANNING = saved
    constexprs = dict(constexprs, PHASE=fused.PHASES["all"])
    if puts == "nvshmem":
        tags["extern_libs"] = _nvshmem_libs(target)
    name = f"fused[{puts}]"
    return [Launch(name, fused.fused_moe_kernel, (132,), args, constexprs, warps, stages, tags)]


__all__ = ["FusedState", "auto_reason", "moe_forward", "plan_launches", "release_states", "unavailable_reason",
           "unsupported_reason"]
