"""hardneg's benchmarks: one script per op, run from the repository root as modules
(`python -m benchmarks.bench_loss`, ...), sharing one harness (benchmarks/common.py)."""
