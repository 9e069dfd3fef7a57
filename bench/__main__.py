"""python -m bench: runs every benchmark that has landed.

Today that is the ledger's (``bench.ledger``). The budget, fraud, gateway and
history benchmarks arrive with their issues and are added here.
"""

from __future__ import annotations

from bench import ledger


def main() -> None:
    ledger.main()


if __name__ == "__main__":
    main()
