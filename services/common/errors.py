"""Domain errors and their one mapping to gRPC status codes.

A domain error carries a machine reason (UPPER_SNAKE) and details. On the wire
it becomes a gRPC status whose details hold a ``google.rpc.ErrorInfo`` with
that reason, so that every client (the gateway included) can act on the reason
without parsing messages. Nothing internal ever leaves a service: an
unexpected exception becomes INTERNAL with only the request id.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "moneta"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class MonetaError(Exception):
    """A refusal that a caller can act on. Subclasses fix the status code."""

    status_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        details: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.details: dict[str, str] = {k: str(v) for k, v in (details or {}).items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason}: {self.message})"


class InvalidArgument(MonetaError):
    status_code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(MonetaError):
    status_code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(MonetaError):
    status_code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(MonetaError):
    """A business refusal: insufficient funds, budget exceeded, frozen wallet."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(MonetaError):
    """A version clash or a lost race: retrying may succeed."""

    status_code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class AttemptExpired(Aborted):
    """An attempt outlived its lease (a stall: a paused process, a long GC
    pause) and stopped before moving money; the same key, retried, is safe."""

    default_reason = "ATTEMPT_EXPIRED"

    def __init__(
        self,
        message: str = "this attempt took too long and moved nothing; retry with the same key",
        *,
        reason: str | None = None,
        details: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, details=details)


class ResourceExhausted(MonetaError):
    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RATE_LIMITED"


class PermissionDenied(MonetaError):
    status_code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(MonetaError):
    status_code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class Unavailable(MonetaError):
    """A dependency did not answer."""

    status_code = grpc.StatusCode.UNAVAILABLE
    default_reason = "DEPENDENCY_UNAVAILABLE"


class DeadlineExceeded(MonetaError):
    status_code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Unimplemented(MonetaError):
    status_code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "NOT_IMPLEMENTED"


class Internal(MonetaError):
    status_code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[MonetaError]] = {
    cls.status_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        ResourceExhausted,
        PermissionDenied,
        Unauthenticated,
        Unavailable,
        DeadlineExceeded,
        Unimplemented,
        Internal,
    )
}


def to_grpc_status(error: MonetaError) -> grpc.Status:
    """The rich status for an error: code, message, and an ErrorInfo."""
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.details
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(
        code=error.status_code.value[0], message=error.message, details=[detail]
    )
    return rpc_status.to_status(status)


def from_rpc_error(exc: grpc.aio.AioRpcError) -> MonetaError:
    """Turns a peer's failed call back into the domain error it stood for."""
    code = exc.code()
    cls = _BY_CODE.get(code, Internal)
    reason: str | None = None
    details: dict[str, str] = {}
    for key, value in exc.trailing_metadata() or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for any_detail in status.details:
            if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                any_detail.Unpack(info)
                reason = info.reason
                details = dict(info.metadata)
    if reason is None:
        # A transport failure, not a peer's answer: its text names internal
        # addresses, so it is replaced by a fixed message.
        reason, message = {
            grpc.StatusCode.UNAVAILABLE: ("DEPENDENCY_UNAVAILABLE", "a dependency is unavailable"),
            grpc.StatusCode.DEADLINE_EXCEEDED: ("DEPENDENCY_TIMEOUT", "a dependency timed out"),
            grpc.StatusCode.CANCELLED: ("CANCELLED", "the call was cancelled"),
        }.get(code, (cls.default_reason, f"a dependency failed ({code.name})"))
        return cls(message, reason=reason)
    return cls(exc.details() or code.name, reason=reason, details=details)


def unavailable_from(exc: BaseException) -> Unavailable | None:
    """An unexpected exception that is a dependency not answering (the
    database restarting or out of connections, a reset socket, Redis gone)
    as UNAVAILABLE, which tells the caller to retry later; None for anything
    else, which is a bug and stays INTERNAL."""
    import asyncpg
    from redis import exceptions as redis_errors

    if isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.exceptions.OperatorInterventionError
        | asyncpg.exceptions.InsufficientResourcesError,
    ):
        return Unavailable("the database is unavailable", reason="DATABASE_UNAVAILABLE")
    if isinstance(exc, asyncpg.InterfaceError) and "connection" in str(exc):
        return Unavailable("the database connection was lost", reason="DATABASE_UNAVAILABLE")
    if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError):
        return Unavailable("the cache is unavailable", reason="REDIS_UNAVAILABLE")
    if isinstance(exc, OSError | TimeoutError):
        return Unavailable("a dependency is unavailable", reason="DEPENDENCY_UNAVAILABLE")
    return None
