"""The floor under every other figure: what the machine charges for the
calls Moneta is made of, with no Moneta code in them.

    make bench-floor            (python -m bench.floor --help)

- a bare ``grpc.aio`` unary call (the standard health Check) from a client
  process to a server process, flat out from 32 concurrent callers: calls
  per second, and each side's CPU per call;
- an asyncpg ``SELECT 1`` over loopback TCP and over the Unix socket when
  PostgreSQL has one: wall time and client CPU per query;
- a Redis ``PING``: wall time per round trip.

A Moneta request is a few of these in a row, so these figures bound what
the services can do on the same machine: a P2P transfer through the
gateway is six gRPC calls, about a dozen statements and a few Redis calls.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.common import machine, median, write_results
from services.common.config import CommonSettings
from services.common.infra import redis_client
from tests.processes import ROOT, die_with_parent, free_port

UNIX_SOCKET_DIR = Path("/var/run/postgresql")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _serve(port: int) -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def _calls(port: int, calls: int, callers: int) -> tuple[float, float]:
    """Elapsed seconds and client CPU seconds for ``calls`` Checks."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        for _ in range(300):  # warm-up
            await stub.Check(request)
        left = calls

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await stub.Check(request)

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return time.perf_counter() - started, time.process_time() - cpu


def grpc_floor(calls: int, callers: int) -> dict[str, float]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.floor", "--serve", str(port)],
        cwd=ROOT,
        preexec_fn=die_with_parent,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as probe:
            grpc.channel_ready_future(probe).result(timeout=30)
        before = _cpu_seconds(server.pid)
        seconds, client_cpu = asyncio.run(_calls(port, calls, callers))
        server_cpu = _cpu_seconds(server.pid) - before
    finally:
        server.kill()
        server.wait()
    return {
        "calls_per_s": round(calls / seconds, 1),
        # The server's figure includes the client's warm-up calls.
        "server_cpu_us_per_call": round(server_cpu / calls * 1e6, 1),
        "client_cpu_us_per_call": round(client_cpu / calls * 1e6, 1),
    }


async def _queries(dsn: str, queries: int) -> dict[str, float]:
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(200):
            await conn.fetchval("SELECT 1")
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(queries):
            await conn.fetchval("SELECT 1")
        return {
            "wall_us_per_query": round((time.perf_counter() - started) / queries * 1e6, 1),
            "client_cpu_us_per_query": round((time.process_time() - cpu) / queries * 1e6, 1),
        }
    finally:
        await conn.close()


async def _pings(url: str, pings: int) -> float:
    client = redis_client(url)
    try:
        for _ in range(100):
            await client.ping()
        started = time.perf_counter()
        for _ in range(pings):
            await client.ping()
        return round((time.perf_counter() - started) / pings * 1e6, 1)
    finally:
        await client.aclose()


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = CommonSettings()
    tcp = settings.postgres_url
    runs: dict[str, list[dict[str, float]]] = {"grpc": [], "postgres_tcp": [], "postgres_unix": []}
    redis_us: list[float] = []
    for attempt in range(args.runs):
        runs["grpc"].append(grpc_floor(args.calls, args.callers))
        runs["postgres_tcp"].append(asyncio.run(_queries(tcp, args.queries)))
        if (UNIX_SOCKET_DIR / ".s.PGSQL.5432").exists():
            unix = f"postgresql://postgres@/postgres?host={UNIX_SOCKET_DIR}"
            runs["postgres_unix"].append(asyncio.run(_queries(unix, args.queries)))
        redis_us.append(asyncio.run(_pings(settings.redis_url, args.queries)))
        print(
            f"  run {attempt + 1}: gRPC {runs['grpc'][-1]}, PostgreSQL {runs['postgres_tcp'][-1]}"
        )
    medians = {
        kind: {key: median([r[key] for r in results]) for key in results[0]}
        for kind, results in runs.items()
        if results
    }
    return {
        "machine": machine(),
        "runs": args.runs,
        "config": {k: v for k, v in vars(args).items() if k != "serve"},
        "medians": {**medians, "redis_ping_us": median(redis_us)},
        "per_run": {**runs, "redis_ping_us": redis_us},
    }


def headlines(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Context, not targets: the floor under the other figures."""
    m = results["medians"]
    out = [
        {"metric": "bare gRPC unary calls (flat out, 32 callers)",
         "value": m["grpc"]["calls_per_s"], "unit": "/s", "target": None, "better": "higher"},
        {"metric": "bare gRPC call, server CPU",
         "value": m["grpc"]["server_cpu_us_per_call"] / 1000, "unit": "ms", "target": None,
         "better": "lower"},
        {"metric": "bare gRPC call, client CPU",
         "value": m["grpc"]["client_cpu_us_per_call"] / 1000, "unit": "ms", "target": None,
         "better": "lower"},
        {"metric": "asyncpg SELECT 1 over TCP, round trip",
         "value": m["postgres_tcp"]["wall_us_per_query"] / 1000, "unit": "ms", "target": None,
         "better": "lower"},
        {"metric": "Redis PING, round trip",
         "value": m["redis_ping_us"] / 1000, "unit": "ms", "target": None, "better": "lower"},
    ]  # fmt: skip
    if "postgres_unix" in m:
        unix_ms = m["postgres_unix"]["wall_us_per_query"] / 1000
        out.append(
            {"metric": "asyncpg SELECT 1 over the Unix socket, round trip", "value": unix_ms,
             "unit": "ms", "target": None, "better": "lower"},
        )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    results = run(args)
    results["headlines"] = headlines(results)
    path = write_results("floor", results)
    m = results["medians"]
    print(
        f"\nbare gRPC: {m['grpc']['calls_per_s']:,.0f} calls/s flat out, "
        f"server {m['grpc']['server_cpu_us_per_call']:.0f} us + client "
        f"{m['grpc']['client_cpu_us_per_call']:.0f} us CPU per call"
    )
    print(f"asyncpg SELECT 1 over TCP: {m['postgres_tcp']}")
    if "postgres_unix" in m:
        print(f"asyncpg SELECT 1 over the Unix socket: {m['postgres_unix']}")
    print(f"Redis PING: {m['redis_ping_us']:.0f} us")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
