"""The training example (examples/train_tiny_moe.py) on one process: the loss goes down.

The two-rank runs (expert parallel, torchrun) are in tests/test_train_ep.py.
"""

from __future__ import annotations

import importlib.util
import pathlib

import torch

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_tiny_moe.py"


def run_example(argv: list[str]) -> list[float]:
    """Run the example's main() in this process (one rank); returns its per-step losses. Restores torch's
    thread count, which the example's --threads changes."""
    spec = importlib.util.spec_from_file_location("train_tiny_moe", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        return module.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_training_example_loss_goes_down_on_one_process(seed, capsys):
    losses = run_example(["--steps", "30", "--seed", str(seed % 1000), "--threads", "1", "--log-every", "10"])
    printed = capsys.readouterr().out
    assert "step   29  loss" in printed, printed
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    first, last = losses[0], sum(losses[-5:]) / 5
    # From about ln(64) = 4.16 towards the data's entropy rate (about 1): a fall of 1 nat is far outside noise.
    assert last < first - 1.0, f"loss did not go down enough: {first:.3f} -> {last:.3f} ({losses})"
