"""Expert-parallel pieces that need no second process: heap layouts, protocol checks on a recording heap,
the per-(token, rank) expert step (slot packing, the ordered local reduction, gradients through one-rank
exchanges, rounds), the expert-major reordering, the native signal words, transport selection, and (on a GPU)
nvshmem with one rank putting to itself."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

import flashmoe_py as fm
from flashmoe_py import reference
from flashmoe_py.parallel import (
    ExchangeTimeout,
    HeapLayout,
    HeapOverflow,
    SymmetricHeap,
    TransportUnavailable,
    transports,
)
from flashmoe_py.parallel.forward import (
    exchange_experts,
    exchange_token_rows,
    expert_major,
    local_partials,
    ordered_sum,
    pack_slots,
    unpack_slots,
)
from flashmoe_py.parallel.layout import ALIGN, DISPATCH, MORE_FLAG, RETURN, SIGNAL_BYTES, TokenLayout
from flashmoe_py.parallel.protocol import OneSidedExchange
from tests.helpers import random_params


def test_layout_blocks_are_aligned_disjoint_and_fit():
    # the fused kernel's HeapLayout: a row per (token, rank), top_k records per row at most
    lay = HeapLayout.for_layer(world_size=3, num_local_experts=5, top_k=2, max_tokens_per_rank=7, hidden_size=6,
                               itemsize=2)
    assert (lay.slab_rows, lay.row_bytes, lay.weight_bytes, lay.slab_records) == (7, 12, 4, 14)
    blocks = [(lay.signal_offset(DISPATCH, 0), lay.signal_offset(DISPATCH, 2, 4) + SIGNAL_BYTES),
              (lay.signal_offset(RETURN, 0), lay.signal_offset(RETURN, 2) + SIGNAL_BYTES)]
    for src in range(3):
        for region in (DISPATCH, RETURN):
            blocks.append((lay.data_offset(region, src), lay.data_offset(region, src) + lay.slab_rows * lay.row_bytes))
        blocks.append((lay.record_offset(src, 0), lay.record_offset(src, 0) + lay.slab_records * lay.weight_bytes))
        blocks.append((lay.record_offset(src, 1), lay.record_offset(src, 1) + lay.slab_records * 4))
    assert all(start % ALIGN == 0 for start, _ in blocks)
    blocks.sort()
    assert blocks[0][0] >= 8 * 8, "the header is overwritten"
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(blocks, blocks[1:])), blocks
    assert blocks[-1][1] <= lay.size
    words = {lay.signal_offset(DISPATCH, s, e) for s in range(3) for e in range(5)} | \
        {lay.signal_offset(RETURN, s) for s in range(3)}
    assert len(words) == 18, "two packets share a signal word"
    assert HeapLayout.for_layer(3, 5, 2, 7, 6, 8).weight_bytes == 8  # fp64 layers carry fp64 weights


def test_token_layout_blocks_are_aligned_disjoint_and_fit():
    lay = TokenLayout.for_layer(world_size=3, top_k=4, max_tokens_per_rank=7, hidden_size=6, itemsize=2,
                                weight_itemsize=4)
    assert (lay.slab_rows, lay.row_bytes, lay.record_columns, lay.slab_records) == (7, 12, (4, 4), 28), \
        "one row per token, at most k (weight, id) records per row"
    blocks = []
    for region in (DISPATCH, RETURN):
        blocks.append((lay.signal_offset(region, 0), lay.signal_offset(region, 2) + SIGNAL_BYTES))
        for src in range(3):
            blocks.append((lay.data_offset(region, src), lay.data_offset(region, src) + lay.slab_rows * lay.row_bytes))
            for col, m in enumerate(lay.record_columns):
                blocks.append((lay.meta_offset(region, src, col),
                               lay.meta_offset(region, src, col) + lay.slab_records * m))
    assert all(start % ALIGN == 0 for start, _ in blocks)
    blocks.sort()
    assert blocks[0][0] >= 8 * 8, "the header is overwritten"
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(blocks, blocks[1:])), blocks
    assert blocks[-1][1] <= lay.size
    assert lay.seq_offset(RETURN) < 8 * 8 and len(lay.header()) == 8
    with pytest.raises(ValueError, match="slab_rows"):
        TokenLayout(world_size=2, slab_rows=MORE_FLAG, row_bytes=8, weight_bytes=4, slab_records=8)


class RecordingHeap(SymmetricHeap):
    """A heap that records puts and signals and answers waits from a script (no other process)."""

    def __init__(self, layout, rank, world_size, missing=-1, seen_seq=None, seen_count=0):
        super().__init__(layout, rank, world_size)
        self.calls, self.missing, self.seen_seq, self.seen_count = [], missing, seen_seq, seen_count
        self.mem = torch.zeros(layout.size, dtype=torch.uint8)

    def put(self, peer, offset, data):
        self.calls.append(("put", peer, offset, data.numel() * data.element_size()))

    def signal(self, peer, offset, words):
        self.calls.append(("signal", peer, offset, words.tolist()))

    def wait(self, offset, n, seq, timeout_s):
        seq_seen = seq if self.seen_seq is None else self.seen_seq
        return self.missing, torch.full((n,), (seq_seen << 32) | self.seen_count, dtype=torch.int64)

    def local(self, offset, nbytes):
        return self.mem[offset:offset + nbytes]


def test_overflowing_packet_is_refused_before_anything_is_written(seed):
    lay = TokenLayout(world_size=2, slab_rows=3, row_bytes=4 * 8, weight_bytes=8, slab_records=4)
    heap = RecordingHeap(lay, rank=0, world_size=2)
    ex = OneSidedExchange(heap, lay, timeout_s=1.0)
    with pytest.raises(HeapOverflow, match="4 rows for rank 1 exceed the heap's 3 rows"):
        ex.run(DISPATCH, torch.randn(5, 4, dtype=torch.float64), torch.tensor([1, 4]))
    with pytest.raises(HeapOverflow, match="5 routing records for rank 1 exceed the heap's 4"):
        ex.run(DISPATCH, torch.randn(3, 4, dtype=torch.float64), torch.tensor([1, 2]),
               [torch.zeros(6, 8, dtype=torch.uint8), torch.zeros(6, 4, dtype=torch.uint8)], [1, 5])
    with pytest.raises(ValueError, match="records: expected up to 2 uint8 columns"):
        ex.run(DISPATCH, torch.randn(2, 4, dtype=torch.float64), torch.tensor([1, 1]),
               [torch.zeros(2, 9, dtype=torch.uint8)], [1, 1])
    with pytest.raises(ValueError, match="records: expected up to 2 uint8 columns"):
        ex.run(DISPATCH, torch.randn(2, 4, dtype=torch.float64), torch.tensor([1, 1]),
               [torch.zeros(2, 8, dtype=torch.uint8)], [1, 2])
    assert heap.calls == [] and ex.seq == [0, 0], "something was written before the checks"


def _records(codes, weight_dtype=torch.float32):
    """Record columns [weights uint8 [n, w], codes uint8 [n, 4]] with random weights and the given int32 codes."""
    w = torch.randn(len(codes), dtype=weight_dtype).view(torch.uint8).view(len(codes), -1)
    return [w, torch.tensor(codes, dtype=torch.int32).view(torch.uint8).view(len(codes), 4)]


def test_exchange_puts_rows_and_records_then_one_signal_per_peer(seed):
    lay = TokenLayout(world_size=2, slab_rows=8, row_bytes=4 * 8, weight_bytes=4, slab_records=24)
    heap = RecordingHeap(lay, rank=0, world_size=2, seen_count=2)
    # what rank 1 left in this rank's record slab: 2 rows (of 2 and 1 records), then stale records
    peer_records = _records([2 << 1, 4 << 1 | 1, 0 << 1 | 1, 5 << 1 | 1, 7 << 1 | 1])
    for col, c in enumerate(peer_records):
        at = lay.meta_offset(DISPATCH, 1, col)
        heap.mem[at:at + c.numel()] = c.reshape(-1)
    ex = OneSidedExchange(heap, lay, timeout_s=1.0)
    records = _records([1 << 1 | 1, 3 << 1, 6 << 1 | 1, 2 << 1 | 1, 0 << 1 | 1, 1 << 1 | 1, 4 << 1 | 1, 0 << 1 | 1])
    res = ex.run(DISPATCH, torch.randn(7, 4, dtype=torch.float64), torch.tensor([3, 4]), records, [4, 4])
    assert heap.calls == [("put", 1, lay.data_offset(DISPATCH, 0), 4 * 32),
                          ("put", 1, lay.meta_offset(DISPATCH, 0, 0), 4 * 4),
                          ("put", 1, lay.meta_offset(DISPATCH, 0, 1), 4 * 4),
                          ("signal", 1, lay.signal_offset(DISPATCH, 0), [(1 << 32) | 4])]
    assert res.bytes_sent == 4 * 32 + 4 * 8 + SIGNAL_BYTES, "rows, their records and one word: nothing else"
    assert res.counts.tolist() == [3, 2] and res.rows.shape == (5, 4)
    assert res.record_counts.tolist() == [4, 3], "the peer's records are the prefix that closes its 2 rows"
    for got, mine, peer in zip(res.records, records, peer_records):
        assert torch.equal(got[:4], mine[:4]), "own records never touch the heap"
        assert torch.equal(got[4:], peer[:3])
    assert not res.more
    assert heap.read_word(lay.seq_offset(DISPATCH)) == 1 and heap.read_word(lay.seq_offset(RETURN)) == 0
    back = [torch.randn(4 + 3).view(torch.uint8).view(7, 4)]
    res = ex.run(RETURN, torch.randn(7, 4, dtype=torch.float64), torch.tensor([3, 4]), back, [4, 3],
                 recv_records=[4, 2], more=True)
    assert heap.calls[-1] == ("signal", 1, lay.signal_offset(RETURN, 0), [(1 << 32) | MORE_FLAG | 4])
    assert res.more and res.record_counts.tolist() == [4, 2], "known counts are taken as given"
    assert res.bytes_sent == 4 * 32 + 3 * 4 + SIGNAL_BYTES
    ex.run(DISPATCH, torch.randn(7, 4, dtype=torch.float64), torch.tensor([3, 4]))
    assert heap.calls[-1][3][0] >> 32 == 2, "the second dispatch must carry sequence 2"


def test_a_peer_saying_more_is_seen_by_every_receiver():
    lay = TokenLayout(world_size=3, slab_rows=4, row_bytes=8, weight_bytes=4, slab_records=8)
    heap = RecordingHeap(lay, rank=2, world_size=3, seen_count=MORE_FLAG | 1)
    res = OneSidedExchange(heap, lay, timeout_s=1.0).run(DISPATCH, torch.zeros(0, 1, dtype=torch.float64),
                                                          torch.zeros(3, dtype=torch.int64))
    assert res.more and res.counts.tolist() == [1, 1, 0], "the flag is not a row count"


def test_timeout_names_rank_peer_and_slot_and_poisons_the_exchange():
    lay = TokenLayout(world_size=3, slab_rows=4, row_bytes=8, weight_bytes=4, slab_records=8)
    heap = RecordingHeap(lay, rank=1, world_size=3, missing=0, seen_seq=0)
    ex = OneSidedExchange(heap, lay, timeout_s=0.25)
    with pytest.raises(ExchangeTimeout, match=r"rank 1: timed out after 0.25 s waiting for peer 0: dispatch slot "
                                              r"\(src=0: its packet of rows for rank 1\) expected sequence 1, saw 0"):
        ex.run(DISPATCH, torch.zeros(0, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="an earlier exchange failed"):
        ex.run(RETURN, torch.zeros(0, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [0, 1, 6])
def test_routing_records_pack_and_unpack(dtype, rows, seed):
    weights = torch.randn(rows, 3, dtype=dtype)
    ids = torch.randint(-1, 7, (rows, 3), dtype=torch.int32)
    if rows:
        ids[:, 1] = torch.randint(0, 7, (rows,), dtype=torch.int32)  # every row has a record (as every pair does)
    records, hits = pack_slots(weights, ids)
    valid = ids >= 0
    assert [(c.dtype, tuple(c.shape)) for c in records] == [(torch.uint8, (int(valid.sum()), dtype.itemsize)),
                                                            (torch.uint8, (int(valid.sum()), 4))], \
        "one record per assignment, none for the slots that are not the receiver's"
    assert hits.tolist() == valid.sum(1).tolist()
    got_w, got_ids, record_at = unpack_slots(records, rows, 3, dtype)
    for r in range(rows):  # a row's records fill its first slots, in slot order
        n = int(valid[r].sum())
        assert torch.equal(got_ids[r, :n], ids[r][valid[r]]) and (got_ids[r, n:] == -1).all()
        assert torch.equal(got_w[r, :n], weights[r][valid[r]]) and (got_w[r, n:] == 0).all()
    assert torch.equal(got_w.reshape(-1)[record_at], weights[valid]), "record_at names each record's slot"
    if rows:
        with pytest.raises(RuntimeError, match="a corrupt packet"):
            unpack_slots(records, rows + 1, 3, dtype)


def test_ordered_sum_adds_in_position_order_and_is_repeatable(seed):
    values = torch.randn(7, 5)
    row = torch.tensor([2, 0, 2, 1, 0, 2, 4])
    pos = torch.tensor([1, 0, 0, 0, 2, 2, 0])
    out = ordered_sum(values, row, pos, 5, 3)
    want = torch.zeros(5, 5)
    for i in sorted(range(7), key=lambda i: (row[i], pos[i])):
        want[row[i]] = want[row[i]] + values[i]
    assert torch.equal(out, want) and torch.equal(ordered_sum(values, row, pos, 5, 3), out)
    assert not out[3].any(), "a row without values is zero"


def _check_vjp(f, inputs: tuple, trials: int = 3, eps: float = 1e-6) -> None:
    """v . J u from one backward per forward against central differences along random u (gradcheck itself runs
    backward twice through one forward, which an exchange's backward refuses: its exchanges happen once)."""
    for _ in range(trials):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = f(*leaves)
        v = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, v)
        us = [torch.randn_like(t) for t in inputs]
        with torch.no_grad():
            plus = f(*[t + eps * u for t, u in zip(inputs, us)])
            minus = f(*[t - eps * u for t, u in zip(inputs, us)])
        numeric = float(((plus - minus) / (2 * eps) * v).sum())
        analytic = float(sum((g * u).sum() for g, u in zip(grads, us)))
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), (numeric, analytic)


