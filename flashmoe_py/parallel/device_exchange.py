"""Device-initiated exchanges on a `OneSidedExchange`'s heap (kernels/exchange.py): the same `TokenLayout`, packets,
signal words and sequence numbers as the host-driven protocol (protocol.py), but the puts, signals and waits are
device programs, and every count stays on the device: no host synchronisation.

Used where the heap reaches its peers through pointers (`SymmetricHeap.peer_address`: shm under the Triton
interpreter, nvshmem on GPUs) and the backend computes the local experts from device-side counts (the `triton`
backend: forward.py picks it). The host and device exchanges share the heap and its sequence numbers, so a layer may
use either per call, as long as every rank uses the same one for the same call.

Differences from the host-driven exchange, all by design:
- every rank's own packet goes through its own segment too (a local copy), so a receiver treats every source alike;
- the received rows land in dense per-source blocks of `slab_rows` rows ([W * slab_rows, H], block s from rank s,
  rows past its count unwritten) instead of being packed: their sizes are known only on the device;
- `bytes_sent` is a 0-d int64 tensor on the device, exact (reading it is the caller's synchronisation);
- a wait that times out aborts the exchange and writes the status (pinned host memory on GPUs); the error naming
  rank, peer and slot is raised by the next exchange on a GPU (reading pinned memory is not a synchronisation), at
  once under the interpreter.
"""

from __future__ import annotations

import torch

from ..triton_backend import Launch, _pow2, _run
from .heap import SymmetricHeap, device_wait_limit
from .layout import DISPATCH, MORE_FLAG, REGION_NAMES, RETURN, SIGNAL_BYTES, TokenLayout
from .protocol import OneSidedExchange

_BLOCK = 32  # rows (and records) per put program; a launch has cdiv(max(rows, records), _BLOCK) programs per rank
_WARPS = 4
_COLLECT_ROWS = 64  # rows of a packet one collect program copies


def _kernels():
    from ..kernels import exchange  # deferred: importing triton fixes compiled vs interpreted for the process

    return exchange


