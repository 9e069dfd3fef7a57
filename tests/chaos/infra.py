"""Private PostgreSQL, Redis and RabbitMQ servers for fault injection.

The machine's own servers are shared with every other test run and
engineer: they are never stopped. A fault test that restarts a server
starts its own on free ports, in a directory of its own, as a child of the
test process (it dies with it), and may then stop, kill, pause and restart
it at will. Each keeps its data across restarts, as a real server does;
``close`` removes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.processes import free_port
from tests.tcp_proxy import TcpProxy

T = TypeVar("T")

POSTGRES_BIN = Path(os.environ.get("MONETA_CHAOS_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
EPMD = "epmd"
_PR_SET_PDEATHSIG = 1


def _dies_with_parent(sig: signal.Signals) -> None:
    """Runs in the child before exec (after it changed user): if the test
    process dies, even by SIGKILL, the server gets ``sig``."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait(predicate: object, what: str, seconds: float, process: subprocess.Popen[bytes]) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while not predicate():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer in {seconds}s")
        time.sleep(0.05)


def missing_binaries(*servers: str) -> list[str]:
    """The binaries this machine lacks to run private ``servers``
    (postgres, redis, rabbitmq; default: all three)."""
    wanted: dict[str, list[Path | str | None]] = {
        "postgres": [
            POSTGRES_BIN / "postgres",
            POSTGRES_BIN / "initdb",
            POSTGRES_BIN / "pg_isready",
        ],
        "redis": [shutil.which("redis-server")],
        "rabbitmq": [RABBITMQ_SERVER, shutil.which(EPMD)],
    }
    return [
        str(path or name)
        for name in servers or tuple(wanted)
        for path in wanted[name]
        if not path or not Path(path).exists()
    ]


@dataclass
class _Server:
    name: str
    port: int
    root: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}.log"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a network
        partition, as the clients see it)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _stop(self, sig: signal.Signals, seconds: float = 30.0) -> None:
        if self.process is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(sig)
        try:
            self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self._stop(signal.SIGKILL)


