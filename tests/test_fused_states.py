"""The fused backend's persistent states under CUDA graphs and several streams (fused_backend._state), on CPU:
the capture query (`fused_backend._capturing`) and the stream (`fused_backend._stream_key`) are patched, the
launches run under TRITON_INTERPRET=1. Real capture and replay: tests/test_fused_gpu.py.

What a GPU would get wrong without these rules: a graph keeps the pointers of the state it captured, so that state
must outlive any later growth or release_states(); two streams' kernels must not share counters; what cannot
happen during capture (heap allocation, the first compile and module init, the first-launch barrier) raises an
error that says to warm up first.
"""

import pytest
import torch

pytest.importorskip("triton")

import flashmoe_py as fm  # noqa: E402
from flashmoe_py import fused_backend  # noqa: E402
from flashmoe_py.parallel.local import LocalRanks  # noqa: E402
from tests.helpers import random_params  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(torch.cuda.is_available(), reason="patches the capture query of a CPU run")]
CFG = fm.MoEConfig(hidden_size=12, ffn_hidden_size=8, num_experts=4, top_k=2)


@pytest.fixture(autouse=True)
def fresh_states():
    fused_backend.release_states(include_captured=True)
    yield
    fused_backend.release_states(include_captured=True)


def _forward(t: int, params: dict):
    x = torch.randn(t, CFG.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        got = fm.moe(x, params, CFG, backend="fused")
    assert_close(got.out, fm.moe(x, params, CFG, backend="reference").out, torch.float64, f"T={t}")
    return got


def _states():
    return list(fused_backend._LOCAL_STATES.values())


def test_captured_state_outlives_growth_and_release(monkeypatch, seed):
    params = random_params(CFG, torch.float64)
    _forward(5, params)  # the warm-up forward
    warm, = _states()
    monkeypatch.setattr(fused_backend, "_capturing", lambda device: True)
    _forward(4, params)  # "captured": same state (fits), now pinned to its graph
    assert _states() == [warm] and warm.captured
    monkeypatch.setattr(fused_backend, "_capturing", lambda device: False)
    _forward(11, params)  # outgrows it: a new state, the captured one kept for its graph's replays
    grown, = _states()
    assert grown is not warm and grown.tokens_cap >= 11 and fused_backend._CAPTURED == [warm]
    assert fused_backend.release_states() == 1 and fused_backend._CAPTURED == [warm]
    _forward(3, params)  # a new state; the captured one still untouched
    monkeypatch.setattr(fused_backend, "_capturing", lambda device: True)
    _forward(3, params)
    pinned, = _states()
    assert fused_backend.release_states() == 0, "a captured state was released under its graph"
    assert fused_backend.release_states(include_captured=True) == 2 and not fused_backend._CAPTURED
    assert pinned.captured


def test_capture_without_warm_up_says_to_warm_up(monkeypatch, seed):
    params = random_params(CFG, torch.float64)
    monkeypatch.setattr(fused_backend, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="cannot be allocated during CUDA-graph capture.*eager forward"):
        _forward(4, params)
    monkeypatch.setattr(fused_backend, "_capturing", lambda device: False)
    _forward(8, params)
    monkeypatch.setattr(fused_backend, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="larger persistent state.*largest token count"):
        _forward(20, params)
    # A kernel variant never launched (training mode: logits given, pre-activations saved) is a first compile.
    x = torch.randn(4, CFG.hidden_size, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="variant that was not compiled.*eager forward"):
        fm.moe(x, params, CFG, backend="fused")


def test_streams_get_their_own_states(monkeypatch, seed):
    params = random_params(CFG, torch.float64)
    monkeypatch.setattr(fused_backend, "_stream_key", lambda device: 1)
    _forward(6, params)
    monkeypatch.setattr(fused_backend, "_stream_key", lambda device: 2)
    _forward(6, params)
    one, two = _states()
    assert one is not two and one.sync.data_ptr() != two.sync.data_ptr()
    # A capture on a third stream (torch.cuda.graph's own) uses the newest state of the shape: the warm-up's.
    monkeypatch.setattr(fused_backend, "_stream_key", lambda device: 3)
    monkeypatch.setattr(fused_backend, "_capturing", lambda device: True)
    _forward(6, params)
    assert _states() == [one, two] and two.captured and not one.captured


def test_kernel_compiled_and_initialised_once_per_variant(monkeypatch, seed):
    # _first_launch compiles (and for NVSHMEM puts initialises the module of) each kernel variant once per state,
    # not every forward; here with the GPU's compile step replaced by a counter.
    params = random_params(CFG, torch.float64)
    _forward(5, params)
    state, = _states()
    calls = []
    monkeypatch.setattr(fused_backend, "_compile_variant", lambda *a: calls.append(a[1]))
    consts = dict(A=1)
    for _ in range(3):
        assert fused_backend._first_launch(state, None, "sm_90", 132, "ptr", {}, consts, {}) == 0
    fused_backend._first_launch(state, None, "sm_90", 132, "ptr", {}, dict(A=2), {})
    assert len(calls) == 2, f"{len(calls)} compiles for 2 variants over 4 launches"


def test_expert_parallel_first_forward_under_capture_says_to_warm_up(monkeypatch):
    params = random_params(CFG, torch.float64)
    ranks = LocalRanks(CFG, 2, max_tokens_per_rank=8)
    el = CFG.num_experts // 2
    split = [{n: (t[r * el:(r + 1) * el] if n in ("w_up", "w_down") else t) for n, t in params.items()}
             for r in range(2)]
    monkeypatch.setattr(fused_backend, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="symmetric heap.*during CUDA-graph capture.*eager forward"):
        ranks.forward([torch.randn(3, CFG.hidden_size, dtype=torch.float64) for _ in range(2)], split)