def _one_rank_exchange(slab_rows=16, hidden=6, top_k=3, dtype=torch.float64):
    lay = TokenLayout.for_layer(1, top_k, slab_rows, hidden, dtype.itemsize, 8 if dtype == torch.float64 else 4)
    return OneSidedExchange(RecordingHeap(lay, rank=0, world_size=1), lay, timeout_s=1.0)


def test_local_partials_weight_and_sum_a_rows_local_experts_in_slot_order(seed):
    cfg = fm.MoEConfig(hidden_size=6, ffn_hidden_size=4, num_experts=3, top_k=3, bias=True)
    p = fm.MoEParams.from_mapping(random_params(cfg, torch.float32))
    rows = torch.randn(5, 6)
    ids = torch.tensor([[2, -1, 0], [-1, -1, -1], [1, 2, 0], [0, -1, -1], [-1, 1, -1]], dtype=torch.int32)
    weights = torch.rand(5, 3) + 0.1
    out = local_partials(rows, ids, weights, reference.expert_ffn, p, cfg.activation_key)
    experts = reference.per_expert(p)
    want = torch.zeros(5, 6)
    for i in range(5):
        for j in range(3):  # ascending slot order, in fp32
            if ids[i, j] >= 0:
                y = reference.expert_block(rows[i:i + 1], experts[int(ids[i, j])], cfg.activation_key)
                want[i] = want[i] + weights[i, j] * y[0]
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert not out[1].any(), "a row with no local slot gives zero"
    assert torch.equal(out, local_partials(rows, ids, weights, reference.expert_ffn, p, cfg.activation_key))
    with pytest.raises(RuntimeError, match="local expert ids"):
        local_partials(rows, ids + 2, weights, reference.expert_ffn, p, cfg.activation_key)


