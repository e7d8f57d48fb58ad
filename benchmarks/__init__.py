"""Benchmark code beside its results (benchmarks/results/): the HF + PEFT baseline that bench.py runs."""
