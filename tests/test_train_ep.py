"""The training example with expert parallelism: torchrun, 2 CPU ranks, gloo + the `shm` transport.

- the loss goes down with W=2;
- W=2 takes the same steps as W=1 on the same global batches (each rank its half; replicated gradients
  summed over ranks, see the example's docstring) to fp32 tolerance for the first steps. SGD and no
  load-balancing loss make the step an exact function of the global batch (the load-balancing loss is per
  rank; Adam's first steps turn gradient rounding into sign decisions).

These need FusedMoE(process_group=..., transport="shm") (DESIGN §5); in a build without it the ranks fail
with NotImplementedError and the test says so.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.test_train import EXAMPLE, run_example
from tests.tolerances import assert_close

ARGS = ["--optimizer", "sgd", "--aux-loss-coef", "0", "--global-batch", "8", "--log-every", "5"]
STEPS, COMPARED = 30, 6


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_two_rank_expert_parallel_training_matches_one_rank(seed, tmp_path):
    seed_args = ["--seed", str(seed % 1000)]
    out = tmp_path / "losses.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE),
           "--steps", str(STEPS), "--device", "cpu", "--transport", "shm", "--losses-json", str(out),
           *ARGS, *seed_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    log = (proc.stdout + proc.stderr)[-4000:]
    if "NotImplementedError" in log and "process_group" in log:
        pytest.fail("expert parallelism is not in this build: FusedMoE(process_group=...) raised "
                    "NotImplementedError in the ranks\n" + log)
    assert proc.returncode == 0, f"torchrun failed (rc={proc.returncode}):\n{log}"
    two_ranks = json.loads(out.read_text())
    assert len(two_ranks) == STEPS

    one_rank = run_example(["--steps", str(COMPARED), "--device", "cpu", "--threads", "1", *ARGS, *seed_args])
    assert_close(torch.tensor(two_ranks[:COMPARED]), torch.tensor(one_rank), torch.float32,
                 f"first {COMPARED} losses, W=2 vs W=1")
    first, last = two_ranks[0], sum(two_ranks[-5:]) / 5
    assert last < first - 1.0, f"W=2 loss did not go down enough: {first:.3f} -> {last:.3f} ({two_ranks})"
