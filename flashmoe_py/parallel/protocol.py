"""The one-sided dispatch/return protocol of DESIGN §5 on a `SymmetricHeap`, driven from the host.

One exchange moves packets in one region (layout.py): every rank sends every other rank one packet per
receiver-side expert slot, then waits for the packets addressed to it.

    send:  for each peer d != me:  put rows of d's packets into d's slab for `me`   (only routed rows)
                                   release-store d's signal words (me, e) = seq<<32 | count
    recv:  for each peer p != me:  acquire-wait on my words (p, e) for sequence seq, with a timeout
                                   copy p's rows out of my slab
    self:  my own packets never touch the heap

Invariants, as DESIGN §5 numbers them:
1. bytes put = rows * row_bytes + E_local signal words per peer; no padding (`ExchangeResult.bytes_sent`).
2. a signal word (src, e) in rank r's segment is written by rank src only, after its rows (release), and
   rows are read after the word is seen (acquire).
3. `seq` counts this rank's exchanges per region; nothing is ever reset (100 forwards reuse the heap).
4. no host sync on GPUs: NOT met by this host-driven protocol, which reads the counts on the host to size
   its copies (free on CPU heaps, one sync per exchange on the nvshmem heap). The fused kernel of DESIGN §6
   (a later piece of work) is the path meant to meet it, putting rows and signals from the device into
   this same layout.
5. every wait has a deadline; `ExchangeTimeout` names the rank, the peer and the slot.
6. packets are checked against the slab size before anything is written (`HeapOverflow`), and counts
   read from signal words are checked again before rows are read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .heap import ExchangeTimeout, HeapOverflow, SymmetricHeap
from .layout import REGION_NAMES, SEQ_LIMIT, SIGNAL_BYTES, HeapLayout


@dataclass
class ExchangeResult:
    """What one exchange delivered to this rank.

    rows       [R, H] exchanged dtype   received rows, source-major then expert-major (own rows included)
    counts     [W, E_local] int64       rows per (source rank, expert slot)
    bytes_sent int                      payload + signal bytes this rank put to other ranks
    """

    rows: torch.Tensor
    counts: torch.Tensor
    bytes_sent: int


def check_send(send_rows: torch.Tensor, send_counts: torch.Tensor, world_size: int, num_local_experts: int,
               slab_rows: int | None) -> torch.Tensor:
    """Validate one exchange's arguments; returns rows per peer [W] int64 (CPU)."""
    if tuple(send_counts.shape) != (world_size, num_local_experts):
        raise ValueError(f"send_counts: expected shape [W={world_size}, E_local={num_local_experts}], "
                         f"got {tuple(send_counts.shape)}")
    per_peer = send_counts.sum(1)
    total = int(per_peer.sum())
    if send_rows.dim() != 2 or send_rows.shape[0] != total:
        raise ValueError(f"send_rows: expected [{total}, H] (the sum of send_counts), got {tuple(send_rows.shape)}")
    if slab_rows is not None and total and int(per_peer.max()) > slab_rows:
        peer = int(per_peer.argmax())
        raise HeapOverflow(f"{int(per_peer[peer])} rows for rank {peer} exceed the heap's {slab_rows} rows per "
                           f"source (max_tokens_per_rank * top_k); raise max_tokens_per_rank")
    return per_peer


