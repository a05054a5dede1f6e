"""Byte layouts of one rank's segment of the symmetric heap, shared by every one-sided transport.

Every rank allocates a segment of the same size and layout (hence "symmetric"): a sender computes the
address of its packet at a receiver from the receiver's segment base and these offsets alone, with no
handshake. Two layouts, one per protocol:

- `TokenLayout`: the host-driven exchange of protocol.py (the unfused expert-parallel path over shm, mpi and
  nvshmem): one row per (token, destination rank) with its routing records, one packet (and one signal
  word) per (source, receiver) pair. Described at the class.
- `HeapLayout`: the persistent fused kernel's (DESIGN §6): one row per (token, destination rank) with a routing
  record per assignment, per-expert record packets (one signal word per (source, receiver-side expert)) on the
  way out, one partial-sum row per (token, rank) and one signal word per pair on the way back. A device program
  puts rows, records and signals at these offsets, peer segments addressed as int64 base addresses
  (`SymmetricHeap.peer_address`) cast to pointers. Described below.

HeapLayout
----------

Segment of rank r (offsets in bytes from the segment base; every block starts 128-byte aligned)::

    header      8 int64        MAGIC, VERSION, W, E_local, slab_rows, row_bytes, weight_bytes, slab_records
    signals[0]  [W, E_local]   int64  DISPATCH signal of records packet (src, e): written by rank src only
    signals[1]  [W]            int64  RETURN signal of the partial sums from src: written by rank src only
    data[0]     [W, slab_rows, row_bytes]  DISPATCH row slabs, one per source rank: row t = the source's token t
    data[1]     [W, slab_rows, row_bytes]  RETURN row slabs, one per expert rank: row t = its partial sum of
                                           this rank's token t
    records     [W] record slabs, DISPATCH: a weights column [slab_records, weight_bytes], then a codes column
                [slab_records] int32, each 128-byte aligned

A forward (the fused kernel, kernels/fused_moe.py):
- DISPATCH: source s stores its token t's row into row t of its slab at every rank that owns one of t's kept
  experts, once per (token, rank) whatever the number of those experts; and a record per kept assignment
  (routing weight, code = t * top_k + slot) into its record slab there, records sorted by the receiver's local
  expert (token order within one), packet e (expert e's records) starting at record sum(count[e'] for e' < e).
  Rows are sparse in the slab (only routed tokens' rows are written and cross the wire); records are dense.
- RETURN: the expert's rank sums each received token's expert outputs (weighted, in fp32/fp64, slot order) and
  stores the sum, in the layer dtype, into row t of its slab at the token's rank; one signal per pair when all
  of them are there.
Only those bytes cross the wire: rows, records and signal words.

Reuse without a reset: a rank writes its next launch's rows into a slab only after it has received the
reply to its previous one, and the reply is sent only after the receiver has read the previous rows and records
(the TokenLayout exchanges rely on the same order).

A signal word is `(seq << 32) | count` (count: DISPATCH records of the packet; RETURN partial-sum rows),
stored with release semantics after the bytes it publishes, and read with acquire semantics before them. `seq`
is the sender's launch number (1, 2, ...); every packet of a launch is signalled, empty ones with count 0, so
the receiver knows each slot is complete. A receiver waits for `word >> 32 == seq`: there is no reset between
launches, and a replay (CUDA graph) only needs the sequence words to advance. `seq` stays below 2^31.

Sizing: a rank may pass at most `max_tokens_per_rank` tokens, so a source writes at most that many rows into
one slab (`slab_rows`), with at most top_k records each (`slab_records`; a router never picks an expert twice,
but caller-supplied routing may). More tokens is an error before anything is written, and every packet count
is checked against the record slab (never an out-of-bounds access).
"""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = 0x464D4F45  # "FMOE"
VERSION = 2  # 2: one row per (token, rank) with routing records (1: one row per (token, expert))
HEADER_WORDS = 8
SIGNAL_BYTES = 8
ALIGN = 128
SEQ_LIMIT = 1 << 31

DISPATCH, RETURN = 0, 1
REGION_NAMES = ("dispatch", "return")
TOKEN_RANK, TOKEN_EXPERT = "(token, rank)", "(token, expert)"  # what one row on the wire stands for (`row_unit`)
COUNT_BITS = 31  # TokenLayout signal words: count in bits [0, 31), the "more rows follow" flag in bit 31
MORE_FLAG = 1 << COUNT_BITS
CODE_BYTES = 4  # TokenLayout routing records: an int32 code each
LAST_OF_ROW = 1  # TokenLayout routing records: bit 0 of a record's int32 code marks its row's last record

