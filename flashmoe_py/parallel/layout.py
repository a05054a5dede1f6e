"""Byte layout of one rank's segment of the symmetric heap, shared by every one-sided transport.

Every rank allocates a segment of the same size and layout (hence "symmetric"): a sender computes the
address of its packet at a receiver from the receiver's segment base and these offsets alone, with no
handshake. The layout is what the persistent fused kernel reuses (DESIGN §6): a device program puts
rows and signals per (peer, expert) packet at these offsets, peer segments addressed as int64 base
addresses (`SymmetricHeap.peer_address`) cast to pointers.

Segment of rank r (offsets in bytes from the segment base; every block starts 128-byte aligned)::

    header      8 int64        MAGIC, VERSION, W, E_local, slab_rows, row_bytes, seq[DISPATCH], seq[RETURN]
    signals[0]  [W, E_local]   int64  DISPATCH signal of packet (src, e): written by rank src only
    signals[1]  [W, E_local]   int64  RETURN signal of packet (src, e): written by rank src only
    data[0]     [W, slab_rows, row_bytes]  DISPATCH receive slabs, one per source rank
    data[1]     [W, slab_rows, row_bytes]  RETURN receive slabs, one per source rank

Two regions, one per direction of an exchange:
- DISPATCH: token rows travelling to the rank that owns their expert (forward), and gradients of the
  expert outputs travelling the same way (backward). `e` is the receiver's local expert.
- RETURN: expert outputs travelling back to the token's rank (forward), and gradients of the dispatched
  rows (backward). `e` is the sender's local expert.
Exchanges alternate DISPATCH, RETURN, DISPATCH, RETURN... on every rank (forward: dispatch then return;
backward: the reverse exchanges in the same region order), which is what makes reuse safe without a
reset: a rank writes its next packet into a slab only after it has received the reply to its previous
one, and the reply is sent only after the receiver copied the previous packet out.

A packet (src -> dst, local expert e) is `count` rows of row_bytes each. Within the source's slab at
the receiver, packets lie in expert order with no gaps: packet e starts at row sum(count[e'] for e' < e).
Only those rows cross the wire (no padding to slab_rows or to a capacity).

A signal word is `(seq << 32) | count`, stored with release semantics after the packet's rows, and read
with acquire semantics before them. `seq` is the sender's launch number for that region (1, 2, ...,
kept in header seq[region] of the sender's own segment); every packet of a launch is signalled, empty
ones with count 0, so the receiver knows each (src, e) slot is complete. A receiver waits for
`word >> 32 == seq`: there is no reset between launches, and a replay (CUDA graph) only needs the
sequence words to advance. `seq` stays below 2^31.

Sizing: a rank may pass at most `max_tokens_per_rank` tokens, each with top_k assignments, so one source
sends a receiver at most `max_tokens_per_rank * top_k` rows: that is `slab_rows` (a router never picks an
expert twice, but caller-supplied routing may). More tokens is an error before anything is written, and
every packet is checked against the slab (never an out-of-bounds put).
"""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = 0x464D4F45  # "FMOE"
VERSION = 1
HEADER_WORDS = 8
SIGNAL_BYTES = 8
ALIGN = 128
SEQ_LIMIT = 1 << 31

DISPATCH, RETURN = 0, 1
REGION_NAMES = ("dispatch", "return")

# Header word indices.
H_MAGIC, H_VERSION, H_WORLD, H_LOCAL_EXPERTS, H_SLAB_ROWS, H_ROW_BYTES, H_SEQ0 = range(7)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class HeapLayout:
    """Offsets of DESIGN §5's symmetric heap; see the module docstring for the picture."""

    world_size: int
    num_local_experts: int
    slab_rows: int  # rows one source may put into one region of one receiver
    row_bytes: int  # hidden_size * itemsize of the exchanged dtype

    @classmethod
    def for_layer(cls, world_size: int, num_local_experts: int, top_k: int, max_tokens_per_rank: int,
                  hidden_size: int, itemsize: int) -> HeapLayout:
        return cls(world_size, num_local_experts, max_tokens_per_rank * top_k, hidden_size * itemsize)

    @property
    def signals_bytes(self) -> int:
        return _align(self.world_size * self.num_local_experts * SIGNAL_BYTES)

    @property
    def slab_bytes(self) -> int:
        return _align(self.slab_rows * self.row_bytes)

    def seq_offset(self, region: int) -> int:
        return (H_SEQ0 + region) * 8

    def signal_offset(self, region: int, src: int, expert: int = 0) -> int:
        """Byte offset of the signal word of packet (src, expert) in `region`."""
        return _align(HEADER_WORDS * 8) + region * self.signals_bytes + \
            (src * self.num_local_experts + expert) * SIGNAL_BYTES

    def data_offset(self, region: int, src: int) -> int:
        """Byte offset of the receive slab of rank `src` in `region`."""
        base = _align(HEADER_WORDS * 8) + 2 * self.signals_bytes
        return base + (region * self.world_size + src) * self.slab_bytes

    @property
    def size(self) -> int:
        return self.data_offset(1, self.world_size - 1) + self.slab_bytes

    def header(self) -> list[int]:
        return [MAGIC, VERSION, self.world_size, self.num_local_experts, self.slab_rows, self.row_bytes, 0, 0]
