"""What every benchmark shares: the machine it ran on, percentiles, results
files, and a service started as a real process on a database of its own."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

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
    }


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