def test_token_rank_rows_gradients_at_one_rank(seed):
    # dispatch -> local partials -> return at W=1 (the exchanges copy to self), differentiated against autograd's
    # numerical gradients: rows, routing weights (they return to the token's rank) and expert weights
    cfg = fm.MoEConfig(hidden_size=6, ffn_hidden_size=4, num_experts=3, top_k=3, activation="gelu")
    p = random_params(cfg, torch.float64)
    ex = _one_rank_exchange()
    ids = torch.tensor([[2, -1, 0], [1, 2, 0], [0, -1, -1], [-1, 1, -1]], dtype=torch.int32)
    rows = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    weights = (torch.rand(4, 3, dtype=torch.float64) + 0.1).masked_fill(ids < 0, 0).requires_grad_()
    w_up, w_down = (p[n].clone().requires_grad_() for n in ("w_up", "w_down"))

    def f(rows, weights, w_up, w_down):
        return exchange_token_rows(rows, weights, ids, torch.tensor([4]), ex, reference.expert_ffn, "gelu", w_up,
                                   w_down)[0]

    _check_vjp(f, (rows, weights, w_up, w_down))
    assert ex.seq[DISPATCH] == ex.seq[RETURN] > 0, "every forward and backward ran both exchanges"


def test_exchange_experts_sends_rows_beyond_a_slab_in_rounds(seed):
    # per-(token, expert) rows (the fused backward's recompute) with 5 rows for a 2-row slab: three rounds, the
    # outputs are the experts' own (weight 1: bit for bit), and the gradients are right
    cfg = fm.MoEConfig(hidden_size=6, ffn_hidden_size=4, num_experts=3, top_k=2)
    p = random_params(cfg, torch.float64)
    ex = _one_rank_exchange(slab_rows=2)
    counts = torch.tensor([[2, 0, 3]])
    rows = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w_up, w_down = (p[n].clone().requires_grad_() for n in ("w_up", "w_down"))
    y, nbytes = exchange_experts(rows, counts, ex, reference.expert_ffn, "swiglu", w_up, w_down)
    assert ex.seq == [3, 3] and nbytes == 0, "three rounds, nothing to other ranks"
    experts = reference.per_expert(fm.MoEParams(router_weight=None, w_up=w_up, w_down=w_down))
    want = torch.cat([reference.expert_block(rows[:2], experts[0], "swiglu"),
                      reference.expert_block(rows[2:], experts[2], "swiglu")])
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)

    def f(rows, w_up, w_down):
        return exchange_experts(rows, counts, ex, reference.expert_ffn, "swiglu", w_up, w_down)[0]

    _check_vjp(f, (rows, w_up, w_down))


