"""The fused kernel with expert parallelism across 2 and 4 CPU ranks (DESIGN §6, §7.5): the shm heap, kernels under
TRITON_INTERPRET=1, cross-rank waits real (each rank spins on its own shm segment while the peer's kernel puts
into it). Three launches of tests/fused_worker.py (starting ranks is the slow part), each scenario reported as its
own test:
  w2          2 ranks, every scenario, each forward the one PHASE=ALL launch a GPU makes, its programs running
              as concurrent threads (flashmoe_py.interpreter_threads): what a GPU runs
  w4          4 ranks, the same, on the scenarios that vary token counts and empty experts
  w2-phases   2 ranks, phase by phase (six launches a forward, programs one after another), on a training step
              and a peer that skips a forward: the phase-split path stays tested.
What they check is listed in tests/fused_worker.py:
forward (routing in the kernel) and backward equal the reference on all tokens, bytes_sent equal to the exact
minimum (one row per (token, rank) each way, a record per remote assignment, the signal words), two runs giving the
same bits, caller routing with everything sent to one rank and a rank without tokens, repeated forwards on one
heap, bf16, a group of one rank, HeapOverflow and transport refusals, and a peer that skips a forward ->
ExchangeTimeout naming rank, peer and slot.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

from tests import fused_worker
from tests.helpers import run_ranks

pytestmark = [pytest.mark.multiproc, pytest.mark.interpreter]

REPO = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT_S = 540
# launch name -> (world size, concurrent programs, scenarios; None: all)
LAUNCHES = {
    "w2": (2, True, None),
    "w4": (4, True, ("swiglu_bias_fp64", "all_to_rank0_and_empty", "repeated_forwards")),
    "w2-phases": (2, False, ("swiglu_bias_fp64", "peer_skips_forward", "late_first_forward")),
}
_results: dict = {}


def _launch(tmp: Path, world: int, concurrent: bool, scenarios) -> dict:
    seed = int(os.environ.get("FLASHMOE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    out = tmp / "fused"
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "tests.fused_worker", "--world", str(world), "--seed", str(seed), "--out", str(out),
           "--store", str(out / "store")]
    if concurrent:
        cmd.append("--concurrent")
    if scenarios:
        cmd += ["--scenarios", ",".join(scenarios)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TRITON_INTERPRET="1",
               FLASHMOE_DEBUG_POISON="1")
    return run_ranks(cmd, env, REPO, out, world, LAUNCH_TIMEOUT_S, seed)


CASES = [(launch, name) for launch, (_, _, names) in LAUNCHES.items() for name in (names or fused_worker.SCENARIOS)]


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
@pytest.mark.parametrize("launch,name", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_fused_ranks(launch, name, tmp_path_factory):
    world, concurrent, scenarios = LAUNCHES[launch]
    if launch not in _results:
        _results[launch] = _launch(tmp_path_factory.mktemp(f"fused-{launch}"), world, concurrent, scenarios)
    res = _results[launch]
    assert "failure" not in res, res.get("failure")
    print(f"seed={res['seed']} (replay with FLASHMOE_TEST_SEED={res['seed']})")
    errors = []
    for r, ranks in enumerate(res["ranks"]):
        got = ranks.get(name)
        assert got is not None, f"rank {r} did not run scenario {name}"
        if not got["ok"]:
            errors.append(f"--- rank {r}:\n{got['error']}")
        else:
            print(f"rank {r}: {got['seconds']} s {got['info']}")
    assert not errors, f"{name} x{world} (seed={res['seed']}):\n" + "\n".join(errors)
