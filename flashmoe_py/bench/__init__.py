"""The microbenchmark: `flashmoe-bench` (cli.py) times our backends against baselines (baselines.py)."""