@dataclass
class PrivatePostgres(_Server):
    """A PostgreSQL cluster of its own (trust authentication; durability
    settings off, this is a test). Run as the ``postgres`` user when the
    tests run as root, since PostgreSQL refuses to run as root."""

    user: str | None = None

    @classmethod
    def create(cls) -> PrivatePostgres:
        # Not under pytest's tmp dir: its parents are private to root, and
        # the server runs as postgres.
        root = Path(tempfile.mkdtemp(prefix="moneta-chaos-pg-"))
        user = "postgres" if os.geteuid() == 0 else None
        if user is not None:
            shutil.chown(root, user)
        server = cls("postgres", free_port(), root, user=user)
        subprocess.run(
            [str(POSTGRES_BIN / "initdb"), "-D", str(root / "data"), "-A", "trust",
             "-U", "postgres", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, user=user, cwd=root,
        )  # fmt: skip
        return server

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(POSTGRES_BIN / "postgres"), "-D", str(self.root / "data"),
             "-p", str(self.port), "-k", str(self.root), "-c", "listen_addresses=127.0.0.1",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=300", "-c", "shared_buffers=64MB"],
            stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT, user=self.user,
            cwd=self.root, preexec_fn=lambda: _dies_with_parent(signal.SIGINT),
        )  # fmt: skip
        _wait(self._accepts, "postgres", 30, self.process)

    def _accepts(self) -> bool:
        ready = subprocess.run(
            [str(POSTGRES_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
            check=False,
        )
        return ready.returncode == 0

    def stop(self) -> None:
        """A fast shutdown: every client connection is cut."""
        self._stop(signal.SIGINT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class PrivateRedis(_Server):
    """A Redis without persistence: a restart starts empty, as a cache
    node that was replaced."""

    @classmethod
    def create(cls) -> PrivateRedis:
        return cls("redis", free_port(), Path(tempfile.mkdtemp(prefix="moneta-chaos-redis-")))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.root)],
            stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT, cwd=self.root,
            preexec_fn=lambda: _dies_with_parent(signal.SIGTERM),
        )  # fmt: skip
        _wait(lambda: _answers(self.port), "redis", 10, self.process)

    def stop(self) -> None:
        self._stop(signal.SIGTERM)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class PrivateRabbitMQ(_Server):
    """A RabbitMQ node of its own: its own node name, AMQP and distribution
    ports, its own epmd, data and log directories, configuration (no
    plugins; the machine's /etc/rabbitmq is not read) and Erlang cookie.
    Its durable queues and their messages survive a restart."""

    dist_port: int = 0
    epmd_port: int = 0
    node: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls) -> PrivateRabbitMQ:
        root = Path(tempfile.mkdtemp(prefix="moneta-chaos-rabbitmq-"))
        port, dist_port, epmd_port = free_port(), free_port(), free_port()
        node = f"moneta-chaos-{port}@localhost"
        (root / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"
        )
        (root / "enabled_plugins").write_text("[].\n")
        (root / "rabbitmq-env.conf").write_text("")
        env = {
            **os.environ,
            "HOME": str(root),  # the Erlang cookie is created there
            "RABBITMQ_NODENAME": node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(root / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(epmd_port),
        }
        return cls(
            "rabbitmq", port, root, dist_port=dist_port, epmd_port=epmd_port, node=node, env=env
        )

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(RABBITMQ_SERVER)],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=self.root,
            preexec_fn=lambda: _dies_with_parent(signal.SIGTERM),
        )
        _wait(lambda: _answers(self.port), "rabbitmq", 60, self.process)

    def stop(self) -> None:
        """A clean shutdown (the start script turns SIGTERM into one)."""
        self._stop(signal.SIGTERM, seconds=60)

    def close(self) -> None:
        self.stop()
        # epmd daemonises itself and outlives the node: ours alone, by port.
        with contextlib.suppress(OSError):
            subprocess.run(
                [EPMD, "-port", str(self.epmd_port), "-kill"],
                check=False,
                capture_output=True,
                timeout=10,
            )
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class PrivateInfra:
    """Private servers, some or all of them; the machine's own stand in for
    those not started here."""

    postgres: PrivatePostgres | None = None
    redis: PrivateRedis | None = None
    rabbitmq: PrivateRabbitMQ | None = None
    # Between the services and Redis, to cut them apart (None: direct).
    redis_proxy: ThreadedProxy | None = None

    @classmethod
    def start(
        cls,
        *,
        postgres: bool = True,
        redis: bool = True,
        rabbitmq: bool = True,
        redis_proxy: bool = False,
    ) -> PrivateInfra:
        infra = cls(
            PrivatePostgres.create() if postgres else None,
            PrivateRedis.create() if redis else None,
            PrivateRabbitMQ.create() if rabbitmq else None,
        )
        try:
            for server in infra.servers:
                server.start()
            if redis_proxy and infra.redis is not None:
                infra.redis_proxy = ThreadedProxy(infra.redis.port)
        except BaseException:
            infra.close()
            raise
        return infra

    @property
    def servers(self) -> list[PrivatePostgres | PrivateRedis | PrivateRabbitMQ]:
        return [s for s in (self.rabbitmq, self.postgres, self.redis) if s is not None]

    def env(self, shared: dict[str, str]) -> dict[str, str]:
        """The servers' URLs: ours where we have one, else ``shared``'s."""
        return {
            "MONETA_POSTGRES_URL": self.postgres.url
            if self.postgres
            else shared["MONETA_POSTGRES_URL"],
            "MONETA_REDIS_URL": (
                f"redis://127.0.0.1:{self.redis_proxy.port}/0"
                if self.redis_proxy
                else self.redis.url
                if self.redis
                else shared["MONETA_REDIS_URL"]
            ),
            "MONETA_AMQP_URL": self.rabbitmq.url if self.rabbitmq else shared["MONETA_AMQP_URL"],
        }

    def close(self) -> None:
        if self.redis_proxy is not None:
            self.redis_proxy.close()
        for server in reversed(self.servers):
            with contextlib.suppress(Exception):
                server.close()


class ThreadedProxy:
    """tests/tcp_proxy.py's TcpProxy on an event loop of its own, in a
    thread: it keeps forwarding while the test's loop is blocked (starting
    processes) and outlives any one test. ``go_dark`` cuts every connection
    (RST: what was in flight is lost) and refuses new ones, as a network
    partition; ``restore`` ends it."""

    def __init__(self, target_port: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._proxy = self._call(TcpProxy("127.0.0.1", target_port).start())

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    @property
    def port(self) -> int:
        return self._proxy.port

    def go_dark(self) -> None:
        self._loop.call_soon_threadsafe(self._proxy.go_dark)

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(self._proxy.restore)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._proxy.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
