"""The ledger benchmark: transfers per second and latency, ours against a
naive baseline, on the same database in the same run.

    make bench-ledger            (python -m bench.ledger --help for the knobs)

Ours is the real ledger service over gRPC (group commit, one pipelined
writer).
The baseline is what most ledgers start as: one database transaction per
transfer that locks both accounts in id order, then two UPDATEs and three
INSERTs (the transfer and its two entries), driven straight from asyncpg by
as many concurrent connections as we have clients.

Scenarios: (a) the batch API, batches of 1,000; (b) single-transfer RPCs from
64 concurrent clients over 100,000 accounts; (c) the same over 10 hot
accounts. Each is run several times; the medians are reported, with the CPU
microseconds each process (the ledger, its database backends, this client)
spent per transfer of ours.

The client runs on the same cores as what it measures, so both sides get
their work ready before the clock starts (ours its requests, the baseline
its parsed ids) and ours' channels leave out retries and channelz, which
this client does not use. Both sides keep 64 concurrent callers in one
process: ours over ``--channels`` connections, the baseline over 64
database connections. ``--replicas 2`` runs two ledger processes on one
port, as a deployment's replicas would share a Service.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc

from bench.common import (
    bench_settings,
    drop_databases,
    machine,
    median,
    percentile,
    running_service,
    write_results,
)
from moneta.ledger.v1 import ledger_pb2 as pb
from moneta.ledger.v1 import ledger_pb2_grpc
from services.common.db import migrate
from services.ledger.__main__ import MIGRATIONS

PREFIX = "moneta_bench_"
OK_CODES = (pb.TransferResult.OK, pb.TransferResult.EXISTS)
TARGETS: dict[str, dict[str, float]] = {
    "a_batch_api": {"ours_tps": 10_000},
    "b_single_cold": {"ours_tps": 2_500, "ratio": 2.0},
    "c_single_hot": {"ratio": 4.0},
}

Pair = tuple[str, str, int]  # debit, credit, amount


@dataclass
class Measure:
    transfers: int
    seconds: float
    latencies_ms: list[float]
    refused: int = 0
    # CPU seconds spent meanwhile, by whom (see cpu_seconds)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def tps(self) -> float:
        return self.transfers / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "transfers_per_s": round(self.tps, 1),
            "p50_ms": round(percentile(self.latencies_ms, 50), 2),
            "p99_ms": round(percentile(self.latencies_ms, 99), 2),
            "transfers": self.transfers,
            "refused": self.refused,
        }


def _process_cpu(pids: Sequence[int]) -> float:
    """CPU seconds (user and system, all threads) the processes have used."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _ledger_pids() -> list[int]:
    """The ledger processes this benchmark started (its children)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                is_ledger = b"services.ledger" in cmdline.read()
        except OSError:
            continue
        if parent == os.getpid() and is_ledger:
            pids.append(int(entry))
    return pids


async def cpu_seconds(pool: asyncpg.Pool) -> dict[str, float]:
    """CPU seconds used so far by the ledger processes, by the database
    backends serving the ledger's database (the ledger's connections, and
    this benchmark's idle ones) and by this client: their differences over a
    run say where each transfer's time goes."""
    backends = [r["pid"] for r in await pool.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid()"
    )]  # fmt: skip
    return {
        "ledger": _process_cpu(_ledger_pids()),
        "postgres": _process_cpu(backends),
        "client": time.process_time(),
    }


def pairs(accounts: Sequence[str], count: int, rng: random.Random) -> list[Pair]:
    out = []
    for _ in range(count):
        debit, credit = rng.sample(accounts, 2)
        out.append((debit, credit, rng.randint(1, 100)))
    return out


def transfer(pair: Pair) -> pb.Transfer:
    return pb.Transfer(
        id=str(uuid.uuid4()),
        debit_account_id=pair[0],
        credit_account_id=pair[1],
        amount=pair[2],
        currency="USD",
        code="BENCH",
    )


