"""The budget benchmark: Reserve + Commit pairs over gRPC, on one hot budget
and spread over 10,000 budgets, at a fixed offered rate and flat out.

    make bench-budget            (python -m bench.budget --help)

Target on a 2-core machine: p99 under 5 ms at 500 pairs/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc

from bench.common import (
    Call,
    bench_settings,
    closed_loop,
    drop_databases,
    machine,
    open_loop,
    running_service,
    timed_call,
    write_results,
)
from moneta.budget.v1 import budget_pb2, budget_pb2_grpc
from moneta.common.v1.money_pb2 import Money

PREFIX = "moneta_bench_budget_"
TARGET_RATE = 500
TARGET_P99_MS = 5.0
WARM_UP_SECONDS = 3.0


async def create_budgets(stub: budget_pb2_grpc.BudgetServiceStub, users: list[str]) -> None:
    now = datetime.now(UTC)
    sem = asyncio.Semaphore(32)

    async def one(user: str) -> None:
        budget = budget_pb2.Budget(
            user_id=user,
            category="ALL",
            currency="USD",
            total_amount=10**12,
            period_type=budget_pb2.PERIOD_TYPE_MONTHLY,
            mode=budget_pb2.BUDGET_MODE_HARD,
        )
        budget.start_date.FromDatetime(now - timedelta(days=1))
        budget.end_date.FromDatetime(now + timedelta(days=30))
        async with sem:
            await stub.CreateBudget(budget_pb2.CreateBudgetRequest(budget=budget), timeout=30)

    await asyncio.gather(*(one(u) for u in users))


async def pair(stub: budget_pb2_grpc.BudgetServiceStub, user: str) -> None:
    """One Reserve + Commit."""
    reservation = (
        await stub.Reserve(
            budget_pb2.ReserveRequest(
                user_id=user,
                amount=Money(amount=100, currency="USD"),
                category="FLIGHT",
                reference=str(uuid.uuid4()),
            ),
            timeout=10,
        )
    ).reservation
    await stub.Commit(
        budget_pb2.CommitRequest(reservation_id=reservation.reservation_id), timeout=10
    )


def _cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used, 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def with_cpu_per_pair(
    measure: Awaitable[dict[str, Any]],
    pairs_in: Callable[[dict[str, Any]], int],
    admin: asyncpg.Connection,
    server_pid: int,
    database: str,
) -> dict[str, Any]:
    """The measurement's result, with the CPU each process used per pair (ms): the
    benchmark client itself, the budget process, and the PostgreSQL
    backends serving its database (not PostgreSQL's shared background
    processes)."""

    async def snapshot() -> dict[str, float]:
        backends = await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", database
        )
        return {"client": _cpu_seconds(os.getpid()), "server": _cpu_seconds(server_pid),
                **{str(r["pid"]): _cpu_seconds(r["pid"]) for r in backends}}  # fmt: skip

    before = await snapshot()
    result = await measure
    after = await snapshot()
    used = {key: after[key] - before.get(key, 0.0) for key in after}
    count = max(pairs_in(result), 1)
    result["cpu_ms_per_pair"] = {
        "client": round(used.pop("client") / count * 1000, 3),
        "server": round(used.pop("server") / count * 1000, 3),
        "postgres": round(sum(used.values()) / count * 1000, 3),
    }
    return result


def pairs(stub: budget_pb2_grpc.BudgetServiceStub, users: list[str], seed: int) -> Call:
    """Timed pairs, each for a user drawn at random (seeded)."""
    rng = random.Random(seed)
    return lambda: timed_call(pair(stub, rng.choice(users)))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = bench_settings(PREFIX)
    await drop_databases(settings, PREFIX)
    results: dict[str, Any] = {"machine": machine(), "target": {"rate": TARGET_RATE,
                               "p99_ms": TARGET_P99_MS}, "scenarios": {}}  # fmt: skip
    with running_service("budget", PREFIX, MONETA_DB_POOL_MAX="20") as budget:
        async with grpc.aio.insecure_channel(
            budget.address,
            # Neither is used here, and each costs every call some CPU on the
            # cores the service shares with this client (as in bench/ledger.py).
            options=[("grpc.enable_retries", 0), ("grpc.enable_channelz", 0)],
        ) as channel:
            stub = budget_pb2_grpc.BudgetServiceStub(channel)
            hot = [str(uuid.uuid4())]
            cold = [str(uuid.uuid4()) for _ in range(args.budgets)]
            print(f"creating {args.budgets:,} budgets and one hot one …")
            await create_budgets(stub, hot + cold)
            admin = await asyncpg.connect(settings.postgres_url)
            assert budget.process is not None
            server_pid = budget.process.pid

            async def metered(
                measure: Awaitable[dict[str, Any]],
                pairs_in: Callable[[dict[str, Any]], int],
            ) -> dict[str, Any]:
                return await with_cpu_per_pair(
                    measure,
                    pairs_in,
                    admin,
                    server_pid,
                    settings.database_url("budget").rsplit("/", 1)[1],
                )

            for name, users in (("one_hot_budget", hot), ("10k_budgets", cold)):
                # Not measured: what only load starts (the pool's connections,
                # their prepared statements and plans, the first batches).
                await open_loop(pairs(stub, users, 4), args.rate, WARM_UP_SECONDS)
                runs = [
                    await metered(
                        open_loop(pairs(stub, users, 5), args.rate, args.seconds),
                        lambda r: int(r["count"]),
                    )
                    for _ in range(args.runs)
                ]
                mid = sorted(runs, key=lambda r: r["p99_ms"])[len(runs) // 2]
                top = await metered(
                    closed_loop(pairs(stub, users, 6), args.clients, args.flat_out_pairs),
                    lambda r: args.flat_out_pairs,
                )
                sweep = [
                    (
                        clients,
                        (await closed_loop(pairs(stub, users, 6), clients, args.sweep_pairs))[
                            "per_s"
                        ],
                    )
                    for clients in args.sweep
                ]
                results.setdefault("series", []).append(
                    {"name": f"{name} Reserve+Commit pairs", "x_label": "concurrent clients",
                     "y_label": "pairs per second", "points": sweep}
                )  # fmt: skip
                results["scenarios"][name] = {
                    "at_offered_rate": mid,
                    "per_run_p99_ms": [r["p99_ms"] for r in runs],
                    "flat_out": top,
                    "meets_target": mid["p99_ms"] < TARGET_P99_MS
                    and mid["failed"] == 0
                    and mid["achieved_per_s"] >= TARGET_RATE * 0.98,
                }
                print(
                    f"  {name:<15} at {args.rate}/s: p50 {mid['p50_ms']} ms, p99 {mid['p99_ms']} ms,"
                    f" {mid['failed']} failed;"
                    f" flat out {top['per_s']}/s (p99 {top['p99_ms']} ms);"
                    f" CPU ms a pair at {args.rate}/s {mid['cpu_ms_per_pair']},"
                    f" flat out {top['cpu_ms_per_pair']}"
                )
            await admin.close()
    await drop_databases(settings, PREFIX)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=TARGET_RATE)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--flat-out-pairs", type=int, default=4000)
    parser.add_argument(
        "--sweep",
        type=int,
        nargs="*",
        default=[1, 4, 16, 64],
        help="client counts for the throughput-against-concurrency series",
    )
    parser.add_argument("--sweep-pairs", type=int, default=1000)
    args = parser.parse_args()
    results = asyncio.run(run(args))
    results["headlines"] = [
        headline
        for name, s in results["scenarios"].items()
        for headline in (
            {"metric": f"{name} p99 at {args.rate}/s", "value": s["at_offered_rate"]["p99_ms"],
             "unit": "ms", "target": TARGET_P99_MS, "better": "lower"},
            {"metric": f"{name} pairs achieved at {args.rate}/s offered",
             "value": s["at_offered_rate"]["achieved_per_s"], "unit": "/s",
             "target": TARGET_RATE * 0.98, "better": "higher"},
            {"metric": f"{name} pairs flat out", "value": s["flat_out"]["per_s"],
             "unit": "/s", "target": None, "better": "higher"},
        )
    ]  # fmt: skip
    path = write_results("budget", results)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