class DeviceExchange:
    """Device-initiated puts and collects on `host`'s heap (its layout and sequence numbers). Not thread-safe."""

    def __init__(self, host: OneSidedExchange):
        heap, lay = host.heap, host.layout
        addresses = [heap.peer_address(p) for p in range(host.world_size)]
        if any(a is None for a in addresses):
            raise ValueError(f"transport {heap.name!r}: device-initiated exchanges need peers reachable by pointers")
        if host.world_size * lay.slab_records >= 2**31:
            raise ValueError(f"max_tokens_per_rank: {lay.slab_rows} tokens x top_k x {host.world_size} ranks = "
                             f"{host.world_size * lay.slab_records} received slots, past the int32 slot indices of "
                             "the device-initiated exchanges (kernels/exchange.py); use fewer tokens per rank")
        self.host, self.heap, self.layout = host, heap, lay
        self.rank, self.world_size = host.rank, host.world_size
        self.segment = heap.local(0, lay.size)
        self.device = self.segment.device
        self._addresses = addresses
        self._views: dict = {}
        gpu = self.device.type == "cuda"
        self.sync = torch.zeros(8, dtype=torch.int32, device=self.device)  # word 1: abort (kernels/signals.py)
        nbc = -(-lay.slab_rows // _COLLECT_ROWS)
        self.clock = torch.zeros(self.world_size * nbc, dtype=torch.int32, device=self.device)  # one per program
        self.status = torch.zeros(8, dtype=torch.int64, pin_memory=gpu)
        self._status = self.status.numpy()  # host memory read as host memory: never a device synchronisation
        self.status_addr = self.status.data_ptr()
        self.timer = gpu
        self.setup_syncs = 1  # the heap's allocation waited for every rank (a barrier): counted by the first call
        self.limit = device_wait_limit(host.timeout_s, gpu)

    def view(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's segment as `dtype` [size / itemsize], deltas [W] int64: a peer's copy of element i is at
        element i + deltas[peer] of that view)."""
        if dtype not in self._views:
            item = torch.empty((), dtype=dtype).element_size()
            me = self._addresses[self.rank]
            deltas = torch.tensor([(a - me) // item for a in self._addresses], dtype=torch.int64, device=self.device)
            self._views[dtype] = (self.segment.view(dtype), deltas)
        return self._views[dtype]

    def check(self) -> None:
        """Raise the error of an earlier exchange that gave up waiting (no synchronisation: the status is host
        memory the kernel wrote)."""
        code = int(self._status[0])
        if not code or self.host.failed is not None:  # a failure already raised: the next put says so
            return
        _, rank, peer, region, _, expected, seen = (int(v) for v in self._status[:7])
        if code == 1:
            self.host._timeout(region, peer, expected, seen)  # the host protocol's ExchangeTimeout, its words
        self.host.failed = (f"rank {rank}: peer {peer} signalled {seen & (MORE_FLAG - 1)} rows in the "
                            f"{REGION_NAMES[region]} region, more than its {expected}-row slab")
        raise RuntimeError(self.host.failed)

    def _next_seq(self, region: int) -> int:
        seq = self.host._next_seq(region)
        self.host.seq[region] = seq
        self.heap.write_local_word(self.layout.seq_offset(region), seq)
        return seq

    def put(self, region: int, src: torch.Tensor, dest_row: torch.Tensor, counts: torch.Tensor,
            records: tuple | None = None) -> torch.Tensor:
        """Send rows (and records) to every rank, this one included (collective with `collect`).

        src [R, H] layer dtype; dest_row [R, W] int32: the row of src's row r in rank d's packet, -1 where it is
        not sent to d; counts [W] int32: rows each rank gets (the number of dest_row entries >= 0 in its column);
        records: None or (values [Q] weight dtype, codes [Q] int32 or None, dest [Q] int32 rank or -1, at [Q]
        int32 index in that rank's packet) -> bytes put to other ranks (0-d int64 tensor on the device).
        """
        self.check()
        lay, w, me = self.layout, self.world_size, self.rank
        if src.dim() != 2 or src.shape[1] * src.element_size() != lay.row_bytes:
            raise ValueError(f"src: expected [R, H] rows of {lay.row_bytes} bytes, got {tuple(src.shape)} "
                             f"{src.dtype}")
        seq = self._next_seq(region)
        rows_view, rows_delta = self.view(src.dtype)
        words_view, words_delta = self.view(torch.int64)
        src, dest_row = src.contiguous(), dest_row.contiguous()
        num_rows = src.shape[0]
        has_rec = records is not None
        if has_rec:
            vals, codes, rec_dest, rec_at = (None if t is None else t.contiguous() for t in records)
            vals_view, vals_delta = self.view(vals.dtype)
            codes_view, codes_delta = self.view(torch.int32)
            num_rec = vals.shape[0]
        else:
            vals = codes = rec_dest = rec_at = None
            vals_view, vals_delta, codes_view, codes_delta = rows_view, rows_delta, rows_view, rows_delta
            num_rec = 0
        nb = max(1, -(-max(num_rows, num_rec) // _BLOCK))
        ticket = torch.zeros(w, dtype=torch.int32, device=self.device)
        item = src.element_size()
        vitem = 4 if vals is None else vals.element_size()
        args = dict(src_ptr=src, dest_row_ptr=dest_row, counts_ptr=counts, rec_val_ptr=vals, rec_code_ptr=codes,
                    rec_dest_ptr=rec_dest, rec_at_ptr=rec_at, heap_rows_ptr=rows_view, rows_delta_ptr=rows_delta,
                    heap_vals_ptr=vals_view, vals_delta_ptr=vals_delta, heap_codes_ptr=codes_view,
                    codes_delta_ptr=codes_delta, heap_words_ptr=words_view, words_delta_ptr=words_delta,
                    ticket_ptr=ticket, R=num_rows, Q=num_rec, H=src.shape[1], seq=seq,
                    data_off=lay.data_offset(region, me) // item, vals_off=lay.meta_offset(region, me, 0) // vitem,
                    codes_off=lay.meta_offset(region, me, 1) // 4, sig_idx=lay.signal_offset(region, me) // 8, NB=nb)
        constexprs = dict(W=w, HAS_REC=has_rec, HAS_CODE=codes is not None, BR=_BLOCK,
                          BH=min(64, _pow2(src.shape[1])), BQ=_BLOCK)
        name = "put" + ("[records]" if has_rec else "")
        _run(Launch(name, _kernels().put_packets_kernel, (nb, w), args, constexprs, _WARPS))
        others = torch.ones(w, dtype=torch.int64, device=self.device)
        others[me] = 0
        sent = (counts.to(torch.int64) * others).sum() * lay.row_bytes + (w - 1) * SIGNAL_BYTES
        if has_rec:
            per_rank = torch.zeros(w + 1, dtype=torch.int64, device=self.device).index_add_(
                0, (rec_dest.to(torch.int64) + w + 1) % (w + 1), torch.ones_like(rec_dest, dtype=torch.int64))[:w]
            sent = sent + (per_rank * others).sum() * (vitem + (4 if codes is not None else 0))
        return sent

    def slabs(self, region: int, dtype: torch.dtype, hidden: int) -> torch.Tensor:
        """This rank's row slabs of `region` in place: [W, slab_rows, H] dtype, slab s filled by rank s."""
        lay = self.layout
        view, _ = self.view(dtype)
        item = view.element_size()
        return view.as_strided((self.world_size, lay.slab_rows, hidden), (lay.slab_bytes // item, hidden, 1),
                               lay.data_offset(region, 0) // item)

    def collect(self, region: int, dtype: torch.dtype, hidden: int, top_k: int, records: str | None = None,
                weight_dtype: torch.dtype = torch.float32, known_records: torch.Tensor | None = None,
                in_place: bool = False) -> dict:
        """Wait for every rank's packet of the exchange `put` started and copy it out (collective).

        -> dict with rows [W, slab_rows, H] dtype (block s from rank s, rows past counts[s] unwritten; in_place:
        the heap's slabs themselves, valid until this rank's next exchange in the other direction lets the peers
        write them again) and counts [W] int32; records="flagged" (forward dispatch) adds weights [W * slab_rows,
        k] weight_dtype, ids [W * slab_rows, k] int32 (-1 past a row's records), rec_index [W * slab_rows, k]
        int32 (each slot's record index in its packet) and rec_counts [W] int32; records="known" adds values [W,
        slab_records] weight_dtype, known_records[s] of them from rank s.
        """
        lay, w = self.layout, self.world_size
        seq = self.host.seq[region]  # the put of this exchange advanced it
        rows_view, _ = self.view(dtype)
        words_view, _ = self.view(torch.int64)
        rows = self.slabs(region, dtype, hidden) if in_place else \
            torch.empty(w, lay.slab_rows, hidden, dtype=dtype, device=self.device)
        counts = torch.empty(w, dtype=torch.int32, device=self.device)
        out = dict(rows=rows, counts=counts)
        vitem = torch.empty((), dtype=weight_dtype).element_size()
        vals_view, _ = self.view(weight_dtype)
        codes_view, _ = self.view(torch.int32)
        if records == "flagged":
            vals = torch.zeros(w * lay.slab_rows, top_k, dtype=weight_dtype, device=self.device)
            ids = torch.full((w * lay.slab_rows, top_k), -1, dtype=torch.int32, device=self.device)
            rec_index = torch.zeros(w * lay.slab_rows, top_k, dtype=torch.int32, device=self.device)
            rec_counts = torch.empty(w, dtype=torch.int32, device=self.device)
            out.update(weights=vals, ids=ids, rec_index=rec_index, rec_counts=rec_counts)
        elif records == "known":
            vals = torch.zeros(w, lay.slab_records, dtype=weight_dtype, device=self.device)
            ids = rec_index = None
            rec_counts = known_records.to(torch.int32).contiguous()
            out.update(values=vals)
        else:
            vals = ids = rec_index = rec_counts = None
        item = torch.empty((), dtype=dtype).element_size()
        args = dict(out_rows_ptr=rows, counts_out_ptr=counts, out_vals_ptr=vals, out_ids_ptr=ids,
                    rec_index_ptr=rec_index, rec_counts_ptr=rec_counts, heap_rows_ptr=rows_view,
                    heap_vals_ptr=vals_view, heap_codes_ptr=codes_view, heap_words_ptr=words_view,
                    sync_ptr=self.sync, clock_ptr=self.clock, status_addr=self.status_addr, H=hidden, me=self.rank,
                    seq=seq, region=region, limit=self.limit, data0=lay.data_offset(region, 0) // item,
                    slab_elems=lay.slab_bytes // item, vals0=lay.meta_offset(region, 0, 0) // vitem,
                    codes0=lay.meta_offset(region, 0, 1) // 4, vals_stride=lay.meta_slab_bytes // vitem,
                    codes_stride=lay.meta_slab_bytes // 4, sig0=lay.signal_offset(region, 0) // 8,
                    slab_rows=lay.slab_rows, slab_records=lay.slab_records)
        constexprs = dict(K=top_k, HAS_REC=records is not None, FLAGGED=records == "flagged", USE_TIMER=self.timer,
                          LANES=32 * _WARPS, COPY=not in_place, ROWS=_COLLECT_ROWS, BR=_BLOCK,
                          BH=min(64, _pow2(hidden)), BQ=_BLOCK)
        grid = (w, 1 if in_place else self.clock.numel() // w)
        _run(Launch(f"collect[{records or 'rows'}]", _kernels().collect_kernel, grid, args, constexprs, _WARPS))
        if not self.timer:
            self.check()  # free under the interpreter: the launch has finished
        return out


class _PlanHeap(SymmetricHeap):
    """A heap of meta tensors at made-up addresses: what `plan_launches` runs DeviceExchange's host code on."""

    name = "plan"

    def __init__(self, layout: TokenLayout, rank: int, world_size: int):
        super().__init__(layout, rank, world_size)
        self._segment = torch.empty(layout.size, dtype=torch.uint8, device="meta")

    def put(self, peer, offset, data):
        raise AssertionError("planning only")

    signal = wait = put

    def local(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._segment[offset:offset + nbytes]

    def peer_address(self, peer: int) -> int:
        return (1 << 40) + peer * (1 << 34)

    def write_local_word(self, offset: int, value: int) -> None:
        pass


def plan_launches(dtype: torch.dtype, world: int, tokens: int, hidden: int, top_k: int) -> list:
    """The launches of one forward and backward over device-initiated exchanges (W ranks, `tokens` per rank, the
    heap sized for them), recorded on meta tensors for the compile gate, as a GPU would launch them."""
    from ..triton_backend import recording

    lay = TokenLayout.for_layer(world, top_k, tokens, hidden, dtype.itemsize, 8 if dtype == torch.float64 else 4)
    dex = DeviceExchange(OneSidedExchange(_PlanHeap(lay, 0, world), lay, 60.0))
    dex.timer, dex.limit = True, 1 << 30
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    meta = dict(device="meta")
    x = torch.empty(tokens, hidden, dtype=dtype, **meta)
    table = torch.empty(tokens, world, dtype=torch.int32, **meta)
    counts = torch.empty(world, dtype=torch.int32, **meta)
    q = tokens * top_k
    records = (torch.empty(q, dtype=wdtype, **meta), torch.empty(q, dtype=torch.int32, **meta),
               torch.empty(q, dtype=torch.int32, **meta), torch.empty(q, dtype=torch.int32, **meta))
    with recording("plan") as launches:
        dex.put(DISPATCH, x, table, counts, records)
        dex.collect(DISPATCH, dtype, hidden, top_k, "flagged", wdtype)
        dex.put(RETURN, x, table, counts)
        dex.collect(RETURN, dtype, hidden, top_k, in_place=True)
        dex.put(RETURN, x, table, counts, (records[0], None, records[2], records[3]))
        dex.collect(RETURN, dtype, hidden, top_k, "known", wdtype, counts, in_place=True)
    return launches