async def _run_clients(
    clients: int, work: Sequence[Any], send: Callable[[Any], Awaitable[int]]
) -> tuple[float, list[float], int]:
    """Runs ``work`` items through ``clients`` concurrent workers; returns
    elapsed seconds, per-item latencies and how many transfers were refused."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    latencies: list[float] = []
    refused = 0

    async def worker() -> None:
        nonlocal refused
        while not queue.empty():
            item = queue.get_nowait()
            started = time.perf_counter()
            refused += await send(item)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - started, latencies, refused


def requests(batches: Sequence[Sequence[Pair]]) -> list[pb.CreateTransfersRequest]:
    """Ours' requests, built before the clock starts (as the baseline's
    arguments are): the client shares the machine's two cores with what it
    measures, so its own work is kept out of the measured run."""
    return [pb.CreateTransfersRequest(transfers=[transfer(p) for p in b]) for b in batches]


async def ours(
    stubs: Sequence[ledger_pb2_grpc.LedgerServiceStub],
    requests: Sequence[pb.CreateTransfersRequest],
    clients: int,
) -> Measure:
    turn = itertools.count()

    async def send(request: pb.CreateTransfersRequest) -> int:
        stub = stubs[next(turn) % len(stubs)]
        response = await stub.CreateTransfers(request, timeout=60)
        return sum(1 for r in response.results if r.code not in OK_CODES)

    seconds, latencies, refused = await _run_clients(clients, requests, send)
    return Measure(sum(len(r.transfers) for r in requests), seconds, latencies, refused)


async def baseline(pool: asyncpg.Pool, work: Sequence[Pair], clients: int) -> Measure:
    """One database transaction per transfer: lock both accounts in id
    order, two UPDATEs, three INSERTs."""
    # Arguments parsed and transfer ids drawn before the clock starts.
    args = [(uuid.UUID(p[0]), uuid.UUID(p[1]), p[2], uuid.uuid4()) for p in work]

    async def send(arg: tuple[uuid.UUID, uuid.UUID, int, uuid.UUID]) -> int:
        debit, credit, amount, transfer_id = arg
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT id, debits_posted, debits_pending, credits_posted, overdraft_limit,"
                " no_overdraft FROM accounts WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE",
                [debit, credit],
            )
            payer = next(r for r in rows if r["id"] == debit)
            if payer["no_overdraft"] and (
                payer["debits_posted"] + payer["debits_pending"] + amount
                > payer["credits_posted"] + payer["overdraft_limit"]
            ):
                return 1
            debit_after = await conn.fetchval(
                "UPDATE accounts SET debits_posted = debits_posted + $2 WHERE id = $1"
                " RETURNING credits_posted - debits_posted",
                debit,
                amount,
            )
            credit_after = await conn.fetchval(
                "UPDATE accounts SET credits_posted = credits_posted + $2 WHERE id = $1"
                " RETURNING credits_posted - debits_posted",
                credit,
                amount,
            )
            await conn.execute(
                "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency,"
                " type, status, code) VALUES ($1, $2, $3, $4, 'USD', 1, 1, 'BASELINE')",
                transfer_id,
                debit,
                credit,
                amount,
            )
            for account, side, after in ((debit, 1, debit_after), (credit, 2, credit_after)):
                await conn.execute(
                    "INSERT INTO entries (transfer_id, account_id, side, amount, currency,"
                    " balance_after, code, created_at) VALUES ($1, $2, $3, $4, 'USD', $5,"
                    " 'BASELINE', now())",
                    transfer_id,
                    account,
                    side,
                    amount,
                    after,
                )
        return 0

    seconds, latencies, refused = await _run_clients(clients, args, send)
    return Measure(len(work), seconds, latencies, refused)


async def create_accounts(
    stub: ledger_pb2_grpc.LedgerServiceStub, count: int, funding: str, balance: int
) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    for start in range(0, count, 8000):
        chunk = ids[start : start + 8000]
        await stub.CreateAccounts(
            pb.CreateAccountsRequest(
                accounts=[
                    pb.Account(
                        id=i, currency="USD", type=pb.ACCOUNT_TYPE_USER_WALLET, no_overdraft=True
                    )
                    for i in chunk
                ]
            ),
            timeout=120,
        )
        response = await stub.CreateTransfers(
            pb.CreateTransfersRequest(transfers=[transfer((funding, i, balance)) for i in chunk]),
            timeout=120,
        )
        assert all(r.code == pb.TransferResult.OK for r in response.results)
    return ids


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = bench_settings(PREFIX)
    await drop_databases(settings, PREFIX)
    url = settings.database_url("ledger")
    await migrate(url, MIGRATIONS)
    rng = random.Random(7)
    results: dict[str, Any] = {"machine": machine(), "runs": args.runs, "scenarios": {}}
    with running_service(
        "ledger", PREFIX, replicas=args.replicas, MONETA_DB_POOL_MAX="4"
    ) as ledger:
        # Several connections, so that the kernel spreads them over the replicas.
        channels = [
            grpc.aio.insecure_channel(
                ledger.address,
                options=[
                    ("grpc.max_send_message_length", 64 << 20),
                    ("grpc.use_local_subchannel_pool", 1),
                    # Neither is used here, and each costs every call some
                    # CPU on the cores the service shares with this client.
                    ("grpc.enable_retries", 0),
                    ("grpc.enable_channelz", 0),
                ],
            )
            for _ in range(args.channels)
        ]
        try:
            stubs = [ledger_pb2_grpc.LedgerServiceStub(c) for c in channels]
            stub = stubs[0]
            funding = str(uuid.uuid4())
            await stub.CreateAccounts(
                pb.CreateAccountsRequest(
                    accounts=[pb.Account(id=funding, currency="USD", type=pb.ACCOUNT_TYPE_EXTERNAL)]
                )
            )
            print(f"creating and funding {args.accounts:,} cold and 10 hot accounts …")
            cold = await create_accounts(stub, args.accounts, funding, 10**9)
            hot = await create_accounts(stub, 10, funding, 10**12)
            pool = await asyncpg.create_pool(url, min_size=args.clients, max_size=args.clients)
            assert pool is not None
            try:
                scenarios: dict[str, tuple[list[Pair], int, int]] = {
                    # name: (accounts' pairs, batch size, clients)
                    "a_batch_api": (pairs(cold, args.batch_transfers, rng), 1000, 4),
                    "b_single_cold": (pairs(cold, args.single_transfers, rng), 1, args.clients),
                    "c_single_hot": (pairs(hot, args.single_transfers, rng), 1, args.clients),
                }
                for name, (work, size, clients) in scenarios.items():
                    if args.scenarios and name[0] not in args.scenarios:
                        continue
                    runs_ours, runs_base = [], []
                    for attempt in range(args.runs):
                        batches = [work[i : i + size] for i in range(0, len(work), size)]
                        built = requests(batches)
                        before = await cpu_seconds(pool)
                        runs_ours.append(await ours(stubs, built, clients))
                        after = await cpu_seconds(pool)
                        runs_ours[-1].cpu = {k: after[k] - before[k] for k in after}
                        base_work = work[: args.baseline_transfers]
                        runs_base.append(await baseline(pool, base_work, args.clients))
                        print(
                            f"  {name} run {attempt + 1}: ours {runs_ours[-1].tps:,.0f}/s,"
                            f" baseline {runs_base[-1].tps:,.0f}/s"
                        )
                    results["scenarios"][name] = summarise(
                        name, runs_ours, runs_base, clients, args.clients
                    )
                verify = await stub.VerifyLedger(pb.VerifyLedgerRequest(), timeout=600)
                results["verify_ok"] = verify.ok
            finally:
                await pool.close()
        finally:
            for channel in channels:
                await channel.close()
    await drop_databases(settings, PREFIX)
    return results


def summarise(
    name: str,
    ours_runs: list[Measure],
    base_runs: list[Measure],
    clients: int,
    base_clients: int,
) -> dict[str, Any]:
    """Medians over the runs; latency percentiles from the median run."""

    def mid(runs: list[Measure]) -> Measure:
        return sorted(runs, key=lambda m: m.tps)[len(runs) // 2]

    ours_mid, base_mid = mid(ours_runs), mid(base_runs)
    ours_tps = median([m.tps for m in ours_runs])
    base_tps = median([m.tps for m in base_runs])
    target: dict[str, float] = TARGETS.get(name, {})
    ratio = ours_tps / base_tps if base_tps else 0.0
    return {
        "clients": clients,
        "baseline_connections": base_clients,
        "ours": {**ours_mid.summary(), "transfers_per_s": round(ours_tps, 1)},
        "baseline": {**base_mid.summary(), "transfers_per_s": round(base_tps, 1)},
        "ratio": round(ratio, 2),
        "per_run_tps": {
            "ours": [round(m.tps, 1) for m in ours_runs],
            "baseline": [round(m.tps, 1) for m in base_runs],
        },
        # Over all runs of ours: CPU microseconds per transfer, by process
        "cpu_us_per_transfer": {
            who: round(
                1e6
                * sum(m.cpu.get(who, 0.0) for m in ours_runs)
                / sum(m.transfers for m in ours_runs),
                1,
            )
            for who in ("ledger", "postgres", "client")
        },
        "target": target,
        "meets_target": all(
            (ours_tps >= v if k == "ours_tps" else ratio >= v) for k, v in target.items()
        ),
    }


def headlines(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures with targets, for bench.report's summary."""
    out: list[dict[str, Any]] = []
    for name, s in results["scenarios"].items():
        ours, base = s["ours"]["transfers_per_s"], s["baseline"]["transfers_per_s"]
        target = s["target"]
        out.append(
            {
                "metric": f"{name} transfers",
                "value": ours,
                "unit": "/s",
                "target": target.get("ours_tps"),
                "better": "higher",
                "baseline": base,
            }
        )
        if "ratio" in target:
            out.append(
                {
                    "metric": f"{name} ours / baseline",
                    "value": s["ratio"],
                    "unit": "ratio",
                    "target": target["ratio"],
                    "better": "higher",
                }
            )
        out.append(
            {
                "metric": f"{name} p99",
                "value": s["ours"]["p99_ms"],
                "unit": "ms",
                "target": None,
                "better": "lower",
                "baseline": s["baseline"]["p99_ms"],
            }
        )
    return out  # fmt: skip


