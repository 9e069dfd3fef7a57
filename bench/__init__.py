"""Benchmarks: `make bench` runs them against the real mesh and writes
bench/results/."""
