"""`flashmoe-bench compare A B`: two result files row by row, to review a change's effect.

Rows are matched on what was measured (shape, sizes, tokens, dtype, mode, ranks, transport, candidate),
not on where, so a CPU file can be held against a GPU one. A results .jsonl holding several runs
contributes its last row per key. Ratio = B median / A median: < 1 means B is faster.
"""

from __future__ import annotations

import argparse
import math

from .schema import read_rows

KEY = ("shape", "hidden_size", "ffn_hidden_size", "num_experts", "top_k", "tokens", "dtype", "mode", "world_size",
       "transport")


def row_key(row: dict) -> tuple:
    return tuple(row["config"][k] for k in KEY) + (row["candidate"],)


def pair_rows(a: list[dict], b: list[dict]) -> list[tuple[tuple, dict | None, dict | None]]:
    """(key, row of A or None, row of B or None) in A's order, then B's extra rows."""
    last_a = {row_key(r): r for r in a}
    last_b = {row_key(r): r for r in b}
    keys = list(dict.fromkeys([row_key(r) for r in a] + [row_key(r) for r in b]))
    return [(k, last_a.get(k), last_b.get(k)) for k in keys]


def ratio(ra: dict | None, rb: dict | None) -> float | None:
    if ra is None or rb is None or ra["status"] != "ok" or rb["status"] != "ok":
        return None
    return rb["metrics"]["latency_ms_median"] / ra["metrics"]["latency_ms_median"]


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    return f"{r['metrics']['latency_ms_median']:.3g}" if r["status"] == "ok" else r["status"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="flashmoe-bench compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="baseline result file (.json from --out, or a results .jsonl)")
    ap.add_argument("b", help="result file to compare with it")
    args = ap.parse_args(argv)
    from rich.table import Table

    from .report import console as make_console

    a, b = read_rows(args.a), read_rows(args.b)
    t = Table(title=f"B / A: {args.b} vs {args.a} (ratio < 1: B faster)")
    for col in ("shape", "T", "dtype", "mode", "ranks", "candidate", "A ms", "B ms", "B/A"):
        t.add_column(col, justify="left" if col in ("shape", "candidate") else "right")
    logs = []
    for key, ra, rb in pair_rows(a, b):
        r = ratio(ra, rb)
        if r is not None:
            logs.append(math.log(r))
        shape, _, _, _, _, tokens, dtype, mode, ws, transport, cand = key
        t.add_row(shape, str(tokens), dtype, mode, str(ws), cand, _cell(ra), _cell(rb),
                  "" if r is None else f"{r:.2f}")
    console = make_console()
    console.print(t)
    if logs:
        console.print(f"geometric mean B/A over {len(logs)} rows timed in both: {math.exp(sum(logs) / len(logs)):.3f}")
    else:
        console.print("no row was timed in both files")
    return 0
