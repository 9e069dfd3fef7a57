"""The shared runtime over real sockets and a real PostgreSQL: health that
follows dependencies, drain on stop, error mapping, request ids, and
migrations applied once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from services.common.db import MigrationError, migrate
from services.common.errors import DeadlineExceeded, InvalidArgument, from_rpc_error
from services.common.interceptors import deadline_var, peer_channel
from services.common.logging import request_id_var
from services.common.server import GrpcService, serve
from tests.conftest import TestRun

SERVICE = "moneta.test.v1.ProbeService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _identity(data: bytes) -> bytes:
    return data


@dataclass
class Running:
    address: str
    stop: asyncio.Event
    task: asyncio.Task[None]
    dependency_up: dict[str, bool]


def _probe_handlers(behaviours: dict[str, Callable[[], Any]]) -> grpc.GenericRpcHandler:
    def handler(name: str) -> grpc.RpcMethodHandler:
        async def run(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return str(behaviours[name]()).encode()

        return grpc.unary_unary_rpc_method_handler(
            run, request_deserializer=_identity, response_serializer=_identity
        )

    return grpc.method_handlers_generic_handler(SERVICE, {n: handler(n) for n in behaviours})


def _request_id() -> str:
    return request_id_var.get() or ""


def _refuse() -> str:
    raise InvalidArgument(
        "amount must be positive", reason="INVALID_AMOUNT", details={"field": "amount"}
    )


def _crash() -> str:
    raise RuntimeError("secret internals: password=hunter2")


# What a handler meets when its database connection is lost: set by the test
# from a real lost connection, raised by the probe's "LoseDatabase".
_LOST_CONNECTION: list[BaseException] = []


def _lose_database() -> str:
    raise _LOST_CONNECTION[0]


@pytest.fixture
async def probe_server() -> AsyncIterator[Running]:
    port = _free_port()
    up = {"db": True}

    async def dependency() -> None:
        if not up["db"]:
            raise ConnectionError("db is down")

    service = GrpcService(
        name="probe",
        host="127.0.0.1",
        port=port,
        register=lambda server: server.add_generic_rpc_handlers(
            (
                _probe_handlers(
                    {
                        "RequestId": _request_id,
                        "Refuse": _refuse,
                        "Crash": _crash,
                        "LoseDatabase": _lose_database,
                    }
                ),
            )
        ),
        service_names=[SERVICE],
        dependencies={"db": dependency},
        readiness_interval_seconds=0.05,
        grace_seconds=1.0,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve(service, stop))
    running = Running(f"127.0.0.1:{port}", stop, task, up)
    await _wait_for_status(running.address, SERVICE, SERVING)
    yield running
    stop.set()
    await asyncio.wait_for(task, 10)


async def _status(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=1.0
        )
        return int(response.status)


async def _wait_for_status(address: str, service: str, wanted: int, seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    last: object = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            last = await _status(address, service)
            if last == wanted:
                return
        except grpc.aio.AioRpcError as exc:
            last = exc.code()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{service!r} stayed {last}, never {wanted}")


async def _call(address: str, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    async with grpc.aio.insecure_channel(address) as channel:
        rpc = channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=_identity, response_deserializer=_identity
        )
        return bytes(await rpc(b"", metadata=metadata, timeout=2.0))


async def test_readiness_follows_dependencies_while_liveness_stays_serving(
    probe_server: Running,
) -> None:
    probe_server.dependency_up["db"] = False
    await _wait_for_status(probe_server.address, SERVICE, NOT_SERVING)
    assert await _status(probe_server.address, "") == SERVING

    probe_server.dependency_up["db"] = True
    await _wait_for_status(probe_server.address, SERVICE, SERVING)


async def test_stopping_reports_not_serving_and_then_closes(probe_server: Running) -> None:
    async with grpc.aio.insecure_channel(probe_server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING

        probe_server.stop.set()

        assert (await watch.read()).status == NOT_SERVING
    await asyncio.wait_for(probe_server.task, 10)


async def test_request_id_from_metadata_reaches_the_handler(probe_server: Running) -> None:
    answer = await _call(probe_server.address, "RequestId", (("x-request-id", "req-123"),))

    assert answer == b"req-123"


async def test_client_channel_passes_the_current_request_id_on(probe_server: Running) -> None:
    token = request_id_var.set("outgoing-456")
    try:
        async with peer_channel(probe_server.address, timeout=2.0) as channel:
            rpc = channel.unary_unary(
                f"/{SERVICE}/RequestId",
                request_serializer=_identity,
                response_deserializer=_identity,
            )
            answer = await rpc(b"")
    finally:
        request_id_var.reset(token)

    assert answer == b"outgoing-456"


async def test_domain_error_becomes_a_status_with_its_reason(probe_server: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _call(probe_server.address, "Refuse")

    error = from_rpc_error(raised.value)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.reason, error.details) == ("INVALID_AMOUNT", {"field": "amount"})


async def test_a_successful_call_is_logged_at_debug_and_a_refused_one_at_info(
    probe_server: Running,
) -> None:
    with capture_logs() as logs:
        await _call(probe_server.address, "RequestId")
        with pytest.raises(grpc.aio.AioRpcError):
            await _call(probe_server.address, "Refuse")

    calls = {e["method"].rsplit("/", 1)[-1]: e for e in logs if e["event"] == "rpc"}
    assert (calls["RequestId"]["log_level"], calls["RequestId"]["code"]) == ("debug", "OK")
    assert (calls["Refuse"]["log_level"], calls["Refuse"]["reason"]) == ("info", "INVALID_AMOUNT")


async def test_unexpected_exception_is_internal_with_a_request_id_and_no_internals(
    probe_server: Running,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _call(probe_server.address, "Crash", (("x-request-id", "req-789"),))

    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "req-789" in (raised.value.details() or "")
    assert "hunter2" not in (raised.value.details() or "")
    assert from_rpc_error(raised.value).reason == "INTERNAL"


async def test_a_lost_database_connection_is_unavailable_not_internal(
    probe_server: Running, test_run: TestRun
) -> None:
    conn = await asyncpg.connect(test_run.settings.postgres_url)
    with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)) as lost:
        await conn.fetchval("SELECT 1")
    _LOST_CONNECTION[:] = [lost.value]

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _call(probe_server.address, "LoseDatabase")

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert from_rpc_error(raised.value).reason == "DATABASE_UNAVAILABLE"


# ---------------------------------------------------------------- migrations


def _write(folder: Path, name: str, sql: str) -> None:
    (folder / name).write_text(sql)


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r["tablename"] for r in rows}
    finally:
        await conn.close()


async def test_migrations_create_the_database_and_apply_each_file_once(
    test_run: TestRun, tmp_path: Path
) -> None:
    url = test_run.database_url("migrations_once")
    _write(tmp_path, "001_first.sql", "CREATE TABLE first (id int PRIMARY KEY);")
    _write(tmp_path, "002_second.sql", "CREATE TABLE second (id int PRIMARY KEY);")

    first = await migrate(url, tmp_path)
    second = await migrate(url, tmp_path)

    assert first == ["001_first.sql", "002_second.sql"]
    assert second == []
    assert {"first", "second", "schema_migrations"} <= await _tables(url)


async def test_concurrent_migrations_apply_once(test_run: TestRun, tmp_path: Path) -> None:
    url = test_run.database_url("migrations_race")
    await migrate(url, tmp_path)  # creates the database, no files yet
    _write(
        tmp_path, "001_counter.sql", "CREATE TABLE counter (n int); INSERT INTO counter VALUES (1);"
    )

    applied = await asyncio.gather(*(migrate(url, tmp_path) for _ in range(5)))

    assert sorted(len(a) for a in applied) == [0, 0, 0, 0, 1]
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM counter") == 1
    finally:
        await conn.close()


async def test_a_migration_edited_after_it_was_applied_stops_the_service(
    test_run: TestRun, tmp_path: Path
) -> None:
    url = test_run.database_url("migrations_drift")
    _write(tmp_path, "001_first.sql", "CREATE TABLE first (id int);")
    await migrate(url, tmp_path)
    _write(tmp_path, "001_first.sql", "CREATE TABLE first (id bigint);")

    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(url, tmp_path)


async def test_a_failing_migration_leaves_nothing_half_applied(
    test_run: TestRun, tmp_path: Path
) -> None:
    url = test_run.database_url("migrations_atomic")
    _write(tmp_path, "001_good.sql", "CREATE TABLE good (id int);")
    _write(tmp_path, "002_bad.sql", "CREATE TABLE bad (id int); SELECT no_such_function();")

    with pytest.raises(asyncpg.UndefinedFunctionError):
        await migrate(url, tmp_path)

    assert not {"good", "bad"} & await _tables(url)


async def test_a_control_character_in_any_string_field_is_invalid_argument(
    probe_server: Running,
) -> None:
    async with grpc.aio.insecure_channel(probe_server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="ledger\x00"), timeout=2.0
            )

    error = from_rpc_error(raised.value)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.reason, error.details) == ("INVALID_CHARACTERS", {"field": "service"})


async def test_a_malformed_request_id_is_replaced_by_a_fresh_one(probe_server: Running) -> None:
    answer = await _call(probe_server.address, "RequestId", (("x-request-id", "bad id;drop"),))

    assert answer != b"bad id;drop"
    assert len(answer) == 32 and int(answer, 16) >= 0


async def test_a_call_on_behalf_of_an_expired_caller_is_not_sent(probe_server: Running) -> None:
    token = deadline_var.set(asyncio.get_running_loop().time() - 1)
    try:
        async with peer_channel(probe_server.address, timeout=2.0) as channel:
            rpc = channel.unary_unary(
                f"/{SERVICE}/RequestId",
                request_serializer=_identity,
                response_deserializer=_identity,
            )
            with pytest.raises(DeadlineExceeded):
                await rpc(b"")
    finally:
        deadline_var.reset(token)
