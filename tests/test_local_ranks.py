"""Several expert-parallel ranks in one process (flashmoe_py/parallel/local.py, DESIGN §7.5): the fused kernel's
cross-rank protocol with every rank's persistent grid running at the same time, over one heap allocation
addressed through peer offsets.

Without a CUDA device: each rank is a thread, each rank's launch runs its programs as concurrent threads under
TRITON_INTERPRET=1 (tests/conftest.py sets it). With one: each rank's kernel on its own
CUDA stream, the grid split between the ranks (`sms`), compiled. The same tests, the same checks: every rank's
output equals the single-process reference on its tokens, the bytes each rank put are the exact minimum, and
more than one program of every rank's grid claimed tasks.
"""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
pytest.importorskip("triton")

import flashmoe_py as fm  # noqa: E402
from flashmoe_py.parallel import HeapOverflow  # noqa: E402
from flashmoe_py.parallel.local import LocalRanks  # noqa: E402
from tests.helpers import fused_wire_bytes, random_params  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("poison")]
H, FFN, E = 24, 20, 8
EXPERT_TENSORS = ("w_up", "w_down", "b_up", "b_down")


def _split(params: dict, world: int, rank: int) -> dict:
    el = E // world
    return {n: (t[rank * el:(rank + 1) * el] if n in EXPERT_TENSORS else t) for n, t in params.items()}


def _check(ranks: LocalRanks, cfg, params: dict, xs: list, dtype, first: bool) -> list:
    """One forward of every rank against the reference. The first forward of a state waits for every rank before
    its launch: a host wait on CPU (the ranks are threads), none on a GPU (one thread launches them all)."""
    world = ranks.world
    syncs = 1 if first and not HAS_CUDA else 0
    outs = ranks.forward(xs, [_split(params, world, r) for r in range(world)])
    sizes = [x.shape[0] for x in xs]
    ref = fm.moe(torch.cat(xs), params, cfg, backend="reference")
    ids = ref.routing.topk_ids.split(sizes)
    for r, (got, want) in enumerate(zip(outs, ref.out.split(sizes))):
        assert got.backend == "fused" and got.stats.kernel_launches == 1 and got.stats.host_syncs == syncs
        assert_close(got.out, want, dtype, f"rank {r} out")
        assert torch.equal(got.routing.topk_ids, ids[r]), f"rank {r}: chosen experts differ"
        assert int(got.stats.bytes_sent) == fused_wire_bytes(list(ids), E // world, r, H, xs[0].element_size())
        claims = got.stats.tasks_per_program
        assert int((claims > 0).sum()) > 1, f"rank {r}: one program did all the work: {claims.tolist()}"
    return outs


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_in_one_process_match_reference(world, seed):
    # Token counts per rank: uneven, a rank without tokens, and on the second forward routing that leaves experts
    # without rows (empty packets); the same heap serves both forwards (sequence numbers, no reset).
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2, bias=True)
    params = {n: t.to(DEVICE) for n, t in random_params(cfg, torch.float64).items()}
    ranks = LocalRanks(cfg, world, device=DEVICE, max_tokens_per_rank=16, timeout_s=30)
    sizes = [13, 0, 9, 4][:world]
    xs = [torch.randn(t, H, dtype=torch.float64, device=DEVICE) for t in sizes]
    _check(ranks, cfg, params, xs, torch.float64, first=True)
    # Experts 0-3 tie at logit 0 for every token; ties go to the lower index, so 2 and 3 never get a row.
    skewed = dict(params, router_weight=params["router_weight"].clone())
    skewed["router_weight"][: E // 2] = 0
    xs = [torch.randn(t, H, dtype=torch.float64, device=DEVICE) for t in ([3, 7, 0, 16][:world])]
    outs = _check(ranks, cfg, skewed, xs, torch.float64, first=False)
    per_expert = sum(o.stats.tokens_per_expert.cpu() for o in outs)
    assert int((per_expert == 0).sum()) > 0, f"every expert got rows: {per_expert.tolist()}"
    state, = ranks.ranks[0].backend_state.values()
    assert int(state.sync[0]) == 2, "the epoch counts the launches"
    ranks.close()


def test_ranks_in_one_process_bf16(seed):
    # bf16 rows on the heap, routing given (from the fp64 reference) so a low-precision near-tie cannot choose
    # differently in the two paths.
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2, activation="geglu")
    params = {n: t.to(DEVICE, torch.bfloat16) for n, t in random_params(cfg, torch.float64).items()}
    xs = [torch.randn(t, H, dtype=torch.float64).to(DEVICE, torch.bfloat16) for t in (11, 6)]
    routed = fm.moe(torch.cat(xs).double(), {n: t.double() for n, t in params.items()}, cfg,
                    backend="reference").routing
    ids, weights = routed.topk_ids.split([11, 6]), routed.topk_weights.float().split([11, 6])
    ranks = LocalRanks(cfg, 2, device=DEVICE, max_tokens_per_rank=16, timeout_s=30)
    outs = ranks.forward(xs, [_split(params, 2, r) for r in range(2)], list(ids), list(weights))
    ref = fm.moe(torch.cat(xs), params, cfg, backend="reference", topk_ids=routed.topk_ids,
                 topk_weights=routed.topk_weights.float())
    for r, (got, want) in enumerate(zip(outs, ref.out.split([11, 6]))):
        assert_close(got.out, want, torch.bfloat16, f"rank {r} out")
        assert int((got.stats.tasks_per_program > 0).sum()) > 1


def test_too_many_tokens_is_refused_before_any_launch():
    cfg = fm.MoEConfig(hidden_size=H, ffn_hidden_size=FFN, num_experts=E, top_k=2)
    params = {n: t.to(DEVICE) for n, t in random_params(cfg, torch.float64).items()}
    ranks = LocalRanks(cfg, 2, device=DEVICE, max_tokens_per_rank=4)
    xs = [torch.randn(t, H, dtype=torch.float64, device=DEVICE) for t in (5, 1)]
    with pytest.raises(HeapOverflow, match="xs\\[0\\]: 5 tokens"):
        ranks.forward(xs, [_split(params, 2, r) for r in range(2)])
    assert not ranks.ranks[0].backend_state, "nothing may be allocated or launched"
