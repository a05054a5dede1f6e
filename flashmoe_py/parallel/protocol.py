"""The one-sided dispatch/return protocol of DESIGN §5 on a `SymmetricHeap`, driven from the host.

One exchange moves one packet per (source, receiver) pair in one region of a `TokenLayout` (layout.py): the
rows a rank has for that receiver (one per (token, receiver) in the expert-parallel forward, forward.py), and
their routing records when the exchange carries any.

    send:  for each peer d != me:  put my rows for d into d's row slab for `me`, my records for d into
                                   d's record slab for `me`  (only those bytes)
                                   release-store d's signal word (me) = seq<<32 | more<<31 | count
    recv:  for each peer p != me:  acquire-wait on my word (p) for sequence seq, with a timeout
                                   copy p's rows (and records) out of my slabs
    self:  my own packet never touches the heap

Invariants, as DESIGN §5 numbers them:
1. bytes put = rows * row_bytes + records * m + one signal word per peer, m the exchange's bytes per routing
   record (one record per (token, expert) assignment; none when the exchange carries none); no padding
   (`PacketResult.bytes_sent`).
2. the signal word (src) in rank r's segment is written by rank src only, after its packet (release), and the
   packet is read after the word is seen (acquire).
3. `seq` counts this rank's exchanges per region; nothing is ever reset (100 forwards reuse the heap).
   Reuse is safe because every rank alternates DISPATCH, RETURN, DISPATCH, ... and every exchange pairs every
   two ranks: a rank writes its next packet into a slab only after it received the peer's reply to the previous
   one, which the peer sends only after it copied that packet out.
4. no host sync on GPUs: NOT met by this host-driven protocol, which reads the counts on the host to size
   its copies (free on CPU heaps, one sync per exchange on the nvshmem heap). device_exchange.py runs the same
   exchanges from device kernels on the same heap, counts on the device (the `triton` backend and the fused
   backend's backward over shm and nvshmem use it), and the fused kernel of DESIGN §6 puts its rows, records and
   signals from the device into its own HeapLayout (one row per (token, rank) too).
5. every wait has a deadline; `ExchangeTimeout` names the rank, the peer and the slot (the peer's packet).
6. packets are checked against the slab size before anything is written (`HeapOverflow`), and counts read
   from signal words are checked again before rows are read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .heap import ExchangeTimeout, HeapOverflow, SymmetricHeap
from .layout import LAST_OF_ROW, MORE_FLAG, REGION_NAMES, SEQ_LIMIT, SIGNAL_BYTES, TOKEN_RANK, TokenLayout


@dataclass
class ExchangeResult:
    """What one per-(token, expert) exchange delivered to this rank (the `alltoall` baseline's unit).

    rows       [R, H] exchanged dtype   received rows, source-major then expert-major (own rows included)
    counts     [W, E_local] int64       rows per (source rank, expert slot)
    bytes_sent int                      payload + count bytes this rank sent to other ranks
    """

    rows: torch.Tensor
    counts: torch.Tensor
    bytes_sent: int


@dataclass
class PacketResult:
    """What one exchange of `OneSidedExchange` delivered to this rank.

    rows           [R, H] exchanged dtype   received rows, source-major (own rows included, in place of rank me)
    records        list of [Q, m_i] uint8   their routing records, column by column, source-major (None: the
                   or None                  exchange had none)
    counts         [W] int64 CPU            rows per source rank
    record_counts  [W] int64 CPU or None    records per source rank
    bytes_sent     int                      rows, records and signal bytes this rank put to other ranks
    more           bool                     some rank (this one included) said another round of the call follows
    """

    rows: torch.Tensor
    records: list[torch.Tensor] | None
    counts: torch.Tensor
    record_counts: torch.Tensor | None
    bytes_sent: int
    more: bool


def flagged_records(codes: torch.Tensor, rows: int) -> int:
    """codes [N] int32 (a packet's record codes, then anything) -> how many belong to a packet of `rows` rows: the
    shortest prefix holding `rows` codes with LAST_OF_ROW set."""
    if rows == 0:
        return 0
    ends = ((codes & LAST_OF_ROW) != 0).nonzero().flatten()
    if ends.numel() < rows:
        raise RuntimeError(f"a packet of {rows} rows carries only {ends.numel()} row ends in its routing records")
    return int(ends[rows - 1]) + 1


def check_send(send_rows: torch.Tensor, send_counts: torch.Tensor, world_size: int, num_local_experts: int,
               slab_rows: int | None) -> torch.Tensor:
    """Validate a per-(token, expert) exchange's arguments (send_counts [W, E_local]); returns rows per peer [W]."""
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
    """Dispatch/return exchanges over a symmetric heap with a `TokenLayout`. One per layer (and dtype); not
    thread-safe. `slab_rows` is the most rows one call of `run` may send one peer."""

    row_unit = TOKEN_RANK  # forward.py sends one row per (token, destination rank) through it

    def __init__(self, heap: SymmetricHeap, layout: TokenLayout, timeout_s: float):
        self.heap, self.layout, self.timeout_s = heap, layout, float(timeout_s)
        self.rank, self.world_size = heap.rank, heap.world_size
        self.slab_rows = layout.slab_rows
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

    def _check(self, send_rows: torch.Tensor, per_peer: torch.Tensor, records: list[torch.Tensor] | None,
               records_per_peer) -> tuple[list[int], list[int]]:
        lay, w = self.layout, self.world_size
        if tuple(per_peer.shape) != (w,):
            raise ValueError(f"per_peer: expected shape [W={w}], got {tuple(per_peer.shape)}")
        counts = per_peer.tolist()
        total = sum(counts)
        if send_rows.dim() != 2 or send_rows.shape[0] != total:
            raise ValueError(f"send_rows: expected [{total}, H] (the sum of per_peer), got {tuple(send_rows.shape)}")
        if send_rows.shape[1] * send_rows.element_size() != lay.row_bytes:
            raise ValueError(f"send_rows: rows of {send_rows.shape[1] * send_rows.element_size()} bytes, but the heap "
                             f"was laid out for {lay.row_bytes}-byte rows")
        if min(counts) < 0:
            raise ValueError(f"per_peer: negative row counts {counts}")
        if total and max(counts) > lay.slab_rows:
            peer = counts.index(max(counts))
            raise HeapOverflow(f"{counts[peer]} rows for rank {peer} exceed the heap's {lay.slab_rows} rows per "
                               "source (max_tokens_per_rank: one row per (token, rank)); raise max_tokens_per_rank")
        if records is None:
            return counts, [0] * w
        rec = [int(n) for n in records_per_peer]
        widths = lay.record_columns
        if (not 0 < len(records) <= len(widths) or len(rec) != w or min(rec) < 0
                or any(c.dtype != torch.uint8 or c.dim() != 2 or c.shape[0] != sum(rec) or not 0 < c.shape[1] <= m
                       for c, m in zip(records, widths))):
            got = [(c.dtype, tuple(c.shape)) for c in records]
            raise ValueError(f"records: expected up to {len(widths)} uint8 columns [sum(records_per_peer), m <= "
                             f"{list(widths)}] with records_per_peer [W={w}] >= 0, got {got} and {rec}")
        if max(rec) > lay.slab_records:
            peer = rec.index(max(rec))
            raise HeapOverflow(f"{rec[peer]} routing records for rank {peer} exceed the heap's {lay.slab_records} "
                               "per source (max_tokens_per_rank * top_k); raise max_tokens_per_rank")
        return counts, rec

    def run(self, region: int, send_rows: torch.Tensor, per_peer: torch.Tensor,
            records: list[torch.Tensor] | None = None, records_per_peer=None, recv_records=None,
            more: bool = False) -> PacketResult:
        """One exchange (collective: every rank calls it with the same region, and with records or without).

        send_rows [S, H] peer-major; per_peer [W] int64 CPU rows for each rank (own included); records: None, or
        the columns of the routing records (layout.TokenLayout: weights, then codes), each uint8 [Q, m_i], the
        same m_i on every rank, peer-major, records_per_peer [W] of them for each rank; recv_records: the records
        each source sends this rank ([W] ints; own entry unused), or None when the codes column marks each row's
        last record with LAST_OF_ROW (`flagged_records`);
        more: this rank has rows for another round of the same call (carried in its signal words; see
        PacketResult.more) -> PacketResult.
        """
        lay, me, w = self.layout, self.rank, self.world_size
        counts, rec = self._check(send_rows, per_peer, records, records_per_peer)
        seq = self._next_seq(region)
        send_rows = send_rows.contiguous()
        records = None if records is None else [c.contiguous() for c in records]
        m = 0 if records is None else sum(c.shape[1] for c in records)
        starts = [sum(counts[:d]) for d in range(w)]
        rstarts = [sum(rec[:d]) for d in range(w)]
        flag = MORE_FLAG if more else 0
        bytes_sent = 0
        for i in range(1, w):
            peer = (me + i) % w
            n, at = counts[peer], starts[peer]
            if n:
                self.heap.put(peer, lay.data_offset(region, me), send_rows[at:at + n])
            for col, c in enumerate(records if rec[peer] else ()):
                self.heap.put(peer, lay.meta_offset(region, me, col), c[rstarts[peer]:rstarts[peer] + rec[peer]])
            word = torch.tensor([(seq << 32) | flag | n], dtype=torch.int64)
            self.heap.signal(peer, lay.signal_offset(region, me), word)
            bytes_sent += n * lay.row_bytes + rec[peer] * m + SIGNAL_BYTES
        self.seq[region] = seq
        self.heap.write_local_word(lay.seq_offset(region), seq)

        recv = [0] * w
        recv[me] = counts[me]
        any_more = more
        deadline = time.monotonic() + self.timeout_s
        for i in range(1, w):
            peer = (me - i) % w
            missing, seen = self.heap.wait(lay.signal_offset(region, peer), 1, seq,
                                           max(deadline - time.monotonic(), 1e-3))
            if missing >= 0:
                self._timeout(region, peer, seq, int(seen[0]))
            word = int(seen[0])
            n = word & (MORE_FLAG - 1)
            if n > lay.slab_rows:
                raise RuntimeError(f"rank {me}: peer {peer} signalled {n} rows in the {REGION_NAMES[region]} region, "
                                   f"more than its {lay.slab_rows}-row slab")
            recv[peer] = n
            any_more = any_more or bool(word & MORE_FLAG)
        rows = send_rows.new_empty(sum(recv), send_rows.shape[1])
        at = 0
        for src, n in enumerate(recv):
            if n:
                rows[at:at + n] = (send_rows[starts[me]:starts[me] + n] if src == me else
                                   self.heap.local(lay.data_offset(region, src), n * lay.row_bytes)
                                   .view(send_rows.dtype).view(n, -1))
            at += n
        got, rec_counts = None, None
        if records is not None:
            own = [c[rstarts[me]:rstarts[me] + rec[me]] for c in records]
            got, rec_counts = self._records(region, own, recv, recv_records)
        return PacketResult(rows, got, torch.tensor(recv, dtype=torch.int64), rec_counts, bytes_sent, any_more)

    def _records(self, region: int, own: list[torch.Tensor], recv: list[int], recv_records):
        """The records of every source, own included -> (columns [Q, m_i] uint8 source-major, counts [W] int64)."""
        lay, me = self.layout, self.rank
        widths = [c.shape[1] for c in own]
        parts, counts = [], []
        for src, n in enumerate(recv):
            if src == me:
                parts.append(own)
                counts.append(own[0].shape[0])
                continue
            if recv_records is None:
                codes = self.heap.local(lay.meta_offset(region, src, len(widths) - 1), lay.slab_records * 4)
                q = flagged_records(codes.view(torch.int32)[:min(n * (lay.slab_records // lay.slab_rows),
                                                                 lay.slab_records)], n)
            else:
                q = int(recv_records[src])
            if q > lay.slab_records:
                raise RuntimeError(f"rank {me}: peer {src} sent {q} routing records in the {REGION_NAMES[region]} "
                                   f"region, more than its {lay.slab_records}-record slab")
            parts.append([self.heap.local(lay.meta_offset(region, src, col), q * m).view(q, m).clone()
                          for col, m in enumerate(widths)])
            counts.append(q)
        return ([torch.cat([p[col] for p in parts]) for col in range(len(widths))],
                torch.tensor(counts, dtype=torch.int64))

    def _timeout(self, region: int, peer: int, seq: int, seen: int) -> None:
        self.failed = (f"rank {self.rank}: timed out after {self.timeout_s:g} s waiting for peer {peer}: "
                       f"{REGION_NAMES[region]} slot (src={peer}: its packet of rows for rank {self.rank}) expected "
                       f"sequence {seq}, saw {seen >> 32}. The peer is dead, slow, or skipped an exchange (every rank "
                       "must run each forward and backward of the layer)")
        raise ExchangeTimeout(self.failed)

    def close(self) -> None:
        self.heap.close()
