"""What every benchmark shares: the machine it ran on, percentiles, results
files, and a service started as a real process on a database of its own."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from services.common.config import CommonSettings
from tests.processes import ServiceProcess, service_process

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """The machine and versions a figure was measured on."""
    with open("/proc/meminfo") as meminfo:
        mem_kb = int(meminfo.readline().split()[1])
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "postgres": _postgres_version(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        # How long a thread takes to wake another and be woken back: about
        # 10-20 us on a healthy machine. A VM whose host is crowded shows
        # ten times that, and every gRPC call pays it: such figures say
        # more about the machine than about Moneta.
        "thread_wakeup_round_trip_us": _thread_round_trip_us(),
    }


def _thread_round_trip_us(rounds: int = 2000) -> float:
    there: queue.SimpleQueue[int] = queue.SimpleQueue()
    back: queue.SimpleQueue[int] = queue.SimpleQueue()

    def echo() -> None:
        while (item := there.get()) >= 0:
            back.put(item)

    worker = threading.Thread(target=echo, daemon=True)
    worker.start()
    started = time.perf_counter()
    for i in range(rounds):
        there.put(i)
        back.get()
    elapsed = time.perf_counter() - started
    there.put(-1)
    worker.join()
    return round(elapsed / rounds * 1e6, 1)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _postgres_version() -> str:
    try:
        out = subprocess.run(
            ["psql", "--version"], capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip()
    except OSError:
        return "unknown"


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; 0 for no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def write_results(name: str, results: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def bench_settings(prefix: str) -> CommonSettings:
    """Settings whose databases are the benchmark's own."""
    return CommonSettings().model_copy(update={"db_prefix": prefix})


async def drop_databases(settings: CommonSettings, prefix: str) -> None:
    conn = await asyncpg.connect(settings.database_url("x").rsplit("/", 1)[0] + "/postgres")
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1",
            prefix.replace("_", r"\_") + "%",
        )
        for row in rows:
            quoted = '"' + row["datname"].replace('"', '""') + '"'
            await conn.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
    finally:
        await conn.close()


@contextmanager
def running_service(
    name: str, prefix: str, replicas: int = 1, **settings: str
) -> Iterator[ServiceProcess]:
    """The service as real processes on databases named with ``prefix``:
    ``replicas`` of them share one port (SO_REUSEPORT), as replicas of a
    deployment would share a Service."""
    base = CommonSettings()
    env = {
        "MONETA_POSTGRES_URL": base.postgres_url,
        "MONETA_DB_PREFIX": prefix,
        "MONETA_LOG_LEVEL": "WARNING",
        "MONETA_GRPC_REUSE_PORT": "true" if replicas > 1 else "false",
        **settings,
    }
    with tempfile.TemporaryDirectory() as logs:
        first = service_process(name, env, Path(logs))
        processes = [first] + [
            ServiceProcess(name, first.env, Path(logs) / f"{name}-{i}.log", first.port)
            for i in range(1, replicas)
        ]
        try:
            for process in processes:
                process.start()
            yield first
        finally:
            for process in processes:
                process.stop()
                if process.process is not None and process.process.returncode not in (0, None):
                    sys.stderr.write(process.log_path.read_text()[-2000:])


Call = Callable[[], Coroutine[Any, Any, float | None]]


async def timed_call(call: Awaitable[Any]) -> float | None:
    """The call's latency in ms, or None when it failed with an RPC error."""
    started = time.perf_counter()
    try:
        await call
    except grpc.aio.AioRpcError:
        return None
    return (time.perf_counter() - started) * 1000


@contextmanager
def client_collector_paused() -> Iterator[None]:
    """The benchmark client's own garbage collector off while it measures.
    Its heap grows with every request it keeps, and a full collection of it
    took 13-36 ms here: every request in flight then would count the
    client's pause as the service's latency. What it made meanwhile is
    collected later; what it had before is frozen, never scanned again."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def open_loop(one: Call, rate: int, seconds: float) -> dict[str, Any]:
    """Starts ``one()`` every 1/rate s for ``seconds`` (open loop: a slow
    answer does not slow the arrivals down) and measures each from its due
    time, not from when the client got round to sending it: a client that
    falls behind (its event loop busy, its process waiting for a core) shows
    as latency instead of hiding it (coordinated omission).

    The arrivals are paced by a thread that sleeps to each due time and
    wakes the event loop (``call_soon_threadsafe``): the loop's own timers
    wake up to a millisecond late (epoll's timeout is whole milliseconds),
    which would add up to 1 ms of the client's lateness to every figure.
    How late each call still started is reported as ``send_lag``."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[tuple[float, float] | None]] = []
    count = int(rate * seconds)

    async def due_at(due: float) -> tuple[float, float] | None:
        sent = time.perf_counter()
        if await one() is None:
            return None
        return (time.perf_counter() - due) * 1000, (sent - due) * 1000

    def launch(due: float) -> None:
        tasks.append(loop.create_task(due_at(due)))

    def pace() -> None:
        for i in range(count):
            due = started + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            loop.call_soon_threadsafe(launch, due)

    with client_collector_paused():
        started = time.perf_counter()
        # Every launch is queued on the loop before the pacer's own completion.
        await asyncio.to_thread(pace)
        answers = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    answered = [a for a in answers if a is not None]
    latencies = [a[0] for a in answered]
    lags = [a[1] for a in answered]
    return {
        "offered_per_s": rate,
        "achieved_per_s": round(len(latencies) / elapsed, 1),
        "failed": len(answers) - len(latencies),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "send_lag_p99_ms": round(percentile(lags, 99), 2),
        "count": len(answers),
    }


async def closed_loop(one: Call, clients: int, count: int) -> dict[str, Any]:
    """``count`` calls of ``one()`` from ``clients`` workers, each starting
    its next as soon as its last is answered (flat out)."""
    latencies: list[float] = []
    failed = 0
    remaining = count

    async def worker() -> None:
        nonlocal remaining, failed
        while remaining > 0:
            remaining -= 1
            latency = await one()
            if latency is None:
                failed += 1
            else:
                latencies.append(latency)

    with client_collector_paused():
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "failed": failed,
    }
