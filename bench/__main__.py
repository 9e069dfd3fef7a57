"""python -m bench: runs every benchmark that has landed.

Each writes ``bench/results/<name>.json``; ``bench.report`` then writes
``bench/results/SUMMARY.md`` and its plots from all of them.
"""

from __future__ import annotations

import sys

from bench import budget, floor, fraud, gateway, history, ledger, report


def main() -> None:
    for benchmark in (floor, ledger, history, budget, fraud, gateway):
        sys.argv = [sys.argv[0]]  # each with its defaults
        benchmark.main()
    report.main()


if __name__ == "__main__":
    main()
