"""Starting services as real processes for tests: free ports, the run's own
databases, readiness awaited, SIGTERM (or SIGKILL) to stop."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
SERVICE_NAMES = {
    "ledger": "moneta.ledger.v1.LedgerService",
    "wallet": "moneta.wallet.v1.WalletService",
    "budget": "moneta.budget.v1.BudgetService",
    "fraud": "moneta.fraud.v1.FraudService",
}


def die_with_parent() -> None:
    """Runs in the child before exec: if the test process dies (even by
    SIGKILL), the kernel sends the service SIGTERM, so no service outlives
    its test run."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    """One service as a child process. ``start`` may be called again after a
    stop or a kill: same port, same database."""

    name: str
    env: dict[str, str]
    log_path: Path
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None)
    # What runs: ``python -m services.<module or name> <args>``.
    module: str = ""
    args: tuple[str, ...] = ()
    # Readiness: this gRPC health name (default: the service's own), or for
    # an HTTP service a URL that answers 200 once ready.
    health_name: str = ""
    ready_url: str = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait_seconds: float = 60.0) -> None:
        self.launch()
        self.wait_ready(wait_seconds)

    def launch(self) -> None:
        """Starts the process without waiting for it (to start several at
        once, then ``wait_ready`` each)."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.module or self.name}", *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )

    def wait_ready(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        if self.ready_url:
            self._wait_http_ready(deadline, seconds)
            return
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
                try:
                    response = stub.Check(
                        health_pb2.HealthCheckRequest(
                            service=self.health_name or SERVICE_NAMES[self.name]
                        ),
                        timeout=1,
                    )
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} was not ready in {seconds}s")

    def _wait_http_ready(self, deadline: float, seconds: float) -> None:
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.ready_url, timeout=1) as response:  # noqa: S310
                    if response.status == 200:
                        return
            except OSError:  # refused, or 503 (HTTPError) while not ready
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} was not ready in {seconds}s")

    def pause(self) -> None:
        """SIGSTOP: the process holds its connections and answers nothing."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM, then wait for the drain."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.send_signal(signal.SIGCONT)  # a paused process must see it
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, as a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def service_process(
    name: str, base_env: dict[str, str], log_dir: Path, **settings: str
) -> ServiceProcess:
    port = free_port()
    env = {
        **os.environ,
        **base_env,
        "MONETA_GRPC_HOST": "127.0.0.1",
        "MONETA_LOG_FORMAT": "json",
        "MONETA_READINESS_INTERVAL_SECONDS": "0.5",
        "MONETA_SHUTDOWN_GRACE_SECONDS": "2",
        f"MONETA_{name.upper()}_PORT": str(port),
        f"MONETA_{name.upper()}_METRICS_PORT": "0",
        **settings,
    }
    return ServiceProcess(name, env, log_dir / f"{name}.log", port)
