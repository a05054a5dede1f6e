"""Compare two benchmark result files row by row: `python bench/compare.py A B`
(the same as `flashmoe-bench compare A B`; see flashmoe_py/bench/compare.py)."""

import sys

from flashmoe_py.bench.compare import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