def test_expert_major_permutation(seed):
    counts = torch.randint(0, 4, (3, 4))
    counts[1, 2] = 0
    perm, per_expert = expert_major(counts)
    src_major = [(s, e) for s in range(3) for e in range(4) for _ in range(int(counts[s, e]))]
    exp_major = [(s, e) for e in range(4) for s in range(3) for _ in range(int(counts[s, e]))]
    assert [src_major[i] for i in perm.tolist()] == exp_major
    assert sorted(perm.tolist()) == list(range(len(src_major)))
    assert per_expert.tolist() == counts.sum(0).tolist()


def _native():
    try:
        from flashmoe_py import _C
    except ImportError:
        pytest.fail("flashmoe_py._C is not built: `pip install --no-build-isolation -e .` builds it")
    return _C


def test_native_signal_release_then_acquire_and_timeout():
    c = _native()
    words = torch.zeros(4, dtype=torch.int64)
    addr = words.data_ptr()

    def producer():
        time.sleep(0.05)
        c.store_release(addr, torch.tensor([(3 << 32) | 5, (3 << 32) | 0, (3 << 32) | 7, (3 << 32) | 1]))

    t = threading.Thread(target=producer)
    t.start()
    missing, seen = c.wait_signals(addr, 4, 3, 5.0)
    t.join()
    assert missing == -1 and (seen & 0xFFFFFFFF).tolist() == [5, 0, 7, 1]
    start = time.monotonic()
    missing, seen = c.wait_signals(addr, 4, 4, 0.2)
    assert missing == 0 and 0.15 < time.monotonic() - start < 5.0
    with pytest.raises(RuntimeError, match="seq"):
        c.wait_signals(addr, 4, 0, 1.0)
    with pytest.raises(RuntimeError, match="not 8-byte aligned"):
        c.store_release(addr + 4, torch.tensor([1]))


