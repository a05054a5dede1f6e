"""Waits on signal words and counters, and the abort-and-report path, shared by the device programs that wait on
peers: the persistent fused kernel (fused_moe.py) and the device-initiated exchanges (exchange.py).

A program's `sync` words (int32) hold the abort flag at word _ABORT (1); word 0 is the caller's. Waits are bounded
spins (GPU: %globaltimer nanoseconds; the interpreter: iterations). A wait that gives up sets the abort word (first
one wins) and writes what it waited for to `status` (code, rank, peer, region, slot, expected seq, word seen);
every later wait then returns at once. The host turns the status into an error naming rank, peer and slot.
"""

import triton
import triton.language as tl

_ABORT = tl.constexpr(1)


@triton.jit
def _now(USE_TIMER: tl.constexpr):
    """GPU: the global nanosecond timer, as this thread reads it (threads differ: decide on it only through
    _spent). Interpreter (no inline asm): 0, and waits count iterations."""
    if USE_TIMER:
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                      pack=1)
    else:
        t = tl.full([], 0, tl.int64)
    return t


@triton.jit
def _aborted(sync_ptr):
    """The abort word (0: no failure), read by a scalar atomic: one thread reads, every thread gets its value (a
    volatile load would be one read per thread, and threads could disagree)."""
    return tl.atomic_add(sync_ptr + _ABORT, 0, sem="relaxed", scope="sys")


@triton.jit
def _pause(ns, USE_TIMER: tl.constexpr):
    """GPU: sleep about `ns` nanoseconds between polls, so spinning programs leave the memory system to the
    producers they wait for. Interpreter: nothing."""
    if USE_TIMER:
        tl.inline_asm_elementwise("nanosleep.u32 $1;\n\tmov.u32 $0, 0;", "=r,r", [ns], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _spent(clock, start, spent, USE_TIMER: tl.constexpr):
    """GPU: microseconds (ns >> 10) since this thread's `start`, the same in every thread: each thread's own reading
    is offered to the program's clock word by a scalar atomic max, which one thread does and whose result (the
    largest reading published so far, one poll old) every thread receives. A reading per thread, or a reduction
    of them, would cost registers the GEMM tiles need. Interpreter: polls so far."""
    if USE_TIMER:
        mine = ((_now(USE_TIMER) - start) >> 10).to(tl.int32)
        spent = tl.atomic_max(clock, mine, sem="relaxed", scope="cta").to(tl.int64)
    else:
        spent += 1
    return spent


@triton.jit
def _start_clock(clock, USE_TIMER: tl.constexpr):
    """(this thread's start time, 0 spent): a wait begins, its program's clock word is reset."""
    start = _now(USE_TIMER)
    if USE_TIMER:
        tl.atomic_xchg(clock, 0, sem="relaxed", scope="cta")
    return start, start * 0


@triton.jit
def _wait_counter(ptr, target, sync_ptr, limit, USE_TIMER: tl.constexpr, clock):
    """Acquire-spin until the int32 at ptr is >= target. False on timeout (limit: us on a GPU, polls under the
    interpreter) or abort. Every value the loop exits on is uniform (scalar atomics): all warps leave together."""
    v = tl.atomic_add(ptr, 0, sem="acquire", scope="sys")
    start, spent = _start_clock(clock, USE_TIMER)
    stop = _aborted(sync_ptr)
    ns = tl.full([], 32, tl.int32)
    while (v < target) & (spent < limit) & (stop == 0):
        _pause(ns, USE_TIMER)
        ns = tl.minimum(ns * 2, 1024)
        v = tl.atomic_add(ptr, 0, sem="acquire", scope="sys")
        stop = _aborted(sync_ptr)
        spent = _spent(clock, start, spent, USE_TIMER)
    tl.debug_barrier()
    return v >= target


@triton.jit
def _poll_words(base, offs, ok, USE_TIMER: tl.constexpr):
    """The int64 words at base[offs] where ok (0 elsewhere), each read with a load-acquire at system scope: plain
    loads, not read-modify-write atomics, so polling programs do not compete with the producers for the lines
    they write.
    Per thread: callers reduce what they decide on."""
    if USE_TIMER:
        safe = base + tl.where(ok, offs, 0)  # inline asm cannot be masked: masked lanes read word 0 instead
        w = tl.inline_asm_elementwise("ld.acquire.sys.global.b64 $0, [$1];", "=l,l", [safe], dtype=tl.int64,
                                      is_pure=False, pack=1)
        w = tl.where(ok, w, 0)
    else:
        w = tl.load(base + offs, mask=ok, other=0, volatile=True)
    return w


@triton.jit
def _wait_words(base, n, seq, sync_ptr, limit, USE_TIMER: tl.constexpr, clock, LANES: tl.constexpr):
    """Acquire-spin until each of the n signal words at base carries sequence `seq` (word >> 32). Returns (all
    arrived, index of the first word that had not (n if none), that word as last seen), the same in every thread,
    and the words [LANES] as last seen (0 past n): one lane per thread, so a reduction over them is uniform too.

    The words are loaded per thread, and a decision on them is uniform only if it is reduced across every warp:
    a vector smaller than the program is replicated in each warp, and each warp would reduce its own loads (a
    warp that read a word before it arrived would wait on while the others go). LANES >= the program's threads
    (and >= n) gives every thread its own lane, so the reductions cross all warps through shared memory."""
    lanes = tl.arange(0, LANES)
    ok = lanes < n
    w = _poll_words(base, lanes, ok, USE_TIMER)
    pending = tl.sum((ok & ((w >> 32) != seq)).to(tl.int32), 0)
    start, spent = _start_clock(clock, USE_TIMER)
    stop = _aborted(sync_ptr)
    ns = tl.full([], 32, tl.int32)
    while (pending > 0) & (spent < limit) & (stop == 0):
        _pause(ns, USE_TIMER)
        ns = tl.minimum(ns * 2, 1024)
        w = _poll_words(base, lanes, ok, USE_TIMER)
        pending = tl.sum((ok & ((w >> 32) != seq)).to(tl.int32), 0)
        stop = _aborted(sync_ptr)
        spent = _spent(clock, start, spent, USE_TIMER)
    tl.debug_barrier()
    first = tl.min(tl.where(ok & ((w >> 32) != seq), lanes, n), 0)
    seen = tl.sum(tl.where(lanes == first, w, 0), 0)
    return pending == 0, first, seen, w


@triton.jit
def _fail(sync_ptr, status_addr, code, me, peer, region, slot, expected, seen):
    """Abort the launch; the first failure records what it waited for (status: code, rank, peer, region,
    slot, expected sequence, word seen)."""
    old = tl.atomic_cas(sync_ptr + _ABORT, 0, code)
    if old == 0:
        st = status_addr.to(tl.pointer_type(tl.int64))
        tl.store(st + 1, me)
        tl.store(st + 2, peer)
        tl.store(st + 3, region)
        tl.store(st + 4, slot)
        tl.store(st + 5, expected)
        tl.store(st + 6, seen)
        tl.store(st, code)