# Header word indices.
H_MAGIC, H_VERSION, H_WORLD, H_LOCAL_EXPERTS, H_SLAB_ROWS, H_ROW_BYTES, H_WEIGHT_BYTES, H_SLAB_RECORDS = range(8)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class HeapLayout:
    """Offsets of the fused kernel's symmetric heap; see the module docstring for the picture."""

    world_size: int
    num_local_experts: int
    slab_rows: int  # rows one source may put into one region of one receiver: max_tokens_per_rank
    row_bytes: int  # hidden_size * itemsize of the exchanged dtype
    weight_bytes: int = 4  # bytes of a routing weight in a record: 4 (fp32) or 8 (fp64 layers)
    slab_records: int = 1  # records one source may put into one receiver: max_tokens_per_rank * top_k

    @classmethod
    def for_layer(cls, world_size: int, num_local_experts: int, top_k: int, max_tokens_per_rank: int,
                  hidden_size: int, itemsize: int) -> HeapLayout:
        """itemsize: bytes of the layer dtype (fp64 layers carry fp64 routing weights, the others fp32)."""
        return cls(world_size, num_local_experts, max_tokens_per_rank, hidden_size * itemsize,
                   8 if itemsize == 8 else 4, max(1, max_tokens_per_rank * top_k))

    def _signals_bytes(self, region: int) -> int:
        return _align(self.world_size * (self.num_local_experts if region == DISPATCH else 1) * SIGNAL_BYTES)

    @property
    def slab_bytes(self) -> int:
        return _align(self.slab_rows * self.row_bytes)

    @property
    def record_slab_bytes(self) -> int:
        return _align(self.slab_records * self.weight_bytes) + _align(self.slab_records * CODE_BYTES)

    def signal_offset(self, region: int, src: int, expert: int = 0) -> int:
        """Byte offset of the signal word of packet (src, expert) (DISPATCH) or of src's partial sums (RETURN)."""
        base = _align(HEADER_WORDS * 8)
        if region == DISPATCH:
            return base + (src * self.num_local_experts + expert) * SIGNAL_BYTES
        return base + self._signals_bytes(DISPATCH) + src * SIGNAL_BYTES

    def data_offset(self, region: int, src: int) -> int:
        """Byte offset of the row slab of rank `src` in `region`."""
        base = _align(HEADER_WORDS * 8) + self._signals_bytes(DISPATCH) + self._signals_bytes(RETURN)
        return base + (region * self.world_size + src) * self.slab_bytes

    def record_offset(self, src: int, column: int = 0) -> int:
        """Byte offset of column `column` (0: weights, 1: codes) of the DISPATCH record slab of rank `src`."""
        base = self.data_offset(1, self.world_size - 1) + self.slab_bytes
        return base + src * self.record_slab_bytes + (_align(self.slab_records * self.weight_bytes) if column else 0)

    @property
    def size(self) -> int:
        return self.record_offset(self.world_size - 1, 0) + self.record_slab_bytes

    def header(self) -> list[int]:
        return [MAGIC, VERSION, self.world_size, self.num_local_experts, self.slab_rows, self.row_bytes,
                self.weight_bytes, self.slab_records]


TOKEN_MAGIC = 0x464D5452  # "FMTR": token-rank rows
TOKEN_VERSION = 2
# TokenLayout header word indices.
T_MAGIC, T_VERSION, T_WORLD, T_SLAB_ROWS, T_ROW_BYTES, T_WEIGHT_BYTES, T_SEQ0 = range(7)


