"""The wallet history benchmark: the first page of a wallet with 100,000
transactions, with and without filters, p50/p99 over many reads.

    make bench-history            (python -m bench.history --help)

It fills a wallet database of its own directly (set-based inserts), then
reads first pages through the wallet's own query code on a real pool.
Target: p99 under 20 ms for a first page.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.common import (
    bench_settings,
    drop_databases,
    machine,
    percentile,
    write_results,
)
from services.common.db import create_pool, migrate
from services.wallet import history
from services.wallet.__main__ import MIGRATIONS

PREFIX = "moneta_bench_history_"
TARGET_P99_MS = 20.0
WORDS = ["coffee", "train", "hotel", "lunch", "taxi", "flight", "books", "rent", "gift", "fuel"]
NAMES = ["Ana L.", "Bob S.", "Chen W.", "Dara K.", "Eli M.", "Fay O.", "Gus P.", "Hana R."]


async def fill(pool: Any, wallet_id: uuid.UUID, count: int, rng: random.Random) -> None:
    start = datetime.now(UTC) - timedelta(days=365)
    types = sorted(history.TYPES)
    for offset in range(0, count, 10_000):
        n = min(10_000, count - offset)
        rows = []
        for i in range(n):
            kind = rng.choice(types)
            amount = rng.randint(1, 500_00)
            rows.append(
                (
                    uuid.uuid4(),
                    kind,
                    amount if kind in ("P2P_IN", "DEPOSIT", "REFUND") else -amount,
                    rng.choice(NAMES),
                    f"{rng.choice(WORDS)} {rng.choice(WORDS)}",
                    start + timedelta(seconds=(offset + i) * 300),
                )
            )
        async with pool.acquire() as conn:
            await conn.execute(
                """
                INSERT INTO transactions (txn_id, wallet_id, type, amount, currency, status,
                                          counterparty, description, created_at, updated_at)
                SELECT t, $1, k, a, 'USD', 'COMPLETED', c, d, at, at
                  FROM unnest($2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                              $7::timestamptz[]) AS u(t, k, a, c, d, at)
                """,
                wallet_id,
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
                [r[3] for r in rows],
                [r[4] for r in rows],
                [r[5] for r in rows],
            )
    async with pool.acquire() as conn:
        await conn.execute("ANALYZE transactions")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = bench_settings(PREFIX)
    await drop_databases(settings, PREFIX)
    url = settings.database_url("wallet")
    await migrate(url, MIGRATIONS)
    pool = await create_pool(url, 1, 4)
    rng = random.Random(11)
    try:
        user_id, wallet_id = uuid.uuid4(), uuid.uuid4()
        async with pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO users (user_id, email, role, default_currency) VALUES ($1, $2, 1, 'USD')",
                user_id,
                f"{user_id}@bench.example",
            )
            await conn.execute(
                "INSERT INTO wallets (wallet_id, user_id, default_currency) VALUES ($1, $2, 'USD')",
                wallet_id,
                user_id,
            )
        print(f"filling one wallet with {args.transactions:,} transactions …")
        await fill(pool, wallet_id, args.transactions, rng)
        month_ago = datetime.now(UTC) - timedelta(days=200)
        queries = {
            "first_page": history.HistoryQuery(wallet_id=wallet_id, page_size=50),
            "by_type": history.HistoryQuery(
                wallet_id=wallet_id, types=frozenset({"MERCHANT_PAYMENT"}), page_size=50
            ),
            "date_range": history.HistoryQuery(
                wallet_id=wallet_id, start=month_ago, end=month_ago + timedelta(days=30)
            ),
            "amount_range": history.HistoryQuery(
                wallet_id=wallet_id, min_amount=100_00, max_amount=200_00
            ),
            "text_search": history.HistoryQuery(wallet_id=wallet_id, text="coffee"),
            "counterparty": history.HistoryQuery(wallet_id=wallet_id, counterparty="Chen"),
        }
        results: dict[str, Any] = {}
        for name, query in queries.items():
            timings = []
            for _ in range(args.reads):
                started = time.perf_counter()
                async with pool.acquire() as conn:
                    rows, _ = await history.list_transactions(conn, query)
                timings.append((time.perf_counter() - started) * 1000)
                assert rows, name
            p99 = percentile(timings, 99)
            results[name] = {
                "p50_ms": round(percentile(timings, 50), 2),
                "p99_ms": round(p99, 2),
                "reads": args.reads,
                "meets_target": p99 < TARGET_P99_MS,
            }
            print(f"  {name:<14} p50 {results[name]['p50_ms']:6.2f} ms   p99 {p99:6.2f} ms")
    finally:
        await pool.close()
        await drop_databases(settings, PREFIX)
    return {
        "machine": machine(),
        "transactions": args.transactions,
        "target_p99_ms": TARGET_P99_MS,
        "queries": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transactions", type=int, default=100_000)
    parser.add_argument("--reads", type=int, default=300)
    args = parser.parse_args()
    results = asyncio.run(run(args))
    results["headlines"] = [
        {"metric": f"{name} p99", "value": q["p99_ms"], "unit": "ms",
         "target": TARGET_P99_MS, "better": "lower"}
        for name, q in results["queries"].items()
    ]  # fmt: skip
    path = write_results("history", results)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