def test_nvshmem_is_finalised_once_at_exit_after_freeing_live_heaps(monkeypatch):
    # _finalize is what atexit runs once NVSHMEM was initialised: live symmetric tensors first, then finalize,
    # exactly once; never raising (the process is exiting). A stand-in nvshmem.core records the calls.
    import types

    import flashmoe_py.parallel.nvshmem as nv

    calls = []
    fake_core = types.SimpleNamespace(finalize=lambda: calls.append("finalize"))
    monkeypatch.setitem(sys.modules, "nvshmem", types.ModuleType("nvshmem"))
    monkeypatch.setitem(sys.modules, "nvshmem.core", fake_core)
    sys.modules["nvshmem"].core = fake_core

    class Heap:
        def close(self):
            calls.append("close")
            nv._live_heaps.discard(self)

    heap = Heap()
    nv._live_heaps.add(heap)
    monkeypatch.setattr(nv, "_runtime", {"initialized": False, "finalized": False})
    nv._finalize()
    assert calls == [], "finalize without an init"
    nv._runtime["initialized"] = True
    nv._finalize()
    nv._finalize()
    assert calls == ["close", "finalize"]
    fake_core.finalize = lambda: 1 / 0
    nv._runtime["finalized"] = False
    nv._finalize()  # reports, does not raise