@dataclass(frozen=True)
class TokenLayout:
    """The host-driven exchange's segment (protocol.py): one row per (token, destination rank).

    Segment of rank r (offsets in bytes from the segment base; every block starts 128-byte aligned)::

        header      8 int64                           MAGIC, VERSION, W, slab_rows, row_bytes, weight_bytes,
                                                      seq[DISPATCH], seq[RETURN]
        signals[0]  [W] int64                         DISPATCH signal of the packet from src: written by src only
        signals[1]  [W] int64                         RETURN signal of the packet from src: written by src only
        data[0]     [W, slab_rows, row_bytes]         DISPATCH row slabs, one per source rank
        data[1]     [W, slab_rows, row_bytes]         RETURN row slabs
        meta[0]     [W] record slabs, one per source rank, DISPATCH: a weights column [slab_records,
                    weight_bytes], then a codes column [slab_records] int32, each 128-byte aligned
        meta[1]     [W] record slabs, RETURN

    One exchange puts one packet per (source, receiver) pair: `count` rows of `row_bytes` each at the start of
    the source's data slab, and, when the exchange carries routing records, its records packed at the start of
    each column of the source's record slab (columns, not interleaved structs, so every element is aligned for
    the device kernels that store them). A record stands for one (token, expert) assignment of a row, so a row
    has as many as it has experts on the receiver: no padding to top_k. Only those bytes cross the wire. What the
    records hold (forward.py):

        forward dispatch   one per kept assignment on the receiver, a row's in slot order: its routing weight
                           (fp32; fp64 for fp64 layers) in the weights column, an int32 code = local expert
                           id << 1 | last in the codes column, `last` (LAST_OF_ROW) set on a row's last record:
                           the receiver finds the packet's records (the shortest prefix with `count` last flags)
                           and each record's row from them
        forward return     none (one partial-sum row per (token, rank))
        backward dispatch  none (the expert's rank kept the records from the forward)
        backward return    one per forward record, in its order: the routing weight's gradient (fp32; fp64) in
                           the weights column; the receiver knows how many (it sent the forward's)

    A signal word is `(seq << 32) | (more << 31) | count`: release-stored after the packet's bytes, read with
    acquire before them, `seq` the sender's exchange number in that region (header seq[region], never reset),
    `more` set when the sender has rows for another round of the same call (forward.py: per-(token, expert) rows
    of `exchange_experts` that do not fit one slab). Every pair is signalled every exchange, empty packets with
    count 0.

    Sizing: a source sends a receiver at most one row per token, so `slab_rows = max_tokens_per_rank` (the
    per-(token, expert) layout needs top_k times that), and at most top_k records per row: `slab_records =
    max_tokens_per_rank * top_k`, of `weight_bytes + 4` bytes each.
    """

    world_size: int
    slab_rows: int  # rows one source may put into one region of one receiver: max_tokens_per_rank
    row_bytes: int  # hidden_size * itemsize of the exchanged dtype
    weight_bytes: int  # bytes of a routing weight in a record: 4 (fp32) or 8 (fp64 layers)
    slab_records: int  # records one source may put into one region of one receiver

    def __post_init__(self):
        if not 0 < self.slab_rows < MORE_FLAG:
            raise ValueError(f"slab_rows={self.slab_rows}: must be in [1, 2^31) (the signal word's count field)")

    @classmethod
    def for_layer(cls, world_size: int, top_k: int, max_tokens_per_rank: int, hidden_size: int, itemsize: int,
                  weight_itemsize: int) -> TokenLayout:
        """weight_itemsize: bytes of a routing weight, 4 (fp32) or 8 (fp64 layers)."""
        return cls(world_size, max_tokens_per_rank, hidden_size * itemsize, weight_itemsize,
                   max_tokens_per_rank * top_k)

    @property
    def record_columns(self) -> tuple[int, int]:
        """Bytes per record of each column of a record slab: (weight, code)."""
        return (self.weight_bytes, CODE_BYTES)

    @property
    def signals_bytes(self) -> int:
        return _align(self.world_size * SIGNAL_BYTES)

    @property
    def slab_bytes(self) -> int:
        return _align(self.slab_rows * self.row_bytes)

    @property
    def meta_slab_bytes(self) -> int:
        return sum(_align(self.slab_records * m) for m in self.record_columns)

    def seq_offset(self, region: int) -> int:
        return (T_SEQ0 + region) * 8

    def signal_offset(self, region: int, src: int) -> int:
        """Byte offset of the signal word of the packet from rank `src` in `region`."""
        return _align(HEADER_WORDS * 8) + region * self.signals_bytes + src * SIGNAL_BYTES

    def data_offset(self, region: int, src: int) -> int:
        """Byte offset of the row slab of rank `src` in `region`."""
        base = _align(HEADER_WORDS * 8) + 2 * self.signals_bytes
        return base + (region * self.world_size + src) * self.slab_bytes

    def meta_offset(self, region: int, src: int, column: int = 0) -> int:
        """Byte offset of column `column` (0: weights, 1: codes) of the record slab of rank `src` in `region`."""
        base = self.data_offset(1, self.world_size - 1) + self.slab_bytes
        return base + (region * self.world_size + src) * self.meta_slab_bytes + \
            sum(_align(self.slab_records * m) for m in self.record_columns[:column])

    @property
    def size(self) -> int:
        return self.meta_offset(1, self.world_size - 1) + self.meta_slab_bytes

    def header(self) -> list[int]:
        return [TOKEN_MAGIC, TOKEN_VERSION, self.world_size, self.slab_rows, self.row_bytes, self.weight_bytes, 0,
                0]