def print_table(results: dict[str, Any]) -> None:
    header = (
        f"{'scenario':<16}{'ours/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'base/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>8}  target"
    )
    print(header)
    print("-" * len(header))
    for name, s in results["scenarios"].items():
        o, b = s["ours"], s["baseline"]
        target = ", ".join(f"{k} ≥ {v:,}" for k, v in s["target"].items())
        mark = "met" if s["meets_target"] else "MISSED"
        print(
            f"{name:<16}{o['transfers_per_s']:>10,.0f}{o['p50_ms']:>9.2f}{o['p99_ms']:>9.2f}"
            f"{b['transfers_per_s']:>10,.0f}{b['p50_ms']:>9.2f}{b['p99_ms']:>9.2f}"
            f"{s['ratio']:>8.2f}  {target} ({mark})"
        )
    for name, s in results["scenarios"].items():
        cpu = ", ".join(f"{who} {us:,.0f}" for who, us in s["cpu_us_per_transfer"].items())
        print(f"{name}: CPU per transfer (us): {cpu}")
    print(f"VerifyLedger after the run: {'ok' if results.get('verify_ok') else 'FAILED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--batch-transfers", type=int, default=40_000)
    parser.add_argument("--single-transfers", type=int, default=12_000)
    parser.add_argument("--baseline-transfers", type=int, default=6_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1, help="ledger processes on one port")
    parser.add_argument("--channels", type=int, default=8, help="client connections")
    parser.add_argument(
        "--scenarios", default="", help="letters of the scenarios to run (say ab); all by default"
    )
    args = parser.parse_args()
    results = asyncio.run(run(args))
    results["config"] = {k: v for k, v in vars(args).items()}
    results["headlines"] = headlines(results)
    path = write_results("ledger", results)
    print()
    print_table(results)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