def test_nvshmem_transport_imports_and_says_it_needs_cuda_on_cpu():
    import flashmoe_py.parallel.nvshmem as nv

    assert "needs CUDA" in nv.unavailable_reason(torch.device("cpu"))
    with pytest.raises(TransportUnavailable, match="transport='nvshmem' cannot run on cpu: needs CUDA"):
        transports.resolve("nvshmem", "cpu")
    assert transports.resolve("auto", "cpu") == "shm"


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "PMIX_RANK")
TORCH_ENV = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("case", ["torchrun", "ompi", "ompi+torch-env", "pmi+torch-env", "pmix+torch-env", "none"])
def test_launch_env_asks_mpis_own_variables_first(case, monkeypatch):
    # An mpirun job that also exports RANK/WORLD_SIZE (torch's env:// recipe under mpirun) is an mpirun job: the
    # mpi transport must run there. The MPI ranks win over RANK; MASTER_ADDR/PORT are kept for the rendezvous.
    from flashmoe_py import env
    from flashmoe_py.parallel import mpi
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    launcher_vars = {"torchrun": {}, "none": {}, "ompi": {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                                                          "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
                     "pmi": {"PMI_RANK": "1", "PMI_SIZE": "2"}, "pmix": {"PMIX_RANK": "1"}}[case.split("+")[0]]
    for name, value in {**(TORCH_ENV if case == "torchrun" or "torch-env" in case else {}), **launcher_vars}.items():
        monkeypatch.setenv(name, value)
    got = env.launch_env()
    if case == "none":
        assert got == env.LaunchEnv(None, None, None, None, None, None)
        assert "not started by mpirun" in mpi.unavailable_reason(torch.device("cpu"))
        assert "PMIX_RANK" in mpi.unavailable_reason(torch.device("cpu"))
        return
    want = {"torchrun": ("torchrun", 3, 4, 3), "ompi": ("mpirun", 1, 2, 1), "pmi": ("mpirun", 1, 2, None),
            "pmix": ("mpirun", 1, None, None)}[case.split("+")[0]]  # PMIx exports no size: init asks MPI
    assert (got.launcher, got.rank, got.world_size, got.local_rank) == want, got
    addr = TORCH_ENV["MASTER_ADDR"] if case == "torchrun" or "torch-env" in case else None
    assert got.master_addr == addr
    if got.launcher == "mpirun":
        assert mpi.unavailable_reason(torch.device("cpu")) is None
    else:
        assert "not started by mpirun" in mpi.unavailable_reason(torch.device("cpu"))


def test_process_group_without_torch_distributed_is_a_clear_error():
    if torch.distributed.is_initialized():
        pytest.skip("this process already has a default process group")
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialized"):
        fm.FusedMoE(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2, process_group=object())
    with pytest.raises(ValueError, match="only meaningful with a process_group"):
        fm.FusedMoE(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2, timeout_s=3.0)


def _one_gpu_layer(transport: str, tmp_path, cfg, **kw):
    """A one-rank expert-parallel layer on the GPU with fresh random parameters -> (layer, params); skips where the
    transport cannot run."""
    import torch.distributed as dist

    if transport == "nvshmem":
        reason = transports.unavailable_reason("nvshmem", torch.device("cuda"))
        if reason:
            pytest.skip(reason)
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    params = random_params(cfg, torch.float32, device="cuda")
    layer = fm.FusedMoE(cfg, process_group=dist.group.WORLD, transport=transport, device="cuda", dtype=torch.float32,
                        **kw)
    with torch.no_grad():
        for name, t in params.items():
            getattr(layer, name).copy_(t)
    return layer, params


def _matches_reference(x, y, params, cfg) -> None:
    """y = layer(x) with y.square().sum() already backpropagated: out and x.grad equal the reference's."""
    from tests.tolerances import assert_close

    x_ref = x.detach().clone().requires_grad_()
    ref = fm.moe(x_ref, params, cfg, backend="reference").out
    ref.square().sum().backward()
    tol = "tf32" if torch.backends.cuda.matmul.allow_tf32 else torch.float32
    assert_close(y, ref, tol, "out")
    assert_close(x.grad, x_ref.grad, tol, "x.grad")


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["nvshmem", "alltoall"])
def test_one_gpu_rank_puts_to_itself_and_matches_reference(transport, tmp_path, seed):
    # World size 1 on one GPU: the protocol runs end to end (heap, signals, waits) with the only peer being self.
    cfg = fm.MoEConfig(hidden_size=64, ffn_hidden_size=32, num_experts=8, top_k=2)
    layer, params = _one_gpu_layer(transport, tmp_path, cfg)
    x = torch.randn(37, 64, device="cuda", requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    _matches_reference(x, y, params, cfg)
    assert layer.stats.bytes_sent == 0, "nothing crosses the wire with one rank"


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_nvshmem_heap_put_signal_wait_to_self(tmp_path, seed):
    # The device-side primitives on one GPU: a put and a release signal to this rank's own segment, an
    # acquire wait that sees them, and a wait for a sequence nobody sends that times out on its slot.
    import torch.distributed as dist

    reason = transports.unavailable_reason("nvshmem", torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    from flashmoe_py.parallel.nvshmem import NvshmemHeap

    lay = HeapLayout(world_size=1, num_local_experts=3, slab_rows=16, row_bytes=32 * 4)
    heap = NvshmemHeap(lay, dist.group.WORLD, torch.device("cuda", torch.cuda.current_device()))
    rows = torch.randn(5, 32, device="cuda")
    heap.put(0, lay.data_offset(DISPATCH, 0), rows)
    heap.signal(0, lay.signal_offset(DISPATCH, 0), torch.tensor([(1 << 32) | 2, (1 << 32) | 0, (1 << 32) | 3]))
    missing, seen = heap.wait(lay.signal_offset(DISPATCH, 0), 3, 1, 5.0)
    assert missing == -1 and (seen & 0xFFFFFFFF).tolist() == [2, 0, 3]
    got = heap.local(lay.data_offset(DISPATCH, 0), 5 * 32 * 4).view(torch.float32).view(5, 32)
    assert torch.equal(got, rows)
    start = time.monotonic()
    missing, _ = heap.wait(lay.signal_offset(RETURN, 0), 3, 1, 0.2)
    assert missing == 0 and time.monotonic() - start < 5.0
    heap.close()


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_triton_over_nvshmem_never_synchronises(tmp_path, seed):
    # World size 1 on one GPU, the triton backend over nvshmem: the device-initiated exchanges (kernels/exchange.py)
    # put into and collect from this rank's own segment. After the call that allocates the heap, a forward and a
    # backward run under torch.cuda.set_sync_debug_mode("error"), which raises at any synchronising CUDA call, report
    # host_syncs == 0, and equal the reference.
    cfg = fm.MoEConfig(hidden_size=64, ffn_hidden_size=32, num_experts=8, top_k=3, bias=True)
    layer, params = _one_gpu_layer("nvshmem", tmp_path, cfg, backend="triton", max_tokens_per_rank=64)
    with torch.no_grad():
        layer(torch.randn(37, 64, device="cuda"))  # allocates the heap: a barrier, counted
    assert layer.stats.host_syncs == 1
    x = torch.randn(37, 64, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
        y.square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.stats.host_syncs == 0
    _matches_reference(x, y, params, cfg)
    assert int(layer.stats.bytes_sent) == 0, "nothing crosses the wire with one rank"


def test_device_exchange_refuses_slot_counts_past_int32():
    # The collect kernel indexes received slots (W * max_tokens_per_rank * top_k) in int32: a heap with more is
    # refused at construction, naming the argument, before a kernel could wrap an index.
    from flashmoe_py.parallel.device_exchange import DeviceExchange, _PlanHeap

    def exchange(tokens):
        lay = TokenLayout.for_layer(world_size=8, top_k=8, max_tokens_per_rank=tokens, hidden_size=8, itemsize=2,
                                    weight_itemsize=4)
        return DeviceExchange(OneSidedExchange(_PlanHeap(lay, 0, 8), lay, timeout_s=1.0))

    assert exchange(2**25 - 1).layout.slab_records == 8 * (2**25 - 1), "the largest that fits is accepted"
    with pytest.raises(ValueError, match=r"max_tokens_per_rank: 33554432 tokens x top_k x 8 ranks = 2147483648"):
        exchange(2**25)