class OneSidedExchange:
    """Dispatch/return exchanges over a symmetric heap. One per layer (and dtype); not thread-safe."""

    def __init__(self, heap: SymmetricHeap, layout: HeapLayout, timeout_s: float):
        self.heap, self.layout, self.timeout_s = heap, layout, float(timeout_s)
        self.rank, self.world_size = heap.rank, heap.world_size
        self.seq = [0, 0]
        self.failed: str | None = None  # set after a timeout: the heap's sequence state is then unknown

    def _next_seq(self, region: int) -> int:
        if self.failed is not None:
            raise RuntimeError(f"rank {self.rank}: an earlier exchange failed ({self.failed}); the heap's "
                               "sequence numbers no longer agree across ranks: recreate the layer on every rank")
        seq = self.seq[region] + 1
        if seq >= SEQ_LIMIT:
            raise RuntimeError(f"rank {self.rank}: {REGION_NAMES[region]} sequence numbers exhausted (2^31 exchanges)")
        return seq

    def run(self, region: int, send_rows: torch.Tensor, send_counts: torch.Tensor) -> ExchangeResult:
        """send_rows [S, H] peer-major then expert-major; send_counts [W, E_local] int64 CPU -> ExchangeResult."""
        lay, me, w = self.layout, self.rank, self.world_size
        el = lay.num_local_experts
        per_peer = check_send(send_rows, send_counts, w, el, lay.slab_rows)
        if send_rows.shape[1] * send_rows.element_size() != lay.row_bytes:
            raise ValueError(f"send_rows: rows of {send_rows.shape[1] * send_rows.element_size()} bytes, but the heap "
                             f"was laid out for {lay.row_bytes}-byte rows")
        seq = self._next_seq(region)
        send_rows = send_rows.contiguous()
        starts = torch.cumsum(per_peer, 0) - per_peer
        starts_l, per_peer_l = starts.tolist(), per_peer.tolist()
        words = (seq << 32) | send_counts
        bytes_sent = 0
        for i in range(1, w):
            peer = (me + i) % w
            n = per_peer_l[peer]
            if n:
                self.heap.put(peer, lay.data_offset(region, me), send_rows[starts_l[peer]:starts_l[peer] + n])
            self.heap.signal(peer, lay.signal_offset(region, me), words[peer].contiguous())
            bytes_sent += n * lay.row_bytes + el * SIGNAL_BYTES
        self.seq[region] = seq
        self.heap.write_local_word(lay.seq_offset(region), seq)

        recv_counts = torch.empty(w, el, dtype=torch.int64)
        recv_counts[me] = send_counts[me]
        deadline = time.monotonic() + self.timeout_s
        for i in range(1, w):
            peer = (me - i) % w
            missing, seen = self.heap.wait(lay.signal_offset(region, peer), el, seq,
                                           max(deadline - time.monotonic(), 1e-3))
            if missing >= 0:
                self._timeout(region, peer, missing, seq, int(seen[missing]))
            counts = seen & 0xFFFFFFFF
            if int(counts.sum()) > lay.slab_rows:
                raise RuntimeError(f"rank {me}: peer {peer} signalled {int(counts.sum())} rows in the "
                                   f"{REGION_NAMES[region]} region, more than its {lay.slab_rows}-row slab")
            recv_counts[peer] = counts
        recv_per_src = recv_counts.sum(1).tolist()
        rows = send_rows.new_empty(sum(recv_per_src), send_rows.shape[1])
        at = 0
        for src, n in enumerate(recv_per_src):
            if not n:
                continue
            if src == me:
                rows[at:at + n] = send_rows[starts_l[me]:starts_l[me] + n]
            else:
                raw = self.heap.local(lay.data_offset(region, src), n * lay.row_bytes)
                rows[at:at + n] = raw.view(send_rows.dtype).view(n, -1)
            at += n
        return ExchangeResult(rows, recv_counts, bytes_sent)

    def _timeout(self, region: int, peer: int, slot: int, seq: int, seen: int) -> None:
        el = self.layout.num_local_experts
        owner = self.rank if region == 0 else peer
        self.failed = (f"rank {self.rank}: timed out after {self.timeout_s:g} s waiting for peer {peer}: "
                       f"{REGION_NAMES[region]} slot (src={peer}, expert {slot} = global expert {owner * el + slot}) "
                       f"expected sequence {seq}, saw {seen >> 32}. The peer is dead, slow, or skipped an exchange "
                       f"(every rank must run each forward and backward of the layer)")
        raise ExchangeTimeout(self.failed)

    def close(self) -> None:
        self.heap.close()
