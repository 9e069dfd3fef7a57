"""Benchmarks: `make bench` runs them against the real mesh and writes
bench/results/."""

import os

# Before anything imports gRPC: see GRPC_ENABLE_FORK_SUPPORT in the Makefile.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
