"""Regenerate the GEMM rows of the launch-config table on a GPU: `python -m flashmoe_py.triton_tune`.

For the GPU's target (sm_90 or sm_80) and bf16, each regime is timed on its shape (prefill: the benchmark
shape of DESIGN §8, forward + backward; decode: 32 tokens, forward only), one kernel at a time: every
tile of `configs.CANDIDATES` (blocks, warps, stages) replaces that kernel's entry with the entry's GROUP_M kept,
then every launch-order group of `configs.GROUP_M_CANDIDATES` on the fastest tile; the layer step is timed
(median, CUDA events via triton.testing.do_bench) and the fastest entry is kept before the next kernel
(coordinate descent, starting from the current table). Candidates that do not fit the GPU are skipped. Prints
the rows to paste into kernels/configs.py; run `make compile-check` afterwards. Takes tens of minutes (every
candidate compiles).
"""

import argparse
import sys

import torch

from .config import MoEConfig
from .layer import FusedMoE
from .triton_backend import launch_configs

REGIMES = {
    "prefill": (16384, ("up", "down", "dh", "dw", "dx"), True),
    "decode": (32, ("up", "down"), False),
}
SHAPE = dict(hidden_size=2048, ffn_hidden_size=1408, num_experts=64, top_k=6)


def _step(layer, x, backward):
    def run():
        if backward:
            y = layer(x)
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                layer(x)
    return run


def _time(entry, cand, run, testing):
    """Median step time (ms) with `cand` as the kernel's bf16 entry, or None when it does not compile or launch."""
    entry[2] = tuple(cand)
    try:
        return testing.do_bench(run, return_mode="median")
    except Exception:  # out of shared memory or registers on this part: not a candidate
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", nargs="*", default=list(REGIMES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_tune needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton.testing

    configs = launch_configs()
    target = "sm_90" if torch.cuda.get_device_capability()[0] >= 9 else "sm_80"
    print(f"# {torch.cuda.get_device_name()} -> target {target}, bf16")
    layer = FusedMoE(MoEConfig(**SHAPE), backend="triton", device="cuda", dtype=torch.bfloat16)
    for regime in args.regimes:
        tokens, kernels, backward = REGIMES[regime]
        x = torch.randn(tokens, SHAPE["hidden_size"], device="cuda", dtype=torch.bfloat16,
                        requires_grad=backward)
        run = _step(layer, x, backward)
        for kernel in kernels:
            entry = configs.GEMM[(target, regime, kernel)]
            best = configs.GemmConfig(*entry[2])
            best_ms = _time(entry, best, run, triton.testing) or float("inf")
            for group_phase in (False, True):  # tiles with the entry's GROUP_M, then GROUP_M on the best tile
                if group_phase:
                    groups = configs.GROUP_M_CANDIDATES + ((0,) if kernel == "dw" else ())
                    cands = [best._replace(group_m=g) for g in groups]
                else:
                    cands = [c._replace(group_m=best.group_m) for c in configs.CANDIDATES[target]]
                for cand in cands:
                    if cand == best:
                        continue
                    ms = _time(entry, cand, run, triton.testing)
                    if ms is None:
                        print(f"#   {kernel} {tuple(cand)}: skipped (does not fit)")
                    elif ms < best_ms:
                        best, best_ms = cand, ms
            entry[2] = tuple(best)
            print(f'    ("{target}", "{regime}", "{kernel}"): {{2: {tuple(best)}, 4: {entry[4]}}},  '
                  f'# {best_ms:.3f} ms step')
    return 0


if __name__ == "__main__":
    sys.exit(main())
