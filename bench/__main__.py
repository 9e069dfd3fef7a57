"""python -m bench: runs every benchmark that has landed.

Today: the ledger's (``bench.ledger``), the wallet history's
(``bench.history``) and the budget's (``bench.budget``). The fraud and
gateway benchmarks arrive with their issues and are added here.
"""

from __future__ import annotations

import sys

from bench import budget, history, ledger


def main() -> None:
    for benchmark in (ledger, history, budget):
        sys.argv = [sys.argv[0]]  # each with its defaults
        benchmark.main()


if __name__ == "__main__":
    main()
