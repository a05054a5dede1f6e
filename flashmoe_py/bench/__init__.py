"""The microbenchmark `flashmoe-bench` (DESIGN §8).

cli.py         options, the run, the report            shapes.py      default sweep, model presets, Case
candidates.py  what can be timed, built per case       baselines.py   naive loop, transformers experts, grouped_mm
runner.py      gate, interleaved timing, rows (1 rank) distributed.py expert-parallel runs over ranks
counting.py    FLOPs, minimum bytes, wire minimum      timing.py      timers, quantiles, measured ceilings
probe.py       launches, syncs, ops, peak memory       schema.py      the result row and its files
report.py      progress bar, table, Markdown, plot     compare.py     `flashmoe-bench compare A B`
"""
